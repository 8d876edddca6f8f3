"""Summaries of cascade curves and the files behind the plots: curves.csv/json, tier_curves.csv/json,
summary.json/md and tier_summary.json."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from cat_jax.cascade.calibration import Calibration, Outcome
from cat_jax.cascade.curves import CurveKey, CurvePoint, OperatingPoint
from cat_jax.cascade.tiers import TierKey, TierPoint

# Quality counts as matching the large model's when it is within this relative float rounding of it.
MATCH_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Summary:
    """One two-model curve in numbers; relative_flops_to_match_large is None when the cascade never
    matches the large model.

    auc is AUC-DF (Gupta et al. 2024): the area under quality against deferral rate over [0, 1].
    auc_df_random is random deferral's, whose expected curve is the straight line from the small
    model's quality (rate 0) to the large model's (rate 1): (small_only + large_only) / 2.
    auc_df_gain = auc - auc_df_random; auc_df_gain_pct = 100 * gain / auc_df_random (the paper's
    relative change against random; None when random's area is 0).
    """

    small_only: float
    large_only: float
    auc: float
    auc_df_random: float
    auc_df_gain: float
    auc_df_gain_pct: float | None
    relative_flops_to_match_large: float | None
    best_quality: float
    best_relative_flops: float


@dataclasses.dataclass(frozen=True)
class TierSummary:
    """One k-tier cascade's Pareto frontier in numbers.

    tiers_alone: each tier run alone on every example (FLOPs relative to the last tier's, quality).
    relative_flops_to_match_last: the cheapest frontier point reaching the last tier's quality alone
    (None if none does). best_*: the frontier point of best quality (the cheapest of ties).
    """

    tiers: tuple[tuple[str, ...], ...]
    tier_rules: tuple[str, ...]
    tiers_alone: tuple[OperatingPoint, ...]
    frontier_points: int
    relative_flops_to_match_last: float | None
    best_quality: float
    best_relative_flops: float
    best_relative_latency: float


def area_under_curve(points: Sequence[CurvePoint]) -> float:
    """Trapezoid area under quality vs deferral rate (points in any order)."""
    ordered = sorted(points, key=lambda p: p.deferral_rate)
    pairs = zip(ordered, ordered[1:])
    return float(sum((b.deferral_rate - a.deferral_rate) * (a.quality + b.quality) / 2 for a, b in pairs))


def _cheapest_match(points: Sequence[Any], reference: float) -> float | None:
    """The smallest relative_flops among points whose quality reaches `reference` (float rounding
    allowed), or None."""
    floor = reference - MATCH_RTOL * max(1.0, abs(reference))
    matching = [p.relative_flops for p in points if p.quality >= floor]
    return min(matching) if matching else None


def _best(points: Sequence[Any]) -> Any:
    """The point of best quality, the cheapest of ties."""
    if not points:
        raise ValueError("a summary needs a curve with at least one point.")
    return min(points, key=lambda p: (-p.quality, p.relative_flops))


def summarize(points: Sequence[CurvePoint], *, small_only: float, large_only: float) -> Summary:
    """AUC-DF and its gain over random deferral, the smallest relative FLOPs reaching large-only
    quality, and the best point of a curve."""
    best = _best(points)
    auc, random_auc = area_under_curve(points), (small_only + large_only) / 2
    return Summary(
        small_only=small_only,
        large_only=large_only,
        auc=auc,
        auc_df_random=random_auc,
        auc_df_gain=auc - random_auc,
        auc_df_gain_pct=100.0 * (auc - random_auc) / random_auc if random_auc else None,
        relative_flops_to_match_large=_cheapest_match(points, large_only),
        best_quality=best.quality,
        best_relative_flops=best.relative_flops,
    )


def summarize_tiers(
    frontier: Sequence[TierPoint],
    tiers: Sequence[Sequence[str]],
    tier_rules: Sequence[str],
    tiers_alone: Sequence[OperatingPoint],
) -> TierSummary:
    """The cost to match the last tier and the best point of a k-tier frontier."""
    best = _best(frontier)
    return TierSummary(
        tiers=tuple(tuple(t) for t in tiers),
        tier_rules=tuple(tier_rules),
        tiers_alone=tuple(tiers_alone),
        frontier_points=len(frontier),
        relative_flops_to_match_last=_cheapest_match(frontier, tiers_alone[-1].quality),
        best_quality=best.quality,
        best_relative_flops=best.relative_flops,
        best_relative_latency=best.relative_latency,
    )


def _json_float(x: float) -> float | None:
    """JSON has no infinity: a threshold of +inf (defer everything) is written as null."""
    return x if math.isfinite(x) else None


def _write_json(path: str | pathlib.Path, records: Any) -> None:
    pathlib.Path(path).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


def _cell(value: float | tuple[float, ...]) -> str:
    """A CSV cell: a float's repr (exact), or a tuple's reprs joined by ';'."""
    if isinstance(value, tuple):
        return ";".join(repr(float(x)) for x in value)
    return repr(float(value))


def _write_points_csv(
    path: str | pathlib.Path, key_fields: Sequence[str], point_type: type, curves: Mapping[tuple, Sequence[Any]]
) -> None:
    fields = [f.name for f in dataclasses.fields(point_type)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*key_fields, *fields])
        for key, points in curves.items():
            for p in points:
                writer.writerow([*key, *(_cell(getattr(p, name)) for name in fields)])


def write_curves_csv(path: str | pathlib.Path, curves: Mapping[CurveKey, Sequence[CurvePoint]]) -> None:
    """One row per point: task, small_model, rule, threshold, deferral_rate, relative_flops, quality."""
    _write_points_csv(path, CurveKey._fields, CurvePoint, curves)


def write_curves_json(path: str | pathlib.Path, curves: Mapping[CurveKey, Sequence[CurvePoint]]) -> None:
    """[{task, small_model, rule, points: [{threshold, deferral_rate, relative_flops, quality}]}]."""
    _write_json(
        path,
        [
            {
                **key._asdict(),
                "points": [{**dataclasses.asdict(p), "threshold": _json_float(p.threshold)} for p in points],
            }
            for key, points in curves.items()
        ],
    )


def _tier_point_record(p: TierPoint) -> dict[str, Any]:
    return {
        **dataclasses.asdict(p),
        "thresholds": [_json_float(t) for t in p.thresholds],
        "exit_shares": list(p.exit_shares),
    }


def write_tier_curves_csv(path: str | pathlib.Path, curves: Mapping[TierKey, Sequence[TierPoint]]) -> None:
    """One row per frontier point; thresholds and exit_shares are ';'-joined, one per boundary / tier."""
    _write_points_csv(path, TierKey._fields, TierPoint, curves)


def write_tier_curves_json(path: str | pathlib.Path, curves: Mapping[TierKey, Sequence[TierPoint]]) -> None:
    """[{task, cascade, rules, points: [{thresholds, exit_shares, deferral_rate, ...}]}]."""
    _write_json(
        path, [{**key._asdict(), "points": [_tier_point_record(p) for p in points]} for key, points in curves.items()]
    )


def _calibration_record(c: Calibration) -> dict[str, Any]:
    return {
        "budget": c.budget.metric,
        "target": c.budget.target,
        "thresholds": [_json_float(t) for t in c.thresholds],
        "met_on_validation": c.met_on_validation,
        "validation": dataclasses.asdict(c.validation),
        "test": dataclasses.asdict(c.test),
    }


def write_summary_json(
    path: str | pathlib.Path,
    summaries: Mapping[CurveKey, Summary],
    calibrations: Mapping[CurveKey, Sequence[Calibration]],
) -> None:
    """A list of {task, small_model, rule, small_only, large_only, auc, ..., calibration: [...]}."""
    _write_json(
        path,
        [
            {
                **key._asdict(),
                **dataclasses.asdict(s),
                "calibration": [_calibration_record(c) for c in calibrations.get(key, ())],
            }
            for key, s in summaries.items()
        ],
    )


def write_tier_summary_json(
    path: str | pathlib.Path,
    summaries: Mapping[TierKey, TierSummary],
    calibrations: Mapping[TierKey, Sequence[Calibration]],
) -> None:
    """A list of {task, cascade, rules, tiers, tier_rules, tiers_alone, ..., calibration: [...]}."""
    records = []
    for key, s in summaries.items():
        alone = [{"tier": "+".join(t), **p._asdict()} for t, p in zip(s.tiers, s.tiers_alone)]
        records.append(
            {
                **key._asdict(),
                **dataclasses.asdict(s),
                "tiers_alone": alone,
                "calibration": [_calibration_record(c) for c in calibrations.get(key, ())],
            }
        )
    _write_json(path, records)


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.4g}"


def _thresholds(c: Calibration) -> str:
    return " / ".join(_fmt(t) for t in c.thresholds)


def _outcome(o: Outcome) -> str:
    return f"{_fmt(o.deferral_rate)} / {_fmt(o.relative_flops)} / {_fmt(o.quality)}"


def _calibration_rows(name: str, rule: str, calibrations: Sequence[Calibration]) -> list[str]:
    return [
        f"| {name} | {rule} | {c.budget.metric} <= {_fmt(c.budget.target)} | {_thresholds(c)} "
        f"| {_outcome(c.validation)}{'' if c.met_on_validation else ' (over budget)'} | {_outcome(c.test)} |\n"
        for c in calibrations
    ]


_MAIN_HEADER = (
    "| small model | rule | small-only | large-only | AUC-DF | random AUC-DF | gain vs random "
    "| rel. FLOPs to match large | best quality @ rel. FLOPs |\n|---|---|---|---|---|---|---|---|---|\n"
)
_CALIBRATION_HEADER = (
    "Budget calibration (thresholds picked on validation; rate / rel. FLOPs / quality):\n\n"
    "| cascade | rule | budget | thresholds | validation | test |\n|---|---|---|---|---|---|\n"
)
_TIER_HEADER = (
    "k-tier cascades (Pareto frontier over the joint threshold grid; each tier alone as quality @ rel. FLOPs):"
    "\n\n| cascade | rules | each tier alone | frontier points | rel. FLOPs to match last tier "
    "| best quality @ rel. FLOPs (rel. latency) |\n|---|---|---|---|---|---|\n"
)


def _gain(s: Summary) -> str:
    pct = "" if s.auc_df_gain_pct is None else f" ({s.auc_df_gain_pct:+.3g}%)"
    return f"{s.auc_df_gain:+.4g}{pct}"


def write_summary_md(
    path: str | pathlib.Path,
    summaries: Mapping[CurveKey, Summary],
    calibrations: Mapping[CurveKey, Sequence[Calibration]],
    tier_summaries: Mapping[TierKey, TierSummary],
    tier_calibrations: Mapping[TierKey, Sequence[Calibration]],
) -> None:
    """Per task: a table with one row per (small model, rule), then the budget calibrations and the
    k-tier cascades when there are any."""
    tasks = dict.fromkeys([*(k.task for k in summaries), *(k.task for k in tier_summaries)])
    sections = []
    for task in tasks:
        parts = [f"## {task}\n\n", _MAIN_HEADER]
        parts += [
            f"| {k.small_model} | {k.rule} | {_fmt(s.small_only)} | {_fmt(s.large_only)} | {_fmt(s.auc)} "
            f"| {_fmt(s.auc_df_random)} | {_gain(s)} | {_fmt(s.relative_flops_to_match_large)} "
            f"| {_fmt(s.best_quality)} @ {_fmt(s.best_relative_flops)} |\n"
            for k, s in summaries.items()
            if k.task == task
        ]
        calibrated = [
            row
            for k, c in calibrations.items()
            if k.task == task
            for row in _calibration_rows(k.small_model, k.rule, c)
        ]
        calibrated += [
            row
            for k, c in tier_calibrations.items()
            if k.task == task
            for row in _calibration_rows(k.cascade, k.rules, c)
        ]
        if calibrated:
            parts += ["\n", _CALIBRATION_HEADER, *calibrated]
        tiered = [
            f"| {k.cascade} | {k.rules} | "
            + ", ".join(
                f"{'+'.join(t)} {_fmt(p.quality)} @ {_fmt(p.relative_flops)}" for t, p in zip(s.tiers, s.tiers_alone)
            )
            + f" | {s.frontier_points} | {_fmt(s.relative_flops_to_match_last)} "
            f"| {_fmt(s.best_quality)} @ {_fmt(s.best_relative_flops)} ({_fmt(s.best_relative_latency)}) |\n"
            for k, s in tier_summaries.items()
            if k.task == task
        ]
        if tiered:
            parts += ["\n", _TIER_HEADER, *tiered]
        sections.append("".join(parts))
    pathlib.Path(path).write_text("\n".join(sections))
