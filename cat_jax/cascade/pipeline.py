"""The cascade_eval job: decode a split with one large and several small models, then write
per-example records, threshold-sweep curves, summaries and plots (DESIGN.md section 1).

Curves are drawn per task and, for a mixture, over all its examples pooled (mean per-example
quality). Tasks with a corpus metric (BLEU) score each point on the mixed list of hypotheses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from cat_jax import data as data_lib
from cat_jax import evaluation, metrics, partitioning
from cat_jax.cascade import curves as curves_lib
from cat_jax.cascade import plots, summary
from cat_jax.cascade import rules as rules_lib
from cat_jax.cascade.records import ModelOutputs
from cat_jax.errors import ConfigError, TeacherMismatchError
from cat_jax.frozen_model import check_vocabulary, load_frozen_model, read_model_info
from cat_jax.inference import InferenceConfig
from cat_jax.models import forward_flops

log = logging.getLogger("cat_jax")

LARGE = "large"
ALL_RULES = tuple(rules_lib.RULES)
# Corpus-metric curves get at most this many thresholds unless num_thresholds says otherwise: each
# point is one sacrebleu call over the task's whole split.
CORPUS_THRESHOLDS = 201


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """One curve's rule: a label (chow_quantile_0.1), the rule in rules.RULES and its quantile."""

    label: str
    rule: str
    quantile: float = 0.0


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's examples, their postprocessed targets and the rows of each task."""

    name: str
    arrays: data_lib.ExampleArrays
    targets: list[Any]
    task_rows: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One model's greedy outputs on one split, and the forward FLOPs of each example [N]."""

    predictions: evaluation.Predictions
    flops: np.ndarray


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Every curve, the standalone points per (group, small model) and each group's metric name."""

    curves: dict[curves_lib.CurveKey, list[curves_lib.CurvePoint]]
    standalone: dict[tuple[str, str], tuple[curves_lib.OperatingPoint, curves_lib.OperatingPoint]]
    metric_names: dict[str, str]


@dataclasses.dataclass(frozen=True)
class CascadeEvalResult:
    """Where the outputs went: the directory and every file written into it."""

    output_dir: str
    files: list[str]


def plan_rules(rules: Sequence[str], quantiles: Sequence[float], num_small: int) -> list[RuleSpec]:
    """The curves to draw, one RuleSpec per label; unknown rules and bad quantiles raise ConfigError.

    chow_quantile expands to one label per quantile; agreement is skipped, with a logged note, with
    fewer than two small models.
    """
    unknown = [r for r in rules if r not in rules_lib.RULES]
    if not rules:
        raise ConfigError(f"run_cascade_eval.rules is empty; name one or more of {', '.join(ALL_RULES)}.")
    if unknown:
        raise ConfigError(f"unknown deferral rules {unknown} in run_cascade_eval.rules={list(rules)}; "
                          f"choose from {', '.join(ALL_RULES)}.")
    specs = []
    for rule in dict.fromkeys(rules):
        if rule == "chow_quantile":
            bad = [q for q in quantiles if not 0.0 <= q <= 1.0]
            if bad or not quantiles:
                raise ConfigError(f"run_cascade_eval.quantiles={list(quantiles)} must be a non-empty list "
                                  "of numbers in [0, 1] for rule chow_quantile.")
            specs += [RuleSpec(f"chow_quantile_{q:g}", rule, float(q)) for q in dict.fromkeys(quantiles)]
        elif rule == "agreement" and num_small < 2:
            log.info("Skipping rule agreement: it needs two or more small models; got %d.", num_small)
        else:
            specs.append(RuleSpec(rule, rule))
    return specs


def check_models(large_model_dir: str, small_model_dirs: Mapping[str, str]) -> None:
    """Refuses small models whose vocabulary (run_info) differs from the large model's.

    A directory without run_info.json raises CheckpointError before anything is decoded.
    """
    large = read_model_info(large_model_dir)
    want = (large["vocabulary"], large["model_config"]["vocab_size"])
    for name, model_dir in small_model_dirs.items():
        info = read_model_info(model_dir)
        have = (info["vocabulary"], info["model_config"]["vocab_size"])
        if have != want:
            raise TeacherMismatchError(
                f"small model {name!r} ({model_dir}) has vocabulary {have[0]} with vocab_size {have[1]}, "
                f"but the large model ({large_model_dir}) has {want[0]} with vocab_size {want[1]}. Both "
                "models of a cascade must share one vocabulary: train them on tasks with the same one.")


