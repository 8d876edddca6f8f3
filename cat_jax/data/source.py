"""One data-source interface, and the gin switch that picks the source of a run.

A `DataSource` answers every question the trainer, the evaluation and the cascades ask of their
data: a task or mixture by name (an object with seqio's `name`, `tasks`, `get_rate`, `splits`,
`postprocess_fn`, `predict_metric_fns`), its vocabulary, its mixture rates and a split as
`ExampleArrays`, and the training batches. Three sources exist, one per run, chosen by one gin
setting and logged:
  - the live seqio pipeline (`SeqioSource`, the default), in memory;
  - `--gin.data_source.exported_dir=DIR`: the .npz files `python -m cat_jax.export_task` wrote
    (`ExportedSource`, no TensorFlow or seqio needed), in memory, the same batches as live seqio;
  - `--gin.data_source.streaming_dir=DIR`: sharded ArrayRecord files streamed by grain
    (`cat_jax.data.streaming`), for splits too large for memory (WMT, FLAN, pretraining corpora).
In memory, a training batch is a pure function of (seed, step) over the loaded arrays; streamed, it
is read from disk and its position is saved in the checkpoint. Use the in-memory path for splits
that fit comfortably in host memory (it is simpler and fast); stream the others.
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Mapping
from typing import Any

import gin

from cat_jax.data.arrays import ExampleArrays


class DataSource(abc.ABC):
    """Where a run's tasks, vocabularies and examples come from."""

    kind: str = ""

    @abc.abstractmethod
    def describe(self) -> str:
        """Provenance for run_info.json: "seqio" or "exported:<dir>"."""

    @abc.abstractmethod
    def provider(self, name: str) -> Any:
        """The task or mixture `name`; UnknownTaskError (with close matches) when there is none."""

    @abc.abstractmethod
    def vocabulary(self, name: str) -> Any:
        """The targets vocabulary of a task or mixture (its tasks must all share it)."""

    @abc.abstractmethod
    def load_split(self, name: str, split: str, lengths: Mapping[str, int],
                   max_examples: int | None = None, cache_dir: str | None = None) -> ExampleArrays:
        """Every example of `split` this source holds, each sub-task of a mixture in turn.

        `max_examples` is applied by the caller (`cat_jax.data.load_split`, a uniform sample per
        task); a source whose data was capped checks here that it holds enough.
        """

    def default_vocabulary_from(self, model_dir: str) -> None:
        """Tokenize with the vocabulary `model_dir` stores unless the configuration names one (a
        source whose data is already tokenized ignores this)."""

    def train_batches(self, name: str, split: str, lengths: Mapping[str, int], batch_size: int, seed: int,
                      max_examples: int | None, rows: tuple[int, int]) -> Any:
        """The training batches: `.batch(step)` gives this process's rows (block `rows[0]` of
        `rows[1]`) of global batch `step`; `.iterator` is a data iterator whose state the checkpoint
        must hold, or None (in memory: the step is the position)."""
        from cat_jax.data.batches import InMemoryBatches  # pylint: disable=import-outside-toplevel
        from cat_jax.data.loading import load_split  # pylint: disable=import-outside-toplevel

        arrays = load_split(name, split, lengths, max_examples, source=self)  # load_split.cache_dir applies
        return InMemoryBatches(arrays, batch_size, seed, self.mixture_rates(name), rows)

    def leaf_tasks(self, name: str) -> list[Any]:
        """The tasks of a mixture, or [the task]."""
        provider = self.provider(name)
        return list(provider.tasks) if hasattr(provider, "tasks") else [provider]

    def mixture_rates(self, name: str) -> dict[str, float] | None:
        """{task: rate} of a mixture, None for a single task."""
        provider = self.provider(name)
        if not hasattr(provider, "tasks"):
            return None
        return {task.name: float(provider.get_rate(task)) for task in provider.tasks}


@functools.lru_cache(maxsize=None)
def _seqio_source() -> DataSource:
    from cat_jax.data.seqio_source import SeqioSource  # pylint: disable=import-outside-toplevel
    return SeqioSource()


def exported_source(directory: str) -> DataSource:
    """The export in `directory` (rebuilt when one of its manifests changes)."""
    from cat_jax.data.exported import registry  # pylint: disable=import-outside-toplevel
    return registry(directory)


def live_source() -> DataSource:
    """The live seqio pipeline, whatever `data_source` says (the export job reads it)."""
    return _seqio_source()


@functools.lru_cache(maxsize=None)
def _streaming_source(directory: str) -> DataSource:
    from cat_jax.data.streaming import StreamingSource  # pylint: disable=import-outside-toplevel
    if not os.path.isdir(directory):
        from cat_jax.errors import ExportedDataError  # pylint: disable=import-outside-toplevel
        raise ExportedDataError(f"data_source.streaming_dir={directory!r} is not a directory; export there "
                                "first with python -m cat_jax.export_task --gin.export_split.format='array_record'.")
    return StreamingSource(directory)


@gin.configurable
def data_source(exported_dir: str | None = None, streaming_dir: str | None = None) -> DataSource:
    """The source of every task look-up of this run: the live seqio pipeline (default), with
    `--gin.data_source.exported_dir=/path` the .npz files `python -m cat_jax.export_task` wrote
    there, or with `--gin.data_source.streaming_dir=/path` its ArrayRecord shards, streamed.

    It switches every look-up together (arrays, vocabulary, mixture rates, metrics), which is why it
    is its own configurable rather than a parameter of `load_split`.
    """
    if exported_dir and streaming_dir:
        from cat_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
        raise ConfigError("data_source: give exported_dir or streaming_dir, not both.")
    if exported_dir:
        return exported_source(os.path.abspath(os.path.expanduser(exported_dir)))
    if streaming_dir:
        return _streaming_source(os.path.abspath(os.path.expanduser(streaming_dir)))
    return _seqio_source()
