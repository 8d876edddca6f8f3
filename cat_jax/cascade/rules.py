"""Deferral scores: one float per example, LOWER = MORE LIKELY TO DEFER to the large model.

Token-level scores read the small model's generated tokens; an example with no generated token
counts as fully confident (log-prob 0, entropy 0, margin 1) so it is deferred last.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from cat_jax.cascade import posthoc
from cat_jax.cascade.posthoc import PostHocConfig
from cat_jax.cascade.records import ModelOutputs, check_aligned


def _per_example(seqs: Sequence[np.ndarray], reduce: Callable[[np.ndarray], float], empty: float) -> np.ndarray:
    """Applies `reduce` to each of N token arrays [T_i] -> [N]; `empty` where T_i = 0."""
    return np.array([reduce(s) if s.size else empty for s in seqs], dtype=np.float64)


def chow_sum(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Sequence log-probability sum_t s_t [N]; favours short outputs."""
    return _per_example(logprobs, np.sum, 0.0)


def chow_average(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Length-normalised log-probability mean_t s_t [N]."""
    return _per_example(logprobs, np.mean, 0.0)


def chow_quantile(logprobs: Sequence[np.ndarray], q: float) -> np.ndarray:
    """q-quantile of the token log-probs [N], numpy's linear interpolation; q = 0: least confident token."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"chow_quantile needs 0 <= q <= 1; got q = {q}.")
    return _per_example(logprobs, lambda s: np.quantile(s, q), 0.0)


def entropy_mean(entropies: Sequence[np.ndarray]) -> np.ndarray:
    """Negated mean per-token entropy [N]."""
    return -_per_example(entropies, np.mean, 0.0)


def entropy_max(entropies: Sequence[np.ndarray]) -> np.ndarray:
    """Negated largest per-token entropy [N]."""
    return -_per_example(entropies, np.max, 0.0)


def margin_min(margins: Sequence[np.ndarray]) -> np.ndarray:
    """Smallest top-1 minus top-2 probability margin over the tokens [N]."""
    return _per_example(margins, np.min, 1.0)


def oracle(small_quality: np.ndarray, large_quality: np.ndarray) -> np.ndarray:
    """quality_S - quality_L [N]: negative exactly where the large model is better, so those go first."""
    return np.asarray(small_quality, dtype=np.float64) - np.asarray(large_quality, dtype=np.float64)


def random_scores(num_examples: int, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores [N] from numpy's default generator seeded with `seed`."""
    return np.random.default_rng(seed).random(num_examples)


def peer_agreement(primary: ModelOutputs, others: Sequence[ModelOutputs]) -> np.ndarray:
    """Fraction of the other small models whose prediction equals the primary's, as raw strings [N].

    The cascade answers with the primary model (not a majority: that is ABC, a tier rule of
    cat_jax.cascade.agreement). With M others the fraction is k / M; ties are broken by the
    primary's Chow-Average by adding exp(chow_average) / (2M), which lies in (0, 1/(2M)] and so
    never crosses to the next k / M.
    """
    if not others:
        raise ValueError("rule 'peer_agreement' needs at least one other small model in `others`.")
    check_aligned(primary, *others)
    agree = np.mean([[p == o for p, o in zip(primary.predictions, other.predictions)] for other in others], axis=0)
    return agree + np.exp(chow_average(primary.logprobs)) / (2 * len(others))


def _margin_min(outputs: ModelOutputs) -> np.ndarray:
    if outputs.margins is None:
        raise ValueError("rule 'margin_min' needs per-token margins; the small model's records have none.")
    return margin_min(outputs.margins)


# Rules that read only the deferring model's own outputs: (outputs, quantile, seed) -> scores [N].
# They also serve at every boundary of a k-tier cascade (cat_jax.cascade.tiers).
OWN_OUTPUT_RULES: dict[str, Callable[[ModelOutputs, float, int], np.ndarray]] = {
    "chow_sum": lambda o, q, seed: chow_sum(o.logprobs),
    "chow_average": lambda o, q, seed: chow_average(o.logprobs),
    "chow_quantile": lambda o, q, seed: chow_quantile(o.logprobs, q),
    "entropy_mean": lambda o, q, seed: entropy_mean(o.entropies),
    "entropy_max": lambda o, q, seed: entropy_max(o.entropies),
    "margin_min": lambda o, q, seed: _margin_min(o),
    "random": lambda o, q, seed: random_scores(len(o), seed),
}


def own_output_scores(rule: str, outputs: ModelOutputs, *, quantile: float = 0.0, seed: int = 0) -> np.ndarray:
    """Scores [N] of a rule in OWN_OUTPUT_RULES on one model's records; lower = defer first."""
    if rule not in OWN_OUTPUT_RULES:
        raise ValueError(
            f"rule {rule!r} does not read only the model's own outputs; those that do: {', '.join(OWN_OUTPUT_RULES)}."
        )
    return OWN_OUTPUT_RULES[rule](outputs, quantile, seed)


@dataclasses.dataclass(frozen=True)
class RuleInputs:
    """Everything a rule may read: aligned small/large test records and the rule options."""

    small: ModelOutputs
    large: ModelOutputs
    quantile: float
    seed: int
    others: tuple[ModelOutputs, ...]
    validation: tuple[ModelOutputs, ModelOutputs] | None
    posthoc_config: PostHocConfig


def _own(rule: str) -> Callable[[RuleInputs], np.ndarray]:
    return lambda r: OWN_OUTPUT_RULES[rule](r.small, r.quantile, r.seed)


# Rules whose scores come from a model fitted on validation records (cat_jax.cascade.posthoc).
LEARNED_RULES = ("post_hoc", "post_hoc_embed")


def _learned_features(rule: str, small: ModelOutputs, large: ModelOutputs) -> np.ndarray:
    """post_hoc's features [N, F] of the small model's records; post_hoc_embed adds the large
    model's input embedding."""
    if rule != "post_hoc_embed":
        return posthoc.features(small)
    if large.embedding is None:
        raise ValueError(
            "rule 'post_hoc_embed' needs the large model's input embeddings in its records; "
            "cascade_eval records them when post_hoc_embed is among run_cascade_eval.rules."
        )
    return posthoc.features(small, large.embedding)


def _learned(rule: str) -> Callable[[RuleInputs], np.ndarray]:
    def scores(r: RuleInputs) -> np.ndarray:
        if r.validation is None:
            raise ValueError(
                f"rule {rule!r} needs validation=(small_val, large_val) records to fit on; "
                "decode the validation split with both models."
            )
        small_val, large_val = r.validation
        return posthoc.fitted_scores(
            _learned_features(rule, small_val, large_val),
            posthoc.targets(small_val, large_val),
            _learned_features(rule, r.small, r.large),
            r.posthoc_config,
        )

    return scores


def cross_fitted_scores(
    rule: str, small: ModelOutputs, large: ModelOutputs, posthoc_config: PostHocConfig = PostHocConfig()
) -> np.ndarray:
    """Scores [N] of a learned rule on the records it is fitted on, out of fold: each example's from
    a model fitted on the other posthoc_config.folds - 1 folds."""
    if rule not in LEARNED_RULES:
        raise ValueError(f"rule {rule!r} is not learned; the learned rules are {', '.join(LEARNED_RULES)}.")
    check_aligned(small, large)
    return posthoc.cross_fitted_scores(
        _learned_features(rule, small, large), posthoc.targets(small, large), posthoc_config
    )


RULES: dict[str, Callable[[RuleInputs], np.ndarray]] = {
    **{
        rule: _own(rule)
        for rule in ("chow_sum", "chow_average", "chow_quantile", "entropy_mean", "entropy_max", "margin_min")
    },
    **{rule: _learned(rule) for rule in LEARNED_RULES},
    "peer_agreement": lambda r: peer_agreement(r.small, r.others),
    "oracle": lambda r: oracle(r.small.quality, r.large.quality),
    "random": _own("random"),
}

# Rules that run the `others` small models on every example, so the cascade pays for them.
RUNS_OTHER_SMALL_MODELS = frozenset({"peer_agreement"})
# Former names -> the rule they now name (a plan naming the old one gets the new one, logged).
RENAMED_RULES = {"agreement": "peer_agreement"}


def _check_known(rule: str) -> None:
    if rule in RENAMED_RULES:
        raise ValueError(
            f"deferral rule {rule!r} is now called {RENAMED_RULES[rule]!r} (it answers with the "
            "primary small model and compares raw strings); ABC is the tier rule 'abc'."
        )
    if rule not in RULES:
        raise ValueError(f"unknown deferral rule {rule!r}; known rules: {', '.join(sorted(RULES))}.")


def compute_scores(
    rule: str,
    small: ModelOutputs,
    large: ModelOutputs,
    *,
    quantile: float = 0.0,
    seed: int = 0,
    others: Sequence[ModelOutputs] = (),
    validation: tuple[ModelOutputs, ModelOutputs] | None = None,
    posthoc_config: PostHocConfig = PostHocConfig(),
) -> np.ndarray:
    """Deferral scores [N] of rule `rule` on aligned test records; lower = defer first.

    quantile: for chow_quantile. seed: for random. others: the other small models for peer_agreement.
    validation: (small, large) validation records for the learned rules (post_hoc, post_hoc_embed),
    fitted on all of them.
    """
    _check_known(rule)
    check_aligned(small, large)
    inputs = RuleInputs(small, large, quantile, seed, tuple(others), validation, posthoc_config)
    return RULES[rule](inputs)


def extra_small_flops(
    rule: str, others: Sequence[ModelOutputs], large: ModelOutputs | None = None
) -> np.ndarray | None:
    """Per-example FLOPs [N] `rule` spends on every example besides the small model, or None: the
    other small models peer_agreement runs; for post_hoc_embed, computing the large model's input
    embedding (its records' embedding_flops: a partial forward of the large model)."""
    _check_known(rule)
    if rule == "post_hoc_embed":
        if large is None or large.embedding_flops is None:
            raise ValueError(
                "rule 'post_hoc_embed' pays for the large model's input embeddings: give the large "
                "model's records with embedding_flops."
            )
        return large.embedding_flops
    if rule not in RUNS_OTHER_SMALL_MODELS or not others:
        return None
    return np.sum([o.flops for o in others], axis=0)
