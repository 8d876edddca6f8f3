"""Autoregressive decoding with a key/value cache, one token per step, with per-token scores.

`decode_loop` runs the cached decoder inside a `jax.lax.while_loop`; a `choose` function picks
each step's tokens from the model's log-probabilities (greedy here, sampling in `sampling.py`).
Token 0 is padding and the decoder's BOS (as in T5); decoding never emits it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cat_jax.decoding.cache import init_cache
from cat_jax.models.t5 import Transformer

Params = Any
# choose(logp [b, vocab] float32, step: int32 scalar) -> tokens [b] int32
Choose = Callable[[jax.Array, jax.Array], jax.Array]


@struct.dataclass
class DecodeOutput:
    """What decoding produced, per row; every per-token field is 0 after EOS.

    tokens: [b, T] int32; logprobs: [b, T] float32, log p of each generated token;
    entropies: [b, T] float32, entropy of the full next-token distribution; lengths: [b] int32,
    generated tokens up to and including EOS; mean_hidden: [b, emb] float32, the final decoder
    hidden state averaged over the generated tokens; margins: [b, T] float32, the difference
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


def greedy_token(logp: jax.Array) -> jax.Array:
    """logp [b, vocab] -> the most likely token other than 0 (padding/BOS), [b] int32."""
    return jnp.argmax(logp.at[:, 0].set(-jnp.inf), axis=-1).astype(jnp.int32)


def decode_loop(model: Transformer, params: Params, encoder_input_tokens: jax.Array,
                max_decode_length: int, eos_id: int, choose: Choose) -> DecodeOutput:
    """Decodes encoder_input_tokens [b, Li] for at most `max_decode_length` steps with `choose`.

    Encodes once, then feeds one token per step through the cached decoder inside a
    `jax.lax.while_loop` that stops when every row has emitted `eos_id`.
    """
    batch = encoder_input_tokens.shape[0]
    emb_dim = model.config.emb_dim
    encoded = model.apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
    cache = init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)
    zeros_f = jnp.zeros((batch, max_decode_length), jnp.float32)
    init = dict(step=jnp.array(0, jnp.int32), cache=cache,
                last=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
                tokens=jnp.zeros((batch, max_decode_length), jnp.int32),
                logprobs=zeros_f, entropies=zeros_f, margins=zeros_f, lengths=jnp.zeros((batch,), jnp.int32),
                hidden_sum=jnp.zeros((batch, emb_dim), jnp.float32))

    def cond(state: dict[str, Any]) -> jax.Array:
        return (state["step"] < max_decode_length) & ~jnp.all(state["done"])

    def body(state: dict[str, Any]) -> dict[str, Any]:
        (logits, hidden), variables = model.apply(
            {"params": params, "cache": state["cache"]}, encoded, encoder_input_tokens,
            state["last"][:, None], decode=True, return_hidden=True, mutable=["cache"],
            method=Transformer.decode)
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
            step=step + 1, cache=variables["cache"], last=token,
            done=state["done"] | (token == eos_id),
            tokens=write(state["tokens"], token),
            logprobs=write(state["logprobs"], token_logp),
            entropies=write(state["entropies"], entropy),
            margins=write(state["margins"], margin),
            lengths=state["lengths"] + active.astype(jnp.int32),
            hidden_sum=state["hidden_sum"]
            + jnp.where(active[:, None], hidden[:, 0].astype(jnp.float32), 0.0))

    final = jax.lax.while_loop(cond, body, init)
    lengths = final["lengths"]
    mean_hidden = final["hidden_sum"] / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
    return DecodeOutput(tokens=final["tokens"], logprobs=final["logprobs"],
                        entropies=final["entropies"], lengths=lengths, mean_hidden=mean_hidden,
                        margins=final["margins"])


def greedy_decode(model: Transformer, params: Params, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = 1) -> DecodeOutput:
    """Greedy decoding of encoder_input_tokens [b, Li] for at most `max_decode_length` steps.

    jit-able with `model`, `max_decode_length` and `eos_id` static.
    """
    return decode_loop(model, params, encoder_input_tokens, max_decode_length, eos_id,
                       lambda logp, step: greedy_token(logp))
