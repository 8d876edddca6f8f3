"""Summaries of cascade curves and the files behind the plots: curves.csv/json, summary.json/md."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

from cat_jax.cascade.curves import CurveKey, CurvePoint

# Quality counts as matching the large model's when it is within this relative float rounding of it.
MATCH_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Summary:
    """One curve in numbers; relative_flops_to_match_large is None when the cascade never matches."""

    small_only: float
    large_only: float
    auc: float
    relative_flops_to_match_large: float | None
    best_quality: float
    best_relative_flops: float


def area_under_curve(points: Sequence[CurvePoint]) -> float:
    """Trapezoid area under quality vs deferral rate (points in any order)."""
    ordered = sorted(points, key=lambda p: p.deferral_rate)
    pairs = zip(ordered, ordered[1:])
    return float(sum((b.deferral_rate - a.deferral_rate) * (a.quality + b.quality) / 2 for a, b in pairs))


def summarize(points: Sequence[CurvePoint], *, small_only: float, large_only: float) -> Summary:
    """AUC, the smallest relative FLOPs reaching large-only quality, and the best point of a curve."""
    if not points:
        raise ValueError("summarize needs a curve with at least one point.")
    floor = large_only - MATCH_RTOL * max(1.0, abs(large_only))
    matching = [p.relative_flops for p in points if p.quality >= floor]
    best = min(points, key=lambda p: (-p.quality, p.relative_flops))
    return Summary(
        small_only=small_only,
        large_only=large_only,
        auc=area_under_curve(points),
        relative_flops_to_match_large=min(matching) if matching else None,
        best_quality=best.quality,
        best_relative_flops=best.relative_flops,
    )


def _json_float(x: float) -> float | None:
    """JSON has no infinity: the rate-1 threshold (+inf) is written as null."""
    return x if math.isfinite(x) else None


def write_curves_csv(path: str | pathlib.Path, curves: Mapping[CurveKey, Sequence[CurvePoint]]) -> None:
    """One row per point: task, small_model, rule, threshold, deferral_rate, relative_flops, quality."""
    fields = [f.name for f in dataclasses.fields(CurvePoint)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CurveKey._fields, *fields])
        for key, points in curves.items():
            for p in points:
                writer.writerow([*key, *(repr(float(getattr(p, name))) for name in fields)])


def write_curves_json(path: str | pathlib.Path, curves: Mapping[CurveKey, Sequence[CurvePoint]]) -> None:
    """[{task, small_model, rule, points: [{threshold, deferral_rate, relative_flops, quality}]}]."""
    records = [
        {
            **key._asdict(),
            "points": [{**dataclasses.asdict(p), "threshold": _json_float(p.threshold)} for p in points],
        }
        for key, points in curves.items()
    ]
    pathlib.Path(path).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


def write_summary_json(path: str | pathlib.Path, summaries: Mapping[CurveKey, Summary]) -> None:
    """A list of {task, small_model, rule, small_only, large_only, auc, ...} records."""
    records = [{**key._asdict(), **dataclasses.asdict(s)} for key, s in summaries.items()]
    pathlib.Path(path).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


def _fmt(x: float | None) -> str:
    return "never" if x is None else f"{x:.4g}"


def write_summary_md(path: str | pathlib.Path, summaries: Mapping[CurveKey, Summary]) -> None:
    """A markdown table per task, one row per (small model, rule)."""
    header = (
        "| small model | rule | small-only | large-only | AUC | rel. FLOPs to match large "
        "| best quality @ rel. FLOPs |\n|---|---|---|---|---|---|---|\n"
    )
    tasks = dict.fromkeys(key.task for key in summaries)
    sections = []
    for task in tasks:
        rows = [
            f"| {k.small_model} | {k.rule} | {_fmt(s.small_only)} | {_fmt(s.large_only)} | {_fmt(s.auc)} "
            f"| {_fmt(s.relative_flops_to_match_large)} "
            f"| {_fmt(s.best_quality)} @ {_fmt(s.best_relative_flops)} |\n"
            for k, s in summaries.items()
            if k.task == task
        ]
        sections.append(f"## {task}\n\n{header}{''.join(rows)}")
    pathlib.Path(path).write_text("\n".join(sections))
