"""Device mesh and the one table of rules from logical axes to mesh axes.

Parameters and activations carry logical axis names (`batch`, `embed`, `mlp`, ...); the rules
below say which mesh axis (`data`, `fsdp`, `model`) each one is split over. Flax resolves the rules
in order and skips a mesh axis already used in the same spec, which is how `embed` is split over
`fsdp` for parameters but stays whole for activations whose `batch` already took `fsdp`.

Parameters are placed by the rules when they are created or restored. Activations are
constrained only where code is traced inside `activation_sharding(mesh, rules)` (the train step,
evaluation and decoding) or `traced_activation_sharding` (a restored model's logits function
carries its own): there the models' `with_logical_constraint` annotations become sharding
constraints, so e.g. the logits the CAT loss reads are split over (batch -> data/fsdp, vocab ->
model); outside them they are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cat_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
# Every logical axis name the models' parameters and activations use.
LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "kv",
    "joined_kv",
    "vocab",
    "relpos_buckets",
    "layers",
)

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    # The key/value heads of grouped-query attention (decoder family). A mesh whose `model` axis does
    # not divide a model's head counts needs those axes replicated: models.decoder.fit_axis_rules.
    ("kv_heads", "model"),
    ("joined_kv", "model"),
    ("embed", "fsdp"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    # The leading axis of a scanned stack's parameters (`scan_layers`): each device holds every
    # layer's slice (split by the rules of the other axes), as nn.scan reads one layer at a time.
    ("layers", None),
)


@gin.configurable
def logical_axis_rules(rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> tuple:
    """The logical-to-mesh axis rules in force (a gin list of (logical, mesh) pairs).

    A logical name the models do not use, or a mesh axis the mesh does not have, is an error (an
    unknown name would otherwise leave that dimension silently replicated).
    """
    out = tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)
    bad_logical = sorted({name for name, _ in out if name not in LOGICAL_AXES})
    targets = {a for _, m in out for a in (m if isinstance(m, tuple) else (m,)) if a is not None}
    bad_mesh = sorted(targets - set(MESH_AXES))
    if bad_logical or bad_mesh:
        raise ConfigError(
            f"partitioning.logical_axis_rules: unknown logical axes {bad_logical} / mesh axes {bad_mesh}. "
            f"The logical axes are {LOGICAL_AXES}; the mesh axes are {MESH_AXES} (or None)."
        )
    return out


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Within the block, code traced by jit constrains the models' annotated activations to the
    shardings `rules` gives on `mesh` (the mesh context and flax's logical axis rules)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


@contextlib.contextmanager
def traced_activation_sharding(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """`activation_sharding` for use inside a function while jit traces it (where `jax.set_mesh`
    is refused): the mesh's abstract form and the rules, for that function's own annotations."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


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
                f"use {fixed}, which does not divide {num_devices}."
            )
        shape[free[0]] = num_devices // fixed
    total = math.prod(shape.values())
    if total != num_devices:
        raise ValueError(
            f"Mesh {mesh_shape} has {total} devices but {num_devices} are available; make the "
            f"product of the axis sizes equal the device count, or set one axis to -1."
        )
    return {a: shape.get(a, 1) for a in MESH_AXES}


