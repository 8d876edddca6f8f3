"""The decoder-only transformer: Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2 as configurations.

Parameter tree (under "params"):

    embedder/embedding                         [vocab, embed]
    layers_{i}/input_norm/scale                [embed]
    layers_{i}/attention/{query,key,value}/kernel (+ /bias with qkv_bias)
    layers_{i}/attention/{query_norm,key_norm}/scale   [head_dim] (qk_norm)
    layers_{i}/attention/out/kernel            [heads, head_dim, embed]
    layers_{i}/post_attention_norm/scale       (sandwich_norms)
    layers_{i}/pre_mlp_norm/scale
    layers_{i}/mlp/{gate,up,down}/kernel
    layers_{i}/post_mlp_norm/scale             (sandwich_norms)
    final_norm/scale
    lm_head/kernel                             [embed, vocab] (untied models)

Inputs are a batch of sequences `tokens` [b, L] with a padding `mask` [b, L] (True for real
tokens; padding may sit on the left, as for batched prompts, or on the right) and per-row
`positions` [b, L] (default: cumsum(mask) - 1, so a left-padded row's first real token is at
position 0). Padded keys are invisible; outputs at padded queries are finite but meaningless.

Packed rows (training only) pass `segment_ids` [b, L] (1, 2, ... per example, 0 padding) and the
positions within each segment: a key is visible only to queries of its own segment.

Cached decoding (`decode=True`, "cache" collection mutable) keeps T5's semantics
(cat_jax/models/layers.py `MultiHeadAttention`): the first call, given tokens [b, max_len],
creates an empty cache; each later call writes a block of g >= 1 tokens per row at
"cache_index" (a scalar, or per row int32 [b] once replaced), advances it by g and returns the
block's logits. Moving a row's index back rolls that row back (keys after a query's slot are
invisible, and the next write overwrites them). The cache also keeps "cached_mask" [b, max_len],
which slots hold real tokens (a left-padded prompt written as the first block keeps its padding
invisible), and the default positions of a block continue that row's real tokens.

With `scan_layers` the `layers_{i}` are one module `layers` whose parameters and cache carry a
leading axis of num_layers (`cat_jax.models.stack`); with a `remat_policy` each layer is
rematerialised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cat_jax.models import stack
from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.models.decoder.layers import Attention, Embed, Mlp, RMSNorm, softcap
from cat_jax.models.layers import Dense

EMBED_AXES = ("batch", "length", "embed")


def _norm(config: DecoderConfig, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.norm_plus_one, dtype=config.compute_dtype, name=name)


def default_positions(mask: jax.Array) -> jax.Array:
    """mask [b, L] bool -> positions [b, L] int32: each real token's index among its row's real
    tokens (cumsum(mask) - 1, clipped at 0 for leading padding)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderLayer(nn.Module):
    """Pre-norm attention and gated MLP, each added to the residual stream (Gemma 2 also normalises
    each sub-layer's output before the add)."""

    config: DecoderConfig
    layer: int
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        query_slots: jax.Array,
        key_mask: jax.Array,
        decode: bool,
        index: jax.Array | None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, None]:
        """x: [b, g, embed] -> [b, g, embed] (in a scanned stack: (that, None), scan's carry and
        output); see `Attention` for the other arguments."""
        cfg = self.config
        h = _norm(cfg, "input_norm")(x)
        h = Attention(cfg, cfg.layer_window(self.layer), name="attention")(
            h, positions, query_slots, key_mask, decode=decode, index=index, segment_ids=segment_ids
        )
        if cfg.sandwich_norms:
            h = _norm(cfg, "post_attention_norm")(h)
        x = x + h
        h = Mlp(cfg.mlp_dim, cfg.activation, cfg.compute_dtype, name="mlp")(_norm(cfg, "pre_mlp_norm")(x))
        if cfg.sandwich_norms:
            h = _norm(cfg, "post_mlp_norm")(h)
        x = nn.with_logical_constraint(x + h, EMBED_AXES)
        return (x, None) if self.scanned else x


class CacheState(nn.Module):
    """The cache's shared bookkeeping: "cache_index" (the next slot to write: a scalar, or per row
    [b]) and "cached_mask" [b, max_len] (which slots hold real tokens)."""

    @nn.compact
    def __call__(self, mask: jax.Array) -> tuple[jax.Array | None, jax.Array, jax.Array]:
        """Records the block's mask [b, g] at the index and advances it by g.

        Returns (the index before the write, or None on the creating call; the key mask [b, K];
        the block's slots [b, g]).
        """
        primed = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        cached = self.variable("cache", "cached_mask", jnp.zeros, mask.shape, jnp.bool_)
        b, g = mask.shape
        if not primed:
            return None, mask, jnp.broadcast_to(jnp.arange(g), (b, g))
        i = index.value
        index.value = i + g
        slots = jnp.broadcast_to(jnp.reshape(i, (-1, 1)) + jnp.arange(g), (b, g))
        if i.ndim == 0:
            cached.value = jax.lax.dynamic_update_slice(cached.value, mask, (0, i))
        else:
            cached.value = cached.value.at[jnp.arange(b)[:, None], slots].set(mask, mode="drop")
        return i, cached.value, slots


