"""Cascade plots: the drawn lines are the curve points, every line has its own colour and marker,
the legend sits outside the axes, and the PNG is written."""

import matplotlib.image
import numpy as np

from cat_jax.cascade import plots
from cat_jax.cascade.curves import CurvePoint, OperatingPoint
from cat_jax.cascade.tiers import TierPoint


def _curve(shift: float) -> list[CurvePoint]:
    # Points deliberately out of FLOPs order: the plot sorts them by relative FLOPs.
    return [
        CurvePoint(0.0, 0.5, 0.6 + shift, 0.9 - shift),
        CurvePoint(-1.0, 0.0, 0.1 + shift, 0.6 - shift),
        CurvePoint(np.inf, 1.0, 1.1 + shift, 0.8 - shift),
    ]


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_by_rule_plot_draws_the_curve_points_with_distinct_styles_and_an_outside_legend(tmp_path):
    curves = {f"rule_{i}": _curve(0.01 * i) for i in range(13)}  # the 13 labels cascade_eval draws
    path = tmp_path / "by_rule.png"
    fig = plots.plot_by_rule(
        curves,
        path,
        task="boolq",
        small_model="cat",
        small_only=OperatingPoint(0.1, 0.6),
        large_only=OperatingPoint(1.0, 0.8),
        metric_name="accuracy",
    )
    (ax,) = fig.axes
    lines = _lines(ax)
    assert list(lines) == list(curves)
    for label, points in curves.items():
        ordered = sorted(points, key=lambda p: p.relative_flops)
        np.testing.assert_array_equal(lines[label].get_xdata(), [p.relative_flops for p in ordered])
        np.testing.assert_array_equal(lines[label].get_ydata(), [p.quality for p in ordered])
    colors = [tuple(line.get_color()) for line in lines.values()]
    markers = [line.get_marker() for line in lines.values()]
    assert len(set(colors)) == 13 and len(set(markers)) == 13
    # The small-only square and the large-only star, at their coordinates.
    offsets = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert offsets == [(0.1, 0.6), (1.0, 0.8)]
    assert ax.get_ylabel() == "accuracy" and ax.get_title() == "boolq: small model cat"
    # The legend is right of the axes, not on them.
    fig.canvas.draw()
    legend, frame = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= frame.x1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [*curves, "cat only", "large only"]
    image = matplotlib.image.imread(path)
    assert image.shape == (480, 960, 4) and image[..., :3].std() > 0


def test_by_model_plot_colours_small_only_points_like_their_lines(tmp_path):
    fig = plots.plot_by_model(
        {"ce": _curve(0.0), "cat": _curve(0.05)},
        tmp_path / "by_model.png",
        task="boolq",
        rule="chow_sum",
        small_only={"ce": OperatingPoint(0.1, 0.6), "cat": OperatingPoint(0.15, 0.5)},
        large_only=OperatingPoint(1.0, 0.8),
    )
    (ax,) = fig.axes
    lines = _lines(ax)
    squares = {c.get_label(): c for c in ax.collections}
    for name in ("ce", "cat"):
        np.testing.assert_allclose(squares[f"{name} only"].get_facecolor()[0][:3], lines[name].get_color()[:3])
    np.testing.assert_allclose(lines["cat"].get_ydata(), [0.55, 0.85, 0.75])


def test_tiers_plot_draws_the_frontier_and_every_tier_alone(tmp_path):
    frontier = [
        TierPoint((-0.9, 1 / 3), (1.0, 0.0, 0.0), 0.0, 0.05, 0.05, 0.25),
        TierPoint((-0.1, 2 / 3), (0.25, 0.5, 0.25), 0.75, 0.6375, 0.45, 1.0),
    ]
    alone = {
        "ce": OperatingPoint(0.05, 0.25),
        "cat+distill": OperatingPoint(0.45, 0.75),
        "large": OperatingPoint(1.0, 0.75),
    }
    fig = plots.plot_tiers({"ce > cat+distill > large": frontier}, tmp_path / "tiers.png", task="t", tiers_alone=alone)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.05, 0.6375] and list(line.get_ydata()) == [0.25, 1.0]
    assert [c.get_label() for c in ax.collections] == ["ce only", "cat+distill only", "large only"]
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(0.05, 0.25), (0.45, 0.75), (1.0, 0.75)]
    colors = [tuple(line.get_color()), *(tuple(c.get_facecolor()[0][:3]) for c in ax.collections[:2])]
    assert len(set(colors)) == 3  # each tier alone in a colour of its own
    assert (tmp_path / "tiers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_line_styles_differ_in_colour_and_marker_up_to_the_marker_count():
    styles = [plots.line_style(i) for i in range(len(plots.MARKERS))]
    assert len({tuple(c) for c, _ in styles}) == len(styles) == len({m for _, m in styles})
