"""`python -m cat_jax.speculative_eval` end to end on two tiny checkpoints, and its config errors."""

from __future__ import annotations

import csv
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DATA_CACHE, run_module, train_args

from cat_jax.cascade.speculative import report
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import ConfigError
from cat_jax.jobs.speculative_eval import alpha_grid, run_speculative_eval

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

MIXTURE = "offline_mix"
GROUPS = ("cmudict_g2p", "cmudict_syllables", "num2words_fr", "num2words_de", MIXTURE)
RULES = ("lossless", "chow", "token_v2")
GAMMAS = (1, 3)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    large, small, out = root / "large", root / "ce", root / "out"
    tiny = "--gin_file=gin_configs/models/tiny.gin"
    with ThreadPoolExecutor(2) as pool:  # the two runs overlap their start-up and compilation
        runs = [
            pool.submit(run_module, "cat_jax.train", train_args(run_file, model_dir, steps, tiny))
            for run_file, model_dir, steps in (("train_large.gin", large, 3), ("train_small_ce.gin", small, 2))
        ]
        for run in runs:
            run.result()
    proc = run_module(
        "cat_jax.speculative_eval",
        [
            "--gin_file=gin_configs/runs/speculative_eval.gin",
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.load_split.cache_dir='{DATA_CACHE}'",
            f"--gin.LARGE_MODEL_DIR='{large}'",
            f"--gin.SMALL_MODEL_DIRS={{'ce': '{small}'}}",
            f"--gin.OUTPUT_DIR='{out}'",
            f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
            "--gin.MAX_EXAMPLES=4",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
            "--gin.BATCH_SIZE=8",
            f"--gin.GAMMAS={list(GAMMAS)}",
            f"--gin.run_speculative_eval.rules={list(RULES)}",
            "--gin.run_speculative_eval.num_alphas=2",
            "--gin.run_speculative_eval.timing_repeats=1",
        ],
    )
    return out, proc


