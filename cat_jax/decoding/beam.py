"""Beam search with T5X's length penalty: a finished hypothesis of L tokens (EOS included) with
log-probability s scores s / ((5 + L) / 6) ** alpha.

Each step extends the k alive beams by every token, keeps the 2k best extensions, moves those
ending in EOS (or reaching max_decode_length) into the k-best finished list and keeps the k best
others alive. The search stops when no alive beam can beat the worst finished one (its
log-probability only falls, and the penalty is largest at max_decode_length for alpha >= 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cat_jax.decoding.greedy import DecodeOutput, Inputs, batch_size_of, next_token_logp, suppress
from cat_jax.errors import ConfigError
from cat_jax.models import Model

PER_TOKEN = ("tokens", "logprobs", "entropies", "margins")


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """T5X's brevity penalty ((5 + length) / 6) ** alpha, for lengths of any shape."""
    return ((5.0 + length) / 6.0) ** alpha


@struct.dataclass
class BeamOutput:
    """The k best finished hypotheses per row, best first (every per-token field 0 after EOS).

    tokens, logprobs, entropies, margins: [b, k, T]; scores: [b, k] float32, the sum of logprobs
    over the length penalty; lengths: [b, k] int32 (EOS included); mean_hidden: [b, k, d].
    """

    tokens: jax.Array
    logprobs: jax.Array
    entropies: jax.Array
    margins: jax.Array
    scores: jax.Array
    lengths: jax.Array
    mean_hidden: jax.Array

    def best(self) -> DecodeOutput:
        """The top hypothesis of every row as a DecodeOutput."""
        return DecodeOutput(
            tokens=self.tokens[:, 0],
            logprobs=self.logprobs[:, 0],
            entropies=self.entropies[:, 0],
            lengths=self.lengths[:, 0],
            mean_hidden=self.mean_hidden[:, 0],
            margins=self.margins[:, 0],
        )


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [b, m, ...] at index [b, n] along axis 1 -> [b, n, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    model: Model,
    params: Any,
    inputs: Inputs,
    max_decode_length: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    eos_id: int = 1,
) -> BeamOutput:
    """Beam search over the batch `inputs`; jit-able with everything but params and the inputs
    static. beam_size 1 with alpha 0 is greedy decoding."""
    vocab, k, steps = model.vocab_size, beam_size, max_decode_length
    if beam_size < 1 or 2 * beam_size > vocab - 1:
        raise ConfigError(f"beam_size must be in [1, {(vocab - 1) // 2}] for a vocabulary of {vocab}, got {beam_size}.")
    if alpha < 0:
        raise ConfigError(f"The length penalty alpha must be >= 0 (0: no penalty), got {alpha}.")
    batch, emb = batch_size_of(inputs), model.hidden_size
    state, first = model.start_decoding(
        params, {name: jnp.repeat(x, k, axis=0) for name, x in inputs.items()}, steps
    )  # [b * k] rows
    zeros = lambda dtype: jnp.zeros((batch, k, steps), dtype)
    per_token = dict(
        tokens=zeros(jnp.int32), logprobs=zeros(jnp.float32), entropies=zeros(jnp.float32), margins=zeros(jnp.float32)
    )
    init = dict(
        step=jnp.array(0, jnp.int32),
        cache=state,
        alive=dict(
            per_token,
            hidden=jnp.zeros((batch, k, emb)),
            last=first.reshape(batch, k),
            logp=jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0),
        ),
        finished=dict(
            per_token,
            hidden=jnp.zeros((batch, k, emb)),
            score=jnp.full((batch, k), -jnp.inf),
            length=jnp.zeros((batch, k), jnp.int32),
        ),
    )
    best_possible = lambda logp: logp / length_penalty(steps, alpha)

    def cond(state: dict[str, Any]) -> jax.Array:
        worst_finished = state["finished"]["score"][:, -1]
        settled = worst_finished >= best_possible(state["alive"]["logp"][:, 0])
        return (state["step"] < steps) & ~jnp.all(settled)

    def body(state: dict[str, Any]) -> dict[str, Any]:
        step, alive, finished = state["step"], state["alive"], state["finished"]
        logits, hidden, decoded = model.decode_block(params, state["cache"], alive["last"].reshape(-1, 1))
        logp = next_token_logp(logits[:, 0]).reshape(batch, k, vocab)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [b, k]
        top2 = jnp.exp(jax.lax.top_k(logp, 2)[0])
        total = (alive["logp"][..., None] + suppress(logp, model.SUPPRESSED_TOKEN)).reshape(batch, k * vocab)
        cand_logp, index = jax.lax.top_k(total, 2 * k)  # [b, 2k]
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        new = {
            "tokens": token,
            "entropies": _take(entropy, parent),
            "margins": _take(top2[..., 0] - top2[..., 1], parent),
            "logprobs": jnp.take_along_axis(logp.reshape(batch, k * vocab), index, axis=1),
        }
        cand = {name: _take(alive[name], parent).at[:, :, step].set(new[name]) for name in PER_TOKEN}
        cand["hidden"] = _take(alive["hidden"] + hidden[:, 0].astype(jnp.float32).reshape(batch, k, emb), parent)
        is_eos = token == eos_id
        ends = is_eos | (step + 1 == steps)
        length = step + 1
        cand_score = jnp.where(ends, cand_logp / length_penalty(length, alpha), -jnp.inf)
        pool_score = jnp.concatenate([finished["score"], cand_score], axis=1)
        score, keep = jax.lax.top_k(pool_score, k)
        pool = {name: jnp.concatenate([finished[name], cand[name]], axis=1) for name in (*PER_TOKEN, "hidden")}
        pool["length"] = jnp.concatenate([finished["length"], jnp.full_like(token, length)], axis=1)
        finished = {name: _take(value, keep) for name, value in pool.items()}
        finished["score"] = score
        alive_logp, chosen = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, cand_logp), k)
        alive = {name: _take(cand[name], chosen) for name in (*PER_TOKEN, "hidden")}
        alive.update(logp=alive_logp, last=_take(token, chosen))
        rows = (jnp.arange(batch)[:, None] * k + _take(parent, chosen)).reshape(-1)
        cache = jax.tree_util.tree_map(lambda x: x[rows] if x.ndim and x.shape[0] == batch * k else x, decoded)
        return dict(step=step + 1, cache=cache, alive=alive, finished=finished)

    final = jax.lax.while_loop(cond, body, init)["finished"]
    lengths = final["length"]
    return BeamOutput(
        tokens=final["tokens"],
        logprobs=final["logprobs"],
        entropies=final["entropies"],
        margins=final["margins"],
        scores=final["score"],
        lengths=lengths,
        mean_hidden=final["hidden"] / jnp.maximum(lengths, 1)[..., None].astype(jnp.float32),
    )