class Decoder(nn.Module):
    """A decoder-only language model (see the module docstring for inputs and the cache)."""

    config: DecoderConfig

    def setup(self) -> None:
        cfg = self.config
        if cfg.vocab_size is None:
            raise ValueError(
                "DecoderConfig.vocab_size is None: set it from the task's vocabulary with "
                "config.replace(vocab_size=vocabulary.vocab_size)."
            )
        self.embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        block = stack.remat(DecoderLayer, cfg.remat_policy, (5,), cfg.scan_layers)
        if cfg.scan_layers:  # every layer attends alike (DecoderConfig refuses otherwise): layer 0's window
            self.layers = stack.scan(block, cfg.num_layers, 6)(cfg, 0, scanned=True)
        else:
            self.layers = [block(cfg, i) for i in range(cfg.num_layers)]
        self.final_norm = _norm(cfg, "final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype)
        self.cache_state = CacheState()

    def _residual(
        self,
        tokens: jax.Array,
        mask: jax.Array | None,
        positions: jax.Array | None,
        decode: bool,
        num_layers: int,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The residual stream [b, g, embed] after the first `num_layers` layers."""
        cfg = self.config
        mask = jnp.ones(tokens.shape, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
        index, key_mask, slots = None, mask, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if decode:
            index, key_mask, slots = self.cache_state(mask)
        if positions is None:
            counted = default_positions(key_mask)
            positions = counted if index is None else jnp.take_along_axis(counted, slots, axis=1)
        x = self.embedder(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.emb_dim**0.5, cfg.compute_dtype)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        if not cfg.scan_layers:
            for layer in self.layers[:num_layers]:
                x = layer(x, positions, slots, key_mask, decode, index, segment_ids)
        elif num_layers == cfg.num_layers:
            x, _ = self.layers(x, positions, slots, key_mask, decode, index, segment_ids)
        else:  # a partial depth: the first slices of the stacked parameters
            unbound = DecoderLayer(cfg, 0, scanned=True, parent=None)
            x = stack.run_prefix(
                unbound,
                self.variables["params"][stack.SCANNED],
                num_layers,
                x,
                positions,
                slots,
                key_mask,
                decode,
                index,
                segment_ids,
            )
        return x

    def __call__(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        decode: bool = False,
        return_hidden: bool = False,
        logits_from: int = 0,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """tokens: [b, g] int -> logits [b, g - logits_from, vocab] in compute dtype of the positions from
        `logits_from` on (with `return_hidden`, also the final normed hidden states there [b, g -
        logits_from, embed]). mask, positions: [b, g] (see the module docstring)."""
        cfg = self.config
        residual = self._residual(tokens, mask, positions, decode, cfg.num_layers, segment_ids)
        hidden = self.final_norm(residual[:, logits_from:])
        logits = self.embedder.attend(hidden) if cfg.tie_embeddings else self.lm_head(hidden)
        logits = nn.with_logical_constraint(softcap(logits, cfg.final_logit_softcap), ("batch", "length", "vocab"))
        return (logits, hidden) if return_hidden else logits

    def hidden_after(
        self, tokens: jax.Array, mask: jax.Array | None = None, positions: jax.Array | None = None, *, layer: int
    ) -> jax.Array:
        """The residual stream [b, L, embed] after the first `layer` layers (0: the scaled token
        embeddings; num_layers: the last layer's output, before the final norm). Teacher-forced, no
        cache; only those layers are computed."""
        if not 0 <= layer <= self.config.num_layers:
            raise ValueError(f"layer must be in [0, {self.config.num_layers}], got {layer}.")
        return self._residual(tokens, mask, positions, False, layer)


def init_params(config: DecoderConfig, rng: jax.Array, length: int = 8) -> Any:
    """Parameters, boxed with their logical axis names (`nn.get_partition_spec` reads them)."""
    return Decoder(config).init({"params": rng}, jnp.ones((1, length), jnp.int32))["params"]


def abstract_params(config: DecoderConfig) -> tuple[Any, Any]:
    """(abstract unboxed params, their logical PartitionSpecs) without allocating anything."""
    boxed = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
