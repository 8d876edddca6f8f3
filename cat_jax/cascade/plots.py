"""PNG plots of cascade curves: quality against relative FLOPs, drawn with matplotlib's Agg canvas.

Every line has its own colour and its own marker (up to len(MARKERS) lines; beyond that the pairs
still differ), and the legend sits outside the axes, right of the plot. Each plot function saves a
PNG and returns its Figure, whose axes hold exactly the plotted data.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cat_jax.cascade.curves import CurvePoint, OperatingPoint
from cat_jax.cascade.tiers import TierPoint

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "h", "8", "d", "H", "*")
# tab20's strong shades first, then its light ones: 20 colours, the first 10 well apart.
_TAB20 = colormaps["tab20"].colors
COLORS = tuple(_TAB20[0::2]) + tuple(_TAB20[1::2])
MARKS_PER_LINE = 12  # a long curve shows its marker at about this many of its points


def line_style(index: int) -> tuple[Any, str]:
    """(colour, marker) of the index-th line."""
    return COLORS[index % len(COLORS)], MARKERS[index % len(MARKERS)]


def _plot(
    lines: Mapping[str, Sequence[CurvePoint | TierPoint]],
    small_only: Mapping[str, OperatingPoint],
    large_only: OperatingPoint,
    title: str,
    metric_name: str,
    path: str | pathlib.Path,
    large_label: str = "large only",
) -> Figure:
    """Draws one line per curve (points by increasing relative FLOPs, every one of them on the line,
    about MARKS_PER_LINE of them marked), the small-only points (squares coloured like the line of
    the same name, else in the next unused colour) and the large-only star, and saves a PNG at `path`."""
    fig = Figure(figsize=(9.6, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.11, 0.58, 0.8))
    colors = {}
    for index, (label, points) in enumerate(lines.items()):
        ordered = sorted(points, key=lambda p: p.relative_flops)
        color, marker = line_style(index)
        ax.plot(
            [p.relative_flops for p in ordered],
            [p.quality for p in ordered],
            color=color,
            marker=marker,
            markersize=5,
            markevery=max(1, len(ordered) // MARKS_PER_LINE),
            linewidth=1.2,
            label=label,
        )
        colors[label] = color
    for index, (name, point) in enumerate(small_only.items(), start=len(lines)):
        color = colors[name] if name in colors else line_style(index)[0]
        ax.scatter(*point, marker="s", s=70, color=color, edgecolors="black", zorder=3, label=f"{name} only")
    ax.scatter(*large_only, marker="*", s=160, color="black", zorder=3, label=large_label)
    ax.set_xlabel("relative FLOPs (cascade / large model)")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(pathlib.Path(path), format="png")
    return fig


def plot_by_model(
    curves_for_rule: Mapping[str, Sequence[CurvePoint]],
    path: str | pathlib.Path,
    *,
    task: str,
    rule: str,
    small_only: Mapping[str, OperatingPoint],
    large_only: OperatingPoint,
    metric_name: str = "quality",
) -> Figure:
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
) -> Figure:
    """One line per rule (label -> curve) for one small model."""
    title = f"{task}: small model {small_model}"
    return _plot(curves_for_model, {small_model: small_only}, large_only, title, metric_name, path)


def plot_tiers(
    frontiers: Mapping[str, Sequence[TierPoint]],
    path: str | pathlib.Path,
    *,
    task: str,
    tiers_alone: Mapping[str, OperatingPoint],
    metric_name: str = "quality",
) -> Figure:
    """One line per k-tier cascade (label -> Pareto frontier); tiers_alone: tier label -> point, the
    last one drawn as the star."""
    *first, (last_name, last) = tiers_alone.items()
    title = f"{task}: k-tier cascades (Pareto frontier)"
    return _plot(frontiers, dict(first), last, title, metric_name, path, large_label=f"{last_name} only")
