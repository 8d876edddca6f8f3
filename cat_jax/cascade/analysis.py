"""The analysis of cascade records: every curve, calibration and k-tier frontier of a plan.

Curves are drawn per task and over all examples pooled (the mixture, mean per-example quality).
Tasks with a corpus metric (BLEU) score each point on the mixed list of hypotheses. The same
function serves cascade_eval (records just decoded) and `cascade_analyse` (records read back), so
both give the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from cat_jax.cascade import calibration, tiers
from cat_jax.cascade import curves as curves_lib
from cat_jax.cascade import rules as rules_lib
from cat_jax.cascade.agreement import STATISTICS
from cat_jax.cascade.calibration import Calibration
from cat_jax.cascade.curves import CorpusMetric, CurveKey, CurvePoint, OperatingPoint
from cat_jax.cascade.plan import LARGE, AnalysisConfig, RuleSpec, TierPlan
from cat_jax.cascade.records import SplitRecords
from cat_jax.cascade.tiers import TierKey, TierPoint

log = logging.getLogger("cat_jax")

# Corpus-metric curves get at most this many thresholds unless num_thresholds says otherwise: each
# point is one sacrebleu call over the task's whole split.
CORPUS_THRESHOLDS = 201


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Every two-model curve with its standalone points (per group and small model) and budget
    calibrations, every k-tier frontier (one per group) with its tiers alone and calibrations, each
    group's metric name, and the k-tier plan (None without one)."""

    curves: dict[CurveKey, list[CurvePoint]]
    standalone: dict[tuple[str, str], tuple[OperatingPoint, OperatingPoint]]
    calibrations: dict[CurveKey, list[Calibration]]
    tier_curves: dict[TierKey, list[TierPoint]]
    tiers_alone: dict[TierKey, list[OperatingPoint]]
    tier_calibrations: dict[TierKey, list[Calibration]]
    metric_names: dict[str, str]
    tier_plan: TierPlan | None


@dataclasses.dataclass(frozen=True)
class _Group:
    """One group's records on test and (when decoded) validation, and its corpus metric."""

    test: SplitRecords
    validation: SplitRecords | None
    metric: CorpusMetric | None
    thresholds: int | None
    free_text: dict[str, np.ndarray]  # split name -> [N] bool: free-text examples (ABC's statistic)


def _free_text(split: SplitRecords, free_text: Mapping[str, bool]) -> np.ndarray:
    return np.array([free_text.get(task, False) for task in split.tasks], dtype=bool)


def _take(split: SplitRecords, rows: np.ndarray) -> SplitRecords:
    return SplitRecords(
        split.name, [split.tasks[i] for i in rows], {name: out.take(rows) for name, out in split.models.items()}
    )


def _groups(
    config: AnalysisConfig,
    test: SplitRecords,
    validation: SplitRecords | None,
    metrics: Mapping[str, CorpusMetric | None],
) -> dict[str, _Group]:
    val_groups = None if validation is None else validation.groups(config.mixture_name)
    groups = {}
    for name, rows in test.groups(config.mixture_name).items():
        metric = metrics.get(name) if name in test.tasks else None
        num = config.options.num_thresholds
        val = None
        if val_groups is not None:
            if name not in val_groups:
                raise ValueError(
                    f"the {validation.name} split has no example of {name!r}; decode it with "
                    "every task of the test split."
                )
            val = _take(validation, val_groups[name])
        group_test = _take(test, rows)
        free_text = {s.name: _free_text(s, config.free_text_tasks()) for s in (group_test, val) if s is not None}
        groups[name] = _Group(group_test, val, metric, num if metric is None else (num or CORPUS_THRESHOLDS), free_text)
    return groups


def _others(split: SplitRecords, small: str) -> tuple:
    return tuple(out for name, out in split.models.items() if name not in (small, LARGE))


def _rule_scores(
    spec: RuleSpec, split: SplitRecords, small: str, fit_on: SplitRecords | None, config: AnalysisConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores [N], FLOPs [N] the rule spends besides the small model, or None) of a two-model rule;
    a learned rule is fitted on all of `fit_on`."""
    others = _others(split, small)
    validation = None if fit_on is None else (fit_on.models[small], fit_on.models[LARGE])
    scores = rules_lib.compute_scores(
        spec.rule,
        split.models[small],
        split.models[LARGE],
        quantile=spec.quantile,
        seed=config.options.seed,
        others=others,
        validation=validation,
        posthoc_config=config.posthoc_config(),
    )
    return scores, rules_lib.extra_small_flops(spec.rule, others, split.models[LARGE])


def _validation_scores(
    spec: RuleSpec, val: SplitRecords, small: str, config: AnalysisConfig
) -> tuple[np.ndarray, np.ndarray | None]:
    """`_rule_scores` on validation; a learned rule's out of fold (cross-fitted on validation)."""
    if spec.rule not in rules_lib.LEARNED_RULES:
        return _rule_scores(spec, val, small, val, config)
    scores = rules_lib.cross_fitted_scores(spec.rule, val.models[small], val.models[LARGE], config.posthoc_config())
    return scores, rules_lib.extra_small_flops(spec.rule, _others(val, small), val.models[LARGE])


