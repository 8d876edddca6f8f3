"""Mesh construction from (axis, size) pairs, including the multi-slice (DCN) form."""

from __future__ import annotations

import jax
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


def test_single_and_multi_slice_meshes_on_this_host():
    devices = jax.devices()
    mesh = partitioning.make_mesh([("data", -1), ("fsdp", 1), ("model", 1)], devices=devices)
    assert mesh.shape == {"data": len(devices), "fsdp": 1, "model": 1}
    # One process is one granule here, so the only multi-slice split is 1 slice.
    hybrid = partitioning.make_mesh([("data", -1)], devices=devices, dcn_mesh_shape=[("data", 1)])
    assert hybrid.shape == {"data": len(devices), "fsdp": 1, "model": 1}
    assert sorted(d.id for d in hybrid.devices.flat) == sorted(d.id for d in devices)
