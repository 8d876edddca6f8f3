"""The data-source interface, and a split of a source sampled and checked (`load_split_from`).

A `DataSource` answers every question the trainer, the evaluation and the cascades ask of their
data: a task or mixture by name (an object with seqio's `name`, `tasks`, `get_rate`, `splits`,
`postprocess_fn`, `predict_metric_fns`), its vocabulary, its mixture rates and a split as
`ExampleArrays`, and the training batches. Three sources exist, one per run, chosen by the gin switch
`cat_jax.data.loading.data_source` and logged:
  - the live seqio pipeline (`cat_jax.data.seqio_source.SeqioSource`, the default), in memory;
  - the .npz files `python -m cat_jax.export_task` wrote (`cat_jax.data.exported.ExportedSource`, no
    TensorFlow or seqio needed), in memory, the same batches as live seqio;
  - sharded ArrayRecord files streamed by grain (`cat_jax.data.streaming.StreamingSource`), for
    splits too large for memory (WMT, FLAN, pretraining corpora).
In memory, a training batch is a pure function of (seed, step) over the loaded arrays; streamed, it
is read from disk and its position is saved in the checkpoint. Use the in-memory path for splits
that fit comfortably in host memory (it is simpler and fast); stream the others.

This module imports no source: the sources import it.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import Any

import gin
import numpy as np

from cat_jax.data.arrays import SAMPLE_SEED, ExampleArrays, sample_per_task
from cat_jax.data.batches import InMemoryBatches
from cat_jax.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"  # load_split.cache_dir: the default cache directory (cat_jax.data.seqio_source)


class DataSource(abc.ABC):
    """Where a run's tasks, vocabularies and examples come from."""

    kind: str = ""
    # The one task a source serves whatever the configuration names (an INPUT_FILE's), else None.
    task_name: str | None = None
    # Whether its examples carry targets to score (an INPUT_FILE's lines may have none).
    has_targets: bool = True

    @property
    def data_order(self) -> str:
        """How a run reads its training batches, as run_info.json and a teacher cache record it:
        "streamed" (grain, from ArrayRecord shards) or "in_memory" (every other source: the same order)."""
        return "streamed" if self.kind == "streaming" else "in_memory"

    @abc.abstractmethod
    def describe(self) -> str:
        """Provenance for run_info.json: "seqio", "exported:<dir>" or "streaming:<dir>"."""

    @abc.abstractmethod
    def provider(self, name: str) -> Any:
        """The task or mixture `name`; UnknownTaskError (with close matches) when there is none."""

    @abc.abstractmethod
    def vocabulary(self, name: str) -> Any:
        """The targets vocabulary of a task or mixture (its tasks must all share it)."""

    @abc.abstractmethod
    def load_split(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        max_examples: int | None = None,
        cache_dir: str | None = None,
    ) -> ExampleArrays:
        """Every example of `split` this source holds, each sub-task of a mixture in turn.

        `max_examples` is applied by the caller (`load_split_from`, a uniform sample per task); a
        source whose data was capped checks here that it holds enough.
        """

    def default_vocabulary_from(self, model_dir: str) -> None:
        """Tokenize with the vocabulary `model_dir` stores unless the configuration names one (a
        source whose data is already tokenized ignores this)."""

    def train_batches(
        self,
        name: str,
        split: str,
        lengths: Mapping[str, int],
        batch_size: int,
        seed: int,
        max_examples: int | None,
        rows: tuple[int, int],
        pack_input_overhead: int | None = None,
    ) -> Any:
        """The training batches: `.batch(step)` gives this process's rows (block `rows[0]` of
        `rows[1]`) of global batch `step`; `.iterator` is a data iterator whose state the checkpoint
        must hold, or None (in memory: the step is the position); `.packed` whether its rows are
        packed, as they are when `pack_input_overhead` (the tokens a family adds to each example's
        inputs, `Model.packing_input_overhead`) is not None."""
        arrays = load_split_from(self, name, split, lengths, max_examples)  # load_split.cache_dir applies
        return InMemoryBatches(arrays, batch_size, seed, self.mixture_rates(name), rows, pack_input_overhead)

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


def _warn_truncation(name: str, split: str, arrays: ExampleArrays, lengths: Mapping[str, int]) -> None:
    truncated = {"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets}
    if any(truncated.values()):
        longest = {"inputs": int(arrays.input_lengths.max()), "targets": int(arrays.target_lengths.max())}
        log.warning(
            "%s/%s: %d of %d examples have inputs longer than %d tokens and %d targets longer than %d "
            "(EOS included); they were truncated. To keep them whole raise TASK_FEATURE_LENGTHS to %s.",
            name,
            split,
            truncated["inputs"],
            len(arrays),
            lengths["inputs"],
            truncated["targets"],
            lengths["targets"],
            longest,
        )


@gin.configurable("load_split", allowlist=["cache_dir"])
def load_split_from(
    source: DataSource,
    name: str,
    split: str,
    lengths: Mapping[str, int],
    max_examples: int | None = None,
    cache_dir: str | None = AUTO,
) -> ExampleArrays:
    """The examples of a split of `source` in a fixed order (a mixture: each sub-task in turn).

    `lengths` is {"inputs": Li, "targets": Lt}; longer examples are counted (and logged) before
    truncation. `max_examples` keeps a uniform sample of that many examples of each task
    (`cat_jax.data.arrays.sample_per_task`), in their split order. `cache_dir` (seqio source only):
    where tokenized splits are kept ("auto": `$CAT_JAX_CACHE_DIR` or ~/.cache/cat_jax/data, for
    tasks whose code is in files; None: no cache; see `cat_jax.data.seqio_source`). Its gin name is
    `load_split.cache_dir`: it applies to every split a run loads, the training split included.
    """
    if set(lengths) != {"inputs", "targets"}:
        raise ConfigError(f"TASK_FEATURE_LENGTHS needs exactly 'inputs' and 'targets'; got {dict(lengths)}.")
    lengths = {k: int(v) for k, v in lengths.items()}
    arrays = source.load_split(name, split, lengths, max_examples=max_examples, cache_dir=cache_dir)
    if max_examples is not None:
        full = len(arrays)
        arrays = sample_per_task(arrays, max_examples, SAMPLE_SEED)
        counts = {t: int(np.sum(arrays.task_names == t)) for t in arrays.task_order()}
        log.info(
            "%s/%s: MAX_EXAMPLES=%d per task: a uniform sample of %d of %d examples (%s).",
            name,
            split,
            max_examples,
            len(arrays),
            full,
            ", ".join(f"{t}: {n}" for t, n in counts.items()),
        )
    _warn_truncation(name, split, arrays, lengths)
    return arrays
