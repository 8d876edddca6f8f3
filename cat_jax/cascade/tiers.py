"""k-tier cascades: tiers 0..K-1 (each one model or an ensemble) tried in order, a deferral rule at
each of the K-1 boundaries.

An example starts at tier 0; at boundary b it stays with tier b when its score there is >= the
boundary's threshold (lower score = defer first, as for two models), else it moves on; the last tier
answers whatever reaches it. Cost counts every model actually run on an example:
- FLOPs: every member of every tier the example reached (ensemble members all pay), relative to
  the last tier run alone on every example: sum_i cost_i / sum_i F_last(i);
- latency proxy: the members of a tier run in parallel, so a tier costs its slowest member's FLOPs
  (max, counted once), and the tiers an example reaches add up; relative to the last tier alone.
Quality mixes each example's answer from the tier that kept it (mean per-example quality, or the
corpus metric of the mixed outputs, from summed statistics when the metric has an additive form).

Search: each boundary gets a bounded grid of thresholds, `curves.threshold_grid` of its scores
(evenly spaced deferral rates, snapped to ties, +inf included), and every point of the joint grid
(the Cartesian product, P = prod_b P_b points) is evaluated in vectorised numpy, in chunks of
rows of a [P, N] exit-tier matrix; the curve is the Pareto frontier of (relative FLOPs, quality).
With 21 thresholds a boundary, K = 3 is 441 points: milliseconds for thousands of examples.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from cat_jax.cascade.agreement import ABC, ensemble_vote
from cat_jax.cascade.curves import CorpusMetric, OperatingPoint, check_scores, quality_of, threshold_grid
from cat_jax.cascade.records import ModelOutputs, check_aligned
from cat_jax.metrics import additive_form

# At most this many exit-tier entries ([rows of the grid, N]) are held in memory at once.
_CHUNK_ENTRIES = 1 << 21


class TierKey(NamedTuple):
    """Names one k-tier curve: a task, the cascade ("ce > cat+distill > large") and its rules
    ("chow_average > abc")."""

    task: str
    cascade: str
    rules: str


def cascade_name(tiers: Sequence[Sequence[str]]) -> str:
    """ "ce > cat+distill > large": tiers in order, ensemble members joined by '+'."""
    return " > ".join("+".join(tier) for tier in tiers)


@dataclasses.dataclass(frozen=True)
class TierAnswer:
    """One tier on N examples.

    outputs: the answering member's records, example by example (predictions, quality, tokens).
    agreement: [N] ABC agreement of the members (`agreement.ensemble_vote`; 1 for one model;
    agreement.EMPTY_MAJORITY where `abc`'s majority answer is empty).
    flops: [N] summed over the members (every member runs). latency: [N] the slowest member's FLOPs.
    """

    outputs: ModelOutputs
    agreement: np.ndarray
    flops: np.ndarray
    latency: np.ndarray


def _pick(members: Sequence[ModelOutputs], winner: np.ndarray) -> ModelOutputs:
    """Records [N] taking example i from members[winner[i]]."""
    rows = range(len(winner))

    def pick(field: str) -> list:
        return [getattr(members[w], field)[i] for i, w in zip(rows, winner)]

    hidden = None
    if all(m.hidden is not None and m.hidden.shape == members[0].hidden.shape for m in members):
        hidden = np.stack([m.hidden for m in members])[winner, np.arange(len(winner))]
    return ModelOutputs(
        ids=members[0].ids,
        predictions=pick("predictions"),
        targets=members[0].targets,
        logprobs=pick("logprobs"),
        entropies=pick("entropies"),
        quality=np.array(pick("quality")),
        flops=np.array(pick("flops")),
        hidden=hidden,
        margins=pick("margins") if all(m.margins is not None for m in members) else None,
    )


def tier_answer(
    members: Sequence[ModelOutputs], free_text: np.ndarray | bool = False, statistic: str = ABC
) -> TierAnswer:
    """The answer and cost of a tier of aligned members [M]; free_text: [N] bool and statistic
    (`abc` or `abc_central`) as `agreement.ensemble_vote` takes them."""
    if not members:
        raise ValueError("a tier needs at least one model.")
    check_aligned(*members)
    flops = np.array([m.flops for m in members])
    if len(members) == 1:
        return TierAnswer(members[0], np.ones(len(members[0])), flops[0], flops[0])
    agreement, winner = ensemble_vote([m.predictions for m in members], free_text, statistic)
    return TierAnswer(_pick(members, winner), agreement, flops.sum(axis=0), flops.max(axis=0))


@dataclasses.dataclass(frozen=True)
class TierPoint:
    """One joint threshold: thresholds [K-1] (+inf defers everything at that boundary), the share of
    examples each tier answers [K], the share that left tier 0, cost and quality."""

    thresholds: tuple[float, ...]
    exit_shares: tuple[float, ...]
    deferral_rate: float
    relative_flops: float
    relative_latency: float
    quality: float


def exit_tiers(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Answering tier [P, N] for scores [B, N] and thresholds [P, B]: the first boundary b whose score
    is >= its threshold, else the last tier B."""
    answering = np.full((thresholds.shape[0], scores.shape[1]), scores.shape[0], dtype=np.int64)
    for b in reversed(range(scores.shape[0])):
        answering = np.where(scores[b][None, :] >= thresholds[:, b : b + 1], b, answering)
    return answering


def joint_grid(scores: np.ndarray, num_thresholds: int | None) -> np.ndarray:
    """Every combination [P, B] of the boundaries' `threshold_grid`s, boundary 0 varying slowest."""
    grids = [threshold_grid(s, num_thresholds) for s in scores]
    return np.array(list(itertools.product(*grids)), dtype=np.float64).reshape(-1, len(grids))


def _check(answers: Sequence[TierAnswer], scores: np.ndarray) -> np.ndarray:
    if len(answers) < 2:
        raise ValueError(f"a tiered cascade needs two or more tiers; got {len(answers)}.")
    check_aligned(*(a.outputs for a in answers))
    n = len(answers[0].outputs)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(answers) - 1:
        raise ValueError(f"scores must be [K-1, N] = ({len(answers) - 1}, {n}); got {scores.shape}.")
    return np.stack([check_scores(s, n) for s in scores])


def evaluate(
    answers: Sequence[TierAnswer],
    scores: np.ndarray,
    thresholds: np.ndarray,
    *,
    corpus_metric: CorpusMetric | None = None,
) -> list[TierPoint]:
    """The cascade of tiers [K] at each joint threshold [P, K-1], boundary scores [K-1, N]."""
    scores = _check(answers, scores)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1, scores.shape[0])
    num_tiers, n = len(answers), scores.shape[1]
    reached_flops = np.cumsum([a.flops for a in answers], axis=0)  # [K, N] cost when tier k answers
    reached_latency = np.cumsum([a.latency for a in answers], axis=0)
    flops_total, latency_total = answers[-1].flops.sum(), answers[-1].latency.sum()
    additive = additive_form(corpus_metric)
    outs = [a.outputs for a in answers]
    if additive is not None:
        values = [additive.statistics(list(o.targets), list(o.predictions)).astype(np.float64) for o in outs]
    else:
        values = [o.quality for o in outs]
    points = []
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, len(thresholds), rows):
        chunk = thresholds[start : start + rows]
        answering = exit_tiers(scores, chunk)
        masks = [(answering == k).astype(np.float64) for k in range(num_tiers)]  # K x [C, N]
        flops = sum(m @ f for m, f in zip(masks, reached_flops)) / flops_total
        latency = sum(m @ t for m, t in zip(masks, reached_latency)) / latency_total
        summed = sum(m @ v for m, v in zip(masks, values))  # [C] or [C, S]
        shares = np.stack([m.mean(axis=1) for m in masks], axis=1)  # [C, K]
        for row in range(len(chunk)):
            if additive is not None:
                quality = additive.from_statistics(summed[row])
            elif corpus_metric is not None:
                mixed = [outs[k].predictions[i] for i, k in enumerate(answering[row])]
                quality = float(corpus_metric(list(outs[0].targets), mixed))
            else:
                quality = float(summed[row] / n)
            points.append(
                TierPoint(
                    thresholds=tuple(float(t) for t in chunk[row]),
                    exit_shares=tuple(float(x) for x in shares[row]),
                    deferral_rate=float(1.0 - shares[row, 0]),
                    relative_flops=float(flops[row]),
                    relative_latency=float(latency[row]),
                    quality=float(quality),
                )
            )
    return points


