"""Greedy decoding with a key/value cache, and teacher-forced scoring, with per-token scores.

Token 0 is padding and the decoder's BOS (as in T5); greedy decoding never emits it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from cat_jax.models.t5 import Transformer

Params = Any


@struct.dataclass
class DecodeOutput:
    """What greedy decoding produced, per row; every per-token field is 0 after EOS.

    tokens: [b, T] int32; logprobs: [b, T] float32, log p of each generated token;
    entropies: [b, T] float32, entropy of the full next-token distribution; lengths: [b] int32,
    generated tokens up to and including EOS; mean_hidden: [b, emb] float32, the final decoder
    hidden state averaged over the generated tokens; margins: [b, T] float32, the difference
    between the two largest next-token probabilities.
    """

    tokens: jax.Array
    logprobs: jax.Array
    entropies: jax.Array
    lengths: jax.Array
    mean_hidden: jax.Array
    margins: jax.Array


def init_cache(model: Transformer, params: Params, encoded: jax.Array,
               encoder_input_tokens: jax.Array, max_decode_length: int) -> Any:
    """A fresh "cache" collection for `max_decode_length` steps.

    Self-attention caches are zero; cross-attention caches hold the encoder's keys/values.
    encoded: [b, Li, emb], encoder_input_tokens: [b, Li].
    """
    dummy = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, encoder_input_tokens, dummy,
                               decode=True, mutable=["cache"], method=Transformer.decode)
    return variables["cache"]


def greedy_decode(model: Transformer, params: Params, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = 1) -> DecodeOutput:
    """Greedy decoding of encoder_input_tokens [b, Li] for at most `max_decode_length` steps.

    Encodes once, then feeds one token per step through the cached decoder inside a
    `jax.lax.while_loop` that stops when every row has emitted `eos_id`. jit-able with
    `model`, `max_decode_length` and `eos_id` static.
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
        logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [b, vocab]
        token = jnp.argmax(logp.at[:, 0].set(-jnp.inf), axis=-1).astype(jnp.int32)
        token_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        top2 = jax.lax.top_k(logp, 2)[0]
        margin = jnp.exp(top2[:, 0]) - jnp.exp(top2[:, 1])
        active = ~state["done"]
        token = jnp.where(active, token, 0)
        step = state["step"]
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


def shift_right(tokens: jax.Array) -> jax.Array:
    """tokens: [b, T] -> [b, T] with a 0 (BOS) prepended and the last token dropped."""
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def score_tokens(model: Transformer, params: Params, encoder_input_tokens: jax.Array,
                 target_tokens: jax.Array) -> jax.Array:
    """Teacher-forced log p(target_t | x, target_<t): [b, T] float32, 0 where the target is 0."""
    logits = model.apply({"params": params}, encoder_input_tokens, shift_right(target_tokens))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, target_tokens[..., None], axis=-1)[..., 0]
    return jnp.where(target_tokens > 0, token_logp, 0.0)
