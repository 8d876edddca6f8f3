"""What speculative_eval writes: every operating point (curves.csv/json), a summary per curve
(summary.json/md), PNG plots of quality against relative latency and relative FLOPs, and every
run's per-example records (examples.jsonl)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cat_jax.cascade.summary import MATCH_RTOL


@dataclasses.dataclass(frozen=True)
class Point:
    """One (group, drafter, rule, gamma, alpha) run of the split, or a model alone (rule 'alone',
    drafter = the model, gamma 0, alpha None). Relative to the large model decoding alone."""

    group: str
    drafter: str
    rule: str
    gamma: int
    alpha: float | None
    quality: float
    relative_flops: float
    relative_latency: float
    ms_per_example: float
    acceptance_rate: float | None = None
    tokens_per_large_call: float | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    """One curve in numbers: the fastest point at the large model's quality (None: never) and the
    best quality."""

    group: str
    drafter: str
    rule: str
    gamma: int
    large_quality: float
    drafter_quality: float
    alpha_to_match_large: float | None
    relative_latency_to_match_large: float | None
    relative_flops_to_match_large: float | None
    acceptance_at_match: float | None
    best_quality: float
    best_relative_latency: float


def curve_key(point: Point) -> tuple[str, str, str, int]:
    return point.group, point.drafter, point.rule, point.gamma


def summarize(points: Sequence[Point]) -> list[Summary]:
    """One Summary per (group, drafter, rule, gamma) curve of `points` (models alone included)."""
    alone = {(p.group, p.drafter): p for p in points if p.rule == "alone"}
    curves: dict[tuple[str, str, str, int], list[Point]] = {}
    for p in points:
        if p.rule != "alone":
            curves.setdefault(curve_key(p), []).append(p)
    out = []
    for (group, drafter, rule, gamma), curve in curves.items():
        large = alone[(group, "large")].quality
        floor = large - MATCH_RTOL * max(1.0, abs(large))
        matching = [p for p in curve if p.quality >= floor]
        fastest = min(matching, key=lambda p: p.relative_latency) if matching else None
        best = min(curve, key=lambda p: (-p.quality, p.relative_latency))
        out.append(
            Summary(
                group=group,
                drafter=drafter,
                rule=rule,
                gamma=gamma,
                large_quality=large,
                drafter_quality=alone[(group, drafter)].quality,
                alpha_to_match_large=fastest.alpha if fastest else None,
                relative_latency_to_match_large=fastest.relative_latency if fastest else None,
                relative_flops_to_match_large=fastest.relative_flops if fastest else None,
                acceptance_at_match=fastest.acceptance_rate if fastest else None,
                best_quality=best.quality,
                best_relative_latency=best.relative_latency,
            )
        )
    return out


def _json_value(key: str, value: object) -> object:
    """JSON has no infinity: an infinite alpha (OPT's extremes) is written "inf" / "-inf" (None
    already means "no alpha"), any other non-finite float null."""
    if not isinstance(value, float) or math.isfinite(value):
        return value
    return str(value) if key.startswith("alpha") and math.isinf(value) else None


def _json_ready(record: dict) -> dict:
    return {k: _json_value(k, v) for k, v in record.items()}


def write_points(csv_path: str | pathlib.Path, json_path: str | pathlib.Path, points: Sequence[Point]) -> None:
    """curves.csv (one row per point) and curves.json (a list of the same records)."""
    fields = [f.name for f in dataclasses.fields(Point)]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for p in points:
            writer.writerow(["" if getattr(p, n) is None else getattr(p, n) for n in fields])
    records = [_json_ready(dataclasses.asdict(p)) for p in points]
    pathlib.Path(json_path).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")


@dataclasses.dataclass(frozen=True)
class ExampleRecord:
    """One example of one run of the split (a model alone: rule 'alone', gamma 0, alpha None, no
    drafts): the raw prediction and its token ids (EOS included), its quality, FLOPs, and for a
    speculative run the drafted tokens (gamma per large-model call), those accepted and the calls."""

    drafter: str
    rule: str
    gamma: int
    alpha: float | None
    id: str
    task: str
    prediction: str
    prediction_ids: list[int]
    quality: float
    flops: float
    drafted: int | None = None
    accepted: int | None = None
    large_calls: int | None = None


EXAMPLES = "examples.jsonl"


def write_examples(path: str | pathlib.Path, records: Sequence[ExampleRecord]) -> None:
    """One JSON line per record, in order (infinite alphas as "inf" / "-inf")."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(_json_ready(dataclasses.asdict(r)), allow_nan=False) + "\n")


def read_examples(path: str | pathlib.Path) -> list[dict]:
    """The records `write_examples` wrote, as dicts (alphas "inf" / "-inf" back to floats)."""
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
    for row in rows:
        if isinstance(row["alpha"], str):
            row["alpha"] = float(row["alpha"])
    return rows


