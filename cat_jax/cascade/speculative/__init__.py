"""Speculative cascades: the small model drafts, the large model verifies in parallel, a rule
decides token by token which distribution the output follows.

    rules.py     the rules as pure functions on next-token distributions
    cost.py      FLOPs of decoding alone and of speculative decoding (analytic)
    report.py    points, summaries and plots of speculative_eval
    pipeline.py  the speculative_eval job

The batched decoding loop (gamma drafts per round, per-row acceptance) is
`cat_jax.decoding.speculative`.
"""

from cat_jax.cascade.speculative.rules import ALPHA_EXTREMES, RULES, rule_id, verification

__all__ = ["ALPHA_EXTREMES", "RULES", "rule_id", "verification"]
