"""The decoder's key/value cache: creation, per-row positions, and scoring a block of tokens.

A fresh cache has one shared position (every row one token per call, as greedy decoding, sampling
and beam search use it). `set_cache_positions` gives each row its own position; a call then
writes a block of g tokens per row at that row's position and advances it by g. Rolling a row back
to its accepted prefix is `set_cache_positions` again with the shorter position: keys after a
query's position are masked, and the next write overwrites them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cat_jax.models.t5 import Transformer

Cache = Any
CACHE_INDEX = "cache_index"


def init_cache(model: Transformer, params: Any, encoded: jax.Array,
               encoder_input_tokens: jax.Array, max_decode_length: int) -> Cache:
    """A fresh "cache" collection for `max_decode_length` positions, at position 0.

    Self-attention caches are zero; cross-attention caches hold the encoder's keys/values.
    encoded: [b, Li, emb], encoder_input_tokens: [b, Li].
    """
    dummy = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, encoder_input_tokens, dummy,
                               decode=True, mutable=["cache"], method=Transformer.decode)
    return variables["cache"]


def set_cache_positions(cache: Cache, positions: jax.Array) -> Cache:
    """The cache with every self-attention layer's next write position set to positions [b]."""
    positions = jnp.asarray(positions, jnp.int32)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: positions if path[-1].key == CACHE_INDEX else leaf, cache)


def score_block(model: Transformer, params: Any, cache: Cache, encoded: jax.Array,
                encoder_input_tokens: jax.Array, block: jax.Array) -> tuple[jax.Array, Cache]:
    """Feeds block [b, g] at each row's cache position in one call.

    Returns (logits [b, g, vocab], the cache with the block written and positions advanced by g).
    Row r's logits at j are the next-token logits after its cached prefix and block[r, :j + 1].
    """
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_input_tokens,
                                    block, decode=True, mutable=["cache"], method=Transformer.decode)
    return logits, variables["cache"]
