"""Tests for cat_jax.checkpoints: roundtrip, retention, killed saves, params-only, errors, sharding."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cat_jax.checkpoints import Checkpointer, restore_params
from cat_jax.errors import CheckpointError


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _params(seed: int, emb_rows: int = 6) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
        "emb": jax.random.normal(k3, (emb_rows, 4)),
    }


def _state(seed: int, step: int = 7) -> State:
    """A state whose every leaf depends on `seed` (`seed % 4 + 1` Adam updates)."""
    params = _params(seed)
    tx = optax.adam(0.1)
    opt_state = tx.init(params)
    for _ in range(seed % 4 + 1):
        grads = jax.tree.map(lambda p: p * (seed + 2.0), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return State(
        step=jnp.int32(step),
        params=params,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 100)),
    )


def _assert_trees_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_every_leaf_differs(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert not np.array_equal(np.asarray(x), np.asarray(y))


def _child_env() -> dict[str, str]:
    """A child script's environment: CPU, and this checkout's cat_jax (a script's own directory,
    not the working directory, heads its sys.path)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


META = {"model": {"emb_dim": 4, "vocab_size": 6}, "teacher": None, "gin_hash": "abc123"}


def test_roundtrip_bitwise(tmp_path: Path) -> None:
    saved = _state(seed=0, step=7)
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=3)
    assert ckpt.save(7, saved, META)
    template = _state(seed=1, step=0)
    _assert_every_leaf_differs(template, saved)

    restored, meta = ckpt.restore(template)
    ckpt.close()
    assert isinstance(restored, State)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    _assert_trees_bitwise_equal(restored, saved)
    assert int(restored.step) == 7
    assert meta == {**META, "step": 7}


def test_interval_max_to_keep_and_latest_step(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2)
    assert ckpt.latest_step() is None
    saved_at = [s for s in range(8) if ckpt.save(s, _state(seed=s, step=s), {"s": s})]
    assert saved_at == [0, 2, 4, 6]
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.latest_step() == 6
    assert ckpt.should_save(8) and not ckpt.should_save(9)
    assert ckpt.save(7, _state(seed=7, step=7), {"s": 7}, force=True)
    assert ckpt.all_steps() == [6, 7]
    assert not ckpt.save(7, _state(seed=8, step=7), {"s": 8}, force=True)  # already saved
    assert ckpt.restore(_state(seed=99))[1] == {"s": 7, "step": 7}
    restored, meta = ckpt.restore(_state(seed=99), step=6)
    assert meta == {"s": 6, "step": 6}
    _assert_trees_bitwise_equal(restored, _state(seed=6, step=6))
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


_KILLED_SAVE_CHILD = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from cat_jax.checkpoints import Checkpointer

directory, kill_point, mode = sys.argv[1:]
ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=None, async_save=mode == "async")
small = {"params": {"w": jnp.full((4,), 1.0)}, "step": jnp.int32(1)}
assert ckpt.save(1, small, {"run": "a"})
ckpt.wait()  # async: step 1 finished before the patch below

def block(*args, **kwargs):
    print("BLOCKED", flush=True)
    time.sleep(120)

if kill_point == "before_data":  # items are being written
    ocp.JsonCheckpointHandler.save = block
    ocp.JsonCheckpointHandler.async_save = block  # orbax saves items through async_save
else:  # all data written, the rename of the temporary directories not done
    ocp.CompositeCheckpointHandler.finalize = block
big = {"params": {"w": jnp.full((4,), 2.0), "big": jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))},
       "step": jnp.int32(2)}
