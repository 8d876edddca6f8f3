"""Building blocks of the decoder (Flax linen, logically partitioned): RMSNorm (plain or Gemma's
1 + scale), rotary position embeddings (with Llama 3's frequency scaling), grouped-query attention
with a key/value cache, the gated MLP, the token embedding.

Parameters are float32 with logical axis names; attention kernels keep their heads apart:
query [embed, heads, kv], key / value [embed, kv_heads, kv], out [heads, kv, embed] (`kv` is the
head dimension). Written after the Hugging Face implementations in transformers 4.57
(models/llama, qwen2, qwen3, gemma, gemma2 `modeling_*.py`, `modeling_rope_utils.py`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cat_jax.models.attention import dot_product_attention
from cat_jax.models.decoder.config import DecoderConfig
from cat_jax.models.layers import MASK_VALUE, Dense, logical_param

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class RMSNorm(nn.Module):
    """x / rms(x) * scale, or * (1 + scale) with `plus_one` (Gemma; the scale then starts at 0).
    Statistics in float32; `axis` names the normalised dimension's logical axis."""

    epsilon: float
    plus_one: bool = False
    axis: str = "embed"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., n] -> [..., n] in `dtype`."""
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = logical_param(self, "scale", init, (x.shape[-1],), (self.axis,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


def rotary_frequencies(config: DecoderConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim // 2] (float32, as transformers computes them):
    theta ** (-2i / head_dim), rescaled by Llama 3's rule when `rope_scaling='llama3'` (wavelengths
    above original_max / low_freq_factor divided by `factor`, those below original_max /
    high_freq_factor kept, a smooth interpolation between)."""
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    if config.rope_scaling == "llama3":
        factor = np.float32(config.rope_scaling_factor)
        low, high = np.float32(config.rope_low_freq_factor), np.float32(config.rope_high_freq_factor)
        original = np.float32(config.rope_original_max_position)
        wavelen = np.float32(2 * np.pi) / inv_freq
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [b, L, heads, head_dim], positions: [b, L] int -> x rotated (the half-split layout:
    dimension i pairs with i + head_dim / 2), in x's dtype; angles in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, L, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) in float32 (Gemma 2), or x unchanged when cap is None."""
    if cap is None:
        return x
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


class Embed(nn.Module):
    """Token embedding [vocab, embed], initialised N(0, 1/embed); `attend` is the tied LM head."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        init = nn.initializers.normal(self.features**-0.5)
        self.embedding = logical_param(
            self, "embedding", init, (self.num_embeddings, self.features), ("vocab", "embed")
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [b, L] int -> [b, L, embed]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [b, L, embed] -> logits [b, L, vocab]."""
        return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class HeadsProjection(nn.Module):
    """x [b, L, embed] -> [b, L, heads, head_dim]; kernel [embed, heads, head_dim] (logical axes
    embed, `heads_axis`, kv), with a bias [heads, head_dim] when `use_bias`."""

    num_heads: int
    head_dim: int
    heads_axis: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        kernel = logical_param(
            self, "kernel", init, (x.shape[-1], self.num_heads, self.head_dim), ("embed", self.heads_axis, "kv")
        )
        y = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = logical_param(
                self, "bias", nn.initializers.zeros, (self.num_heads, self.head_dim), (self.heads_axis, "kv")
            )
            y = y + bias.astype(self.dtype)
        return y


