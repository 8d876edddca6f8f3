"""launch/experiments/cat_small_scale_analysis.py: paired differences, training curves, and the
files it writes from a small fake run tree."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from launch.experiments import cat_small_scale_analysis as analysis


def test_paired_differences_pair_by_seed():
    values = {
        ("t", 0, "ce"): 0.50,
        ("t", 1, "ce"): 0.60,
        ("t", 2, "ce"): 0.55,
        ("t", 0, "cat"): 0.45,
        ("t", 1, "cat"): 0.62,
        ("t", 2, "cat"): 0.50,
        ("t", 3, "cat"): 0.99,
    }  # seed 3 has no CE run: left out
    d = analysis.paired_differences(values, "ce")[("t", "cat")]
    assert d["seeds"] == [0, 1, 2]
    assert d["differences"] == pytest.approx([-0.05, 0.02, -0.05])
    assert d["mean"] == pytest.approx(-0.08 / 3)
    # sample standard deviation (ddof=1): deviations -0.07/3 (twice) and +0.14/3 from the mean
    assert d["std"] == pytest.approx(math.sqrt((2 * (0.07 / 3) ** 2 + (0.14 / 3) ** 2) / 2))
    assert d["same_sign"] == 2
    assert list(analysis.paired_differences(values, "ce")) == [("t", "cat")]


def test_one_seed_has_no_spread():
    d = analysis.paired_differences({("t", 0, "ce"): 0.5, ("t", 0, "cat"): 0.7}, "ce")[("t", "cat")]
    assert d["mean"] == pytest.approx(0.2) and math.isnan(d["std"]) and d["same_sign"] == 1


def test_training_curves_keep_the_last_row_of_a_step():
    rows = [
        {"step": 20, "train/loss": 1.0, "train/mask_fraction": 0.9, "train/student_accuracy": 0.1},
        {"step": 40, "train/loss": 1.0, "train/mask_fraction": 0.8, "train/student_accuracy": 0.2},
        {"step": 40, "train/loss": 1.0, "train/mask_fraction": 0.7, "train/student_accuracy": 0.3},
        {"step": 40, "eval/accuracy": 0.5},
    ]
    curves = analysis.training_curves(rows)
    assert curves["mask_fraction"] == [(20, 0.9), (40, 0.7)]
    assert curves["teacher_accuracy"] == []
    assert analysis.tail_mean(curves["student_accuracy"], last=2) == pytest.approx(0.2)
    assert math.isnan(analysis.tail_mean(curves["teacher_accuracy"]))


def test_accuracy_by_large_splits_on_the_large_models_correct_examples():
    quality = {
        "large": {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0},
        "ce": {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0},
        "cat": {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0},
    }
    assert analysis.accuracy_by_large(quality) == {"ce": (0.5, 0.5), "cat": (1.0, 0.0)}
    everything_right = analysis.accuracy_by_large({"large": {"a": 1.0}, "ce": {"a": 0.0}})
    assert everything_right["ce"][0] == 0.0 and math.isnan(everything_right["ce"][1])


def test_majority_shares():
    majority, share, shares = analysis.majority_shares(
        ["2", "2", "3", " 2", "1"], {"ce": ["2", "3", "3", "1", "1"], "cat": ["2 ", "2", "2", "2", "1"]}
    )
    assert (majority, share) == ("2", 0.6)
    assert shares == {"ce": 0.2, "cat": 0.8}


def _fake_runs(root, accuracies):
    """<root>/t/seed<k>/<student>/train_metrics.jsonl and cascade/summary.json."""
    for (seed, student), acc in accuracies.items():
        run = root / "t" / f"seed{seed}" / student
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "train_metrics.jsonl", "w") as f:
            for step in (20, 40):
                row = {
                    "step": step,
                    "train/loss": 1.0,
                    "train/mask_fraction": 1.0 if student == "ce" else 0.8,
                    "train/student_accuracy": acc,
                    "train/teacher_accuracy": 0.9,
                }
                f.write(json.dumps(row) + "\n")
    for seed in {s for s, _ in accuracies}:
        cascade = root / "t" / f"seed{seed}" / "cascade"
        cascade.mkdir()
        rows = [
            {
                "task": "t",
                "small_model": student,
                "rule": rule,
                "small_only": acc,
                "large_only": 0.8,
                "auc": (acc + 0.8) / 2 + 0.01,
                "auc_df_gain": 0.01,
            }
            for (s, student), acc in accuracies.items()
            if s == seed
            for rule in ("chow_average", "oracle")
        ]
        (cascade / "summary.json").write_text(json.dumps(rows))
        # Two test examples: every model (the large one and each student) gets x right and y wrong.
        examples = [
            {"model": m, "id": i, "task": "t", "quality": float(i == "x"), "target": i, "prediction": "x"}
            for m in ["large"] + [st for (s, st) in accuracies if s == seed]
            for i in ("x", "y")
        ]
        (cascade / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))


def test_analyse_writes_tables_and_plots(tmp_path):
    _fake_runs(tmp_path / "runs", {(0, "ce"): 0.5, (0, "cat"): 0.4, (1, "ce"): 0.6, (1, "cat"): 0.55})
    out = tmp_path / "out"
    summary = analysis.analyse(str(tmp_path / "runs"), str(out))
    assert sorted(os.listdir(out)) == [
        "differences.csv",
        "means.csv",
        "per_seed.csv",
        "t__mask_share.png",
        "t__quality.png",
    ]
    with open(out / "differences.csv") as f:
        rows = list(csv.DictReader(f))
    diffs = {r["metric"]: r for r in rows if r["baseline"] == "ce"}
    against_cat = {r["metric"]: r for r in rows if r["baseline"] == "cat"}
    assert against_cat["accuracy"]["student"] == "ce" and against_cat["accuracy"]["differences"] == "+0.1000 +0.0500"
    assert diffs["accuracy"]["differences"] == "-0.1000 -0.0500"
    assert float(diffs["accuracy"]["mean"]) == pytest.approx(-0.075)
    assert float(diffs["train_mask_fraction"]["mean"]) == pytest.approx(-0.2)
    assert float(diffs["accuracy_large_right"]["mean"]) == 0.0
    assert "phoneme_error_rate" not in diffs  # a task without the metric has no row for it
    assert all(r["accuracy_large_right"] == 1.0 and r["accuracy_large_wrong"] == 0.0 for r in summary["per_seed"])
    assert all(r["majority_prediction_share"] == 1.0 and r["majority_target_share"] == 0.5 for r in summary["per_seed"])
    assert len(summary["per_seed"]) == 4
    with open(out / "means.csv") as f:
        means = {(r["student"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(means[("ce", "accuracy")]["mean"]) == pytest.approx(0.55)
    assert float(means[("ce", "accuracy")]["std"]) == pytest.approx(math.sqrt(0.005))  # (0.05² + 0.05²) / 1
    assert all(os.path.getsize(out / p) > 10_000 for p in ("t__mask_share.png", "t__quality.png"))
    with pytest.raises(ValueError, match="no rows for task 't' and rule 'margin'"):
        analysis.analyse(str(tmp_path / "runs"), str(out), rule="margin")