ckpt.save(2, big, {"run": "a"})
time.sleep(120)  # async: the save goes on in orbax's thread, which blocks
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kill_point", ["before_data", "before_rename"])
def test_killed_save_is_ignored_and_saving_resumes(tmp_path: Path, kill_point: str, mode: str) -> None:
    """kill -9 while step 2 is written (synchronously, or by orbax's background thread): only a
    temporary directory is left, step 1 is restored, and saving goes on."""
    script = tmp_path / "child.py"
    script.write_text(_KILLED_SAVE_CHILD)
    ckpt_dir = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, str(script), str(ckpt_dir), kill_point, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_child_env(),
    )
    try:
        assert child.stdout.readline().strip() == "BLOCKED"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    leftover = ckpt_dir / "2.orbax-checkpoint-tmp"
    # (async: orbax's thread creates the temporary directory while the items start; it may not exist yet)
    if mode == "sync" or kill_point == "before_rename":
        assert leftover.is_dir(), sorted(p.name for p in ckpt_dir.iterdir())
    written = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
    assert (written > 1_000_000) == (kill_point == "before_rename"), written  # the 4 MiB array
    assert not (ckpt_dir / "2").exists()

    # A read-only restore sees only the finished step 1 while the leftover is still there.
    params, meta = restore_params(str(ckpt_dir), {"w": jnp.zeros((4,))})
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full((4,), 1.0, np.float32))
    assert meta == {"run": "a", "step": 1}

    ckpt = Checkpointer(str(ckpt_dir), save_interval_steps=1, max_to_keep=None)
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    template = {"params": {"w": jnp.zeros((4,))}, "step": jnp.int32(0)}
    restored, meta = ckpt.restore(template)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((4,), 1.0))
    assert int(restored["step"]) == 1 and meta == {"run": "a", "step": 1}

    new = {"params": {"w": jnp.full((4,), 3.0)}, "step": jnp.int32(2)}
    assert ckpt.save(2, new, {"run": "b"})
    assert ckpt.all_steps() == [1, 2]
    restored, meta = ckpt.restore(template)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((4,), 3.0))
    assert int(restored["step"]) == 2 and meta == {"run": "b", "step": 2}
    ckpt.close()
    assert not [p for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name]


def test_restore_params_only_with_bfloat16(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    ckpt.save(3, _state(seed=3, step=3), {"at": 3})
    ckpt.save(5, _state(seed=5, step=5), {"at": 5})
    ckpt.close()
    template = _params(seed=42)
    _assert_every_leaf_differs(template, _state(seed=5).params)

    params, meta = restore_params(str(tmp_path), template)
    assert set(params) == {"dense", "emb"} and meta == {"at": 5, "step": 5}
    _assert_trees_bitwise_equal(params, _state(seed=5).params)

    params3, meta3 = restore_params(str(tmp_path), template, step=3)
    _assert_trees_bitwise_equal(params3, _state(seed=3).params)
    assert meta3 == {"at": 3, "step": 3}

    bf16 = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), template)
    params_bf16, _ = restore_params(str(tmp_path), bf16)
    expected = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _state(seed=5).params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params_bf16))
    _assert_trees_bitwise_equal(params_bf16, expected)


def test_error_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=f"{missing} does not exist"):
        restore_params(str(missing), _params(0))