def _calibrate_rule(
    spec: RuleSpec,
    group: _Group,
    small: str,
    scores: np.ndarray,
    extra: np.ndarray | None,
    budgets: Sequence[calibration.Budget],
    config: AnalysisConfig,
) -> list[Calibration]:
    """The threshold spending each budget on validation (every distinct score a candidate; a learned
    rule's scores out of fold), on test."""
    val = group.validation
    val_scores, val_extra = _validation_scores(spec, val, small, config)
    val_points = curves_lib.sweep(
        val_scores, val.models[small], val.models[LARGE], extra_small_flops=val_extra, corpus_metric=group.metric
    )
    found = []
    for budget in budgets:
        chosen, met = calibration.spend(val_points, budget)
        (on_test,) = curves_lib.points_at(
            scores,
            group.test.models[small],
            group.test.models[LARGE],
            np.array([chosen.threshold]),
            extra_small_flops=extra,
            corpus_metric=group.metric,
        )
        found.append(
            Calibration(budget, (chosen.threshold,), calibration.outcome(chosen), calibration.outcome(on_test), met)
        )
    return found


def _tier_inputs(
    plan: TierPlan, split: SplitRecords, free_text: np.ndarray, seed: int
) -> tuple[list[tiers.TierAnswer], np.ndarray]:
    """(each tier's answer [K], boundary scores [K-1, N]); a random boundary b is seeded seed + b."""
    answers = [
        tiers.tier_answer([split.models[m] for m in tier], free_text, plan.statistic(k))
        for k, tier in enumerate(plan.tiers)
    ]
    scores = [
        answer.agreement
        if spec.rule in STATISTICS
        else rules_lib.own_output_scores(spec.rule, answer.outputs, quantile=spec.quantile, seed=seed + b)
        for b, (spec, answer) in enumerate(zip(plan.rules, answers))
    ]
    return answers, np.array(scores, dtype=np.float64).reshape(len(plan.rules), len(split))


def _calibrate_tiers(
    plan: TierPlan,
    group: _Group,
    answers: Sequence[tiers.TierAnswer],
    scores: np.ndarray,
    budgets: Sequence[calibration.Budget],
    config: AnalysisConfig,
) -> list[Calibration]:
    """The joint grid point of best validation quality within each budget, on test."""
    val = group.validation
    val_answers, val_scores = _tier_inputs(plan, val, group.free_text[val.name], config.options.seed)
    grid = tiers.joint_grid(val_scores, config.options.tier_thresholds)
    val_points = tiers.evaluate(val_answers, val_scores, grid, corpus_metric=group.metric)
    found = []
    for budget in budgets:
        chosen, met = calibration.best_within(val_points, budget)
        (on_test,) = tiers.evaluate(answers, scores, np.array([chosen.thresholds]), corpus_metric=group.metric)
        found.append(
            Calibration(budget, chosen.thresholds, calibration.outcome(chosen), calibration.outcome(on_test), met)
        )
    return found


def analyse(
    config: AnalysisConfig,
    test: SplitRecords,
    validation: SplitRecords | None,
    metrics: Mapping[str, CorpusMetric | None],
) -> Analysis:
    """Sweeps every (group, small model, rule) and the k-tier cascade, and calibrates the budgets.

    test / validation: every model's records (LARGE included); validation may be None when
    config.needs_validation() is False. metrics: task -> corpus metric (None: per-example).
    """
    config.check()
    plan, tier_plan, budgets = config.rule_plan(), config.tier_plan(), config.budgets()
    if validation is None and config.needs_validation():
        raise ValueError("the learned rules and budget calibration need validation records; none were given.")
    if validation is not None:
        config.check_folds({name: len(rows) for name, rows in validation.groups(config.mixture_name).items()})
    seed = config.options.seed
    result = Analysis({}, {}, {}, {}, {}, {}, {}, tier_plan)
    groups = _groups(config, test, validation, metrics)
    for index, (name, group) in enumerate(groups.items(), start=1):
        started = time.time()
        result.metric_names[name] = "mean per-example quality" if group.metric is None else "BLEU (sacrebleu)"
        large = group.test.models[LARGE]
        for small in config.small_models:
            result.standalone[(name, small)] = curves_lib.standalone_points(
                group.test.models[small], large, corpus_metric=group.metric
            )
            for spec in plan:
                key = CurveKey(name, small, spec.label)
                scores, extra = _rule_scores(spec, group.test, small, group.validation, config)
                result.curves[key] = curves_lib.sweep(
                    scores,
                    group.test.models[small],
                    large,
                    extra_small_flops=extra,
                    corpus_metric=group.metric,
                    num_thresholds=group.thresholds,
                )
                if budgets:
                    result.calibrations[key] = _calibrate_rule(spec, group, small, scores, extra, budgets, config)
        if tier_plan is not None:
            key = TierKey(name, tier_plan.name, tier_plan.rules_label)
            answers, scores = _tier_inputs(tier_plan, group.test, group.free_text[test.name], seed)
            result.tier_curves[key] = tiers.sweep_tiers(
                answers, scores, corpus_metric=group.metric, num_thresholds=config.options.tier_thresholds
            )
            result.tiers_alone[key] = tiers.tiers_alone(answers, corpus_metric=group.metric)
            if budgets:
                result.tier_calibrations[key] = _calibrate_tiers(tier_plan, group, answers, scores, budgets, config)
        log.info(
            "[%d/%d] swept %d rules x %d small models%s on %s (%d examples) in %.1f s",
            index,
            len(groups),
            len(plan),
            len(config.small_models),
            "" if tier_plan is None else " and the k-tier cascade",
            name,
            len(group.test),
            time.time() - started,
        )
    return result
