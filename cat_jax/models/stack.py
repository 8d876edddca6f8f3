"""A family's stack of layers: rematerialised, scanned, or neither (what both families share).

`remat_policy` (a config field of both families) wraps each layer in `nn.remat`:

    none      no rematerialisation: every activation the backward pass needs is kept
    full      keep only each layer's input; recompute the whole layer in the backward pass
    save_dot  keep the outputs of the matmuls without batch dimensions (the q/k/v/out and MLP
              projections: `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, MaxText's
              "minimal" policy); recompute the rest, the attention scores and softmax included

`save_dot` rather than `checkpoint_dots`: the attention einsums have batch dimensions (batch,
heads), so this policy does not keep the [b, heads, q, k] scores and weights, the largest
activations of a long sequence, which are cheap to recompute from the saved projections, while the
projections (the FLOPs) are not recomputed. Remat only acts under differentiation: a forward pass
(a teacher, eval, decoding) computes the same values with any policy.

`scan_layers` runs the layers as one `nn.scan` over stacked parameters: each parameter of the
scanned module "layers" gains a leading axis of length num_layers, with the logical axis name
LAYERS_AXIS (replicated by `cat_jax.partitioning`'s rules), and compiles once for any depth. A
decoding cache is stacked the same way; `batch_first` / `layers_first` move its layers axis behind
the batch for the decoding state (whose per-row leaves lead with the batch). Parameters convert
between the layouts with `models.convert.tree.stack_layers` / `unstack_layers`. Written after
MaxText's `layers/decoders.py` (scan_layers, remat policies) and flaxformer's scanned layers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

REMAT_POLICIES = ("none", "full", "save_dot")
LAYERS_AXIS = "layers"
SCANNED = "layers"  # the scanned module's name in a stack, and its parameters' path component


def remat(layer: type[nn.Module], policy: str, static_argnums: tuple[int, ...], scanned: bool) -> type[nn.Module]:
    """`layer` under `nn.remat` with the named policy (`layer` itself for "none").

    `static_argnums` index `layer.__call__`'s arguments, self being 0 (its Python flags).
    """
    if policy == "none":
        return layer
    saved = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # Outside a scan, prevent_cse keeps XLA from merging the recomputation back into the forward
    # pass; scan's loop boundary already does (MaxText sets it to `not scan_layers`).
    return nn.remat(layer, policy=saved, prevent_cse=not scanned, static_argnums=static_argnums)


def scan(layer: type[nn.Module], length: int, broadcast: int) -> type[nn.Module]:
    """`layer` (whose `__call__(carry, *args)` returns (carry, None)) scanned `length` times over
    stacked "params" and "cache", its `broadcast` other arguments the same for every layer."""
    return nn.scan(
        layer,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
    )


def run_prefix(layer: nn.Module, stacked: Any, depth: int, x: jax.Array, *args: Any) -> jax.Array:
    """The carry after the first `depth` layers of a scanned stack, without gradients or cache:
    `layer` (an unbound layer module) applied with each of the first `depth` slices of `stacked`
    (the scanned module's "params"). Used for a partial depth (`input_embedding`)."""
    prefix = jax.tree_util.tree_map(lambda p: p[:depth], stacked)

    def body(carry: jax.Array, params: Any) -> tuple[jax.Array, None]:
        return layer.apply({"params": params}, carry, *args)

    return jax.lax.scan(body, x, prefix)[0] if depth else x


def _move(cache: Any, move: Callable[[jax.Array], jax.Array]) -> Any:
    def visit(node: Any, stacked: bool) -> Any:
        if isinstance(node, dict) or hasattr(node, "items"):
            return {k: visit(v, stacked or k == SCANNED) for k, v in node.items()}
        return move(node) if stacked else node

    return visit(cache, False)


def batch_first(cache: Any) -> Any:
    """A "cache" collection with the scanned layers' leaves [layers, b, ...] as [b, layers, ...]."""
    return _move(cache, lambda a: jnp.moveaxis(a, 0, 1))


def layers_first(cache: Any) -> Any:
    """Inverse of `batch_first`."""
    return _move(cache, lambda a: jnp.moveaxis(a, 1, 0))
