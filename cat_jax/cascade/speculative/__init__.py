"""Speculative cascades: the small model drafts, the large model verifies in parallel, a rule
decides token by token which distribution the output follows.

    rules.py     the rules as pure functions on next-token distributions
    cost.py      FLOPs of decoding alone and of speculative decoding (analytic)
    report.py    points, summaries, plots and per-example records of speculative_eval

The job is `cat_jax.jobs.speculative_eval`; the batched decoding loop (gamma drafts per round, per-row acceptance) is
`cat_jax.decoding.speculative`.
"""

from cat_jax.cascade.speculative.rules import ALPHA_EXTREMES, RULES, rule_id, verification

__all__ = ["ALPHA_EXTREMES", "RULES", "rule_id", "verification"]