@gin.configurable
def make_mesh(
    mesh_shape: Sequence[tuple[str, int]] = (("data", -1), ("fsdp", 1), ("model", 1)),
    devices: Sequence[jax.Device] | None = None,
    dcn_mesh_shape: Sequence[tuple[str, int]] | None = None,
) -> Mesh:
    """A Mesh over (data, fsdp, model) from (axis, size) pairs; one size may be -1.

    Multi-slice (several TPU slices, or several hosts joined by the data-centre network): give
    `dcn_mesh_shape`, the split of each axis ACROSS slices (e.g. [('data', 2)]); `mesh_shape` is then
    the shape WITHIN one slice, and each axis of the mesh is the product of the two.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(device_grid(mesh_shape, devices, dcn_mesh_shape), MESH_AXES)


def device_grid(
    mesh_shape: Sequence[tuple[str, int]],
    devices: Sequence[Any],
    dcn_mesh_shape: Sequence[tuple[str, int]] | None = None,
) -> np.ndarray:
    """`make_mesh`'s array of devices [data, fsdp, model]. With `dcn_mesh_shape`, each slice (the
    devices' `slice_index`, or their process where devices have none) fills one block of the
    grid, so only the axes `dcn_mesh_shape` splits cross slices."""
    from jax.experimental import mesh_utils

    if dcn_mesh_shape is not None:
        dcn_sizes = [s for _, s in dcn_mesh_shape]
        if any(s < 1 for s in dcn_sizes):
            raise ValueError(f"dcn_mesh_shape {dcn_mesh_shape} needs explicit positive sizes.")
        dcn = resolve_mesh_shape(dcn_mesh_shape, math.prod(dcn_sizes))
        granules = math.prod(dcn.values())
        if len(devices) % granules:
            raise ValueError(
                f"dcn_mesh_shape {dcn_mesh_shape} needs the {len(devices)} devices to split "
                f"into {granules} equal slices."
            )
        ici = resolve_mesh_shape(mesh_shape, len(devices) // granules)
        return mesh_utils.create_hybrid_device_mesh(
            tuple(ici[a] for a in MESH_AXES),
            tuple(dcn[a] for a in MESH_AXES),
            devices=devices,
            process_is_granule=not hasattr(devices[0], "slice_index"),
        )
    sizes = resolve_mesh_shape(mesh_shape, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices).reshape(shape)


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


def process_batch_slice(sharding: NamedSharding, global_batch_size: int) -> tuple[int, int]:
    """`(index, count)`: this process feeds block `index` of `count` equal, consecutive blocks of
    rows of every global batch laid out by `sharding` (T5X's "data shard" of a host).

    `count` is the number of distinct row blocks the processes hold: `process_count()` when the
    batch axes (`data`, `fsdp`) are split evenly over the processes, fewer when processes share
    rows (e.g. a `model` axis that spans processes: those processes feed the same rows). Pass the
    pair to `TrainBatches.batch(step, index, count)` and `global_batch`. Raises ValueError when a
    process's devices hold rows that are not one consecutive block (a mesh whose devices are not
    ordered by process; `make_mesh` orders them).
    """
    return _process_batch_slice(sharding, global_batch_size, jax.process_index())


@functools.lru_cache(maxsize=64)
def _process_batch_slice(sharding: NamedSharding, global_batch_size: int, process_index: int) -> tuple[int, int]:
    shape = (global_batch_size,) + (1,) * max(len(sharding.spec) - 1, 0)
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        rows = index[0]
        start, stop, _ = rows.indices(global_batch_size)
        blocks.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for process, ranges in blocks.items():
        ordered = sorted(ranges)
        start, stop = ordered[0][0], ordered[-1][1]
        covered = sum(b - a for a, b in ordered)
        if covered != stop - start or any(a < prev for (_, prev), (a, _) in zip(ordered, ordered[1:])):
            raise ValueError(
                f"Process {process} holds rows {ordered} of each batch of {global_batch_size}, which "
                f"are not one consecutive block; build the mesh with devices ordered by process "
                f"(partitioning.make_mesh does)."
            )
        spans[process] = (start, stop)
    sizes = {b - a for a, b in spans.values()}
    if len(sizes) != 1:
        raise ValueError(f"Processes hold unequal numbers of rows of each batch: {spans}.")
    size = sizes.pop()
    start, stop = spans[process_index]
    if start % size:
        raise ValueError(
            f"Process {process_index} holds rows [{start}, {stop}), not aligned to blocks of {size}: {spans}."
        )
    return start // size, global_batch_size // size


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of a batch (every process passes its own rows).

    A process passes block `index` of `count` of the global batch, as `process_batch_slice` says
    (with one process: the whole batch). `global_batch_size`, when given, is checked against the
    local rows; without it the global size is inferred from the local rows and the sharding.
    """
    out = {}
    for k, v in local_batch.items():
        shape = None
        if global_batch_size is not None:
            index, count = process_batch_slice(sharding, global_batch_size)
            if v.shape[0] * count != global_batch_size:
                raise ValueError(
                    f"Feature {k!r}: this process passed {v.shape[0]} rows, but a global batch of "
                    f"{global_batch_size} over this mesh needs {global_batch_size // count} rows from "
                    f"each process (block {index} of {count})."
                )
            shape = (global_batch_size,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


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