def load_split(dataset: InferenceConfig, split: str) -> Split:
    """A split of the dataset with its targets postprocessed by each example's task."""
    arrays = data_lib.load_split(dataset.mixture_or_task_name, split, dict(dataset.task_feature_lengths),
                                 max_examples=dataset.max_examples)
    names = list(dict.fromkeys(arrays.task_names.tolist()))
    tasks = {name: data_lib.get_task_or_mixture(name) for name in names}
    targets = [tasks[t].postprocess_fn(arrays.targets_text[i], example=arrays.example(i), is_target=True)
               for i, t in enumerate(arrays.task_names)]
    rows = {name: np.flatnonzero(arrays.task_names == name) for name in names}
    return Split(split, arrays, targets, rows)


def example_flops(config: Any, arrays: data_lib.ExampleArrays, decoded_lengths: np.ndarray) -> np.ndarray:
    """Forward FLOPs [N] at each example's actual input length (capped at Li) and decoded length."""
    inputs = np.minimum(arrays.input_lengths, arrays.features["encoder_input_tokens"].shape[1])
    return np.array([forward_flops(config, int(li), int(lt)) for li, lt in zip(inputs, decoded_lengths)])


def decode_model(name: str, model_dir: str, splits: Sequence[Split], dataset: InferenceConfig,
                 vocab: Any, mesh: Any, rules: Any) -> dict[str, Decoded]:
    """Restores one model and greedy-decodes every split with it: split name -> Decoded."""
    frozen = load_frozen_model(model_dir, mesh=mesh, rules=rules)
    check_vocabulary(model_dir, frozen.info, frozen.config, vocab, role=f"model {name!r}")
    out = {}
    for split in splits:
        start = time.perf_counter()
        preds = evaluation.predict(frozen.model, frozen.params, split.arrays, vocab, dataset.batch_size,
                                   mesh, rules, dataset.task_feature_lengths["targets"])
        log.info("Decoded %d %s examples with model %r (step %d of %s) in %.1f s", len(split.arrays),
                 split.name, name, frozen.step, model_dir, time.perf_counter() - start)
        out[split.name] = Decoded(preds, example_flops(frozen.config, split.arrays, preds.lengths))
    return out


def score_texts(split: Split, texts: Sequence[str]) -> tuple[list[Any], np.ndarray]:
    """Predictions [N] postprocessed by each example's task, and their per-example quality [N]."""
    arrays = split.arrays
    tasks = {name: data_lib.get_task_or_mixture(name) for name in split.task_rows}
    processed = [tasks[t].postprocess_fn(texts[i], example=arrays.example(i), is_target=False)
                 for i, t in enumerate(arrays.task_names)]
    quality = np.zeros(len(arrays))
    for name, rows in split.task_rows.items():
        per_example = metrics.get_quality(name).per_example
        quality[rows] = per_example([split.targets[i] for i in rows], [processed[i] for i in rows])
    return processed, quality


def to_records(split: Split, decoded: Decoded) -> ModelOutputs:
    """One model's records on a split (ids "<task>/<id>"), quality from each task's per-example metric."""
    arrays, preds = split.arrays, decoded.predictions
    texts, quality = score_texts(split, preds.texts)
    lengths = preds.lengths
    return ModelOutputs(
        ids=[f"{t}/{i}" for t, i in zip(arrays.task_names, arrays.ids)],
        predictions=texts, targets=split.targets, quality=quality, flops=decoded.flops,
        logprobs=[preds.logprobs[i, :n] for i, n in enumerate(lengths)],
        entropies=[preds.entropies[i, :n] for i, n in enumerate(lengths)],
        margins=[preds.margins[i, :n] for i, n in enumerate(lengths)],
        hidden=preds.mean_hidden)


def curve_groups(split: Split, mixture_name: str) -> dict[str, np.ndarray]:
    """Group name -> rows: each task, plus the mixture pooled when the dataset is not one task."""
    groups = dict(split.task_rows)
    if mixture_name not in groups:
        groups[mixture_name] = np.arange(len(split.arrays))
    return groups


def _corpus_metric(group: str, tasks: Sequence[str]) -> curves_lib.CorpusMetric | None:
    """The task's corpus metric, (targets, predictions) -> score; None if per-example (and for the
    pooled mixture)."""
    return metrics.get_quality(group).corpus if group in tasks else None


