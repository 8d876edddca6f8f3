"""Mesh construction from (axis, size) pairs, including the multi-slice (DCN) form."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cat_jax import partitioning


def test_resolve_fills_the_free_axis_and_names_bad_shapes():
    assert partitioning.resolve_mesh_shape([("data", -1), ("model", 2)], 8) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(ValueError, match="does not divide 8"):
        partitioning.resolve_mesh_shape([("data", -1), ("model", 3)], 8)
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        partitioning.resolve_mesh_shape([("batch", 2)], 2)
    with pytest.raises(ValueError, match="At most one"):
        partitioning.resolve_mesh_shape([("data", -1), ("model", -1)], 2)


def test_single_slice_mesh_on_this_host():
    devices = jax.devices()
    mesh = partitioning.make_mesh([("data", -1), ("fsdp", 1), ("model", 1)], devices=devices)
    assert mesh.shape == {"data": len(devices), "fsdp": 1, "model": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@pytest.mark.parametrize("dcn_axis", ["data", "model"])
def test_multi_slice_grid_keeps_each_slice_in_one_block(dcn_axis):
    """8 devices in 2 slices of 4 (stand-ins carrying `slice_index`, as TPU devices do): the axis
    split across slices (DCN) changes slice exactly once along it, every other axis stays within a
    slice, and each device appears once."""
    from types import SimpleNamespace

    devices = [
        SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, platform="cpu", device_kind="cpu")
        for i in range(8)
    ]
    ici = [("data", 2), ("fsdp", 1), ("model", 2)] if dcn_axis == "data" else [("data", 4), ("fsdp", 1), ("model", 1)]
    grid = partitioning.device_grid(ici, devices, dcn_mesh_shape=[(dcn_axis, 2)])
    assert grid.shape == (4, 1, 2)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    axis = partitioning.MESH_AXES.index(dcn_axis)
    halves = np.split(slices, 2, axis=axis)
    assert (halves[0] == 0).all() and (halves[1] == 1).all(), slices
    assert sorted(d.id for d in grid.flat) == list(range(8))
