"""PNG plots of cascade curves: quality against relative FLOPs, drawn with matplotlib's Agg canvas."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cat_jax.cascade.curves import CurvePoint, OperatingPoint


def _plot(
    lines: Mapping[str, Sequence[CurvePoint]],
    small_only: Mapping[str, OperatingPoint],
    large_only: OperatingPoint,
    title: str,
    metric_name: str,
    path: str | pathlib.Path,
) -> pathlib.Path:
    """Draws one line per curve, the small-only points (coloured like the line of the same name) and
    the large-only point, and saves a PNG at `path`."""
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {}
    for label, points in lines.items():
        ordered = sorted(points, key=lambda p: p.relative_flops)
        xs, ys = [p.relative_flops for p in ordered], [p.quality for p in ordered]
        (line,) = ax.plot(xs, ys, marker=".", label=label)
        colors[label] = line.get_color()
    for name, point in small_only.items():
        color = colors.get(name, "gray")
        ax.scatter(*point, marker="s", s=60, color=color, zorder=3, label=f"{name} only")
    ax.scatter(*large_only, marker="*", s=140, color="black", zorder=3, label="large only")
    ax.set_xlabel("relative FLOPs (cascade / large model)")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = pathlib.Path(path)
    fig.savefig(path, format="png")
    return path


def plot_by_model(
    curves_for_rule: Mapping[str, Sequence[CurvePoint]],
    path: str | pathlib.Path,
    *,
    task: str,
    rule: str,
    small_only: Mapping[str, OperatingPoint],
    large_only: OperatingPoint,
    metric_name: str = "quality",
) -> pathlib.Path:
    """One line per small model (display name -> curve) for one rule; small_only: name -> point."""
    return _plot(curves_for_rule, small_only, large_only, f"{task}: rule {rule}", metric_name, path)


def plot_by_rule(
    curves_for_model: Mapping[str, Sequence[CurvePoint]],
    path: str | pathlib.Path,
    *,
    task: str,
    small_model: str,
    small_only: OperatingPoint,
    large_only: OperatingPoint,
    metric_name: str = "quality",
) -> pathlib.Path:
    """One line per rule (label -> curve) for one small model."""
    title = f"{task}: small model {small_model}"
    return _plot(curves_for_model, {small_model: small_only}, large_only, title, metric_name, path)