class OutProjection(nn.Module):
    """[b, L, heads, head_dim] -> [b, L, embed]; kernel [heads, head_dim, embed]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        kernel = logical_param(
            self, "kernel", init, (x.shape[-2], x.shape[-1], self.features), ("heads", "kv", "embed")
        )
        return jnp.einsum("blhk,hkd->bld", x.astype(self.dtype), kernel.astype(self.dtype))


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional key/value cache.

    Query head h reads key/value head h // (num_heads // num_kv_heads). Scores are float32,
    multiplied by `config.attention_scale`, soft-capped (Gemma 2), masked and soft-maxed in float32.
    A key is visible to a query when its slot holds a real token (`key_mask`), is not after the
    query's slot and, with a sliding `window`, is fewer than `window` slots before it, and (packed rows,
    no cache) belongs to the query's segment (`segment_ids` [b, g]).

    Cache ("cache" collection, `decode=True`): the first call creates zero `cached_key` /
    `cached_value` [b, max_len, kv_heads, head_dim] from its full-length input and computes
    ordinary attention; each later call writes its block of keys/values at `index` (a scalar, or
    per row [b]; a per-row write past the end is dropped) and attends to the cache. A sliding
    layer reads only the `window + block - 1` slots that its queries can see when the cache is
    longer than that.

    `config.attention_impl` "dot_product" gives the same queries, keys, values and visibility to
    `cat_jax.models.attention.dot_product_attention` (grouped heads included) instead of the einsums.
    """

    config: DecoderConfig
    window: int | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        query_slots: jax.Array,
        key_mask: jax.Array,
        *,
        decode: bool = False,
        index: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """x: [b, g, embed]; positions, query_slots: [b, g] int; key_mask: [b, K] bool over the key
        slots (K = g without a cache, max_len with one) -> [b, g, embed]."""
        cfg = self.config
        dt = cfg.compute_dtype
        query = HeadsProjection(cfg.num_heads, cfg.head_dim, "heads", cfg.qkv_bias, dt, name="query")(x)
        key = HeadsProjection(cfg.num_kv_heads, cfg.head_dim, "kv_heads", cfg.qkv_bias, dt, name="key")(x)
        value = HeadsProjection(cfg.num_kv_heads, cfg.head_dim, "kv_heads", cfg.qkv_bias, dt, name="value")(x)
        if cfg.qk_norm:
            query = RMSNorm(cfg.rms_norm_eps, axis="kv", dtype=dt, name="query_norm")(query)
            key = RMSNorm(cfg.rms_norm_eps, axis="kv", dtype=dt, name="key_norm")(key)
        inv_freq = rotary_frequencies(cfg)
        query = nn.with_logical_constraint(apply_rotary(query, positions, inv_freq), ("batch", "length", "heads", "kv"))
        key = nn.with_logical_constraint(apply_rotary(key, positions, inv_freq), ("batch", "length", "kv_heads", "kv"))
        value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "kv"))

        key_slots = query_slots
        if decode:
            key, value, key_slots, key_mask = self._cached(key, value, key_slots, key_mask, index)
        visible = key_mask[:, None, :] & (key_slots[:, None, :] <= query_slots[:, :, None])  # [b, g, K]
        if self.window is not None:
            visible &= key_slots[:, None, :] > query_slots[:, :, None] - self.window
        if segment_ids is not None:
            visible &= segment_ids[:, None, :] == segment_ids[:, :, None]

        b, g = query.shape[:2]
        if cfg.attention_impl == "dot_product":
            out = dot_product_attention(query, key, value, mask=visible[:, None], scale=cfg.attention_scale)
        else:
            groups = cfg.num_heads // cfg.num_kv_heads
            grouped = query.reshape(b, g, cfg.num_kv_heads, groups, cfg.head_dim)
            scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, key, preferred_element_type=jnp.float32)
            scores = softcap(scores * cfg.attention_scale, cfg.attn_logit_softcap)
            scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
            weights = jax.nn.softmax(scores, axis=-1).astype(dt)
            out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value).reshape(b, g, cfg.num_heads, cfg.head_dim)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return OutProjection(x.shape[-1], dt, name="out")(out)

    def _cached(
        self, key: jax.Array, value: jax.Array, slots: jax.Array, key_mask: jax.Array, index: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Writes the block's keys/values [b, g, kv_heads, d] at `index`; returns the keys, values,
        their slots [b, K] and mask [b, K] to attend to (the block itself on the creating call)."""
        primed = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        if not primed:
            return key, value, slots, key_mask
        b, g = key.shape[:2]
        if index.ndim == 0:
            cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
            cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
        else:
            rows = jnp.arange(b)[:, None]
            cached_key.value = cached_key.value.at[rows, slots].set(key, mode="drop")
            cached_value.value = cached_value.value.at[rows, slots].set(value, mode="drop")
        max_len = cached_key.value.shape[1]
        span = None if self.window is None else self.window + g - 1
        if span is None or span >= max_len:
            return (cached_key.value, cached_value.value, jnp.broadcast_to(jnp.arange(max_len), (b, max_len)), key_mask)
        # The slots a sliding layer's queries can see: from window - 1 before the first query's slot
        # to the last query's slot (those below 0 are masked).
        window_slots = jnp.broadcast_to(jnp.reshape(index, (-1, 1)) - self.window + 1 + jnp.arange(span), (b, span))
        gather = jnp.clip(window_slots, 0, max_len - 1)
        take = lambda cache: jnp.take_along_axis(cache, gather[:, :, None, None], axis=1)
        mask = jnp.take_along_axis(key_mask, gather, axis=1) & (window_slots >= 0)
        return take(cached_key.value), take(cached_value.value), window_slots, mask


class Mlp(nn.Module):
    """Gated feed-forward: down(act(gate x) * up x), act SiLU (SwiGLU) or GELU (GeGLU)."""

    mlp_dim: int
    activation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [b, L, embed] -> [b, L, embed]."""
        gate = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="gate")(x)
        up = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="up")(x)
        h = nn.with_logical_constraint(ACTIVATION_FNS[self.activation](gate) * up, ("batch", "length", "mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="down")(h)