def _fmt(x: float | None, digits: int = 4) -> str:
    return "never" if x is None else f"{x:.{digits}g}"


def _alpha_at_match(s: Summary) -> str:
    """The matching alpha; "never" when no point matches; "(no alpha)" for a rule without one."""
    if s.relative_latency_to_match_large is None:
        return "never"
    return "(no alpha)" if s.alpha_to_match_large is None else _fmt(s.alpha_to_match_large, 3)


def write_summaries(
    json_path: str | pathlib.Path,
    md_path: str | pathlib.Path,
    summaries: Sequence[Summary],
    points: Sequence[Point],
    preamble: str,
) -> None:
    """summary.json, and summary.md: per group the models alone, then one row per curve."""
    records = [_json_ready(dataclasses.asdict(s)) for s in summaries]
    pathlib.Path(json_path).write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
    sections = [preamble]
    for group in dict.fromkeys(s.group for s in summaries):
        alone = [p for p in points if p.group == group and p.rule == "alone"]
        rows = [
            f"| {p.drafter} alone | {_fmt(p.quality)} | {_fmt(p.relative_latency, 3)} | "
            f"{_fmt(p.relative_flops, 3)} | {p.ms_per_example:.3g} |\n"
            for p in alone
        ]
        curves = [
            f"| {s.drafter} | {s.rule} | {s.gamma} | {_alpha_at_match(s)} | "
            f"{_fmt(s.relative_latency_to_match_large, 3)} | {_fmt(s.relative_flops_to_match_large, 3)} | "
            f"{_fmt(s.acceptance_at_match, 3)} | {_fmt(s.best_quality)} @ {_fmt(s.best_relative_latency, 3)} |\n"
            for s in summaries
            if s.group == group
        ]
        sections.append(
            f"## {group}\n\n| model | quality | rel. latency | rel. FLOPs | ms / example |\n|---|---|---|---|---|\n"
            + "".join(rows)
            + "\n| drafter | rule | gamma | alpha to match large | rel. latency there "
            "| rel. FLOPs there | acceptance there | best quality @ rel. latency |\n|---|---|---|---|---|---|---|---|\n"
            + "".join(curves)
        )
    pathlib.Path(md_path).write_text("\n".join(sections))


def plot(
    points: Sequence[Point], path: str | pathlib.Path, *, group: str, drafter: str, gamma: int, metric_name: str
) -> pathlib.Path:
    """Two panels, quality against relative latency and against relative FLOPs: one line per rule
    (its alpha sweep), the drafter and the large model alone as points."""
    fig = Figure(figsize=(11, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    curves: dict[str, list[Point]] = {}
    for p in points:
        if p.group == group and p.drafter == drafter and p.gamma == gamma:
            curves.setdefault(p.rule, []).append(p)
    alone = {p.drafter: p for p in points if p.group == group and p.rule == "alone"}
    for index, (field, label) in enumerate(
        (
            ("relative_latency", "relative latency (wall clock / large model alone)"),
            ("relative_flops", "relative FLOPs (/ large model alone)"),
        )
    ):
        ax = fig.add_subplot(1, 2, index + 1)
        for rule, curve in curves.items():
            ordered = sorted(curve, key=lambda p: getattr(p, field))
            ax.plot(
                [getattr(p, field) for p in ordered],
                [p.quality for p in ordered],
                marker="x" if len(ordered) == 1 else ".",
                label=rule,
            )
        ax.scatter(
            getattr(alone[drafter], field),
            alone[drafter].quality,
            marker="s",
            s=60,
            color="gray",
            zorder=3,
            label=f"{drafter} alone",
        )
        ax.scatter(
            getattr(alone["large"], field),
            alone["large"].quality,
            marker="*",
            s=140,
            color="black",
            zorder=3,
            label="large alone",
        )
        ax.set_xlabel(label)
        ax.set_ylabel(metric_name)
        ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"{group}: speculative cascades, drafter {drafter}, gamma {gamma}")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, format="png")
    return path


def plot_all(points: Sequence[Point], output_dir: str | pathlib.Path, metric_names: Mapping[str, str]) -> list[str]:
    """One PNG per (group, drafter, gamma): <group>__<drafter>__gamma<g>.png."""
    safe = lambda name: re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    keys = dict.fromkeys((p.group, p.drafter, p.gamma) for p in points if p.rule != "alone")
    return [
        str(
            plot(
                points,
                pathlib.Path(output_dir) / f"{safe(g)}__{safe(d)}__gamma{k}.png",
                group=g,
                drafter=d,
                gamma=k,
                metric_name=metric_names[g],
            )
        )
        for g, d, k in keys
    ]