def pareto_frontier(points: Sequence[TierPoint]) -> list[TierPoint]:
    """The points no other point beats on both relative FLOPs (lower) and quality (higher), cheapest
    first; of points equal in both, the first in input order."""
    order = sorted(range(len(points)), key=lambda i: (points[i].relative_flops, -points[i].quality, i))
    frontier: list[TierPoint] = []
    for i in order:
        if not frontier or points[i].quality > frontier[-1].quality:
            frontier.append(points[i])
    return frontier


def sweep_tiers(
    answers: Sequence[TierAnswer],
    scores: np.ndarray,
    *,
    corpus_metric: CorpusMetric | None = None,
    num_thresholds: int | None = None,
) -> list[TierPoint]:
    """Pareto frontier over the joint threshold grid (`joint_grid(scores, num_thresholds)`)."""
    scores = _check(answers, scores)
    grid = joint_grid(scores, num_thresholds)
    return pareto_frontier(evaluate(answers, scores, grid, corpus_metric=corpus_metric))


def tiers_alone(answers: Sequence[TierAnswer], *, corpus_metric: CorpusMetric | None = None) -> list[OperatingPoint]:
    """Each tier run alone on every example: its FLOPs relative to the last tier's, its quality."""
    total = answers[-1].flops.sum()
    return [OperatingPoint(float(a.flops.sum() / total), quality_of(a.outputs, corpus_metric)) for a in answers]
