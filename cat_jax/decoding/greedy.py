"""Autoregressive decoding with a key/value cache, one token per step, with per-token scores.

`decode_loop` runs any model of the contract (`cat_jax.models.contract`: `start_decoding`, then
`decode_block` one token at a time) inside a `jax.lax.while_loop`; a `choose` function picks each
step's tokens from the model's log-probabilities (greedy here, sampling in `sampling.py`). A
family's `SUPPRESSED_TOKEN` (T5's padding/BOS 0) is never emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cat_jax.models import Model

Params = Any
Inputs = Mapping[str, jax.Array]
# choose(logp [b, vocab] float32, step: int32 scalar) -> tokens [b] int32
Choose = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class DecodeOutput:
    """What decoding produced, per row; every per-token field is 0 after EOS.

    tokens: [b, T] int32; logprobs: [b, T] float32, log p of each generated token;
    entropies: [b, T] float32, entropy of the full next-token distribution; lengths: [b] int32,
    generated tokens up to and including EOS; mean_hidden: [b, d] float32, the final hidden state
    averaged over the generated tokens; margins: [b, T] float32, the difference
    between the two largest next-token probabilities. Scores are the model's own (untempered)
    distribution whatever chose the tokens.
    """

    tokens: jax.Array
    logprobs: jax.Array
    entropies: jax.Array
    lengths: jax.Array
    mean_hidden: jax.Array
    margins: jax.Array


def next_token_logp(logits: jax.Array) -> jax.Array:
    """logits [b, vocab] in any dtype -> float32 log-probabilities [b, vocab]."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def suppress(logp: jax.Array, token: int | None) -> jax.Array:
    """logp [..., vocab] with `token` (a family's SUPPRESSED_TOKEN) made impossible, if any."""
    return logp if token is None else logp.at[..., token].set(-jnp.inf)


def greedy_token(logp: jax.Array, suppressed: int | None = None) -> jax.Array:
    """logp [b, vocab] -> the most likely token other than `suppressed`, [b] int32."""
    return jnp.argmax(suppress(logp, suppressed), axis=-1).astype(jnp.int32)


def batch_size_of(inputs: Inputs) -> int:
    return next(iter(inputs.values())).shape[0]


def decode_loop(
    model: Model, params: Params, inputs: Inputs, max_decode_length: int, eos_id: int, choose: Choose
) -> DecodeOutput:
    """Decodes the batch `inputs` (the model's DECODING_INPUTS) for at most `max_decode_length`
    steps with `choose`.

    Starts decoding once (encoding, or prefilling the prompts), then feeds one token per step
    through the cache inside a `jax.lax.while_loop` that stops when every row has emitted `eos_id`.
    """
    batch = batch_size_of(inputs)
    state, first = model.start_decoding(params, inputs, max_decode_length)
    zeros_f = jnp.zeros((batch, max_decode_length), jnp.float32)
    init = dict(
        step=jnp.array(0, jnp.int32),
        cache=state,
        last=first,
        done=jnp.zeros((batch,), bool),
        tokens=jnp.zeros((batch, max_decode_length), jnp.int32),
        logprobs=zeros_f,
        entropies=zeros_f,
        margins=zeros_f,
        lengths=jnp.zeros((batch,), jnp.int32),
        hidden_sum=jnp.zeros((batch, model.hidden_size), jnp.float32),
    )

    def cond(state: dict[str, Any]) -> jax.Array:
        return (state["step"] < max_decode_length) & ~jnp.all(state["done"])

    def body(state: dict[str, Any]) -> dict[str, Any]:
        logits, hidden, cache = model.decode_block(params, state["cache"], state["last"][:, None])
        logp = next_token_logp(logits[:, 0])  # [b, vocab]
        step = state["step"]
        token = choose(logp, step)
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        top2 = jax.lax.top_k(logp, 2)[0]
        margin = jnp.exp(top2[:, 0]) - jnp.exp(top2[:, 1])
        active = ~state["done"]
        token = jnp.where(active, token, 0)
        write = lambda arr, val: arr.at[:, step].set(jnp.where(active, val, 0))
        return dict(
            step=step + 1,
            cache=cache,
            last=token,
            done=state["done"] | (token == eos_id),
            tokens=write(state["tokens"], token),
            logprobs=write(state["logprobs"], token_logp),
            entropies=write(state["entropies"], entropy),
            margins=write(state["margins"], margin),
            lengths=state["lengths"] + active.astype(jnp.int32),
            hidden_sum=state["hidden_sum"] + jnp.where(active[:, None], hidden[:, 0].astype(jnp.float32), 0.0),
        )

    final = jax.lax.while_loop(cond, body, init)
    lengths = final["lengths"]
    mean_hidden = final["hidden_sum"] / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    return DecodeOutput(
        tokens=final["tokens"],
        logprobs=final["logprobs"],
        entropies=final["entropies"],
        lengths=lengths,
        mean_hidden=mean_hidden,
        margins=final["margins"],
    )


def greedy_decode(
    model: Model, params: Params, inputs: Inputs, max_decode_length: int, eos_id: int = 1
) -> DecodeOutput:
    """Greedy decoding of `inputs` for at most `max_decode_length` steps.

    jit-able with `model`, `max_decode_length` and `eos_id` static.
    """
    return decode_loop(
        model, params, inputs, max_decode_length, eos_id, lambda logp, step: greedy_token(logp, model.SUPPRESSED_TOKEN)
    )
