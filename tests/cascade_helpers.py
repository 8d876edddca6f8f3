"""Helpers the cascade_eval tests share: reading a run's records and curves, each curve's two ends
computed by hand from the records, and re-analysis from the records in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from conftest import REPO, SUBPROCESS_ENV

from cat_jax import metrics

# The files a re-analysis must reproduce byte for byte (tier files only where the run drew tiers).
CURVE_FILES = ("curves.csv", "curves.json", "summary.json", "summary.md")
# Every curve label cascade_eval draws with its default rules (chow_quantile at its four quantiles).
LABELS = {
    "chow_sum",
    "chow_average",
    "chow_quantile_0",
    "chow_quantile_0.1",
    "chow_quantile_0.25",
    "chow_quantile_0.5",
    "entropy_mean",
    "entropy_max",
    "margin_min",
    "post_hoc",
    "post_hoc_embed",
    "peer_agreement",
    "oracle",
    "random",
}
TIER_FILES = ("tier_curves.csv", "tier_curves.json", "tier_summary.json")


def read_examples(out: Path, name: str = "examples.jsonl") -> dict[str, list[dict]]:
    """A records file's rows by model, in file order."""
    by_model = defaultdict(list)
    for line in (out / name).read_text().splitlines():
        row = json.loads(line)
        by_model[row["model"]].append(row)
    return by_model


def read_curves(out: Path) -> dict[tuple[str, str, str], list[dict]]:
    """curves.json as (task, small model, rule) -> points."""
    records = json.loads((out / "curves.json").read_text())
    return {(c["task"], c["small_model"], c["rule"]): c["points"] for c in records}


def total(rows: list[dict], field: str) -> float:
    return sum(r[field] for r in rows)


def expected_endpoints(rows, group, small, mixture, bleu_tasks, others=(), embedding=False):
    """(quality at rate 0, rel. FLOPs at rate 0, quality at rate 1, rel. FLOPs at rate 1) by hand:
    the small model alone (plus `others`, the peers a rule runs, and the large model's embedding
    FLOPs when the rule reads it) and the large model after it."""
    pick = {m: [r for r in rows[m] if group in (r["task"], mixture)] for m in rows}
    large_flops = total(pick["large"], "flops")
    small_flops = sum(total(pick[m], "flops") for m in (small, *others))
    if embedding:  # the large model's partial forward, on every example
        small_flops += total(pick["large"], "embedding_flops")
    if group in bleu_tasks:

        def quality(m):
            return metrics.corpus_bleu([r["target"] for r in pick[m]], [r["prediction"] for r in pick[m]])
    else:

        def quality(m):
            return total(pick[m], "quality") / len(pick[m])

    return quality(small), small_flops / large_flops, quality("large"), 1 + small_flops / large_flops


def reanalyse(out: Path, again: Path) -> subprocess.CompletedProcess:
    """`cat_jax.cascade_analyse out --output_dir again` (its job) in a fresh interpreter that prints which of
    TensorFlow, seqio and the tasks it imported."""
    check = (
        "import sys; from cat_jax.jobs import cascade_analyse; rc = cascade_analyse.main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('tensorflow', 'seqio', 'tasks') if m in sys.modules); "
        "print('imported', heavy); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", check, str(out), "--output_dir", str(again)],
        cwd=REPO,
        env=dict(os.environ, **SUBPROCESS_ENV),
        capture_output=True,
        text=True,
        timeout=600,
    )
