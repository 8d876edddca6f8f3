"""SALT_DS: score sequences with the small model, keep a band of scores for the distillation phase.

The score of a sequence is the median of the small model's per-token cross-entropy over the target
tokens that lie in its top-k next-token predictions ("learnable" tokens; k = 10 by default). A
sequence with no such token gets NaN: the small model deems all of it unlearnable, so it is never
selected. High scores are "challenging yet learnable" sequences.

The default band keeps the upper half of the finite scores (quantiles 0.5 to 1.0): the top-k filter
already removes what the small model cannot learn, so among what is left the higher losses are the
challenging sequences SALT_DS is after, and keeping half of them leaves the distillation phase
enough distinct sequences at the sizes cat_jax trains on. Narrow it (e.g. 0.7-1.0) for big
corpora.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax.data.batches import InMemoryBatches
from cat_jax.data.loading import load_split
from cat_jax.data.source import DataSource
from cat_jax.errors import ConfigError

log = logging.getLogger("cat_jax")

SCORES_FILE = "scores.npz"
META_FILE = "scores.json"


def sequence_scores(logits: jax.Array, targets: jax.Array, weights: jax.Array, k: int = 10) -> jax.Array:
    """[batch] median per-token CE over the weighted target tokens in the top-k of `logits`
    ([batch, length, vocab]); NaN for a sequence with no such token."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    kth = jax.lax.top_k(logits, k)[0][..., -1]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    learnable = (target_logit >= kth) & (weights > 0)
    return jnp.nanmedian(jnp.where(learnable, ce, jnp.nan), axis=-1)


def band_rows(scores: np.ndarray, min_quantile: float, max_quantile: float) -> np.ndarray:
    """Sorted row indices whose finite score lies between the two quantiles of the finite scores
    (both ends included)."""
    finite = np.isfinite(scores)
    if not finite.any():
        raise ConfigError(
            "No sequence has a finite SALT_DS score (no target token is in the small model's "
            "top-k anywhere): raise salt_score.top_k or check the scoring model."
        )
    lo, hi = np.quantile(scores[finite], [min_quantile, max_quantile])
    return np.flatnonzero(finite & (scores >= lo) & (scores <= hi))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataSelection:
    """Train the distillation phase on the sequences of `scores_dir` (written by
    `python -m cat_jax.salt_score`) whose score lies in the quantile band [min_quantile,
    max_quantile] (see the module docstring for the default)."""

    scores_dir: str
    min_quantile: float = 0.5
    max_quantile: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.min_quantile < self.max_quantile <= 1.0:
            raise ConfigError(
                f"DataSelection needs 0 <= min_quantile < max_quantile <= 1; got "
                f"{self.min_quantile}, {self.max_quantile}."
            )


def check_scores_match(selection: DataSelection, dataset: dict) -> dict:
    """The scores' meta; refuses scores of another task, split, lengths or MAX_EXAMPLES than
    `dataset` (a DatasetConfig as a dict), or none."""
    meta_path = os.path.join(selection.scores_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise ConfigError(
            f"{selection.scores_dir} holds no finished SALT_DS scores ({META_FILE}); run python -m "
            "cat_jax.salt_score there first (it resumes if it was interrupted)."
        )
    with open(meta_path) as f:
        meta = json.load(f)
    for key in ("mixture_or_task_name", "split", "task_feature_lengths", "max_examples"):
        if meta["dataset"].get(key) != dataset.get(key):
            raise ConfigError(
                f"The SALT_DS scores in {selection.scores_dir} were computed for {key}="
                f"{meta['dataset'].get(key)!r}, this run trains on {dataset.get(key)!r}. Score "
                "this run's data (python -m cat_jax.salt_score) into another directory."
            )
    return meta


def selected_rows(
    selection: DataSelection, task_names: np.ndarray, ids: np.ndarray, dataset: dict
) -> tuple[np.ndarray, dict]:
    """The rows of a training split (its `task_names`, `ids`) that `selection` keeps, and a summary
    for the log; refuses scores of other data (`check_scores_match`)."""
    meta = check_scores_match(selection, dataset)
    with np.load(os.path.join(selection.scores_dir, SCORES_FILE)) as data:
        stored = {k: data[k] for k in ("task_names", "ids", "scores")}
    position = {(t, i): n for n, (t, i) in enumerate(zip(stored["task_names"].tolist(), stored["ids"].tolist()))}
    try:
        order = np.array([position[(t, i)] for t, i in zip(task_names.tolist(), ids.tolist())], dtype=np.int64)
    except KeyError as missing:
        raise ConfigError(
            f"The SALT_DS scores in {selection.scores_dir} have no score for example "
            f"{missing.args[0]}: the data changed since scoring; score it again."
        ) from None
    rows = band_rows(stored["scores"][order], selection.min_quantile, selection.max_quantile)
    summary = {
        "scores_dir": selection.scores_dir,
        "band": [selection.min_quantile, selection.max_quantile],
        "selected": int(len(rows)),
        "of": int(len(ids)),
        "scored_with": meta["model_dir"],
        "scored_step": meta["step"],
        "top_k": meta["top_k"],
    }
    return rows, summary


class PhasedBatches:
    """SALT_DS's training batches: the selected rows' for the steps before `kd_steps`, then the whole
    split's; each a pure function of (seed, step) like every in-memory stream (nothing to checkpoint)."""

    iterator = None
    packed = False

    def __init__(self, distillation: InMemoryBatches, full: InMemoryBatches, kd_steps: int):
        self.distillation, self.full, self.kd_steps = distillation, full, kd_steps

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return (self.distillation if step < self.kd_steps else self.full).batch(step)


def phased_batches(
    source: DataSource, dataset: dict, rows: tuple[int, int], selection: DataSelection, kd_steps: int
) -> PhasedBatches:
    """The split of `dataset` (a DatasetConfig as a dict) loaded once: its selected rows feed the
    distillation phase, all of it the rest."""
    arrays = load_split(
        dataset["mixture_or_task_name"],
        dataset["split"],
        dict(dataset["task_feature_lengths"]),
        dataset["max_examples"],
        source=source,
    )  # with load_split.cache_dir
    keep, summary = selected_rows(selection, arrays.task_names, arrays.ids, dataset)
    subset = arrays.take(keep)
    rates = source.mixture_rates(dataset["mixture_or_task_name"])
    if rates is not None:
        rates = {t: r for t, r in rates.items() if t in set(subset.task_names.tolist())}
    log.info(
        "SALT_DS: the first %d steps train on %d of %d sequences (score quantiles %s of %s, scored by "
        "step %s of %s, top-%d); then on all of them.",
        kd_steps,
        summary["selected"],
        summary["of"],
        summary["band"],
        selection.scores_dir,
        summary["scored_step"],
        summary["scored_with"],
        summary["top_k"],
    )
    args = (dataset["batch_size"], dataset["seed"])
    return PhasedBatches(
        InMemoryBatches(subset, *args, rates, rows),
        InMemoryBatches(arrays, *args, source.mixture_rates(dataset["mixture_or_task_name"]), rows),
        kd_steps,
    )
