"""Cached decoding with a decoder: create the cache, write blocks of tokens, move rows' positions.

A fresh cache holds `max_length` empty slots at one shared index 0. `decode_block` writes a block
of g >= 1 tokens per row at the index and advances it by g: the first block is the prompt (a
left-padded batch of prompts with its mask: the padding stays invisible), each later one the
next token(s) (one for greedy decoding, sampling and beam search, a draft of several for
speculative verification). `set_cache_index` gives every row its own index (int32 [b]); moving a
row's index back rolls it back to that prefix (keys after a query's slot are masked, and the next
write overwrites them).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cat_jax.models.decoder.model import Decoder

Cache = Any
CACHE_INDEX = "cache_index"


def init_cache(model: Decoder, params: Any, batch_size: int, max_length: int) -> Cache:
    """An empty "cache" collection of `max_length` slots per row, at index 0."""
    dummy = jnp.zeros((batch_size, max_length), jnp.int32)
    _, variables = model.apply({"params": params}, dummy, decode=True, mutable=["cache"])
    return variables["cache"]


def decode_block(
    model: Decoder,
    params: Any,
    cache: Cache,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> tuple[jax.Array, Cache]:
    """Writes tokens [b, g] at each row's index in one call.

    Returns (logits [b, g, vocab], the cache with the block written and the index advanced by g).
    Row r's logits at j are the next-token logits after its cached prefix and tokens[r, :j + 1].
    `mask` [b, g] marks real tokens (default: all); `positions` [b, g] default to the count of the
    row's real tokens before each one.
    """
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens, mask, positions, decode=True, mutable=["cache"]
    )
    return logits, variables["cache"]


def set_cache_index(cache: Cache, index: jax.Array) -> Cache:
    """The cache with its next write slot set to index (a scalar, or per row [b])."""
    index = jnp.asarray(index, jnp.int32)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: index if path[-1].key == CACHE_INDEX else leaf, cache)
