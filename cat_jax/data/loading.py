"""`load_split`: a split of a task or mixture from the configured source, sampled and checked."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import gin
import numpy as np

from cat_jax.data.arrays import SAMPLE_SEED, ExampleArrays, sample_per_task
from cat_jax.data.seqio_source import AUTO
from cat_jax.data.source import DataSource, data_source
from cat_jax.errors import ConfigError

log = logging.getLogger(__name__)

def _warn_truncation(name: str, split: str, arrays: ExampleArrays, lengths: Mapping[str, int]) -> None:
    truncated = {"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets}
    if any(truncated.values()):
        longest = {"inputs": int(arrays.input_lengths.max()), "targets": int(arrays.target_lengths.max())}
        log.warning(
            "%s/%s: %d of %d examples have inputs longer than %d tokens and %d targets longer than %d "
            "(EOS included); they were truncated. To keep them whole raise TASK_FEATURE_LENGTHS to %s.",
            name, split, truncated["inputs"], len(arrays), lengths["inputs"], truncated["targets"],
            lengths["targets"], longest,
        )


def load_split_from(source: DataSource, name: str, split: str, lengths: Mapping[str, int],
                    max_examples: int | None = None, cache_dir: str | None = AUTO) -> ExampleArrays:
    """`load_split` from a given source (the export job reads the live seqio one)."""
    if set(lengths) != {"inputs", "targets"}:
        raise ConfigError(f"TASK_FEATURE_LENGTHS needs exactly 'inputs' and 'targets'; got {dict(lengths)}.")
    lengths = {k: int(v) for k, v in lengths.items()}
    arrays = source.load_split(name, split, lengths, max_examples=max_examples, cache_dir=cache_dir)
    if max_examples is not None:
        full = len(arrays)
        arrays = sample_per_task(arrays, max_examples, SAMPLE_SEED)
        counts = {t: int(np.sum(arrays.task_names == t)) for t in arrays.task_order()}
        log.info("%s/%s: MAX_EXAMPLES=%d per task: a uniform sample of %d of %d examples (%s).", name, split,
                 max_examples, len(arrays), full, ", ".join(f"{t}: {n}" for t, n in counts.items()))
    _warn_truncation(name, split, arrays, lengths)
    return arrays


@gin.configurable(allowlist=["cache_dir"])
def load_split(mixture_or_task_name: str, split: str, task_feature_lengths: Mapping[str, int],
               max_examples: int | None = None, cache_dir: str | None = AUTO,
               source: DataSource | None = None) -> ExampleArrays:
    """The examples of a split in a fixed order (a mixture: each sub-task in turn).

    `task_feature_lengths` is {"inputs": Li, "targets": Lt}; longer examples are counted (and
    logged) before truncation. `max_examples` keeps a uniform sample of that many examples of each
    task (`cat_jax.data.arrays.sample_per_task`), in their split order. `cache_dir` (seqio source
    only): where tokenized splits are kept ("auto": `$CAT_JAX_CACHE_DIR` or ~/.cache/cat_jax/data,
    for tasks whose code is in files; None: no cache; see `cat_jax.data.seqio_source`).

    With `data_source.exported_dir`, the split is read from `<exported_dir>/<name>.<split>.npz`
    (no TensorFlow, no seqio); a missing file, or one exported with other lengths or a smaller cap,
    is refused with the export command that fixes it. `source` (default: the configured one) reads
    from another source with the configured cache.
    """
    return load_split_from(source or data_source(), mixture_or_task_name, split, task_feature_lengths,
                           max_examples, cache_dir)


def get_task_or_mixture(name: str):
    """The task or mixture of the configured source (seqio's, or an exported stand-in)."""
    return data_source().provider(name)


def get_vocabulary_of(name: str):
    """The targets vocabulary of a task or mixture of the configured source."""
    return data_source().vocabulary(name)


def mixture_rates(name: str) -> dict[str, float] | None:
    """{task: rate} of a mixture (for TrainBatches), None for a single task."""
    return data_source().mixture_rates(name)
