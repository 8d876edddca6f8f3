"""Batched speculative (cascade) decoding: the small model drafts gamma tokens, the large model
scores them in one call, a rule from `rules` verifies them, each row keeps its own accepted prefix.

A round, per row with n tokens emitted so far and last token y_n:
1. the small model feeds y_n, d_1, ..., d_gamma one at a time at positions n..n+gamma, drawing
   each draft d_t from its sampling distribution q_s; the last feed gives q at position gamma+1
   and leaves every draft in its cache;
2. the large model feeds the block [y_n, d_1..d_gamma] at positions n..n+gamma in one call;
3. the rule verifies the drafts in order; with k accepted, the next token is drawn from the
   residual at position k+1 (k < gamma) or, when all are accepted, from the rule's target at
   position gamma+1 (the large model's p_s for lossless decoding);
4. the row emits d_1..d_k and that token (cut at EOS and at max_decode_length), and both caches
   move to position n+k+1 (a rollback of the rejected drafts).
Rows accept different numbers of tokens: the caches keep one position per row. At temperature 0
every draw is an argmax and the result does not depend on the rng. Both models are any two models
of the contract (`cat_jax.models.contract`) sharing one vocabulary; their positions count the tokens
fed since `start_decoding`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cat_jax.cascade.speculative.rules import verification_by_id
from cat_jax.decoding.greedy import Inputs, batch_size_of, next_token_logp, suppress
from cat_jax.decoding.sampling import Sampler, sampling_probs
from cat_jax.models import Model


@struct.dataclass
class SpeculativeOutput:
    """tokens: [b, T] int32, 0 after EOS; lengths: [b] int32 (EOS included); rounds: [b] int32,
    large-model calls while the row was decoding; accepted: [b] int32, drafted tokens accepted
    (gamma are drafted per round); round_starts: [b, T] int32, tokens emitted before each round
    (-1 after the row's last round), what the FLOPs of each call depend on."""

    tokens: jax.Array
    lengths: jax.Array
    rounds: jax.Array
    accepted: jax.Array
    round_starts: jax.Array


def rule_probs(logp: jax.Array, suppressed: int | None = None) -> jax.Array:
    """The model's next-token distribution over the tokens it may emit: logp [..., vocab]."""
    return jax.nn.softmax(suppress(logp, suppressed), axis=-1)


def _draw(probs: jax.Array, rng: jax.Array, greedy: bool) -> jax.Array:
    """One token per row of probs [b, vocab]: the argmax when greedy, else a sample."""
    if greedy:
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def _draft(
    small: Model, params: Any, state: Any, last: jax.Array, rng: jax.Array, gamma: int, sampler: Sampler
) -> tuple[Any, dict[str, jax.Array]]:
    """gamma + 1 one-token steps of the small model from `last`: q, q_s [b, gamma+1, vocab] and
    the drafts [b, gamma]."""
    suppressed = small.SUPPRESSED_TOKEN

    def step(carry: tuple[Any, jax.Array], j: jax.Array) -> tuple[tuple[Any, jax.Array], tuple[jax.Array, ...]]:
        state, token = carry
        logits, _, state = small.decode_block(params, state, token[:, None])
        logp = next_token_logp(logits[:, 0])
        q_s = sampling_probs(logp, sampler, suppressed)
        draft = _draw(q_s, jax.random.fold_in(rng, j), sampler.greedy)
        return (state, draft), (rule_probs(logp, suppressed), q_s, draft)

    (state, _), (q, q_s, drafts) = jax.lax.scan(step, (state, last), jnp.arange(gamma + 1))
    return state, {"q": jnp.moveaxis(q, 0, 1), "q_s": jnp.moveaxis(q_s, 0, 1), "drafts": drafts[:gamma].T}


def speculative_decode(
    small: Model,
    small_params: Any,
    large: Model,
    large_params: Any,
    inputs: Inputs,
    rng: jax.Array,
    rule_index: jax.Array,
    alpha: jax.Array,
    *,
    gamma: int,
    max_decode_length: int,
    eos_id: int = 1,
    sampler: Sampler = Sampler(temperature=0.0),
    large_inputs: Inputs | None = None,
) -> SpeculativeOutput:
    """Speculative decoding of the batch `inputs` (the small model's DECODING_INPUTS;
    `large_inputs` the large model's, by default the same) under rules.RULES[rule_index] with alpha
    (both traced: one compilation serves every rule and alpha); jit-able with the models, gamma,
    max_decode_length, eos_id and sampler static. Both models share one vocabulary."""
    batch, steps = batch_size_of(inputs), max_decode_length
    room = steps + gamma + 1  # the last round may write gamma + 1 positions past the last token
    rows, offsets = jnp.arange(batch)[:, None], jnp.arange(gamma + 1)[None, :]
    zeros = jnp.zeros((batch,), jnp.int32)
    started = {
        "small": small.start_decoding(small_params, inputs, room),
        "large": large.start_decoding(large_params, inputs if large_inputs is None else large_inputs, room),
    }
    cache = {
        "small": small.set_positions(started["small"][0], zeros),
        "large": large.set_positions(started["large"][0], zeros),
    }
    init = dict(
        round=jnp.array(0, jnp.int32),
        n=zeros,
        last=started["small"][1],
        done=jnp.zeros((batch,), bool),
        tokens=jnp.zeros((batch, room), jnp.int32),
        cache=cache,
        rounds=zeros,
        accepted=zeros,
        starts=jnp.full((batch, steps), -1, jnp.int32),
    )

    def cond(state: dict[str, Any]) -> jax.Array:
        return (state["round"] < steps) & ~jnp.all(state["done"])

    def body(state: dict[str, Any]) -> dict[str, Any]:
        n, active = state["n"], ~state["done"]
        key_draft, key_accept, key_next = jax.random.split(jax.random.fold_in(rng, state["round"]), 3)
        small_cache, drafted = _draft(
            small,
            small_params,
            small.set_positions(state["cache"]["small"], n),
            state["last"],
            key_draft,
            gamma,
            sampler,
        )
        block = jnp.concatenate([state["last"][:, None], drafted["drafts"]], axis=1)  # [b, gamma+1]
        logits, _, large_cache = large.decode_block(
            large_params, large.set_positions(state["cache"]["large"], n), block
        )
        logp = next_token_logp(logits.reshape(batch * (gamma + 1), -1))
        flat = lambda x: x.reshape(batch * (gamma + 1), -1)
        suppressed = large.SUPPRESSED_TOKEN
        verdict = verification_by_id(
            rule_index,
            flat(drafted["q"]),
            rule_probs(logp, suppressed),
            flat(drafted["q_s"]),
            sampling_probs(logp, sampler, suppressed),
            alpha,
        )
        accept, residual, target = (x.reshape(batch, gamma + 1, -1) for x in verdict)
        drafts = drafted["drafts"]
        accept_p = jnp.take_along_axis(accept[:, :gamma], drafts[..., None], axis=-1)[..., 0]  # [b, gamma]
        ok = jax.random.uniform(key_accept, accept_p.shape) < accept_p
        k = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # accepted drafts [b]
        fallback = jnp.concatenate([residual[:, :gamma], target[:, gamma:]], axis=1)
        next_token = _draw(jnp.take_along_axis(fallback, k[:, None, None], axis=1)[:, 0], key_next, sampler.greedy)
        emitted = jnp.where(offsets < k[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
        keep = (offsets <= k[:, None]) & active[:, None] & (n[:, None] + offsets < steps)
        eos = keep & (emitted == eos_id)
        first_eos = jnp.where(jnp.any(eos, axis=1), jnp.argmax(eos, axis=1), gamma + 1)
        keep &= offsets <= first_eos[:, None]
        count = jnp.sum(keep, axis=1).astype(jnp.int32)
        tokens = state["tokens"].at[rows, n[:, None] + offsets].set(jnp.where(keep, emitted, 0), mode="drop")
        new_n = n + count
        return dict(
            round=state["round"] + 1,
            n=new_n,
            last=next_token,
            tokens=tokens,
            done=state["done"] | jnp.any(eos, axis=1) | (new_n >= steps),
            cache={"small": small_cache, "large": large_cache},
            rounds=state["rounds"] + active,
            accepted=state["accepted"] + jnp.where(active, k, 0),
            starts=state["starts"].at[:, state["round"]].set(jnp.where(active, n, -1)),
        )

    final = jax.lax.while_loop(cond, body, init)
    return SpeculativeOutput(
        tokens=final["tokens"][:, :steps],
        lengths=final["n"],
        rounds=final["rounds"],
        accepted=final["accepted"],
        round_starts=final["starts"],
    )