def test_error_no_finished_checkpoint(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds no finished checkpoint"):
        ckpt.restore(_state(0))
    with pytest.raises(CheckpointError, match="holds no finished checkpoint"):
        restore_params(str(tmp_path), _params(0))


def test_error_missing_step_lists_available(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    ckpt.save(2, _state(2), {})
    ckpt.save(4, _state(4), {})
    with pytest.raises(CheckpointError, match=r"no step 3; available steps: \[2, 4\]"):
        ckpt.restore(_state(0), step=3)
    with pytest.raises(CheckpointError, match=r"no step 9; available steps: \[2, 4\]"):
        restore_params(str(tmp_path), _params(0), step=9)


def test_error_shape_and_key_mismatch(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    ckpt.save(1, _state(1), {})
    wide = _params(0, emb_rows=7)
    wrong = _state(0).replace(params=wide)
    with pytest.raises(CheckpointError, match=r"'params/emb': checkpoint \(6, 4\), template \(7, 4\)"):
        ckpt.restore(wrong)
    with pytest.raises(CheckpointError, match=r"'params/emb': checkpoint \(6, 4\), template \(7, 4\)"):
        restore_params(str(tmp_path), wide)
    extra = {**_params(0), "head": jnp.zeros((2,))}
    with pytest.raises(CheckpointError, match="no entry 'params/head'"):
        restore_params(str(tmp_path), extra)
    fewer = {"dense": _params(0)["dense"]}
    with pytest.raises(CheckpointError, match="has entry 'params/emb'"):
        restore_params(str(tmp_path), fewer)
    no_opt = {"step": jnp.int32(0), "params": _params(0), "rng": jnp.zeros((2,), jnp.uint32)}
    with pytest.raises(CheckpointError, match="has entry 'opt_state/0/count'"):
        ckpt.restore(no_opt)


def test_error_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=f"{blocker / 'ckpt'} cannot be created or written"):
        Checkpointer(str(blocker / "ckpt"), save_interval_steps=1, max_to_keep=None)


def test_error_metadata_not_json(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    with pytest.raises(CheckpointError, match="not JSON"):
        ckpt.save(1, _state(1), {"bad": object()})
    assert ckpt.all_steps() == []


_SHARDED_CHILD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cat_jax.checkpoints import Checkpointer, restore_params

assert jax.device_count() == 8
directory = sys.argv[1]
devices = np.array(jax.devices())
mesh24 = Mesh(devices.reshape(2, 4), ("data", "model"))
mesh42 = Mesh(devices.reshape(4, 2), ("data", "model"))
value = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
w = jax.device_put(value, NamedSharding(mesh24, P("data", "model")))
assert w.addressable_shards[0].data.shape == (4, 4)
state = {"params": {"w": w}, "step": jnp.int32(5)}
ckpt = Checkpointer(directory, save_interval_steps=1, max_to_keep=None)
assert ckpt.save(5, state, {})

target = NamedSharding(mesh42, P("data", "model"))
replicated = NamedSharding(mesh42, P())
template = {
    "params": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=target)},
    "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
}
restored, _ = ckpt.restore(template)
r = restored["params"]["w"]
assert r.sharding == target, r.sharding
assert {s.data.shape for s in r.addressable_shards} == {(2, 8)}
np.testing.assert_array_equal(np.asarray(r), value)
assert int(restored["step"]) == 5

params, _ = restore_params(directory, {"w": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=replicated)})
p = params["w"]
assert p.sharding == replicated and p.dtype == jnp.bfloat16
assert {s.data.shape for s in p.addressable_shards} == {(8, 16)}
np.testing.assert_array_equal(np.asarray(p.astype(jnp.float32)), value)
print("SHARDED_OK")
"""


def test_sharded_save_restores_onto_other_mesh(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_SHARDED_CHILD))
    env = {
        **_child_env(),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED_OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# Integrity: every saved step is recorded by its checksums; damage is found, named and survived.


def _data_file(step_dir: Path) -> Path:
    """The largest array data file of a step (orbax's OCDBT data under state/d/)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
    path = _data_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(step_dir: Path) -> None:
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated_data": _truncate,
    "one_bit_flipped": _flip_one_bit,
    "no_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "no_manifest": lambda d: next((d / "state").glob("manifest.ocdbt")).unlink(),
    "no_state": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_is_named_moved_aside_and_the_previous_restored(tmp_path: Path, damage, caplog):
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    for step in (1, 2, 3):
        assert ckpt.save(step, _state(seed=step, step=step), {"s": step})
    assert (tmp_path / "checkpoint_integrity" / "3.json").exists()
    DAMAGE[damage](tmp_path / "3")
    with pytest.raises(CheckpointError, match=r"step 3 is damaged: .*finished steps: \[1, 2, 3\]"):
        ckpt.restore(_state(seed=0))
    with pytest.raises(CheckpointError, match="step 3 is damaged"):
        restore_params(str(tmp_path), _params(0))
    with caplog.at_level("ERROR", logger="cat_jax"):
        state, meta, step = ckpt.restore_latest_good(_state(seed=0))
    assert step == 2 and meta["s"] == 2
    _assert_trees_bitwise_equal(state, _state(seed=2, step=2))
    assert "CHECKPOINT DAMAGED: step 3" in caplog.text
    moved = list((tmp_path / "damaged_checkpoints").iterdir())
    assert [p.name.split(".")[0] for p in moved] == ["3"] and (moved[0] / "checksums.json").exists()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, _state(seed=30, step=3), {"s": 30})  # the step is written again, anew
    _assert_trees_bitwise_equal(ckpt.restore(_state(seed=0))[0], _state(seed=30, step=3))
    ckpt.close()


