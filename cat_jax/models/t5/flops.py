"""Analytic forward-pass FLOPs of the T5 encoder-decoder (2 FLOPs per multiply-add)."""

from __future__ import annotations

from typing import Any

from cat_jax.models.t5.config import T5Config


def _check(config: T5Config) -> None:
    if config.vocab_size is None:
        raise ValueError("FLOPs need T5Config.vocab_size; set it from the vocabulary.")


def encoder_layers_flops(config: T5Config, input_length: Any, num_layers: int) -> Any:
    """FLOPs of the first `num_layers` encoder layers on Li = input_length tokens (what
    `Transformer.encoder_hidden` at that depth runs):

        num_layers * Li * (8*d*a + m*d*f + 4*Li*a)

    (q, k, v, out projections; the MLP; scores and weighted values), with the names of
    `forward_flops`. Plain arithmetic: input_length may be a number or a numpy array.
    """
    _check(config)
    if not 0 <= num_layers <= config.num_encoder_layers:
        raise ValueError(f"num_layers={num_layers} must lie in [0, {config.num_encoder_layers}].")
    d, f, a, li = config.emb_dim, config.mlp_dim, config.num_heads * config.head_dim, input_length
    m = 6 if config.gated_mlp else 4
    return num_layers * li * (8 * d * a + m * d * f + 4 * li * a)


def encoder_flops(config: T5Config, input_length: Any) -> Any:
    """FLOPs of encoding Li = input_length tokens, including every decoder layer's projection of
    the encoder outputs to cross-attention keys/values (done once per example):

        Le * Li * (8*d*a + m*d*f + 4*Li*a) + Ld * 4*Li*d*a

    (`encoder_layers_flops` of all Le layers, then the k/v projections), with the names of
    `forward_flops`. Plain arithmetic: input_length may be a number or a numpy array.
    """
    d, a = config.emb_dim, config.num_heads * config.head_dim
    return (
        encoder_layers_flops(config, input_length, config.num_encoder_layers)
        + config.num_decoder_layers * 4 * input_length * d * a
    )


def decoder_flops(config: T5Config, input_length: Any, context: Any, block: Any) -> Any:
    """FLOPs of `block` decoder tokens attending to `context` earlier (cached) tokens and to
    themselves, causally counted as if every query saw the whole block (as teacher forcing does):

        Ld * block * (12*d*a + m*d*f + 4*(context + block)*a + 4*Li*a) + 2 * block * d * V

    (self-attention projections, scores and values; cross-attention q and out projections, scores
    and values against Li keys; the MLP; the LM head). Greedy decoding's step t is
    decoder_flops(Li, t, 1); scoring a draft of g tokens after n accepted ones in one call is
    decoder_flops(Li, n, g). Plain arithmetic: the lengths may be numbers or numpy arrays.
    """
    _check(config)
    d, f, v = config.emb_dim, config.mlp_dim, config.vocab_size
    a = config.num_heads * config.head_dim
    m = 6 if config.gated_mlp else 4
    per_token = 12 * d * a + m * d * f + 4 * (context + block) * a + 4 * input_length * a
    return config.num_decoder_layers * block * per_token + 2 * block * d * v


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
                = encoder_flops(Li) + decoder_flops(Li, context=0, block=Lt)

    Embedding lookups, norms, softmax and activations are not counted.
    """
    return float(encoder_flops(config, input_length) + decoder_flops(config, input_length, 0, target_length))
