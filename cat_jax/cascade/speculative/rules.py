"""Speculative-cascade rules (Narasimhan et al. 2024, "Faster Cascades via Speculative Decoding"):
from the small model's and the large model's next-token distributions, how a drafted token is
verified.

Every function is pure and works on rows: q, p [b, vocab] are the small and the large model's
distributions (untempered, token 0 excluded) whose maxima and accepted sets the rules decide on;
q_s, p_s [b, vocab] are the distributions tokens are drawn from (tempered / filtered; one-hot at
temperature 0), which OPT's total variation also reads. A drafted
token x ~ q_s is accepted with probability accept[x]; on rejection the token is drawn from
`residual`. `target` is the distribution this produces, token by token:

    target = q_s * accept + (1 - sum(q_s * accept)) * residual

The cascade rules name a target pi and verify losslessly against it: accept = min(1, pi / q_s),
residual = norm(max(0, pi - q_s)).
- lossless: pi = p_s (speculative decoding: the large model's distribution exactly).
- chow / diff / opt: keep the small model (pi = q_s) when max q >= 1 - alpha / max q >= max p -
  alpha / max q >= max p - alpha * TV(q_s, p_s), else defer (pi = p_s). As in the official notebook
  (google-research speculative_cascades/speculative_cascades_gemma.ipynb, target_distribution_opt)
  the max terms read the untempered q, p and the total variation the sampling distributions q_s,
  p_s, so at temperature 0 TV is 1 wherever the two greedy tokens differ and 0 where they agree.
- token_v1 / v2 / v3: pi(v) = q_s(v) 1[v in A] + (sum_{u not in A} q_s(u)) p_s(v) with A = {v: q(v)
  >= max p - alpha} / {v: p(v) >= max p - alpha} / {v: p(v) >= (1 - alpha) max p}.
- speed (lossy speculative decoding): accept = min(1, p_s / ((1 - alpha) q_s)), residual =
  norm(max(0, p_s - q_s)), where p_s exceeds what the drafts already gave (alpha = 0 is lossless).

ALPHA_EXTREMES gives each rule's alpha at which it is the large model alone (target = p_s) and the
small model alone (target = q_s), exactly. OPT's are -inf and +inf (the notebook's range): TV(q_s,
p_s) can be far smaller than |max q - max p| at temperatures other than 0 and 1, so no finite alpha
is an extreme there; where TV(q_s, p_s) is 0, q_s = p_s and alpha * TV is taken as 0. SWEEP_SPANS
gives the finite span a default sweep of OPT spreads its inner alphas over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

RULES = ("lossless", "speed", "chow", "diff", "opt", "token_v1", "token_v2", "token_v3")
DEFERRAL_RULES = ("chow", "diff", "opt")
TOKEN_RULES = ("token_v1", "token_v2", "token_v3")
# rule -> (alpha: the large model alone, alpha: the small model alone); lossless takes no alpha.
ALPHA_EXTREMES = {
    "speed": (0.0, 1.0),
    "chow": (-0.1, 1.0),
    "diff": (-1.0, 1.0),
    "opt": (-jnp.inf, jnp.inf),
    "token_v1": (-1.0, 1.0),
    "token_v2": (-0.1, 1.0),
    "token_v3": (-0.1, 1.0),
}
# Rules with infinite extremes -> the finite span of their inner alphas: at temperatures 0 and 1,
# |max q - max p| <= TV(q_s, p_s) wherever TV > 0, so OPT's decisions all change within (-1, 1).
SWEEP_SPANS = {"opt": (-1.0, 1.0)}


class Verification(NamedTuple):
    """accept [b, vocab] in [0, 1]; residual [b, vocab] and target [b, vocab], distributions."""

    accept: jax.Array
    residual: jax.Array
    target: jax.Array


def total_variation(q: jax.Array, p: jax.Array) -> jax.Array:
    """TV(q, p) = sum max(0, q - p) per row (the notebook's form; sum |q - p| / 2 for
    distributions): [b, vocab] x2 -> [b]."""
    return jnp.sum(jnp.maximum(q - p, 0.0), axis=-1)


def keep_small(rule: str, q: jax.Array, p: jax.Array, q_s: jax.Array, p_s: jax.Array, alpha: jax.Array) -> jax.Array:
    """Deferral rules: True [b] where the small model's distribution is kept (not deferred); the
    max terms read q, p, OPT's total variation q_s, p_s (see the module docstring)."""
    max_q, max_p = jnp.max(q, axis=-1), jnp.max(p, axis=-1)
    if rule == "chow":
        return max_q >= 1.0 - alpha
    if rule == "diff":
        return max_q >= max_p - alpha
    if rule == "opt":
        tv = total_variation(q_s, p_s)
        return max_q >= max_p - jnp.where(tv > 0, alpha * tv, 0.0)  # 0, not nan, for alpha = +-inf
    raise ValueError(f"{rule!r} is not one of the deferral rules {DEFERRAL_RULES}.")


