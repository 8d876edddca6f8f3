"""The files of an analysis: curves.csv/json, summary.json/md, tier_curves.csv/json and
tier_summary.json (with a k-tier cascade), and the PNG plots of every group."""

from __future__ import annotations

import logging
import os
import pathlib
import re

from cat_jax.cascade import plots, summary
from cat_jax.cascade.analysis import Analysis
from cat_jax.cascade.plan import AnalysisConfig

log = logging.getLogger("cat_jax")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_plots(output_dir: str, analysis: Analysis, plot_rule: str) -> list[str]:
    """Per group: plot_rule with one line per small model, every small model with one line per rule,
    and the k-tier frontiers when there are any."""
    paths = []
    for group, metric_name in analysis.metric_names.items():
        keyed = {k: v for k, v in analysis.curves.items() if k.task == group}
        small_only = {m: pts[0] for (g, m), pts in analysis.standalone.items() if g == group}
        large_only = next(pts[1] for (g, _), pts in analysis.standalone.items() if g == group)
        by_model = {k.small_model: v for k, v in keyed.items() if k.rule == plot_rule}
        path = os.path.join(output_dir, f"{_safe(group)}__by_model__{_safe(plot_rule)}.png")
        plots.plot_by_model(
            by_model,
            path,
            task=group,
            rule=plot_rule,
            small_only=small_only,
            large_only=large_only,
            metric_name=metric_name,
        )
        paths.append(path)
        for small, point in small_only.items():
            by_rule = {k.rule: v for k, v in keyed.items() if k.small_model == small}
            path = os.path.join(output_dir, f"{_safe(group)}__by_rule__{_safe(small)}.png")
            plots.plot_by_rule(
                by_rule,
                path,
                task=group,
                small_model=small,
                small_only=point,
                large_only=large_only,
                metric_name=metric_name,
            )
            paths.append(path)
        tiered = {k: v for k, v in analysis.tier_curves.items() if k.task == group}
        for key, frontier in tiered.items():
            labels = ["+".join(tier) for tier in analysis.tier_plan.tiers]
            path = os.path.join(output_dir, f"{_safe(group)}__tiers.png")
            plots.plot_tiers(
                {f"{key.cascade}\n({key.rules})": frontier},
                path,
                task=group,
                tiers_alone=dict(zip(labels, analysis.tiers_alone[key])),
                metric_name=metric_name,
            )
            paths.append(path)
    return paths


def preamble(config: AnalysisConfig, num_examples: int) -> str:
    """summary.md's opening: the dataset, the models and how to read the numbers."""
    models = "".join(f"- {name}: `{d}`\n" for name, d in config.model_dirs.items())
    return (
        f"# Cascade evaluation: {config.mixture_name} / {config.split} ({num_examples} examples)\n\n{models}\n"
        "Quality is the mean per-example score (0-1), or BLEU (0-100) for tasks with a corpus "
        "metric; relative FLOPs are the cascade's forward FLOPs over the large model's. AUC-DF is "
        "the area under quality against deferral rate; random deferral's is the mean of the "
        "small-only and large-only qualities, and the gain is the difference (and its percentage).\n\n"
    )


def write_outputs(output_dir: str, config: AnalysisConfig, analysis: Analysis, num_examples: int) -> list[str]:
    """Writes the curve and summary files and the PNGs into output_dir; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(output_dir, name)

    summaries = {}
    for key, points in analysis.curves.items():
        small_only, large_only = analysis.standalone[(key.task, key.small_model)]
        summaries[key] = summary.summarize(points, small_only=small_only.quality, large_only=large_only.quality)
    plan = analysis.tier_plan
    tier_summaries = {
        key: summary.summarize_tiers(points, plan.tiers, [spec.label for spec in plan.rules], analysis.tiers_alone[key])
        for key, points in analysis.tier_curves.items()
    }
    summary.write_curves_csv(path("curves.csv"), analysis.curves)
    summary.write_curves_json(path("curves.json"), analysis.curves)
    summary.write_summary_json(path("summary.json"), summaries, analysis.calibrations)
    summary.write_summary_md(
        path("summary.md"), summaries, analysis.calibrations, tier_summaries, analysis.tier_calibrations
    )
    md = pathlib.Path(path("summary.md"))
    md.write_text(preamble(config, num_examples) + md.read_text())
    files = [path(name) for name in ("curves.csv", "curves.json", "summary.json", "summary.md")]
    if analysis.tier_curves:
        summary.write_tier_curves_csv(path("tier_curves.csv"), analysis.tier_curves)
        summary.write_tier_curves_json(path("tier_curves.json"), analysis.tier_curves)
        summary.write_tier_summary_json(path("tier_summary.json"), tier_summaries, analysis.tier_calibrations)
        files += [path(name) for name in ("tier_curves.csv", "tier_curves.json", "tier_summary.json")]
    files += write_plots(output_dir, analysis, config.options.plot_rule)
    for file in files:
        log.info("Wrote %s", file)
    return files
