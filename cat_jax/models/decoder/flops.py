"""Analytic forward FLOPs of the decoder (2 FLOPs per multiply-add; matmuls only).

With d = emb_dim, H / K query / key-value heads of D dims (q = H*D, k = K*D), f = mlp_dim,
V = vocab_size and N layers, each token costs per layer
    4*d*q + 4*d*k        (query and out projections; key and value projections)
    6*d*f                (the gated MLP: gate, up, down)
    4*q per key it is scored against (scores and weighted values)
and 2*d*V for the LM head. Embedding lookups, norms, rotary embeddings, soft-capping and softmax
are not counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cat_jax.models.decoder.config import DecoderConfig


def _token_flops(config: DecoderConfig) -> int:
    if config.vocab_size is None:
        raise ValueError("FLOPs need DecoderConfig.vocab_size; set it from the vocabulary.")
    q, k = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return 4 * config.emb_dim * q + 4 * config.emb_dim * k + 6 * config.emb_dim * config.mlp_dim


def layers_flops(config: DecoderConfig, length: Any, num_layers: int) -> Any:
    """FLOPs of the first `num_layers` layers on `length` tokens, every query scored against all of
    them (what `Decoder.hidden_after` at that depth computes): num_layers * L * (4*d*q + 4*d*k +
    6*d*f + 4*L*q)."""
    if not 0 <= num_layers <= config.num_layers:
        raise ValueError(f"num_layers={num_layers} must lie in [0, {config.num_layers}].")
    return num_layers * length * (_token_flops(config) + 4 * length * config.num_heads * config.head_dim)


def prefill_flops(config: DecoderConfig, length: Any) -> Any:
    """FLOPs of a teacher-forced forward pass (or a prefill) of `length` tokens:

        N * L * (4*d*q + 4*d*k + 6*d*f + 4*L*q) + 2*L*d*V

    Every query is scored against all L keys (masking, not skipping, hides later and out-of-window
    keys), sliding-window layers included. Plain arithmetic: `length` may be a number or a numpy
    array.
    """
    per_layer = length * (_token_flops(config) + 4 * length * config.num_heads * config.head_dim)
    return config.num_layers * per_layer + 2 * length * config.emb_dim * config.vocab_size


def decode_flops(config: DecoderConfig, context: Any, block: Any) -> Any:
    """FLOPs of `block` tokens written in one cached call after `context` cached ones, the cache
    holding exactly context + block slots:

        sum over layers of block * (4*d*q + 4*d*k + 6*d*f + 4*keys*q) + 2*block*d*V

    where keys = context + block for a global layer, and min(context + block, window + block - 1)
    for a sliding-window layer (it reads only the slots its queries can see). Greedy decoding's
    step t is decode_flops(t, 1); scoring a draft of g tokens after n accepted ones is
    decode_flops(n, g). Plain arithmetic: the lengths may be numbers or numpy arrays.
    """
    q = config.num_heads * config.head_dim
    total = 0
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        keys = context + block if window is None else np.minimum(context + block, window + block - 1)
        total = total + block * (_token_flops(config) + 4 * keys * q)
    return total + 2 * block * config.emb_dim * config.vocab_size
