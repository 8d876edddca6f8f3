"""Device mesh and the one table of rules from logical axes to mesh axes.

Parameters and activations carry logical axis names (`batch`, `embed`, `mlp`, ...); the rules
below say which mesh axis (`data`, `fsdp`, `model`) each one is split over. Flax resolves the rules
in order and skips a mesh axis already used in the same spec, which is how `embed` is split over
`fsdp` for parameters but stays whole for activations whose `batch` already took `fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", "fsdp"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
)


@gin.configurable
def logical_axis_rules(rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> tuple:
    """The logical-to-mesh axis rules in force (a gin list of (logical, mesh) pairs)."""
    return tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)


def resolve_mesh_shape(mesh_shape: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Sizes of every mesh axis, with at most one -1 standing for "the remaining devices"."""
    shape = dict(mesh_shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    free = [a for a, s in shape.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {free} in {mesh_shape}.")
    fixed = math.prod(s for s in shape.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"Mesh {mesh_shape} cannot be laid over {num_devices} devices: the fixed axes "
                f"use {fixed}, which does not divide {num_devices}.")
        shape[free[0]] = num_devices // fixed
    total = math.prod(shape.values())
    if total != num_devices:
        raise ValueError(
            f"Mesh {mesh_shape} has {total} devices but {num_devices} are available; make the "
            f"product of the axis sizes equal the device count, or set one axis to -1.")
    return {a: shape.get(a, 1) for a in MESH_AXES}


@gin.configurable
def make_mesh(mesh_shape: Sequence[tuple[str, int]] = (("data", -1), ("fsdp", 1), ("model", 1)),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over (data, fsdp, model) from (axis, size) pairs; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_shape, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: LogicalRules) -> NamedSharding:
    """NamedSharding of one array whose dimensions carry the given logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, logical_specs: Any, rules: LogicalRules) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs (as `nn.get_partition_spec` gives)."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of a [batch, length] input array."""
    return logical_sharding(mesh, ("batch", "length"), rules)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of a batch (every process passes its own rows)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def per_device_bytes(tree: Any) -> int:
    """Bytes of a pytree of jax arrays held by one device (the first addressable shard of each)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.addressable_shards[0].data
        total += shard.size * shard.dtype.itemsize
    return total


def describe_mesh(mesh: Mesh) -> str:
    sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return f"mesh({sizes}) over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
