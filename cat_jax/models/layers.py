"""Building blocks every model family shares (Flax linen, logically partitioned).

Every parameter is float32 and carries logical axis names (`nn.with_logical_partitioning`), read by
`cat_jax.partitioning`'s one rules table; activations are computed in the module's `dtype`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]

# Additive attention bias for masked-out keys (finite, so a fully masked row stays finite).
MASK_VALUE = -1e9

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def logical_param(
    module: nn.Module, name: str, init_fn: Initializer, shape: Sequence[int], axes: tuple[str, ...]
) -> jax.Array:
    """A float32 parameter of `shape` annotated with the logical axis names `axes`."""
    return module.param(name, nn.with_logical_partitioning(init_fn, axes), tuple(shape), jnp.float32)


class Dense(nn.Module):
    """Bias-free linear map: x [..., in] -> [..., features], kernel [in, features] with `axes`."""

    features: int
    axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = logical_param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
