"""Building blocks of the T5-family encoder-decoder (Flax linen, logically partitioned).

Every parameter is float32 and carries logical axis names; activations are computed in the module's
`dtype`. Kernels are stored 2-D: q/k/v projections are `[embed, joined_kv]` with joined_kv = heads *
head_dim, the attention output is `[joined_kv, embed]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cat_jax.models.attention import dot_product_attention
from cat_jax.models.layers import MASK_VALUE, Dense, Initializer, logical_param


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * scale (no mean, no bias); statistics in float32."""

    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., embed] -> [..., embed] in `dtype`."""
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * scale).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed], initialised N(0, 1) as in T5; `attend` is the tied LM
    head (x @ table.T)."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = logical_param(
            self, "embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features), ("vocab", "embed")
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [batch, length] int -> [batch, length, embed]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [batch, length, embed] -> logits [batch, length, vocab] against the table."""
        return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


_ACTIVATIONS = {"relu": jax.nn.relu, "gated-gelu": lambda x: nn.gelu(x, approximate=True), "gated-silu": jax.nn.silu}


class MlpBlock(nn.Module):
    """T5 feed-forward: relu `wo(relu(wi x))`, or gated `wo(act(wi_0 x) * wi_1 x)` with act GELU
    (tanh approximation) or SiLU (`activation`: one of T5Config's MLP_ACTIVATIONS)."""

    mlp_dim: int
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, enable_dropout: bool = False) -> jax.Array:
        """x: [batch, length, embed] -> [batch, length, embed]."""
        act = _ACTIVATIONS[self.activation]
        if self.activation.startswith("gated-"):
            gate = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi_0")(x)
            linear = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi_1")(x)
            h = act(gate) * linear
        else:
            h = act(Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not enable_dropout)
        return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(h)


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucketing of `relative_position = key_pos - query_pos` (any shape) -> int32 buckets.

    Half the buckets (per direction) are exact offsets, the rest logarithmically wider up to
    `max_distance`; bidirectional buckets split the range between past and future, causal ones
    give every future key bucket 0 (such keys are masked anyway).
    """
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / jnp.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return (bucket + jnp.where(is_small, n, large)).astype(jnp.int32)


class RelativePositionBias(nn.Module):
    """The learned per-head bias of each relative-position bucket: one table [heads, buckets] per
    stack, shared by its layers (a scanned stack passes it to every layer as an argument)."""

    num_heads: int
    num_buckets: int

    @nn.compact
    def __call__(self) -> jax.Array:
        """The table [heads, buckets] (float32)."""
        return logical_param(
            self,
            "rel_embedding",
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets),
            ("heads", "relpos_buckets"),
        )


@dataclasses.dataclass(frozen=True)
class PositionBias:
    """The attention bias of a relative-position table: what `MultiHeadAttention` calls as `relpos`."""

    table: jax.Array
    bidirectional: bool
    max_distance: int

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions: [q] or per row [b, q], key_positions: [k] or per row [b, k] (packed rows:
        positions within each segment) int -> bias [1 or b, heads, q, k] float32."""
        buckets = relative_position_bucket(
            key_positions[..., None, :] - query_positions[..., None],
            self.bidirectional,
            self.table.shape[1],
            self.max_distance,
        )
        bias = jnp.take(self.table, buckets, axis=1)  # [heads, q, k] or [heads, b, q, k]
        return bias[None] if bias.ndim == 3 else jnp.moveaxis(bias, 0, 1)


