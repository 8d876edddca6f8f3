"""Tables and plots of launch/experiments/cat_small_scale.sh: paired per-seed differences against CE.

    python -m launch.experiments.cat_small_scale_analysis /work/runs_catstudy \
        [--out docs/results/cat_small_scale] [--rule chow_average] [--baselines ce,cat,distill]

Reads <runs>/<task>/seed<k>/<student>/train_metrics.jsonl and <runs>/<task>/seed<k>/cascade/{summary.json,
examples.jsonl} and writes into --out:
- per_seed.csv: one row per task, seed and student. Test split: accuracy, AUC-DF and its gain over
  random deferral under --rule, accuracy on the examples the large model gets right and on those it
  gets wrong, the share of answers that are the most frequent reference answer, the phoneme error
  rate (cmudict_g2p). Training batches: the mask's share and the student's and teacher's token
  accuracy, each averaged over the last LAST_STEPS logged steps.
- differences.csv: per baseline (default CE, CAT-Xent from scratch, distillation), task, student and
  metric, each seed's difference from the baseline student of the same seed, their mean, sample
  standard deviation and how many seeds share the mean's sign.
- means.csv: per task, student and metric, the mean and sample standard deviation over seeds.
- per task, <task>__mask_share.png (the mask's share and the token accuracies over training) and
  <task>__quality.png (test accuracy and AUC-DF gain per student and seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cat_jax import metrics
from cat_jax.cascade.plan import LARGE
from cat_jax.cascade.plots import line_style
from cat_jax.cascade.store import EXAMPLES
from cat_jax.metric_writers import read_jsonl

# Test split: from the cascade summary, then (from examples.jsonl) the small model's accuracy on the
# test examples the large model gets right and on those it gets wrong, and the share of its answers
# that are the most frequent reference answer.
METRICS = (
    "accuracy",
    "auc",
    "auc_df_gain",
    "accuracy_large_right",
    "accuracy_large_wrong",
    "majority_prediction_share",
    "phoneme_error_rate",
)
# A finer test metric where the task has one (NaN elsewhere): a student that gets ~1% of words
# right still differs from another in how many phonemes it gets right.
TASK_METRICS = {"cmudict_g2p": ("phoneme_error_rate", metrics.phoneme_error_rate)}
CURVES = ("mask_fraction", "student_accuracy", "teacher_accuracy")  # training batches, per logged step
LAST_STEPS = 5  # logged steps averaged for the end-of-training values (the last 100 steps at 20/log)


def training_curves(rows: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """{curve: [(step, value)]} from train_metrics.jsonl rows; a step logged twice (a resumed run)
    keeps its last row."""
    by_step = {int(r["step"]): r for r in rows if "train/loss" in r}
    return {
        name: [(s, float(by_step[s][f"train/{name}"])) for s in sorted(by_step) if f"train/{name}" in by_step[s]]
        for name in CURVES
    }


def tail_mean(curve: Sequence[tuple[int, float]], last: int = LAST_STEPS) -> float:
    """Mean of the last `last` values of a (step, value) curve; NaN when it is empty."""
    values = [v for _, v in curve[-last:]]
    return float(np.mean(values)) if values else math.nan


def accuracy_by_large(quality: Mapping[str, Mapping[str, float]], large: str = LARGE) -> dict[str, tuple[float, float]]:
    """{model: (mean quality on the examples where the large model's quality is 1, mean on the
    rest)} for every model but the large one. quality: {model: {example id: quality}}, all models
    on the same ids; a side with no examples gives NaN."""
    right = {i for i, q in quality[large].items() if q == 1.0}
    out = {}
    for model, scores in quality.items():
        if model == large:
            continue
        on_right = [q for i, q in scores.items() if i in right]
        on_wrong = [q for i, q in scores.items() if i not in right]
        out[model] = (
            float(np.mean(on_right)) if on_right else math.nan,
            float(np.mean(on_wrong)) if on_wrong else math.nan,
        )
    return out


def majority_shares(
    targets: Sequence[str], predictions: Mapping[str, Sequence[str]]
) -> tuple[str, float, dict[str, float]]:
    """(the most frequent target, its share of the targets, {model: share of its predictions equal to
    it}); texts compared after stripping surrounding whitespace. A student that leans on the
    majority answer more than the references do shows a share above the targets'."""
    counts = Counter(t.strip() for t in targets)
    majority = counts.most_common(1)[0][0]
    return (
        majority,
        counts[majority] / len(targets),
        {model: float(np.mean([p.strip() == majority for p in preds])) for model, preds in predictions.items()},
    )