def analyse(test: Split, records: Mapping[str, ModelOutputs], plan: Sequence[RuleSpec], *,
            mixture_name: str, validation: tuple[Split, Mapping[str, ModelOutputs]] | None,
            num_thresholds: int | None, seed: int) -> Analysis:
    """Sweeps every (group, small model, rule); records: model name -> test records (LARGE included)."""
    groups = curve_groups(test, mixture_name)
    val_groups = None if validation is None else curve_groups(validation[0], mixture_name)
    small_names = [n for n in records if n != LARGE]
    curves, standalone, metric_names = {}, {}, {}
    for index, (group, rows) in enumerate(groups.items(), start=1):
        started = time.time()
        metric = _corpus_metric(group, list(test.task_rows))
        metric_names[group] = "mean per-example quality" if metric is None else "BLEU (sacrebleu)"
        thresholds = num_thresholds if metric is None else (num_thresholds or CORPUS_THRESHOLDS)
        large = records[LARGE].take(rows)
        smalls = {name: records[name].take(rows) for name in small_names}
        for name, small in smalls.items():
            others = tuple(s for n, s in smalls.items() if n != name)
            fit_on = None
            if validation is not None:
                val_rows = val_groups[group]
                fit_on = (validation[1][name].take(val_rows), validation[1][LARGE].take(val_rows))
            standalone[(group, name)] = curves_lib.standalone_points(small, large, corpus_metric=metric)
            for spec in plan:
                scores = rules_lib.compute_scores(spec.rule, small, large, quantile=spec.quantile, seed=seed,
                                                  others=others, validation=fit_on)
                curves[curves_lib.CurveKey(group, name, spec.label)] = curves_lib.sweep(
                    scores, small, large, extra_small_flops=rules_lib.extra_small_flops(spec.rule, others),
                    corpus_metric=metric, num_thresholds=thresholds)
        log.info("[%d/%d] swept %d rules x %d small models on %s (%d examples) in %.1f s", index,
                 len(groups), len(plan), len(smalls), group, len(rows), time.time() - started)
    return Analysis(curves, standalone, metric_names)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_examples(path: str, split: Split, decoded: Mapping[str, Decoded],
                   records: Mapping[str, ModelOutputs]) -> None:
    """examples.jsonl: one line per model and example, models in order, examples in split order."""
    arrays = split.arrays
    with open(path, "w") as f:
        for name, out in decoded.items():
            rec = records[name]
            for i in range(len(arrays)):
                f.write(json.dumps({
                    "model": name, "id": str(arrays.ids[i]), "task": str(arrays.task_names[i]),
                    "input": str(arrays.inputs_text[i]), "target": str(arrays.targets_text[i]),
                    "prediction": out.predictions.texts[i],
                    "token_logprobs": [round(float(x), 6) for x in rec.logprobs[i]],
                    "token_entropies": [round(float(x), 6) for x in rec.entropies[i]],
                    "token_margins": [round(float(x), 6) for x in rec.margins[i]],
                    "quality": float(rec.quality[i]), "flops": float(rec.flops[i]),
                }) + "\n")


def write_plots(output_dir: str, analysis: Analysis, plot_rule: str, plot_model: str) -> list[str]:
    """Per group: plot_rule with one line per small model, and plot_model with one line per rule."""
    paths = []
    for group, metric_name in analysis.metric_names.items():
        keyed = {k: v for k, v in analysis.curves.items() if k.task == group}
        small_only = {m: pts[0] for (g, m), pts in analysis.standalone.items() if g == group}
        large_only = analysis.standalone[(group, plot_model)][1]
        by_model = {k.small_model: v for k, v in keyed.items() if k.rule == plot_rule}
        by_rule = {k.rule: v for k, v in keyed.items() if k.small_model == plot_model}
        paths.append(plots.plot_by_model(
            by_model, os.path.join(output_dir, f"{_safe(group)}__by_model__{_safe(plot_rule)}.png"),
            task=group, rule=plot_rule, small_only=small_only, large_only=large_only,
            metric_name=metric_name))
        paths.append(plots.plot_by_rule(
            by_rule, os.path.join(output_dir, f"{_safe(group)}__by_rule__{_safe(plot_model)}.png"),
            task=group, small_model=plot_model, small_only=small_only[plot_model], large_only=large_only,
            metric_name=metric_name))
    return [str(p) for p in paths]


def _summary_preamble(dataset: InferenceConfig, model_dirs: Mapping[str, str], num_examples: int) -> str:
    models = "".join(f"- {name}: `{d}`\n" for name, d in model_dirs.items())
    return (f"# Cascade evaluation: {dataset.mixture_or_task_name} / {dataset.split} "
            f"({num_examples} examples)\n\n{models}\n"
            "Quality is the mean per-example score (0-1), or BLEU (0-100) for tasks with a corpus "
            "metric; relative FLOPs are the cascade's forward FLOPs over the large model's. AUC is "
            "the area under quality against deferral rate.\n\n")


