"""T5-family encoder-decoder: pre-norm layers, relative position bias shared by each stack's
layers, an untied LM head (v1.1) or logits through the token embedding (v1.0).

Parameter tree (under "params"): `token_embedder/embedding` (shared by encoder and decoder
inputs), `encoder/{relpos_bias, layers_i, encoder_norm}`, `decoder/{relpos_bias, layers_i,
decoder_norm, logits_dense}` (no `logits_dense` with `logits_via_embedding`). Layer i of the
encoder holds `pre_attention_norm, attention/{query,key,value,out}, pre_mlp_norm, mlp`; of the
decoder `pre_self_attention_norm, self_attention, pre_cross_attention_norm,
encoder_decoder_attention, pre_mlp_norm, mlp`; `mlp` holds `wi_0, wi_1, wo` (gated) or `wi, wo`.

Packed rows (`cat_jax.data.packing`; teacher forcing only) pass `packing`, a dict of
`encoder_segment_ids`, `encoder_positions`, `decoder_segment_ids`, `decoder_positions`: attention stays
within a segment and the relative-position buckets come from the positions within segments.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import linen as nn

from cat_jax.models.layers import Dense
from cat_jax.models.t5.config import T5Config
from cat_jax.models.t5.layers import Embed, MlpBlock, MultiHeadAttention, RelativePositionBias, RMSNorm

EMBED_AXES = ("batch", "length", "embed")


def _relpos(config: T5Config, bidirectional: bool) -> RelativePositionBias:
    return RelativePositionBias(
        config.num_heads,
        config.relative_attention_num_buckets,
        config.relative_attention_max_distance,
        bidirectional,
        name="relpos_bias",
    )


def _norm(config: T5Config, name: str) -> RMSNorm:
    return RMSNorm(config.compute_dtype, config.layer_norm_epsilon, name=name)


def _mlp(config: T5Config) -> MlpBlock:
    return MlpBlock(config.mlp_dim, config.mlp_activation, config.dropout_rate, config.compute_dtype, name="mlp")


def _attention(config: T5Config, name: str, cross: bool = False) -> MultiHeadAttention:
    return MultiHeadAttention(
        config.num_heads,
        config.head_dim,
        cross_attention=cross,
        dropout_rate=config.dropout_rate,
        dtype=config.compute_dtype,
        impl=config.attention_impl,
        name=name,
    )


class EncoderLayer(nn.Module):
    """Pre-norm self-attention (bidirectional relative bias) and gated MLP, each residual."""

    config: T5Config
    relpos: RelativePositionBias

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, enable_dropout: bool, packing: Mapping[str, jax.Array] | None = None
    ) -> jax.Array:
        """x: [batch, length, embed], mask: [batch, length] bool -> [batch, length, embed]."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        h = _norm(cfg, name="pre_attention_norm")(x)
        packed = {}
        if packing is not None:
            seg, pos = packing["encoder_segment_ids"], packing["encoder_positions"]
            packed = {"segments": (seg, seg), "positions": (pos, pos)}
        h = _attention(cfg, "attention")(
            h, h, kv_mask=mask, relpos=self.relpos, enable_dropout=enable_dropout, **packed
        )
        x = x + dropout(h, deterministic=not enable_dropout)
        h = _norm(cfg, name="pre_mlp_norm")(x)
        h = _mlp(cfg)(h, enable_dropout)
        x = x + dropout(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x, EMBED_AXES)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention over the encoder, gated MLP."""

    config: T5Config
    relpos: RelativePositionBias

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        enable_dropout: bool,
        decode: bool,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """x: [b, Lt, embed], encoded: [b, Li, embed], encoder_mask: [b, Li] -> [b, Lt, embed]."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        h = _norm(cfg, name="pre_self_attention_norm")(x)
        packed_self, packed_cross = {}, {}
        if packing is not None:
            seg, pos = packing["decoder_segment_ids"], packing["decoder_positions"]
            packed_self = {"segments": (seg, seg), "positions": (pos, pos)}
            packed_cross = {"segments": (seg, packing["encoder_segment_ids"])}
        h = _attention(cfg, "self_attention")(
            h, h, causal=True, relpos=self.relpos, enable_dropout=enable_dropout, decode=decode, **packed_self
        )
        x = x + dropout(h, deterministic=not enable_dropout)
        h = _norm(cfg, name="pre_cross_attention_norm")(x)
        h = _attention(cfg, "encoder_decoder_attention", cross=True)(
            h, encoded, kv_mask=encoder_mask, enable_dropout=enable_dropout, decode=decode, **packed_cross
        )
        x = x + dropout(h, deterministic=not enable_dropout)
        h = _norm(cfg, name="pre_mlp_norm")(x)
        h = _mlp(cfg)(h, enable_dropout)
        x = x + dropout(h, deterministic=not enable_dropout)
        return nn.with_logical_constraint(x, EMBED_AXES)


