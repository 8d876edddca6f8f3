"""Seed comparison of cascade summaries: mean and spread by hand."""

from __future__ import annotations

import json

from cat_jax.jobs.cascade_compare import load, table


def _summary(path, auc, match):
    path.mkdir()
    row = {
        "task": "t",
        "small_model": "cat",
        "rule": "chow_average",
        "small_only": 0.1,
        "large_only": 0.5,
        "auc": auc,
        "relative_flops_to_match_large": match,
        "best_quality": 0.5,
        "best_relative_flops": 1.0,
    }
    (path / "summary.json").write_text(json.dumps([row, dict(row, rule="random", auc=0.0)]))
    return str(path)


def test_mean_and_spread_over_seeds(tmp_path):
    dirs = [_summary(tmp_path / "s0", 0.30, 0.6), _summary(tmp_path / "s1", 0.40, None)]
    rows = load(dirs)
    assert len(rows[("t", "cat", "chow_average")]) == 2
    text = table(rows, rule="chow_average")
    assert "| cat | chow_average | 2 | 0.3500 ± 0.0500 | 0.6000 ± 0.0000 (1/2) |" in text
    assert "random" not in text
