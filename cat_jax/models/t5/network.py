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

With `scan_layers` each stack's `layers_0 ... layers_{n-1}` are one module `layers` whose
parameters (and decoding cache) carry a leading axis of n (`cat_jax.models.stack`); with a
`remat_policy` each layer is rematerialised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from flax import linen as nn

from cat_jax.models import stack
from cat_jax.models.layers import Dense
from cat_jax.models.t5.config import T5Config
from cat_jax.models.t5.layers import Embed, MlpBlock, MultiHeadAttention, PositionBias, RelativePositionBias, RMSNorm

EMBED_AXES = ("batch", "length", "embed")


def _relpos(config: T5Config) -> RelativePositionBias:
    return RelativePositionBias(config.num_heads, config.relative_attention_num_buckets, name="relpos_bias")


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


def _bias(config: T5Config, table: jax.Array, bidirectional: bool) -> PositionBias:
    return PositionBias(table, bidirectional, config.relative_attention_max_distance)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention (bidirectional relative bias) and gated MLP, each residual. In a
    scanned stack (`scanned`) it returns (x, None), scan's (carry, output)."""

    config: T5Config
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        relpos_table: jax.Array,
        enable_dropout: bool,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, None]:
        """x: [batch, length, embed], mask: [batch, length] bool, relpos_table: [heads, buckets] ->
        [batch, length, embed]; `packing`: see the module docstring."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        relpos = _bias(cfg, relpos_table, bidirectional=True)
        h = _norm(cfg, name="pre_attention_norm")(x)
        packed = {}
        if packing is not None:
            seg, pos = packing["encoder_segment_ids"], packing["encoder_positions"]
            packed = {"segments": (seg, seg), "positions": (pos, pos)}
        h = _attention(cfg, "attention")(h, h, kv_mask=mask, relpos=relpos, enable_dropout=enable_dropout, **packed)
        x = x + dropout(h, deterministic=not enable_dropout)
        h = _norm(cfg, name="pre_mlp_norm")(x)
        h = _mlp(cfg)(h, enable_dropout)
        x = x + dropout(h, deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention over the encoder, gated MLP. In a scanned
    stack (`scanned`) it returns (x, None)."""

    config: T5Config
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        relpos_table: jax.Array,
        enable_dropout: bool,
        decode: bool,
        packing: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, None]:
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
            h,
            h,
            causal=True,
            relpos=_bias(cfg, relpos_table, bidirectional=False),
            enable_dropout=enable_dropout,
            decode=decode,
            **packed_self,
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
        x = nn.with_logical_constraint(x, EMBED_AXES)
        return (x, None) if self.scanned else x


def _stack(
    config: T5Config, layer: type[nn.Module], count: int, static_argnums: tuple[int, ...], broadcast: int
) -> Callable[[int], nn.Module]:
    """index -> the layer module to call: `layers_{index}` (each under remat), or the one scanned
    module `layers` (index 0) over `count` stacked layers."""
    block = stack.remat(layer, config.remat_policy, static_argnums, config.scan_layers)
    if config.scan_layers:
        scanned = stack.scan(block, count, broadcast)
        return lambda _: scanned(config, scanned=True, name=stack.SCANNED)
    return lambda i: block(config, name=f"layers_{i}")


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
        hidden_states[depth]); None or num_encoder_layers: the encoder's output. A scanned stack
        runs a partial depth on the first `depth` slices of its stacked parameters."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        table = _relpos(cfg)()
        mask = tokens > 0
        x = dropout(self.embedder(tokens), deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        layers = cfg.num_encoder_layers if depth is None else depth
        layer = _stack(cfg, EncoderLayer, cfg.num_encoder_layers, static_argnums=(4,), broadcast=4)
        if cfg.scan_layers and layers < cfg.num_encoder_layers:
            unbound = EncoderLayer(cfg, scanned=True, parent=None)
            stacked = self.variables["params"][stack.SCANNED]
            return stack.run_prefix(unbound, stacked, layers, x, mask, table, False, packing)
        if cfg.scan_layers:
            x, _ = layer(0)(x, mask, table, enable_dropout, packing)
        else:
            for i in range(layers):
                x = layer(i)(x, mask, table, enable_dropout, packing)
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
        table = _relpos(cfg)()
        x = dropout(self.embedder(tokens), deterministic=not enable_dropout)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        layer = _stack(cfg, DecoderLayer, cfg.num_decoder_layers, static_argnums=(5, 6), broadcast=6)
        if cfg.scan_layers:
            x, _ = layer(0)(x, encoded, encoder_mask, table, enable_dropout, decode, packing)
        else:
            for i in range(cfg.num_decoder_layers):
                x = layer(i)(x, encoded, encoder_mask, table, enable_dropout, decode, packing)
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