def accepted_set(rule: str, q: jax.Array, p: jax.Array, alpha: jax.Array) -> jax.Array:
    """Token-level rules: the set A [b, vocab] bool of tokens the small model may keep."""
    max_p = jnp.max(p, axis=-1, keepdims=True)
    if rule == "token_v1":
        return q >= max_p - alpha
    if rule == "token_v2":
        return p >= max_p - alpha
    if rule == "token_v3":
        return p >= (1.0 - alpha) * max_p
    raise ValueError(f"{rule!r} is not one of the token-level rules {TOKEN_RULES}.")


def target_distribution(
    rule: str, q: jax.Array, p: jax.Array, q_s: jax.Array, p_s: jax.Array, alpha: jax.Array
) -> jax.Array:
    """pi [b, vocab] of the lossless, deferral and token-level rules (not speed)."""
    if rule == "lossless":
        return p_s
    if rule in DEFERRAL_RULES:
        return jnp.where(keep_small(rule, q, p, q_s, p_s, alpha)[:, None], q_s, p_s)
    in_set = accepted_set(rule, q, p, alpha)
    outside = jnp.sum(jnp.where(in_set, 0.0, q_s), axis=-1, keepdims=True)
    return jnp.where(in_set, q_s, 0.0) + outside * p_s


def _normalize(weights: jax.Array, fallback: jax.Array) -> jax.Array:
    """weights [b, vocab] >= 0 over their row sum; rows without mass take `fallback`."""
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), fallback)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """min(1, num / den), 1 where den is 0 (tokens the draft never proposes, or alpha = 1)."""
    return jnp.where(den > 0, jnp.minimum(1.0, num / jnp.where(den > 0, den, 1.0)), 1.0)


def verify_against(pi: jax.Array, q_s: jax.Array) -> Verification:
    """Lossless verification of drafts x ~ q_s [b, vocab] against a target pi [b, vocab]."""
    return Verification(_ratio(pi, q_s), _normalize(jnp.maximum(pi - q_s, 0.0), pi), pi)


def speed_verification(q_s: jax.Array, p_s: jax.Array, alpha: jax.Array) -> Verification:
    """Lossy speculative decoding with lenience alpha in [0, 1]."""
    accept = _ratio(p_s, (1.0 - alpha) * q_s)
    residual = _normalize(jnp.maximum(p_s - q_s, 0.0), p_s)
    kept = q_s * accept
    return Verification(accept, residual, kept + (1.0 - jnp.sum(kept, axis=-1, keepdims=True)) * residual)


def verification(
    rule: str, q: jax.Array, p: jax.Array, q_s: jax.Array, p_s: jax.Array, alpha: jax.Array
) -> Verification:
    """How drafts x ~ q_s are verified under `rule` (see the module docstring)."""
    if rule == "speed":
        return speed_verification(q_s, p_s, alpha)
    return verify_against(target_distribution(rule, q, p, q_s, p_s, alpha), q_s)


def rule_id(rule: str) -> int:
    """The index of `rule` in RULES (what `verification_by_id` takes)."""
    if rule not in RULES:
        raise ValueError(f"Unknown speculative rule {rule!r}; choose from {', '.join(RULES)}.")
    return RULES.index(rule)


def verification_by_id(
    index: jax.Array, q: jax.Array, p: jax.Array, q_s: jax.Array, p_s: jax.Array, alpha: jax.Array
) -> Verification:
    """`verification` of RULES[index] with the index traced: one compiled program serves every rule."""
    branches: list[Callable[..., Verification]] = [
        (lambda *args, rule=rule: verification(rule, *args)) for rule in RULES
    ]
    return jax.lax.switch(index, branches, q, p, q_s, p_s, alpha)
