"""The run's data source (the gin switch `data_source`) and the look-ups that go through it:
`load_split`, `get_task_or_mixture`, `get_vocabulary_of`, `mixture_rates`."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import gin

from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.exported import ExportedSource
from cat_jax.data.jsonl_source import JsonlSource
from cat_jax.data.seqio_source import SeqioSource
from cat_jax.data.source import DataSource, load_split_from
from cat_jax.data.streaming import StreamingSource
from cat_jax.errors import ConfigError


@functools.lru_cache(maxsize=None)
def live_source() -> DataSource:
    """The live seqio pipeline, whatever `data_source` says (the export job reads it)."""
    return SeqioSource()


@gin.configurable
def data_source(
    exported_dir: str | None = None, streaming_dir: str | None = None, input_file: str | None = None
) -> DataSource:
    """The source of every task look-up of this run: the live seqio pipeline (default), with
    `--gin.data_source.exported_dir=/path` the .npz files `python -m cat_jax.export_task` wrote
    there, with `--gin.data_source.streaming_dir=/path` its ArrayRecord shards, streamed, or with
    `input_file` (the run files' INPUT_FILE) a JSONL file of prompts as a one-off task
    (`cat_jax.data.jsonl_source`).

    It switches every look-up together (arrays, vocabulary, mixture rates, metrics), which is why it
    is its own configurable rather than a parameter of `load_split`.
    """
    if sum(bool(x) for x in (exported_dir, streaming_dir, input_file)) > 1:
        raise ConfigError("data_source: give one of exported_dir, streaming_dir and input_file (INPUT_FILE).")
    if input_file:
        return JsonlSource.open(input_file)
    if exported_dir:
        return ExportedSource.open(exported_dir)
    if streaming_dir:
        return StreamingSource.open(streaming_dir)
    return live_source()


_CONFIGURED = object()  # load_split(cache_dir=...) not given: gin's load_split.cache_dir applies


def load_split(
    mixture_or_task_name: str,
    split: str,
    task_feature_lengths: Mapping[str, int],
    max_examples: int | None = None,
    cache_dir: str | None | object = _CONFIGURED,
    source: DataSource | None = None,
) -> ExampleArrays:
    """The examples of a split in a fixed order (a mixture: each sub-task in turn), from `source`
    (default: the configured one); see `cat_jax.data.source.load_split_from`.

    `task_feature_lengths` is {"inputs": Li, "targets": Lt}. `max_examples` keeps a uniform sample
    of that many examples of each task. `cache_dir` (seqio source only; default
    `--gin.load_split.cache_dir`, else "auto"): where tokenized splits are kept, None for no cache.

    With `data_source.exported_dir`, the split is read from `<exported_dir>/<name>.<split>.npz`
    (no TensorFlow, no seqio); a missing file, or one exported with other lengths or a smaller cap,
    is refused with the export command that fixes it.
    """
    options = {} if cache_dir is _CONFIGURED else {"cache_dir": cache_dir}
    return load_split_from(
        source or data_source(), mixture_or_task_name, split, task_feature_lengths, max_examples, **options
    )


def get_task_or_mixture(name: str):
    """The task or mixture of the configured source (seqio's, or an exported stand-in)."""
    return data_source().provider(name)


def get_vocabulary_of(name: str):
    """The targets vocabulary of a task or mixture of the configured source."""
    return data_source().vocabulary(name)


def mixture_rates(name: str) -> dict[str, float] | None:
    """{task: rate} of a mixture (for TrainBatches), None for a single task."""
    return data_source().mixture_rates(name)