def write_outputs(output_dir: str, test: Split, decoded: Mapping[str, Decoded],
                  records: Mapping[str, ModelOutputs], analysis: Analysis, dataset: InferenceConfig,
                  model_dirs: Mapping[str, str], plot_rule: str, plot_model: str) -> list[str]:
    """Writes examples.jsonl, curves.csv/json, summary.json/md and the PNGs; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    path = {name: os.path.join(output_dir, name) for name in
            ("examples.jsonl", "curves.csv", "curves.json", "summary.json", "summary.md")}
    summaries = {}
    for key, points in analysis.curves.items():
        small_only, large_only = analysis.standalone[(key.task, key.small_model)]
        summaries[key] = summary.summarize(points, small_only=small_only.quality,
                                           large_only=large_only.quality)
    write_examples(path["examples.jsonl"], test, decoded, records)
    summary.write_curves_csv(path["curves.csv"], analysis.curves)
    summary.write_curves_json(path["curves.json"], analysis.curves)
    summary.write_summary_json(path["summary.json"], summaries)
    summary.write_summary_md(path["summary.md"], summaries)
    md = pathlib.Path(path["summary.md"])
    md.write_text(_summary_preamble(dataset, model_dirs, len(test.arrays)) + md.read_text())
    files = [*path.values(), *write_plots(output_dir, analysis, plot_rule, plot_model)]
    for file in files:
        log.info("Wrote %s", file)
    return files


@gin.configurable
def run_cascade_eval(
    *,
    large_model_dir: str = gin.REQUIRED,
    small_model_dirs: Mapping[str, str] = gin.REQUIRED,
    dataset: InferenceConfig = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    rules: Sequence[str] = ALL_RULES,
    quantiles: Sequence[float] = (0.0, 0.1, 0.25, 0.5),
    validation_split: str = "validation",
    plot_rule: str = "chow_average",
    plot_model: str | None = None,
    num_thresholds: int | None = None,
    seed: int = 0,
) -> CascadeEvalResult:
    """Decodes `dataset` with the large model and every small model (display name -> MODEL_DIR),
    sweeps each deferral rule and writes records, curves, summaries and plots into output_dir.

    post_hoc is fitted on `validation_split`, decoded only when post_hoc is requested. plot_rule is
    a curve label (e.g. chow_quantile_0.1); plot_model defaults to the first small model.
    """
    small_model_dirs = dict(small_model_dirs)
    if not small_model_dirs or LARGE in small_model_dirs:
        raise ConfigError(f"run_cascade_eval.small_model_dirs={small_model_dirs} must name one or more "
                          f"small models other than {LARGE!r}, e.g. {{'ce': '/tmp/cat_jax/small_ce'}}.")
    plan = plan_rules(rules, quantiles, len(small_model_dirs))
    labels = [spec.label for spec in plan]
    plot_model = next(iter(small_model_dirs)) if plot_model is None else plot_model
    if plot_rule not in labels or plot_model not in small_model_dirs:
        raise ConfigError(f"plot_rule={plot_rule!r} must be one of the curves {labels} and "
                          f"plot_model={plot_model!r} one of the small models {list(small_model_dirs)}.")
    check_models(large_model_dir, small_model_dirs)
    model_dirs = {LARGE: large_model_dir, **small_model_dirs}

    mesh, mesh_rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
    vocab = data_lib.get_vocabulary_of(dataset.mixture_or_task_name)
    test = load_split(dataset, dataset.split)
    splits = [test]
    use_validation = any(spec.rule == "post_hoc" for spec in plan)
    if use_validation and validation_split == dataset.split:
        log.warning("post_hoc is fitted and evaluated on the same split %r.", validation_split)
    elif use_validation:
        splits.append(load_split(dataset, validation_split))
    decoded = {name: decode_model(name, d, splits, dataset, vocab, mesh, mesh_rules)
               for name, d in model_dirs.items()}
    if jax.process_index() != 0:
        return CascadeEvalResult(output_dir, [])

    by_split = {s.name: {name: to_records(s, out[s.name]) for name, out in decoded.items()} for s in splits}
    validation = (splits[-1], by_split[splits[-1].name]) if use_validation else None
    analysis = analyse(test, by_split[test.name], plan, mixture_name=dataset.mixture_or_task_name,
                       validation=validation, num_thresholds=num_thresholds, seed=seed)
    test_decoded = {name: out[test.name] for name, out in decoded.items()}
    files = write_outputs(output_dir, test, test_decoded, by_split[test.name], analysis, dataset,
                          model_dirs, plot_rule, plot_model)
    return CascadeEvalResult(output_dir, files)