class MultiHeadAttention(nn.Module):
    """Bias-free multi-head dot-product attention, with an optional key/value cache.

    As in T5 the scores are not divided by sqrt(head_dim); that factor is folded into the
    query kernel's initialisation. Scores and softmax are float32.

    With `decode=True` a self-attention layer (`cross_attention=False`) writes the keys/values
    of its new tokens into the "cache" collection at "cache_index" and advances the index; a
    cross-attention layer stores the encoder's keys/values when the cache is first created and
    reuses them after. The first call with `decode=True` (the one that creates the cache, given
    the full-length decoder input) computes ordinary attention. A call writes a block of one or
    more tokens. "cache_index" is a scalar (every row at one position) or, once replaced by an
    int32 [b] array, each row's own position; moving a row's index back rolls its cache back
    (keys after a query's position are masked, and overwritten by the next write).

    `impl` (T5Config.attention_impl): "einsum" computes the scores and softmax here; "dot_product"
    gives the same scores, mask and relative bias to `cat_jax.models.attention.dot_product_attention`
    (no attention dropout there: T5Config refuses it with dropout_rate > 0).
    """

    num_heads: int
    head_dim: int
    cross_attention: bool = False
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    impl: str = "einsum"

    def _project(self, x: jax.Array, name: str, init: Initializer) -> jax.Array:
        """x: [batch, length, embed] -> [batch, length, heads, kv]."""
        y = Dense(self.num_heads * self.head_dim, ("embed", "joined_kv"), self.dtype, kernel_init=init, name=name)(x)
        y = y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)
        return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        *,
        kv_mask: jax.Array | None = None,
        causal: bool = False,
        relpos: PositionBias | None = None,
        enable_dropout: bool = False,
        decode: bool = False,
        segments: tuple[jax.Array, jax.Array] | None = None,
        positions: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """inputs_q: [b, q, embed], inputs_kv: [b, k, embed], kv_mask: [b, k] bool -> [b, q, embed].

        `causal` masks keys after each query; `relpos` adds its bias over (query, key) positions.
        Packed rows (no cache): `segments` = (query, key) segment ids [b, q], [b, k] hide keys of other
        segments; `positions` = (query, key) positions [b, q], [b, k] within segments feed `relpos`.
        """
        kv_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        q_init = nn.initializers.variance_scaling(1.0 / self.head_dim, "fan_in", "normal")
        query = self._project(inputs_q, "query", q_init)
        query_positions = jnp.arange(query.shape[1])
        project_kv = lambda: (self._project(inputs_kv, "key", kv_init), self._project(inputs_kv, "value", kv_init))
        if decode and self.cross_attention:
            key, value = self._cached_cross_kv(project_kv)
        elif decode:
            key, value, query_positions = self._cached_self_kv(*project_kv(), query_positions)
        else:
            key, value = project_kv()

        key_positions = jnp.arange(key.shape[1])
        mask = jnp.ones((1, 1, query.shape[1], key.shape[1]), bool)
        if causal:
            visible = key_positions <= query_positions[..., None]  # [q, k] or per row [b, q, k]
            mask = mask & visible.reshape((-1, 1) + visible.shape[-2:])
        if kv_mask is not None:
            mask = mask & kv_mask[:, None, None, :]
        if segments is not None:
            mask = mask & (segments[0][:, None, :, None] == segments[1][:, None, None, :])
        if positions is not None:
            query_positions, key_positions = positions
        bias = None if relpos is None else relpos(query_positions, key_positions)
        if self.impl == "dot_product":
            out = dot_product_attention(query, key, value, mask=mask, scale=1.0, bias=bias)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
            scores = jnp.where(mask, scores + (0.0 if bias is None else bias), MASK_VALUE)
            weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not enable_dropout)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
        out = nn.with_logical_constraint(out, ("batch", "length", "joined_kv"))
        return Dense(inputs_q.shape[-1], ("joined_kv", "embed"), self.dtype, kernel_init=kv_init, name="out")(out)

    def _cached_cross_kv(self, project_kv: Callable[[], tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
        """Encoder keys/values [b, k, heads, kv]: computed and stored once, then read back."""
        if self.has_variable("cache", "cached_key"):
            return (self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value"))
        key, value = project_kv()
        self.variable("cache", "cached_key", lambda: key)
        self.variable("cache", "cached_value", lambda: value)
        return key, value

    def _cached_self_kv(
        self, key: jax.Array, value: jax.Array, query_positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes new keys/values [b, q, heads, kv] at the cache index and advances it by q.

        Returns the whole cache [b, max_len, heads, kv] twice and the query positions: [q] with a
        scalar index, [b, q] with a per-row index [b]. A per-row write past the end of the cache
        is dropped; a shared one must fit. On the call that creates the (zero) cache it returns
        its inputs.
        """
        primed = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not primed:
            return key, value, query_positions
        i = index.value
        index.value = i + key.shape[1]
        if i.ndim == 0:
            cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, i, 0, 0))
            cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, i, 0, 0))
            return cached_key.value, cached_value.value, i + query_positions
        positions = i[:, None] + query_positions  # [b, q]
        rows = jnp.arange(key.shape[0])[:, None]
        cached_key.value = cached_key.value.at[rows, positions].set(key, mode="drop")
        cached_value.value = cached_value.value.at[rows, positions].set(value, mode="drop")
        return cached_key.value, cached_value.value, positions
