"""Compare cascade summaries across seeds: mean and spread of AUC and of the FLOPs to match large.

    python -m cat_jax.cascade_compare runs/offline_cascade/seed*/cascade [--rule chow_average]

Reads each directory's summary.json and prints a markdown table per task: for every small model
and rule, the AUC (mean ± standard deviation over the runs) and the relative FLOPs at which the
cascade first reaches the large model's quality (mean ± std over the runs that reach it).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import numpy as np


def load(dirs: list[str]) -> dict[tuple[str, str, str], list[dict]]:
    """{(task, small model, rule): [summary row of each run]}."""
    rows: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for d in dirs:
        with open(os.path.join(d, "summary.json")) as f:
            for r in json.load(f):
                rows[(r["task"], r["small_model"], r["rule"])].append(r)
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "never"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def table(rows: dict[tuple[str, str, str], list[dict]], rule: str | None = None) -> str:
    out = []
    for task in sorted({k[0] for k in rows}):
        out += [
            f"## {task}",
            "",
            "| small model | rule | runs | AUC | rel. FLOPs to match large (runs reaching it) |",
            "|---|---|---|---|---|",
        ]
        for (t, model, r), runs in sorted(rows.items()):
            if t != task or (rule and r != rule):
                continue
            matched = [
                x["relative_flops_to_match_large"] for x in runs if x["relative_flops_to_match_large"] is not None
            ]
            out.append(
                f"| {model} | {r} | {len(runs)} | {_mean_std([x['auc'] for x in runs])} | "
                f"{_mean_std(matched)} ({len(matched)}/{len(runs)}) |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="cascade_eval output directories (one per seed)")
    parser.add_argument("--rule", default=None, help="only this rule")
    args = parser.parse_args()
    print(table(load(args.dirs), args.rule))
