"""The demo's report: tables from summary.json and tier_summary.json, a winner among deployable
rules, the 3-tier cascade, the budget-calibrated rows, the commands."""

import json

import gin
import pytest

from cat_jax.jobs import demo
from cat_jax.models.decoder import DecoderConfig


def _calibration(val_rate: float, test_rate: float) -> list[dict]:
    return [
        {
            "budget": "deferral_rate",
            "target": demo.TARGET_DEFERRAL_RATE,
            "thresholds": [-0.5],
            "met_on_validation": True,
            "validation": {"deferral_rate": val_rate, "relative_flops": 0.4, "quality": 0.7},
            "test": {"deferral_rate": test_rate, "relative_flops": 0.45, "quality": 0.68},
        }
    ]


def _row(model: str, rule: str, auc: float, match: float | None) -> dict:
    return {
        "task": demo.TASK,
        "small_model": model,
        "rule": rule,
        "small_only": 0.5,
        "large_only": 0.8,
        "auc": auc,
        "auc_df_random": 0.65,
        "auc_df_gain": auc - 0.65,
        "auc_df_gain_pct": None,
        "relative_flops_to_match_large": match,
        "best_quality": 0.8,
        "best_relative_flops": 0.9,
        "calibration": _calibration(0.3, 0.32),
    }


def test_report_names_the_best_deployable_rule_and_the_cheapest_match(tmp_path):
    rows = [
        _row("ce", "oracle", 0.95, 0.3),
        _row("ce", "chow_average", 0.70, None),
        _row("cat", "chow_average", 0.74, 0.9),
        _row("cat", "random", 0.60, 1.0),
        _row("distill", "post_hoc", 0.72, 0.8),
        {**_row("ce", "chow_average", 0.99, 0.1), "task": "other"},
    ]
    tiered = [
        {
            "task": demo.TASK,
            "cascade": "ce > cat+distill > large",
            "rules": "chow_average > abc",
            "tiers_alone": [
                {"tier": "ce", "relative_flops": 0.07, "quality": 0.58},
                {"tier": "cat+distill", "relative_flops": 0.14, "quality": 0.61},
                {"tier": "large", "relative_flops": 1.0, "quality": 0.77},
            ],
            "relative_flops_to_match_last": 0.62,
            "best_quality": 0.79,
            "best_relative_flops": 0.8,
            "best_relative_latency": 0.7,
            "calibration": _calibration(0.25, 0.27),
        }
    ]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    (tmp_path / "tier_summary.json").write_text(json.dumps(tiered))
    (tmp_path / "curve.png").write_bytes(b"")
    results = {
        "large": {"step": 8, "metrics": {demo.TASK: {"accuracy": 80.0}}},
        "small_ce": {"step": 2, "metrics": {demo.TASK: {"accuracy": 50.0}}},
    }
    report = tmp_path / "report.md"

    winner = demo.write_report(str(report), str(tmp_path), results, ["python -m cat_jax.train --x"])

    assert winner == "cat/chow_average"  # not ce/oracle (a bound) nor the other task's row
    text = report.read_text()
    assert "**distill** + **post_hoc** at 0.800" in text  # cheapest non-bound match
    assert "| small_ce | 2 | 50.0000 |" in text and "| large | 8 | 80.0000 |" in text
    assert f"The CAT row is CAT-Xent trained from scratch for {demo.STEPS} steps with one seed" in text
    assert "| ce | oracle | 0.500 | 0.800 | 0.9500 | +0.3000 | 0.300 |" in text  # bounds stay in the table
    assert "| cat | chow_average | 0.500 | 0.800 | 0.7400 | +0.0900 | 0.900 |" in text
    assert (
        "| ce > cat+distill > large | chow_average > abc | ce 0.580 @ 0.070, cat+distill 0.610 @ 0.140, "
        "large 0.770 @ 1.000 | 0.620 | 0.790 @ 0.800 (0.700) |"
    ) in text
    assert "| cat | chow_average | 0.300 / 0.400 / 0.700 | 0.320 / 0.450 / 0.680 |" in text
    assert "| ce > cat+distill > large | chow_average > abc | 0.250 / 0.400 / 0.700 | 0.270 / 0.450 / 0.680 |" in text
    assert "![curve.png](cascade/curve.png)" in text and "python -m cat_jax.train --x" in text


def test_family_switch_picks_the_decoder_demo_models(monkeypatch, tmp_path):
    """CAT_JAX_DEMO_FAMILY=decoder: every training adds the decoder demo model of its size (the
    large run file the large one), eval and cascade_eval need none (run_info says); t5 adds none;
    the report names the family; an unknown family is refused naming the choices."""
    monkeypatch.setenv("CAT_JAX_DEMO_FAMILY", "decoder")
    assert demo.family_from_env() == "decoder"
    recorded = []
    stages = demo.Stages(total=2)
    monkeypatch.setattr(stages, "run", lambda name, args, skip_if=None: recorded.append(args))
    demo._train(stages, "large", "train_large.gin", steps=4, family="decoder")
    demo._train(stages, "small_ce", "train_small_ce.gin", family="decoder")
    demo._train(stages, "small_t5", "train_small_ce.gin", family="t5")
    model_files = [[a for a in args if a.startswith("--gin_file=gin_configs/models/")] for args in recorded]
    assert model_files == [
        ["--gin_file=gin_configs/models/decoder/decoder_demo_large.gin"],
        ["--gin_file=gin_configs/models/decoder/decoder_demo_small.gin"],
        [],
    ]
    for args, files, width in zip(recorded, model_files, (128, 64)):
        assert args.index(files[0]) == 2  # right after the run file: its model is replaced
        gin.clear_config()
        try:
            gin.parse_config_file(files[0].split("=", 1)[1])
            assert "DecoderConfig" in str(gin.query_parameter("%MODEL_CONFIG"))
            assert DecoderConfig().emb_dim == width
        finally:
            gin.clear_config()
    (tmp_path / "summary.json").write_text(json.dumps([_row("ce", "chow_average", 0.7, None)]))
    (tmp_path / "tier_summary.json").write_text("[]")
    results = {"large": {"step": 8, "metrics": {demo.TASK: {"accuracy": 80.0}}}}
    demo.write_report(str(tmp_path / "report.md"), str(tmp_path), results, [], family="decoder")
    assert "decoder-only (Llama-shaped) models" in (tmp_path / "report.md").read_text()
    monkeypatch.setenv("CAT_JAX_DEMO_FAMILY", "mamba")
    with pytest.raises(SystemExit, match="CAT_JAX_DEMO_FAMILY='mamba': choose one of"):
        demo.family_from_env()
