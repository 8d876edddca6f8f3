"""Validation quality against training steps of CE, SALT and SALT_DS runs of the large model:

    python -m cat_jax.salt_report --output_dir OUT ce=DIR1,DIR2 salt=DIR3,DIR4 [salt_ds=DIR5,DIR6]
        [--metric TASK/METRIC] [--baseline ce]

Each argument names a method and its runs (one MODEL_DIR per seed, trained with
`train.eval_period` > 0 so train_metrics.jsonl holds `eval/...` rows). The quality of an
evaluation is `--metric` (a flattened eval key such as cmudict_g2p/exact_match_any) or, by
default, the mean over tasks of each task's first metric. A method's curve is the mean over its
seeds at the steps every seed evaluated. Written to OUT: curves.csv (every run's points),
summary.json / summary.md (final quality per method, and the first step at which a method's mean
curve reaches the baseline's final mean quality, absolute and as a fraction of the baseline's
steps) and quality_vs_steps.png. Reads only the JSON lines: no checkpoint, no accelerator.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cat_jax.cascade.plots import line_style
from cat_jax.errors import FRIENDLY, ConfigError
from cat_jax.metric_writers import read_jsonl

EVAL_PREFIX = "eval/"


def quality_of(row: Mapping[str, float], metric: str | None) -> float:
    """The quality of one eval row: `metric`, or the mean over tasks of each task's first metric."""
    evals = {k[len(EVAL_PREFIX) :]: v for k, v in row.items() if k.startswith(EVAL_PREFIX)}
    if metric is not None:
        if metric not in evals:
            raise ConfigError(f"No eval metric {metric!r}; the runs report {sorted(evals)}.")
        return float(evals[metric])
    first: dict[str, float] = {}
    for key, value in evals.items():
        first.setdefault(key.split("/")[0], float(value))
    return float(np.mean(list(first.values())))


def eval_curve(model_dir: str, metric: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, quality) of one run's evaluations, in step order (the latest row of a step wins)."""
    path = os.path.join(model_dir, "train_metrics.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir} has no train_metrics.jsonl: point at the MODEL_DIR of a cat_jax.train run.")
    by_step = {
        int(r["step"]): quality_of(r, metric) for r in read_jsonl(path) if any(k.startswith(EVAL_PREFIX) for k in r)
    }
    if not by_step:
        raise ConfigError(f"{path} holds no evaluations: train with --gin.train.eval_period=N (N > 0).")
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def mean_curve(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) over seeds at the steps every curve has."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
    if not common:
        raise ConfigError("The runs of a method share no evaluation step; use the same train.eval_period.")
    values = np.array([[dict(zip(s.tolist(), q.tolist()))[t] for t in common] for s, q in curves])
    return np.array(common), values.mean(0), values.min(0), values.max(0)


def steps_to_reach(steps: np.ndarray, quality: np.ndarray, target: float) -> int | None:
    """The first step whose quality is >= target, or None."""
    reached = np.flatnonzero(quality >= target)
    return int(steps[reached[0]]) if len(reached) else None


def summarize(groups: Mapping[str, Sequence[str]], metric: str | None, baseline: str) -> dict:
    """Every method's curves, mean curve, final quality and steps to reach the baseline's final quality."""
    if baseline not in groups:
        raise ConfigError(f"The baseline {baseline!r} is not among the methods {list(groups)}.")
    runs = {m: {d: eval_curve(d, metric) for d in dirs} for m, dirs in groups.items()}
    means = {m: mean_curve(list(curves.values())) for m, curves in runs.items()}
    b_steps, b_mean = means[baseline][0], means[baseline][1]
    target = float(b_mean[-1])
    methods = {}
    for m, (steps, mean, lo, hi) in means.items():
        reach = steps_to_reach(steps, mean, target)
        methods[m] = {
            "runs": list(groups[m]),
            "final_step": int(steps[-1]),
            "final_quality": float(mean[-1]),
            "final_quality_min": float(lo[-1]),
            "final_quality_max": float(hi[-1]),
            "steps_to_baseline_final": reach,
            "fraction_of_baseline_steps": None if reach is None else reach / float(b_steps[-1]),
        }
    return {
        "metric": metric or "mean over tasks of each task's first metric",
        "baseline": baseline,
        "baseline_final_quality": target,
        "methods": methods,
        "curves": {
            m: {"steps": s.tolist(), "mean": q.tolist(), "min": lo.tolist(), "max": hi.tolist()}
            for m, (s, q, lo, hi) in means.items()
        },
        "runs": {
            m: {d: {"steps": s.tolist(), "quality": q.tolist()} for d, (s, q) in curves.items()}
            for m, curves in runs.items()
        },
    }


def markdown(summary: dict) -> str:
    lines = [
        f"Quality: {summary['metric']}; baseline: {summary['baseline']} "
        f"(final mean {summary['baseline_final_quality']:.4f}).",
        "",
        "| method | seeds | final step | final quality (mean) | min-max over seeds "
        "| steps to the baseline's final quality |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in summary["methods"].items():
        reach = (
            "not reached"
            if r["steps_to_baseline_final"] is None
            else f"{r['steps_to_baseline_final']} ({r['fraction_of_baseline_steps']:.0%})"
        )
        lines.append(
            f"| {m} | {len(r['runs'])} | {r['final_step']} | {r['final_quality']:.4f} | "
            f"{r['final_quality_min']:.4f}-{r['final_quality_max']:.4f} | {reach} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> Figure:
    """Mean quality against steps per method, the seeds' range shaded; the baseline's final quality dashed."""
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (m, c) in enumerate(summary["curves"].items()):
        color, marker = line_style(i)
        ax.plot(c["steps"], c["mean"], color=color, marker=marker, label=f"{m} (mean of {len(summary['runs'][m])})")
        ax.fill_between(c["steps"], c["min"], c["max"], color=color, alpha=0.2)
    ax.axhline(summary["baseline_final_quality"], color="grey", linestyle="--", label=f"{summary['baseline']} final")
    ax.set_xlabel("training step")
    ax.set_ylabel(summary["metric"])
    ax.set_title("Large model: validation quality against training steps")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def write_report(
    groups: Mapping[str, Sequence[str]], output_dir: str, metric: str | None = None, baseline: str = "ce"
) -> dict:
    """summary.json/md, curves.csv and quality_vs_steps.png in output_dir; returns the summary."""
    summary = summarize(groups, metric, baseline)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(markdown(summary))
    with open(os.path.join(output_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "model_dir", "step", "quality"])
        for m, curves in summary["runs"].items():
            for d, c in curves.items():
                writer.writerows([m, d, s, q] for s, q in zip(c["steps"], c["quality"]))
    plot(summary, os.path.join(output_dir, "quality_vs_steps.png"))
    return summary


def _groups(specs: Sequence[str]) -> dict[str, list[str]]:
    groups = {}
    for spec in specs:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            raise ConfigError(f"Give each method as NAME=DIR[,DIR...]; got {spec!r}.")
        groups[name] = [d for d in dirs.split(",") if d]
    return groups


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="+", help="NAME=MODEL_DIR[,MODEL_DIR...] per method")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--metric", default=None)
    parser.add_argument("--baseline", default="ce")
    args = parser.parse_args(argv)
    try:
        summary = write_report(_groups(args.methods), args.output_dir, args.metric, args.baseline)
    except FRIENDLY as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(summary))
    return 0
