"""FLOPs of decoding one example, from the analytic model (`cat_jax.models.flops`).

Decoding alone: the encoder once, then one cached decoder token per step. Speculative decoding:
both encoders once; per round that starts after n emitted tokens, gamma + 1 one-token steps of the
small model (contexts n..n+gamma) and one block of gamma + 1 tokens of the large model (context n).
"""

from __future__ import annotations

import numpy as np

from cat_jax.models import T5Config, decoder_flops, encoder_flops


def decode_flops(config: T5Config, input_length: int, decoded_length: int) -> float:
    """FLOPs of encoding input_length tokens and decoding decoded_length tokens one at a time."""
    steps = np.arange(decoded_length)
    return float(encoder_flops(config, input_length) + np.sum(decoder_flops(config, input_length, steps, 1)))


def speculative_flops(small: T5Config, large: T5Config, input_length: int, round_starts: np.ndarray,
                      gamma: int) -> float:
    """FLOPs of one example's speculative decoding; round_starts [R]: tokens emitted before each
    round (entries < 0 are rounds that did not happen)."""
    starts = np.asarray(round_starts)
    starts = starts[starts >= 0]
    drafts = starts[:, None] + np.arange(gamma + 1)[None, :]
    return float(encoder_flops(small, input_length) + encoder_flops(large, input_length)
                 + np.sum(decoder_flops(small, input_length, drafts, 1))
                 + np.sum(decoder_flops(large, input_length, starts, gamma + 1)))
