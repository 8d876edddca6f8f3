"""Analytic forward-pass FLOPs of the T5 encoder-decoder (2 FLOPs per multiply-add)."""

from __future__ import annotations

from cat_jax.models.config import T5Config


def forward_flops(config: T5Config, input_length: int, target_length: int) -> float:
    """FLOPs of one example's teacher-forced forward pass (matmuls only).

    With d = emb_dim, a = num_heads * head_dim, f = mlp_dim, V = vocab_size, Li = input_length,
    Lt = target_length, Le / Ld = encoder / decoder layers, and m = 6 for a gated MLP (wi_0, wi_1,
    wo) or 4 for relu (wi, wo):

        encoder = Le * Li * (8*d*a + m*d*f + 4*Li*a)
                  (q, k, v, out projections; the MLP; scores and weighted values)
        decoder = Ld * (Lt * (12*d*a + m*d*f + 4*Lt*a + 4*Li*a) + 4*Li*d*a)
                  (self-attention as above; cross-attention q and out projections per target
                  token, scores and values against Li keys, and the k/v projections of the
                  Li encoder outputs; MLP)
        head    = 2 * Lt * d * V   (the untied LM head or the tied embedding alike)
        total   = encoder + decoder + head

    Embedding lookups, norms, softmax and activations are not counted.
    """
    if config.vocab_size is None:
        raise ValueError("forward_flops needs T5Config.vocab_size; set it from the vocabulary.")
    d, f, v = config.emb_dim, config.mlp_dim, config.vocab_size
    a = config.num_heads * config.head_dim
    li, lt = input_length, target_length
    m = 6 if config.gated_mlp else 4
    encoder = config.num_encoder_layers * li * (8 * d * a + m * d * f + 4 * li * a)
    decoder = config.num_decoder_layers * (
        lt * (12 * d * a + m * d * f + 4 * lt * a + 4 * li * a) + 4 * li * d * a)
    head = 2 * lt * d * v
    return float(encoder + decoder + head)