def test_no_good_step_left_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    for step in (1, 2):
        ckpt.save(step, _state(seed=step, step=step), {})
        _flip_one_bit(tmp_path / str(step))
    with pytest.raises(CheckpointError, match="No usable checkpoint is left"):
        ckpt.restore_latest_good(_state(seed=0))
    # Asked again (the next start of the same command): still an error, although no step is left.
    with pytest.raises(CheckpointError, match="damaged_checkpoints"):
        Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None).restore_latest_good(_state(0))
    assert Checkpointer(str(tmp_path / "fresh"), 1, None).restore_latest_good(_state(0)) is None


def test_a_step_without_a_record_is_not_trusted(tmp_path: Path, caplog) -> None:
    """A step whose record is missing and whose data has a flipped bit is neither restored nor
    recorded as good: it is moved aside and the previous step is restored."""
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    ckpt.save(1, _state(seed=1, step=1), {})
    ckpt.save(2, _state(seed=2, step=2), {})
    (tmp_path / "checkpoint_integrity" / "2.json").unlink()
    _flip_one_bit(tmp_path / "2")
    with caplog.at_level("ERROR", logger="cat_jax"):
        state, _, step = ckpt.restore_latest_good(_state(seed=0))
    assert step == 1
    _assert_trees_bitwise_equal(state, _state(seed=1, step=1))
    assert "CHECKPOINT DAMAGED: step 2" in caplog.text and "no checksum record" in caplog.text
    assert not (tmp_path / "checkpoint_integrity" / "2.json").exists() and ckpt.all_steps() == [1]
    assert [p.name.split(".")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == ["2"]
    ckpt.close()


_KILLED_FINISH_CHILD = """
import sys, time
import jax.numpy as jnp
import orbax.checkpoint as ocp
from cat_jax.checkpoints import Checkpointer

ckpt = Checkpointer(sys.argv[1], save_interval_steps=1, max_to_keep=None)
assert ckpt.save(1, {"w": jnp.full((4,), 1.0)}, {})

rename = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

async def block(self, *args, **kwargs):  # orbax's rename of the finished step directory
    if not self.get_final().name.isdigit():  # an item's directory inside the step
        return await rename(self, *args, **kwargs)
    print("BLOCKED", flush=True)
    time.sleep(120)

ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = block
ckpt.save(2, {"w": jnp.full((4,), 2.0)}, {})
"""


def test_the_record_is_written_before_the_step_is_finished(tmp_path: Path) -> None:
    """Killed as orbax is about to rename step 2's temporary directory: the record of step 2 is
    already written (so a finished step always has one); the step does not exist, step 1 is
    restored, and saving step 2 again replaces the record with one that verifies."""
    from cat_jax import integrity

    script = tmp_path / "child.py"
    script.write_text(_KILLED_FINISH_CHILD)
    ckpt_dir = tmp_path / "ckpt"
    env = _child_env()
    child = subprocess.Popen(
        [sys.executable, str(script), str(ckpt_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "BLOCKED"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert (ckpt_dir / "checkpoint_integrity" / "2.json").exists() and not (ckpt_dir / "2").exists()
    ckpt = Checkpointer(str(ckpt_dir), save_interval_steps=1, max_to_keep=None)
    template = {"w": jnp.zeros((4,))}
    _, _, step = ckpt.restore_latest_good(template)
    assert step == 1
    assert ckpt.save(2, {"w": jnp.full((4,), 3.0)}, {})
    assert integrity.problems(str(ckpt_dir), 2) == [] and integrity.problems(str(ckpt_dir), 1) == []
    restored, _, step = ckpt.restore_latest_good(template)
    assert step == 2 and np.asarray(restored["w"]).tolist() == [3.0] * 4
    ckpt.close()


def test_an_unreadable_step_that_cannot_be_moved_is_skipped(tmp_path: Path, monkeypatch, caplog) -> None:
    """The newest step cannot be read nor moved (its permissions; simulated, the tests run as root):
    it is named as unreadable, left in place, and the previous step is restored."""
    from cat_jax import integrity

    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=None)
    for step in (1, 2, 3):
        ckpt.save(step, _state(seed=step, step=step), {})
    locked = str(tmp_path / "3")
    real_stat, real_rename = os.stat, os.rename

    def stat(path, *args, **kwargs):
        if str(path).startswith(locked + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if str(src) == locked:
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst, *args, **kwargs)

    with monkeypatch.context() as m, caplog.at_level("WARNING", logger="cat_jax"):
        m.setattr(integrity.os, "stat", stat)
        m.setattr(integrity.os, "rename", rename)
        state, _, step = ckpt.restore_latest_good(_state(seed=0))
    assert step == 2
    _assert_trees_bitwise_equal(state, _state(seed=2, step=2))
    assert "CHECKPOINT DAMAGED: step 3" in caplog.text and "cannot be read (Permission denied)" in caplog.text
    assert "could not be moved aside" in caplog.text and (tmp_path / "3").is_dir()
    assert not ckpt.save(3, _state(seed=30, step=3), {}) and "Step 3 is not saved" in caplog.text
    assert ckpt.save(4, _state(seed=4, step=4), {})
    ckpt.close()


def test_rotation_keeps_the_newest_verified_steps_only_after_recording(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=2)
    for step in range(1, 6):
        ckpt.save(step, _state(seed=step, step=step), {})
        records = sorted(p.stem for p in (tmp_path / "checkpoint_integrity").iterdir())
        assert ckpt.all_steps() == list(range(max(1, step - 1), step + 1))
        assert records == [str(s) for s in ckpt.all_steps()]
    ckpt.close()


def test_async_saves_keep_every_guarantee(tmp_path: Path) -> None:
    """async_save: `save` returns before the files are written, and the state's device buffers may
    be freed at once (the trainer donates them to the next step): every step restores bit for bit;
    each finished step has its verifying record; rotation keeps the newest two only once the next
    is finished; `close` waits for the last save (no temporary directory left)."""
    from cat_jax import integrity

    ckpt = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=2, async_save=True)
    for step in range(1, 5):
        state = _state(seed=step, step=step)
        assert ckpt.save(step, state, {"s": step})
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # as donation does: the save must not read these buffers any more
        # the previous step was finished (and the older ones rotated away) before this one started
        finished = {int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()}
        assert set(range(max(1, step - 2), step)) <= finished <= set(range(max(1, step - 2), step + 1))
    ckpt.close()
    assert ckpt.all_steps() == [3, 4]
    assert not [p for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]
    assert sorted(p.stem for p in (tmp_path / "checkpoint_integrity").iterdir()) == ["3", "4"]
    reopened = Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=2)
    for step in (3, 4):
        assert integrity.problems(str(tmp_path), step) == []
        restored, meta = reopened.restore(_state(seed=0), step=step)
        assert meta == {"s": step, "step": step}
        _assert_trees_bitwise_equal(restored, _state(seed=step, step=step))
    reopened.close()
