"""Data: tasks and mixtures -> fixed-shape numpy arrays -> deterministic batches.

    arrays.py        ExampleArrays (the leaf: plain numpy) and the MAX_EXAMPLES sample
    source.py        the DataSource interface and the gin switch `data_source`
    seqio_source.py  the live seqio pipeline (seqio/TensorFlow imported on first use), its cache
    exported.py      the files `python -m cat_jax.export_task` writes, read without TensorFlow
    export.py        writing those files
    loading.py       load_split and the look-ups of the configured source
    batches.py       TrainBatches (a pure function of (seed, step)) and eval_batches

Only the seqio source touches seqio or TensorFlow, and only when asked for data.
"""

from cat_jax.data.arrays import (LENGTH_FIELDS, MODEL_FEATURES, SAMPLE_SEED, TEXT_FIELDS, ExampleArrays,
                                 sample_per_task)
from cat_jax.data.batches import TrainBatches, eval_batches
from cat_jax.data.loading import (get_task_or_mixture, get_vocabulary_of, load_split,
                                  load_split_from, mixture_rates)
from cat_jax.data.source import DataSource, data_source, live_source

__all__ = [
    "DataSource", "ExampleArrays", "LENGTH_FIELDS", "MODEL_FEATURES", "SAMPLE_SEED", "TEXT_FIELDS",
    "TrainBatches", "data_source", "eval_batches", "get_task_or_mixture", "get_vocabulary_of",
    "live_source", "load_split", "load_split_from", "mixture_rates", "sample_per_task",
]
