"""FLOPs of decoding one example, from each model's analytic count (`cat_jax.models.contract`).

Decoding alone: `start_decoding` once (the encoder, or the prompt's prefill), then one cached token
per step. Speculative decoding: both models start once; per round that starts after n emitted
tokens, gamma + 1 one-token steps of the small model (contexts n..n+gamma) and one block of
gamma + 1 tokens of the large model (context n).
"""

from __future__ import annotations

import numpy as np

from cat_jax.models import Model


def decode_flops(model: Model, input_length: int, decoded_length: int) -> float:
    """FLOPs of starting on input_length tokens and decoding decoded_length tokens one at a time."""
    steps = np.arange(decoded_length)
    return float(model.prefill_flops(input_length) + np.sum(model.decode_flops(input_length, steps, 1)))


def speculative_flops(small: Model, large: Model, input_length: int, round_starts: np.ndarray, gamma: int) -> float:
    """FLOPs of one example's speculative decoding; round_starts [R]: tokens emitted before each
    round (entries < 0 are rounds that did not happen)."""
    starts = np.asarray(round_starts)
    starts = starts[starts >= 0]
    drafts = starts[:, None] + np.arange(gamma + 1)[None, :]
    return float(
        small.prefill_flops(input_length)
        + large.prefill_flops(input_length)
        + np.sum(small.decode_flops(input_length, drafts, 1))
        + np.sum(large.decode_flops(input_length, starts, gamma + 1))
    )