def _example_rows(path: str, task: str) -> dict[str, dict[str, dict]]:
    """{model: {example id: row}} of one task in a cascade_eval examples.jsonl."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in read_jsonl(path):
        if r["task"] == task:
            out[r["model"]][r["id"]] = r
    return out


def paired_differences(values: Mapping[tuple[str, int, str], float], baseline: str) -> dict[tuple[str, str], dict]:
    """Per (task, student), each seed's value minus the baseline student's of the same task and seed.

    values: {(task, seed, student): value}. Returns {(task, student): {"seeds": [...], "differences":
    [...], "mean", "std" (sample, ddof=1; NaN with one seed), "same_sign" (seeds whose difference
    has the mean's sign)}} for every student other than the baseline; a seed without both runs is left out.
    """
    out = {}
    keys = sorted({(task, student) for task, _, student in values if student != baseline})
    for task, student in keys:
        seeds = sorted(seed for t, seed, s in values if t == task and s == student and (t, seed, baseline) in values)
        diffs = [values[(task, seed, student)] - values[(task, seed, baseline)] for seed in seeds]
        mean = float(np.mean(diffs)) if diffs else math.nan
        out[(task, student)] = {
            "seeds": seeds,
            "differences": diffs,
            "mean": mean,
            "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan,
            "same_sign": int(sum(np.sign(d) == np.sign(mean) for d in diffs)),
        }
    return out


def load_runs(runs_dir: str, rule: str) -> tuple[list[dict], dict[tuple[str, int, str], dict]]:
    """(per-seed rows, {(task, seed, student): training curves}) of every seed directory with a
    cascade summary; a row holds the test metrics under `rule` and the end-of-training values."""
    rows, curves = [], {}
    for task in sorted(os.listdir(runs_dir)):
        task_dir = os.path.join(runs_dir, task)
        seed_dirs = sorted(d for d in os.listdir(task_dir) if d.startswith("seed")) if os.path.isdir(task_dir) else []
        for seed_name in seed_dirs:
            summary_path = os.path.join(task_dir, seed_name, "cascade", "summary.json")
            if not os.path.exists(summary_path):
                continue
            seed = int(seed_name[len("seed") :])
            with open(summary_path) as f:
                summary = [r for r in json.load(f) if r["task"] == task and r["rule"] == rule]
            if not summary:
                raise ValueError(
                    f"{summary_path} has no rows for task {task!r} and rule {rule!r}; "
                    f"pass a rule its cascade evaluation ran (--rule)."
                )
            examples = _example_rows(os.path.join(os.path.dirname(summary_path), EXAMPLES), task)
            by_large = accuracy_by_large({m: {i: r["quality"] for i, r in rs.items()} for m, rs in examples.items()})
            _, target_share, shares = majority_shares(
                [r["target"] for r in examples[LARGE].values()],
                {m: [r["prediction"] for r in rs.values()] for m, rs in examples.items()},
            )
            extra = {}
            if task in TASK_METRICS:
                name, fn = TASK_METRICS[task]
                extra = {
                    m: fn([r["scored_target"] for r in rs.values()], [r["scored_prediction"] for r in rs.values()])[
                        name
                    ]
                    for m, rs in examples.items()
                }
            for r in summary:
                student = r["small_model"]
                metrics_path = os.path.join(task_dir, seed_name, student, "train_metrics.jsonl")
                run_curves = training_curves(read_jsonl(metrics_path))
                curves[(task, seed, student)] = run_curves
                rows.append(
                    {
                        "task": task,
                        "seed": seed,
                        "student": student,
                        "accuracy": r["small_only"],
                        "large_accuracy": r["large_only"],
                        "auc": r["auc"],
                        "auc_df_gain": r["auc_df_gain"],
                        "accuracy_large_right": by_large[student][0],
                        "accuracy_large_wrong": by_large[student][1],
                        "majority_prediction_share": shares[student],
                        "majority_target_share": target_share,
                        "phoneme_error_rate": extra.get(student, math.nan),
                        **{f"train_{name}": tail_mean(c) for name, c in run_curves.items()},
                    }
                )
    return rows, curves


def difference_rows(rows: Sequence[Mapping], baseline: str) -> list[dict]:
    """One row per task, student and metric of paired_differences over `rows` (per_seed rows)."""
    out = []
    for metric in METRICS + tuple(f"train_{c}" for c in CURVES[:2]):
        values = {(r["task"], r["seed"], r["student"]): r[metric] for r in rows if not math.isnan(r[metric])}
        for (task, student), d in paired_differences(values, baseline).items():
            out.append(
                {
                    "task": task,
                    "student": student,
                    "metric": metric,
                    "baseline": baseline,
                    "seeds": " ".join(map(str, d["seeds"])),
                    "differences": " ".join(f"{x:+.4f}" for x in d["differences"]),
                    "mean": d["mean"],
                    "std": d["std"],
                    "same_sign": d["same_sign"],
                }
            )
    return out


def mean_rows(rows: Sequence[Mapping]) -> list[dict]:
    """Per task, student and metric (test and end-of-training): mean and sample std over seeds."""
    out = []
    for metric in METRICS + tuple(f"train_{c}" for c in CURVES):
        groups = defaultdict(list)
        for r in rows:
            if not math.isnan(r[metric]):
                groups[(r["task"], r["student"])].append(r[metric])
        for (task, student), v in groups.items():
            out.append(
                {
                    "task": task,
                    "student": student,
                    "metric": metric,
                    "seeds": len(v),
                    "mean": float(np.mean(v)),
                    "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
                }
            )
    return out


def _write_csv(path: str, rows: Sequence[Mapping]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def _students(rows: Sequence[Mapping], task: str, baseline: str) -> list[str]:
    """The task's students, the baseline first, then in the order the runs list them."""
    names = list(dict.fromkeys(r["student"] for r in rows if r["task"] == task))
    return sorted(names, key=lambda s: (s != baseline, names.index(s)))


def plot_mask_share(
    curves: Mapping[tuple[str, int, str], Mapping], task: str, students: Sequence[str], path: str
) -> Figure:
    """Two panels over training steps: the mask's share of target tokens and the student's token
    accuracy (thin: each seed; thick: the mean over seeds), the teacher's token accuracy dashed."""
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    teacher = []
    for index, student in enumerate(students):
        color, marker = line_style(index)
        runs = [c for (t, _, s), c in sorted(curves.items()) if t == task and s == student]
        for ax, name in zip(axes, ("mask_fraction", "student_accuracy")):
            for c in runs:
                ax.plot(*zip(*c[name]), color=color, linewidth=0.6, alpha=0.35)
            steps = [s for s, _ in runs[0][name]]
            mean = np.mean([[v for _, v in c[name]] for c in runs], axis=0)
            ax.plot(steps, mean, color=color, marker=marker, markersize=4, linewidth=1.6, label=student)
        teacher += [c["teacher_accuracy"] for c in runs if c["teacher_accuracy"]]
    if teacher:
        steps = [s for s, _ in teacher[0]]
        axes[1].plot(
            steps,
            np.mean([[v for _, v in c] for c in teacher], axis=0),
            color="black",
            linestyle="--",
            linewidth=1.2,
            label="large (teacher)",
        )
    axes[0].set(title=f"{task}: mask share (counted / target tokens)", xlabel="training step", ylabel="share")
    axes[1].set(title="token accuracy on the training batch", xlabel="training step", ylabel="accuracy")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return fig


def plot_quality(rows: Sequence[Mapping], task: str, students: Sequence[str], path: str) -> Figure:
    """Test accuracy and AUC-DF gain over random deferral per student: one dot per seed (its seed
    number beside it), a bar at the mean."""
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(
        axes, ("accuracy", "auc_df_gain"), ("test accuracy (small alone)", "AUC-DF gain over random deferral")
    ):
        for x, student in enumerate(students):
            color, _ = line_style(x)
            points = sorted((r["seed"], r[metric]) for r in rows if r["task"] == task and r["student"] == student)
            values = [v for _, v in points]
            ax.hlines(np.mean(values), x - 0.3, x + 0.3, color=color, linewidth=2.5)
            ax.scatter([x] * len(values), values, color=color, edgecolors="black", zorder=3)
            for seed, v in points:
                ax.annotate(str(seed), (x, v), xytext=(5, -3), textcoords="offset points", fontsize=7)
        ax.set_xticks(range(len(students)), students, rotation=20)
        ax.set(title=f"{task}: {label}", ylabel=label)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def analyse(
    runs_dir: str, out_dir: str, rule: str = "chow_average", baselines: Sequence[str] = ("ce", "cat", "distill")
) -> dict:
    """Writes per_seed.csv, differences.csv, means.csv and the PNGs into out_dir; returns
    {"rule", "baselines", "per_seed": rows, "differences": rows}."""
    rows, curves = load_runs(runs_dir, rule)
    if not rows:
        raise ValueError(
            f"No <task>/seed<k>/cascade/summary.json under {runs_dir}; run "
            f"launch/experiments/cat_small_scale.sh --out {runs_dir} first."
        )
    os.makedirs(out_dir, exist_ok=True)
    differences = [d for b in baselines for d in difference_rows(rows, b)]
    _write_csv(os.path.join(out_dir, "per_seed.csv"), rows)
    _write_csv(os.path.join(out_dir, "differences.csv"), differences)
    _write_csv(os.path.join(out_dir, "means.csv"), mean_rows(rows))
    summary = {"rule": rule, "baselines": list(baselines), "per_seed": rows, "differences": differences}
    for task in sorted({r["task"] for r in rows}):
        students = _students(rows, task, baselines[0])
        plot_mask_share(curves, task, students, os.path.join(out_dir, f"{task}__mask_share.png"))
        plot_quality(rows, task, students, os.path.join(out_dir, f"{task}__quality.png"))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default=os.path.join("docs", "results", "cat_small_scale"))
    parser.add_argument("--rule", default="chow_average")
    parser.add_argument("--baselines", default="ce,cat,distill", help="students to difference against, comma-separated")
    args = parser.parse_args(argv)
    summary = analyse(args.runs_dir, args.out, args.rule, args.baselines.split(","))
    by_task = defaultdict(list)
    for d in summary["differences"]:
        by_task[(d["task"], d["baseline"])].append(d)
    for (task, baseline), diffs in by_task.items():
        print(f"\n{task}: difference from {baseline} (mean ± sample std over seeds; seeds sharing the sign)")
        for d in diffs:
            print(
                f"  {d['student']:12s} {d['metric']:24s} {d['mean']:+.4f} ± {d['std']:.4f}  "
                f"({d['same_sign']}/{len(d['seeds'].split())})  [{d['differences']}]"
            )
    print(f"\nWrote {args.out}/")


if __name__ == "__main__":
    main()