class Encoder(nn.Module):
    """Embedding, `num_encoder_layers` layers sharing one relative-bias table, final norm."""

    config: T5Config
    embedder: Embed

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        enable_dropout: bool,
        depth: int | None = None,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """tokens: [batch, Li] int (0 = padding) -> [batch, Li, embed]. depth: run only the first
        `depth` layers and return their residual stream, without the final norm (Hugging Face's
        hidden_states[depth]); None or num_encoder_layers: the encoder's output."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        relpos = _relpos(cfg, bidirectional=True)
        mask = tokens > 0
        x = dropout(self.embedder(tokens), deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        layers = cfg.num_encoder_layers if depth is None else depth
        for i in range(layers):
            x = EncoderLayer(cfg, relpos, name=f"layers_{i}")(x, mask, enable_dropout, packing)
        if layers < cfg.num_encoder_layers:
            return x
        x = _norm(cfg, name="encoder_norm")(x)
        return dropout(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
    """Embedding, `num_decoder_layers` layers sharing one causal relative-bias table, final
    norm and the LM head (untied, or the token embedding with `logits_via_embedding`)."""

    config: T5Config
    embedder: Embed

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        tokens: jax.Array,
        enable_dropout: bool,
        decode: bool,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """tokens: [b, Lt] -> (logits [b, Lt, vocab] in compute dtype, hidden [b, Lt, embed])."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        relpos = _relpos(cfg, bidirectional=False)
        x = dropout(self.embedder(tokens), deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, relpos, name=f"layers_{i}")(x, encoded, encoder_mask, enable_dropout, decode, packing)
        hidden = _norm(cfg, name="decoder_norm")(x)
        x = dropout(hidden, deterministic=not enable_dropout)
        if cfg.logits_via_embedding:
            logits = self.embedder.attend(x * cfg.emb_dim**-0.5)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype, name="logits_dense")(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), hidden


class Transformer(nn.Module):
    """T5-family encoder-decoder. Token id 0 is padding (and the decoder's BOS)."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        if cfg.vocab_size is None:
            raise ValueError(
                "T5Config.vocab_size is None: set it from the task's vocabulary "
                "with config.replace(vocab_size=vocabulary.vocab_size)."
            )
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        enable_dropout: bool = False,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """encoder_input_tokens: [b, Li] int -> encoded [b, Li, embed] in compute dtype."""
        return self.encoder(encoder_input_tokens, enable_dropout, packing=packing)

    def encoder_hidden(self, encoder_input_tokens: jax.Array, depth: int) -> jax.Array:
        """The encoder's hidden states after its first `depth` layers, 0 <= depth <= num_encoder_layers
        (depth num_encoder_layers: `encode`'s output): [b, Li] int -> [b, Li, embed]."""
        if not 0 <= depth <= self.config.num_encoder_layers:
            raise ValueError(
                f"encoder depth {depth} must lie in [0, {self.config.num_encoder_layers}] "
                "(0: the token embeddings; num_encoder_layers: the encoder's output)."
            )
        return self.encoder(encoder_input_tokens, False, depth)

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        enable_dropout: bool = False,
        decode: bool = False,
        return_hidden: bool = False,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """decoder_input_tokens: [b, Lt] -> logits [b, Lt, vocab] (or (logits, hidden [b, Lt, embed])).

        With `decode=True` the "cache" collection must be mutable; the first such call (given the
        full-length decoder input) creates the cache, each later call consumes one token [b, 1].
        """
        logits, hidden = self.decoder(
            encoded, encoder_input_tokens > 0, decoder_input_tokens, enable_dropout, decode, packing
        )
        return (logits, hidden) if return_hidden else logits

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        enable_dropout: bool = False,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Teacher-forced logits [b, Lt, vocab] in compute dtype (of packed rows with `packing`)."""
        encoded = self.encode(encoder_input_tokens, enable_dropout, packing)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout, packing=packing)
