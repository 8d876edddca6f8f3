"""What a cascade analysis computes, checked before anything is decoded, and recorded with the
records (cascade_config.json) so that `python -m cat_jax.cascade_analyse DIR` computes it again.

Task quality at analysis time: per-example scores are in the records; a task's corpus metric
(BLEU) is recorded by its importable name (`module:qualname`, e.g. `cat_jax.metrics:corpus_bleu`)
and imported again on re-analysis, which registers its additive form too. A metric that cannot be
named that way (a lambda, a closure) is found by importing `tasks` and asking
`cat_jax.metrics.get_quality(task)`, which needs the task's registry (and so TensorFlow).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cat_jax import metrics
from cat_jax.cascade import calibration
from cat_jax.cascade import rules as rules_lib
from cat_jax.cascade.agreement import ABC, ABC_CENTRAL, STATISTICS
from cat_jax.cascade.curves import CorpusMetric
from cat_jax.cascade.posthoc import PostHocConfig
from cat_jax.cascade.tiers import cascade_name
from cat_jax.errors import ConfigError

log = logging.getLogger("cat_jax")

LARGE = "large"
CONFIG = "cascade_config.json"
ALL_RULES = tuple(rules_lib.RULES)
# Rules a boundary of a k-tier cascade can use: those reading the tier's own answer, and ABC's two
# agreement statistics (cat_jax.cascade.agreement).
TIER_RULES = (*rules_lib.OWN_OUTPUT_RULES, *STATISTICS)
_QUANTILE_LABEL = re.compile(r"chow_quantile_(.+)")


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """One curve's rule: a label (chow_quantile_0.1), the rule in rules.RULES and its quantile."""

    label: str
    rule: str
    quantile: float = 0.0


@dataclasses.dataclass(frozen=True)
class Options:
    """The analysis options of run_cascade_eval (see its docstring), as recorded."""

    rules: tuple[str, ...] = ALL_RULES
    quantiles: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    num_thresholds: int | None = None
    seed: int = 0
    plot_rule: str = "chow_average"
    tiers: tuple[tuple[str, ...], ...] = ()
    tier_rules: tuple[str, ...] | None = None
    tier_thresholds: int | None = 21
    target_deferral_rate: float | None = None
    target_relative_flops: float | None = None
    posthoc_folds: int = 5
    embed_layer: int | None = None

    def __post_init__(self) -> None:
        def set_(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)  # frozen; normalise gin's lists once here

        set_("rules", tuple(self.rules))
        set_("quantiles", tuple(float(q) for q in self.quantiles))
        set_("tiers", tuple((t,) if isinstance(t, str) else tuple(t) for t in self.tiers))
        if self.tier_rules is not None:
            set_("tier_rules", tuple(self.tier_rules))


@dataclasses.dataclass(frozen=True)
class TierPlan:
    """A k-tier cascade: tiers of model names [K] and one rule per boundary [K-1]."""

    tiers: tuple[tuple[str, ...], ...]
    rules: tuple[RuleSpec, ...]

    @property
    def name(self) -> str:
        return cascade_name(self.tiers)

    @property
    def rules_label(self) -> str:
        return " > ".join(spec.label for spec in self.rules)

    def statistic(self, tier: int) -> str:
        """The agreement statistic tier `tier` votes with: abc_central when its boundary rule is,
        else abc (the last tier, and tiers whose boundary reads the answer's own scores)."""
        rule = self.rules[tier].rule if tier < len(self.rules) else ABC
        return ABC_CENTRAL if rule == ABC_CENTRAL else ABC


def plan_rules(rules: Sequence[str], quantiles: Sequence[float], num_small: int) -> list[RuleSpec]:
    """The curves to draw, one RuleSpec per label; unknown rules and bad quantiles raise ConfigError.

    chow_quantile expands to one label per quantile; peer_agreement is skipped, with a logged note,
    with fewer than two small models; a former rule name (rules.RENAMED_RULES) gives its new rule.
    """
    for old, new in rules_lib.RENAMED_RULES.items():
        if old in rules:
            log.warning("Deferral rule %r is now called %r; running that.", old, new)
    rules = [rules_lib.RENAMED_RULES.get(r, r) for r in rules]
    unknown = [r for r in rules if r not in rules_lib.RULES]
    if not rules:
        raise ConfigError(f"run_cascade_eval.rules is empty; name one or more of {', '.join(ALL_RULES)}.")
    if unknown:
        raise ConfigError(
            f"unknown deferral rules {unknown} in run_cascade_eval.rules={list(rules)}; "
            f"choose from {', '.join(ALL_RULES)}."
        )
    specs = []
    for rule in dict.fromkeys(rules):
        if rule == "chow_quantile":
            bad = [q for q in quantiles if not 0.0 <= q <= 1.0]
            if bad or not quantiles:
                raise ConfigError(
                    f"run_cascade_eval.quantiles={list(quantiles)} must be a non-empty list "
                    "of numbers in [0, 1] for rule chow_quantile."
                )
            specs += [RuleSpec(f"chow_quantile_{q:g}", rule, float(q)) for q in dict.fromkeys(quantiles)]
        elif rule == "peer_agreement" and num_small < 2:
            log.info("Skipping rule peer_agreement: it needs two or more small models; got %d.", num_small)
        else:
            specs.append(RuleSpec(rule, rule))
    return specs


