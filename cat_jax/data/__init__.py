"""Data: tasks and mixtures -> fixed-shape numpy arrays -> deterministic batches.

    config.py        DatasetConfig: which split, lengths, batches (every job's)
    arrays.py        ExampleArrays (the leaf: plain numpy) and the MAX_EXAMPLES sample
    batches.py       TrainBatches (a pure function of (seed, step)) and eval_batches
    source.py        the DataSource interface; load_split_from: a source's split, sampled and checked
    seqio_source.py  the live seqio pipeline (seqio/TensorFlow imported on first use), its cache
    manifest.py      export manifests: the one writer, and the function names they store
    file_source.py   the base of the two file sources: manifests -> tasks, mixtures, vocabularies
    exported.py      the .npz files `python -m cat_jax.export_task` writes, read without TensorFlow
    streaming.py     its ArrayRecord shards, streamed by grain (and the stream's checkpointed state)
    jsonl_source.py  INPUT_FILE: a JSONL file of prompts as a one-off task (eval, infer)
    loading.py       the gin switch `data_source`, load_split and the other look-ups through it
    stream_export.py the streaming export: ArrayRecord shards, resumable, never whole in memory

Imports flow down this list (the export job is `cat_jax.jobs.export_task`). Only the seqio source
touches seqio or TensorFlow, and only when asked for data.
"""

from cat_jax.data.arrays import LENGTH_FIELDS, MODEL_FEATURES, SAMPLE_SEED, TEXT_FIELDS, ExampleArrays, sample_per_task
from cat_jax.data.batches import TrainBatches, eval_batches
from cat_jax.data.config import DatasetConfig
from cat_jax.data.loading import (
    data_source,
    get_task_or_mixture,
    get_vocabulary_of,
    live_source,
    load_split,
    mixture_rates,
)
from cat_jax.data.source import DataSource, load_split_from

__all__ = [
    "DataSource",
    "DatasetConfig",
    "ExampleArrays",
    "LENGTH_FIELDS",
    "MODEL_FEATURES",
    "SAMPLE_SEED",
    "TEXT_FIELDS",
    "TrainBatches",
    "data_source",
    "eval_batches",
    "get_task_or_mixture",
    "get_vocabulary_of",
    "live_source",
    "load_split",
    "load_split_from",
    "mixture_rates",
    "sample_per_task",
]
