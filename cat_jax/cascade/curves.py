"""Threshold sweep of a deferral score: quality against relative FLOPs of the cascade.

Cost (DESIGN.md section 1): relative FLOPs = (sum_i F_S(i) + sum_{i deferred} F_L(i)) / sum_i F_L(i).
Quality: the mean of the large model's per-example quality on deferred examples and the small
model's on kept ones, or a corpus metric (BLEU) recomputed on the mixed list of predictions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from cat_jax.cascade.records import ModelOutputs, check_aligned
from cat_jax.metrics import additive_form

# corpus_metric(targets [N], predictions [N]) -> one corpus-level score, e.g. sacrebleu BLEU. One with
# a registered metrics.AdditiveForm (corpus_bleu has one) is re-scored from summed per-example statistics.
CorpusMetric = Callable[[Sequence[Any], Sequence[str]], float]


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One operating point: examples with score < threshold are deferred (threshold may be +inf)."""

    threshold: float
    deferral_rate: float
    relative_flops: float
    quality: float


class CurveKey(NamedTuple):
    """Names one curve: a task, a small model's display name and a deferral rule label."""

    task: str
    small_model: str
    rule: str


class OperatingPoint(NamedTuple):
    """A model run alone: its FLOPs relative to the large model and its quality."""

    relative_flops: float
    quality: float


def _quality(
    predictions: Sequence[str], per_example: np.ndarray, targets: Sequence[Any], metric: CorpusMetric | None
) -> float:
    """The mean of per_example [N], or metric(targets, predictions) when a corpus metric is given."""
    return float(per_example.mean()) if metric is None else float(metric(list(targets), list(predictions)))


def quality_of(outputs: ModelOutputs, corpus_metric: CorpusMetric | None = None) -> float:
    """One model's quality alone: its mean per-example quality, or the corpus metric of its outputs."""
    return _quality(outputs.predictions, outputs.quality, outputs.targets, corpus_metric)


def threshold_grid(scores: np.ndarray, num_thresholds: int | None) -> np.ndarray:
    """Sorted thresholds [P] of scores [N]: the first defers nothing, the last (+inf) defers everything.

    Every distinct score, or with num_thresholds the scores at evenly spaced deferral rates snapped
    to tie groups (tied examples are deferred together), so P <= num_thresholds.
    """
    ordered = np.sort(scores)
    if num_thresholds is None:
        return np.append(np.unique(ordered), np.inf)
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 (rate 0 and rate 1); got {num_thresholds}.")
    ranks = np.round(np.linspace(0, len(scores), num_thresholds)).astype(np.int64)
    padded = np.append(ordered, np.inf)
    return np.unique(padded[ranks])


def check_scores(scores: np.ndarray, n: int) -> np.ndarray:
    """scores as float64 [N]; ValueError on another shape, NaN or +inf (which nothing could keep)."""
    scores = np.asarray(scores, dtype=np.float64)
    if n == 0:
        raise ValueError("a cascade curve needs at least one example.")
    if scores.shape != (n,) or np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError(f"scores must be [N] = ({n},) without NaN or +inf; got shape {scores.shape}.")
    return scores


def points_at(
    scores: np.ndarray,
    small: ModelOutputs,
    large: ModelOutputs,
    thresholds: np.ndarray,
    *,
    extra_small_flops: np.ndarray | None = None,
    corpus_metric: CorpusMetric | None = None,
) -> list[CurvePoint]:
    """The cascade at each threshold [P] of a deferral score [N] over aligned small/large records.

    Examples with score < threshold go to the large model. extra_small_flops [N]: FLOPs of other
    small models the rule ran (agreement), paid on every example.
    """
    check_aligned(small, large)
    n = len(small)
    scores = check_scores(scores, n)
    small_cost = small.flops.sum()
    if extra_small_flops is not None:
        extra = np.asarray(extra_small_flops, dtype=np.float64)
        if extra.shape != (n,):
            raise ValueError(f"extra_small_flops must be [N] = ({n},); got {extra.shape}.")
        small_cost += extra.sum()
    large_total = large.flops.sum()
    additive = additive_form(corpus_metric)
    if additive is not None:
        small_stats = additive.statistics(list(small.targets), list(small.predictions))
        large_stats = additive.statistics(list(large.targets), list(large.predictions))
    points = []
    for threshold in thresholds:
        deferred = scores < threshold
        if additive is not None:
            quality = additive.from_statistics(np.where(deferred[:, None], large_stats, small_stats).sum(axis=0))
        else:
            mixed = [l if d else s for d, s, l in zip(deferred, small.predictions, large.predictions)]
            per_example = np.where(deferred, large.quality, small.quality)
            quality = _quality(mixed, per_example, small.targets, corpus_metric)
        points.append(
            CurvePoint(
                threshold=float(threshold),
                deferral_rate=float(deferred.mean()),
                relative_flops=float((small_cost + large.flops[deferred].sum()) / large_total),
                quality=quality,
            )
        )
    return points


def sweep(
    scores: np.ndarray,
    small: ModelOutputs,
    large: ModelOutputs,
    *,
    extra_small_flops: np.ndarray | None = None,
    corpus_metric: CorpusMetric | None = None,
    num_thresholds: int | None = None,
) -> list[CurvePoint]:
    """Curve of a deferral score [N] over aligned small/large records, by increasing deferral rate.

    The thresholds are `threshold_grid(scores, num_thresholds)`: rate 0 and rate 1 always included.
    """
    grid = threshold_grid(check_scores(scores, len(small)), num_thresholds)
    return points_at(scores, small, large, grid, extra_small_flops=extra_small_flops, corpus_metric=corpus_metric)


def standalone_points(
    small: ModelOutputs, large: ModelOutputs, *, corpus_metric: CorpusMetric | None = None
) -> tuple[OperatingPoint, OperatingPoint]:
    """(small model alone, large model alone): relative FLOPs sum F_S / sum F_L and 1, and their quality."""
    check_aligned(small, large)
    return (
        OperatingPoint(float(small.flops.sum() / large.flops.sum()), quality_of(small, corpus_metric)),
        OperatingPoint(1.0, quality_of(large, corpus_metric)),
    )
