"""The demo's report: tables from summary.json, a winner among deployable rules, the commands."""

import json

from cat_jax import demo


def _row(model: str, rule: str, auc: float, match: float | None) -> dict:
    return {"task": demo.TASK, "small_model": model, "rule": rule, "small_only": 0.5, "large_only": 0.8,
            "auc": auc, "relative_flops_to_match_large": match, "best_quality": 0.8, "best_relative_flops": 0.9}


def test_report_names_the_best_deployable_rule_and_the_cheapest_match(tmp_path):
    rows = [_row("ce", "oracle", 0.95, 0.3), _row("ce", "chow_average", 0.70, None),
            _row("cat", "chow_average", 0.74, 0.9), _row("cat", "random", 0.60, 1.0),
            _row("distill", "post_hoc", 0.72, 0.8), {**_row("ce", "chow_average", 0.99, 0.1), "task": "other"}]
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    (tmp_path / "curve.png").write_bytes(b"")
    results = {"large": {"step": 8, "metrics": {demo.TASK: {"accuracy": 80.0}}},
               "small_ce": {"step": 2, "metrics": {demo.TASK: {"accuracy": 50.0}}}}
    report = tmp_path / "report.md"

    winner = demo.write_report(str(report), str(tmp_path), results, ["python -m cat_jax.train --x"])

    assert winner == "cat/chow_average"  # not ce/oracle (a bound) nor the other task's row
    text = report.read_text()
    assert "**distill** + **post_hoc** at 0.800" in text  # cheapest non-bound match
    assert "| small_ce | 2 | 50.0000 |" in text and "| large | 8 | 80.0000 |" in text
    assert "| ce | oracle | 0.500 | 0.800 | 0.9500 | 0.300 |" in text  # bounds stay in the table
    assert "| cat | chow_average | 0.500 | 0.800 | 0.7400 | 0.900 |" in text
    assert "![curve.png](cascade/curve.png)" in text and "python -m cat_jax.train --x" in text