def test_writes_every_point_summary_and_plot(outputs):
    out, proc = outputs
    points = json.loads((out / "curves.json").read_text())
    with open(out / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == len(points)
    per_group = 2 + len(GAMMAS) * (1 + 2 + 2)  # two models alone; lossless, then 2 alphas each
    assert len(points) == len(GROUPS) * per_group
    summaries = json.loads((out / "summary.json").read_text())
    assert len(summaries) == len(GROUPS) * len(GAMMAS) * len(RULES)
    md = (out / "summary.md").read_text()
    for gamma in GAMMAS:  # greedy lossless decoding is the large model: a match, at no alpha
        assert f"| lossless | {gamma} | (no alpha) |" in md
    for group in GROUPS:
        assert f"## {group}" in md
        for gamma in GAMMAS:
            assert (out / f"{group}__ce__gamma{gamma}.png").read_bytes().startswith(PNG)
    assert f"wrote {4 + len(GROUPS) * len(GAMMAS) + 1} files to {out}" in proc.stdout  # examples.jsonl too


def test_lossless_is_the_large_model_and_the_small_extreme_the_drafter(outputs):
    """Greedy lossless speculative decoding decodes exactly what the large model does; chow and
    token_v2 at their small-model extreme exactly what the drafter does."""
    points = json.loads((outputs[0] / "curves.json").read_text())
    alone = {(p["group"], p["drafter"]): p for p in points if p["rule"] == "alone"}
    for p in points:
        large, drafter = alone[(p["group"], "large")], alone[(p["group"], "ce")]
        if p["rule"] == "alone":
            continue
        assert 0 <= p["acceptance_rate"] <= 1 and p["tokens_per_large_call"] >= 1
        assert p["relative_latency"] > 0 and p["ms_per_example"] > 0
        if p["rule"] == "lossless":
            assert p["quality"] == large["quality"], p
            assert p["relative_flops"] > 1  # the drafts cost on top of the large model's scoring
        elif p["alpha"] == alpha_grid(p["rule"], 2, {})[-1]:
            assert p["quality"] == drafter["quality"] and p["acceptance_rate"] == 1.0, p
    assert alone[(MIXTURE, "large")]["relative_flops"] == 1.0 == alone[(MIXTURE, "large")]["relative_latency"]
    assert 0 < alone[(MIXTURE, "ce")]["relative_flops"]


def test_configuration_errors_before_decoding(tmp_path):
    dataset = DatasetConfig(MIXTURE, {"inputs": 32, "targets": 8})
    run = lambda **kw: run_speculative_eval(
        **{
            "large_model_dir": str(tmp_path / "large"),
            "dataset": dataset,
            "small_model_dirs": {"ce": str(tmp_path / "ce")},
            "output_dir": str(tmp_path / "out"),
            **kw,
        }
    )
    with pytest.raises(ConfigError, match="rules=.*lossless"):
        run(rules=["lossles"])
    with pytest.raises(ConfigError, match="gammas"):
        run(gammas=[0])
    with pytest.raises(ConfigError, match="alphas names"):
        run(alphas={"lossless": [0.5]})
    with pytest.raises(ConfigError, match="small_model_dirs"):
        run(small_model_dirs={})
    with pytest.raises(ConfigError, match="timing_repeats"):
        run(timing_repeats=0)
    assert not (tmp_path / "out").exists()


def test_opt_sweeps_between_infinite_extremes_written_as_strings(tmp_path):
    """OPT's extremes are -inf and +inf (the notebook's range); JSON, which has no infinity,
    gets "-inf" / "inf" for them, and null still means a rule without alpha."""
    assert alpha_grid("opt", 5, {}) == [-math.inf, -0.5, 0.0, 0.5, math.inf]
    assert alpha_grid("opt", 2, {}) == [-math.inf, math.inf]
    assert alpha_grid("chow", 3, {}) == pytest.approx([-0.1, 0.45, 1.0]) and alpha_grid("lossless", 5, {}) == [0.0]
    points = [
        report.Point(
            group="g",
            drafter="ce",
            rule=rule,
            gamma=1,
            alpha=alpha,
            quality=0.5,
            relative_flops=1.0,
            relative_latency=1.0,
            ms_per_example=1.0,
        )
        for rule, alpha in (("opt", -math.inf), ("opt", 0.5), ("opt", math.inf), ("lossless", None))
    ]
    report.write_points(tmp_path / "curves.csv", tmp_path / "curves.json", points)
    assert [p["alpha"] for p in json.loads((tmp_path / "curves.json").read_text())] == ["-inf", 0.5, "inf", None]
    with open(tmp_path / "curves.csv") as f:
        assert [float(r["alpha"]) if r["alpha"] else None for r in csv.DictReader(f)] == [
            -math.inf,
            0.5,
            math.inf,
            None,
        ]


def test_records_hold_every_run_and_example(outputs):
    """examples.jsonl: one record per (drafter, gamma, rule, alpha) and example; greedy lossless
    emits the large model's very token ids."""
    records = report.read_examples(outputs[0] / report.EXAMPLES)
    per_run = 4 * (len(GROUPS) - 1)  # MAX_EXAMPLES=4 of each task
    assert len(records) == per_run * (2 + len(GAMMAS) * (1 + 2 + 2))
    large = [r for r in records if r["drafter"] == "large"]
    assert len(large) == per_run and all(r["rule"] == "alone" and r["accepted"] is None for r in large)
    for gamma in GAMMAS:
        lossless = [r for r in records if r["rule"] == "lossless" and r["gamma"] == gamma]
        assert [r["prediction_ids"] for r in lossless] == [r["prediction_ids"] for r in large]
        assert [r["id"] for r in lossless] == [r["id"] for r in large]
        assert all(r["drafted"] == gamma * r["large_calls"] and r["accepted"] <= r["drafted"] for r in lossless)
