"""The fused attention path both families can choose (`attention_impl` in T5Config and DecoderConfig).

`"einsum"` (the default) is each family's own einsum attention with a float32 softmax. `"dot_product"`
hands the scores, the mask and the additive bias (T5's relative-position bias) to
`jax.nn.dot_product_attention`, which picks its implementation from `fused_implementation`:

- on a GPU with a bfloat16 or float16 compute dtype: `"cudnn"`, cuDNN's fused (flash) attention. It
  takes a head_dim that is a multiple of 8 and at most 128 (256 from Hopper on) and, with a bias in
  training, even lengths; jax raises NotImplementedError for other shapes (choose `"einsum"` then).
  Boolean masks and the bias reach cuDNN as one additive bias in the compute dtype.
- everywhere else (CPU, TPU, float32 on GPU): jax's XLA implementation, the same maths as the einsum
  path in one fused-by-XLA expression (float32 scores and softmax). jax 0.10 ships no Pallas TPU
  kernel behind `jax.nn.dot_product_attention`, so on TPU this is XLA's attention, not a flash kernel.

What it cannot do, refused by the configs with a named error: attention-probability dropout (T5 with
`dropout_rate > 0`) and soft-capped scores (Gemma 2's `attn_logit_softcap`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("einsum", "dot_product")
# Compute dtypes cuDNN's fused attention takes.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def fused_implementation(dtype: jnp.dtype) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation for a compute dtype on this backend:
    "cudnn" on a GPU with bfloat16 / float16, None (XLA) otherwise."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return "cudnn"
    return None


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array,
    scale: float,
    bias: jax.Array | None = None,
) -> jax.Array:
    """query [b, q, heads, d], key / value [b, k, kv_heads, d] (heads a multiple of kv_heads: query
    head h reads key head h // (heads // kv_heads)), mask [b or 1, 1, q, k] bool (True: visible),
    bias [b or 1, heads, q, k] added to the scaled scores -> [b, q, heads, d] in the query's dtype."""
    implementation = fused_implementation(query.dtype)
    if bias is not None and implementation == "cudnn":
        bias = bias.astype(query.dtype)
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, scale=scale, implementation=implementation
    )