def _tier_rule(label: str, tier: tuple[str, ...]) -> RuleSpec:
    """The RuleSpec of a boundary rule label (chow_average, chow_quantile_0.1, abc, ...) after `tier`."""
    match = _QUANTILE_LABEL.fullmatch(label)
    if match:
        try:
            quantile = float(match.group(1))
        except ValueError:
            quantile = -1.0
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(
                f"tier rule {label!r}: the quantile after chow_quantile_ must be a number "
                "in [0, 1], e.g. chow_quantile_0.1."
            )
        return RuleSpec(label, "chow_quantile", quantile)
    if label not in TIER_RULES or label == "chow_quantile":
        raise ConfigError(
            f"unknown tier rule {label!r}; a boundary takes one of "
            f"{', '.join(r for r in TIER_RULES if r != 'chow_quantile')} or chow_quantile_<q>."
        )
    if label in STATISTICS and len(tier) < 2:
        raise ConfigError(
            f"tier rule {label!r} after tier {list(tier)} needs an ensemble: ABC defers on "
            "disagreement between two or more models of one tier."
        )
    return RuleSpec(label, label)


def plan_tiers(
    tiers: Sequence[Sequence[str]], tier_rules: Sequence[str] | None, models: Sequence[str]
) -> TierPlan | None:
    """The k-tier cascade of run_cascade_eval.tiers (None when there is none); ConfigError on tiers
    naming unknown or repeated models, fewer than two tiers, or a wrong number of rules.

    Without tier_rules, a boundary after one model uses chow_average and after an ensemble abc.
    """
    if not tiers:
        if tier_rules:
            raise ConfigError(
                f"run_cascade_eval.tier_rules={list(tier_rules)} is set but run_cascade_eval.tiers "
                "is not: give the tiers too, e.g. [['ce'], ['cat', 'distill'], ['large']]."
            )
        return None
    tiers = tuple(tuple(t) for t in tiers)
    names = [m for tier in tiers for m in tier]
    unknown = [m for m in names if m not in models]
    repeated = sorted({m for m in names if names.count(m) > 1})
    if len(tiers) < 2 or any(not t for t in tiers) or unknown or repeated:
        raise ConfigError(
            f"run_cascade_eval.tiers={[list(t) for t in tiers]} must list two or more non-empty tiers of "
            f"distinct models among {list(models)} (unknown: {unknown}, repeated: {repeated}), e.g. "
            f"[['ce'], ['cat', 'distill'], ['{LARGE}']]."
        )
    if tier_rules is None:
        tier_rules = [ABC if len(t) > 1 else "chow_average" for t in tiers[:-1]]
    if len(tier_rules) != len(tiers) - 1:
        raise ConfigError(
            f"run_cascade_eval.tier_rules={list(tier_rules)} needs one rule per tier boundary: "
            f"{len(tiers) - 1} for {len(tiers)} tiers."
        )
    return TierPlan(tiers, tuple(_tier_rule(label, t) for label, t in zip(tier_rules, tiers)))


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Everything an analysis needs besides the records.

    mixture_name: the dataset (task or mixture) whose examples are pooled as one more group.
    split / validation_split: the split names (validation_split None when it was not decoded).
    model_dirs: display name -> MODEL_DIR, the large model (LARGE) first. corpus_metrics: task ->
    its corpus metric's `module:qualname`, or None for a per-example metric. free_text: task ->
    whether its answers are free text (`agreement.is_free_text`, which ABC's statistic depends on);
    None (records of an older run): the tasks with a corpus metric.
    """

    mixture_name: str
    split: str
    validation_split: str | None
    model_dirs: dict[str, str]
    options: Options
    corpus_metrics: dict[str, str | None]
    free_text: dict[str, bool] | None = None

    @property
    def small_models(self) -> list[str]:
        return [name for name in self.model_dirs if name != LARGE]

    def rule_plan(self) -> list[RuleSpec]:
        return plan_rules(self.options.rules, self.options.quantiles, len(self.small_models))

    def free_text_tasks(self) -> dict[str, bool]:
        """Task -> whether its answers are free text (see the class docstring)."""
        if self.free_text is not None:
            return dict(self.free_text)
        return {task: ref is not None for task, ref in self.corpus_metrics.items()}

    def tier_plan(self) -> TierPlan | None:
        return plan_tiers(self.options.tiers, self.options.tier_rules, list(self.model_dirs))

    def budgets(self) -> list[calibration.Budget]:
        try:
            return calibration.budgets(self.options.target_deferral_rate, self.options.target_relative_flops)
        except ValueError as e:
            raise ConfigError(f"{e} Set TARGET_DEFERRAL_RATE in [0, 1] or TARGET_RELATIVE_FLOPS >= 0.") from e

    def needs_validation(self) -> bool:
        """The learned rules are fitted, and budgets are calibrated, on the validation split."""
        return any(spec.rule in rules_lib.LEARNED_RULES for spec in self.rule_plan()) or bool(self.budgets())

    def needs_embeddings(self) -> bool:
        """post_hoc_embed reads the large model's input embeddings, recorded at decoding."""
        return any(spec.rule == "post_hoc_embed" for spec in self.rule_plan())

    def posthoc_config(self) -> PostHocConfig:
        return PostHocConfig(folds=self.options.posthoc_folds)

    def check_folds(self, validation_sizes: Mapping[str, int]) -> None:
        """ConfigError when a group (task) has fewer validation examples than the learned rules'
        cross-fitting folds; validation_sizes: group -> examples."""
        if not any(spec.rule in rules_lib.LEARNED_RULES for spec in self.rule_plan()):
            return
        small = {group: n for group, n in validation_sizes.items() if n < self.options.posthoc_folds}
        if small:
            raise ConfigError(
                f"the learned rules are cross-fitted in posthoc_folds={self.options.posthoc_folds} "
                f"folds, but the {self.validation_split} split has fewer examples in {small}: decode "
                "more (MAX_EXAMPLES) or lower run_cascade_eval.posthoc_folds."
            )

    def check(self) -> None:
        """Every ConfigError the analysis would raise, raised now (before any decoding)."""
        labels = [spec.label for spec in self.rule_plan()]
        if self.options.plot_rule not in labels:
            raise ConfigError(f"plot_rule={self.options.plot_rule!r} must be one of the curves {labels}.")
        for name, value in (
            ("num_thresholds", self.options.num_thresholds),
            ("tier_thresholds", self.options.tier_thresholds),
        ):
            if value is not None and value < 2:
                raise ConfigError(
                    f"run_cascade_eval.{name}={value} must be >= 2 (rate 0 and rate 1), "
                    "or None for every distinct score."
                )
        if self.needs_validation() and not (
            isinstance(self.options.posthoc_folds, int) and self.options.posthoc_folds >= 2
        ):
            raise ConfigError(
                f"run_cascade_eval.posthoc_folds={self.options.posthoc_folds!r} must be an int >= 2: "
                "the learned rules are cross-fitted on validation in that many folds."
            )
        if self.options.embed_layer is not None and not (
            isinstance(self.options.embed_layer, int) and self.options.embed_layer >= 0
        ):
            raise ConfigError(
                f"run_cascade_eval.embed_layer={self.options.embed_layer!r} must be an int >= 0 "
                "(encoder layers run), or None for all of the large model's encoder."
            )
        self.tier_plan()
        self.budgets()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AnalysisConfig:
        record = json.loads(text)
        return cls(**{**record, "options": Options(**record["options"])})


def metric_ref(fn: CorpusMetric | None) -> str | None:
    """`module:qualname` of a corpus metric (None for none); `<...>` marks one that cannot be imported."""
    return None if fn is None else f"{fn.__module__}:{fn.__qualname__}"


def _import(ref: str) -> CorpusMetric | None:
    module, _, qualname = ref.partition(":")
    if "<" in qualname:
        return None
    try:
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return None
    return value


def corpus_metrics(recorded: Mapping[str, str | None]) -> dict[str, CorpusMetric | None]:
    """Task -> corpus metric function (None: per-example), imported from the recorded names, else
    from the task registry (`import tasks`); ConfigError naming the metric when neither works."""
    found = {}
    for task, ref in recorded.items():
        fn = None if ref is None else _import(ref)
        if ref is not None and fn is None:
            try:
                importlib.import_module("tasks")
                fn = metrics.get_quality(task).corpus
            except (ImportError, ValueError) as e:
                raise ConfigError(
                    f"task {task!r} was scored with corpus metric {ref}, which cannot be imported by name, "
                    f"and the task registry does not have it ({e}). Define the metric at module level in an "
                    "importable module, or run where `import tasks` registers the task."
                ) from e
        found[task] = fn
    return found
