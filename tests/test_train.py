"""The trainer through its real entry point: end to end, resume, restore order, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, run_module, train_args
from helpers import assert_trees_equal, final_state, kill_when

from cat_jax.metric_writers import read_jsonl

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow


def _final_params(model_dir, step=None):
    from cat_jax import partitioning
    from cat_jax.frozen_model import load_frozen_model

    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    frozen = load_frozen_model(str(model_dir), mesh=mesh, rules=partitioning.logical_axis_rules(), step=step)
    return frozen.step, jax.tree_util.tree_map(np.asarray, frozen.params)


def _tensorboard_steps(model_dir, tag: str = "train/loss") -> list[int]:
    """The steps TensorBoard shows for `tag`: every event file of the run in the order it was
    written, a SessionLog START at step s purging the events of steps >= s before it (as
    TensorBoard does); a record cut short by a kill ends its file."""
    import struct

    from tensorboardX.proto import event_pb2

    files = []
    for path in (model_dir / "tensorboard" / "train").glob("events.out.tfevents.*"):
        data, pos, events = path.read_bytes(), 0, []
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            if pos + 16 + length > len(data):
                break
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 16 + length
        if events:
            files.append(events)
    steps: list[int] = []
    for events in sorted(files, key=lambda e: e[0].wall_time):
        for event in events:
            if event.session_log.status == event_pb2.SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def _dir_snapshot(path) -> dict:
    return {
        os.path.relpath(os.path.join(r, f), path): os.stat(os.path.join(r, f)).st_mtime_ns
        for r, _, files in os.walk(path)
        for f in files
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A tiny run of 8 steps, never stopped (the reference for the resume tests)."""
    model_dir = tmp_path_factory.mktemp("ref") / "model"
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", model_dir, 8, "--gin.train.checkpoint_period=4", "--gin.train.eval_period=8"),
    )
    return model_dir, proc


def test_end_to_end_writes_checkpoints_metrics_and_config(uninterrupted):
    model_dir, proc = uninterrupted
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 8
    assert "eval" in summary and any(k.endswith("/accuracy") for k in summary["eval"])
    step, _ = _final_params(model_dir)
    assert step == 8
    rows = read_jsonl(os.path.join(model_dir, "train_metrics.jsonl"))
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, 9))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any(os.scandir(os.path.join(model_dir, "tensorboard")))
    for name in ("config.gin", "operative_config.gin", "run_info.json"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0
    log = proc.stderr
    assert "starting from scratch" in log and "steps/s" in log and "ETA" in log
    assert "Compiled the train step" in log


def test_relative_model_dir_trains_and_resumes(tmp_path):
    relative = os.path.relpath(tmp_path / "rel", REPO)
    args = train_args("train_small_ce.gin", relative, 2, "--gin.train.checkpoint_period=1")
    run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=1"])
    proc = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step 1" in proc.stderr
    assert _final_params(tmp_path / "rel")[0] == 2


def test_finished_run_exits_zero_says_so_and_writes_nothing(uninterrupted):
    model_dir, _ = uninterrupted
    before = _dir_snapshot(model_dir)
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", model_dir, 8, "--gin.train.checkpoint_period=4", "--gin.train.eval_period=8"),
    )
    assert "nothing to do" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final_step"] == 8
    assert _dir_snapshot(model_dir) == before


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    model_dir = tmp_path / "model"
    args = train_args(
        "train_small_ce.gin", model_dir, 8, "--gin.train.checkpoint_period=4", "--gin.train.eval_period=8"
    )
    first = run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=3"])
    assert "max_steps_per_run reached: saved step 3" in first.stderr
    second = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step 3" in second.stderr
    _, ref = final_state(ref_dir)
    step, resumed = final_state(model_dir)
    assert step == 8
    assert_trees_equal(ref, resumed)


def _saving(model_dir):
    """True once an orbax save of step >= 3 is in progress (its temporary directory exists)."""

    def check(_lines):
        names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
        return any(".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) >= 3 for n in names)

    return check


@pytest.fixture(scope="module")
def reference_12(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ref12") / "model"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 12, "--gin.train.checkpoint_period=100"))
    return final_state(model_dir)[1]


@pytest.mark.parametrize("moment", ["random", "during_a_save", "during_an_async_save"])
def test_sigkill_then_resume_equals_uninterrupted_bitwise(tmp_path, reference_12, moment):
    """kill -9 at a random step boundary, or aimed at a save in progress (its temporary directory
    exists; with train.async_checkpoints, written in the background while the steps go on),
    restart with the same command: the whole final state equals an uninterrupted run's, bit for
    bit, and the metrics hold each step once."""
    model_dir = tmp_path / "killed"
    args = train_args(
        "train_small_ce.gin", model_dir, 12, "--gin.train.checkpoint_period=1", "--gin.train.keep_checkpoints=2"
    )
    if moment == "during_an_async_save":
        args.append("--gin.train.async_checkpoints=True")
    if moment == "random":
        kill_step = int(np.random.default_rng().integers(3, 10))
        kill_when(args, lambda lines: any(f" step {kill_step}/12 " in line for line in lines[-3:]))
    else:
        kill_when(args, _saving(str(model_dir)))
    resumed = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step" in resumed.stderr
    step, state = final_state(model_dir)
    assert step == 12
    assert_trees_equal(state, reference_12)
    steps = [r["step"] for r in read_jsonl(os.path.join(model_dir, "train_metrics.jsonl")) if "train/loss" in r]
    assert steps == list(range(1, 13))
    assert _tensorboard_steps(model_dir) == list(range(1, 13))  # the killed run's steps were flushed
    assert "Took over the stale lock" in resumed.stderr and "is no longer running" in resumed.stderr
    assert not (model_dir / "trainer.lock").exists()


def test_a_second_trainer_on_the_model_dir_is_refused_before_touching_anything(tmp_path):
    """While one trainer runs, a second on its MODEL_DIR exits 2 naming the first's pid and host;
    the first is unharmed and releases the lock as it stops."""
    import socket

    model_dir = tmp_path / "m"
    args = train_args(
        "train_small_ce.gin",
        model_dir,
        10**6,
        "--gin.train.checkpoint_period=1000000",
        "--gin.train.log_every_steps=1000000",
    )
    env = dict(os.environ, **SUBPROCESS_ENV)
    first = subprocess.Popen(
        [sys.executable, "-m", "cat_jax.train", *args],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stderr:
            if "Compiled the train step" in line:  # it trains until stopped
                break
        second = run_module("cat_jax.train", args, check=False, timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)
    rest = first.stderr.read()
    assert first.wait(timeout=300) == 0 and "Preemption signal: saved step" in rest, rest[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another trainer: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr and "Restore:" not in second.stderr
    assert len(list((model_dir / "tensorboard" / "train").iterdir())) == 1  # the second wrote no events
    assert not (model_dir / "trainer.lock").exists()


_DISK_FULL_AT_SAVE = """
import errno, runpy, sys
import orbax.checkpoint as ocp
failing_save = int(sys.argv.pop(1))
calls = []
write = ocp.PyTreeCheckpointHandler.async_save

async def full(self, directory, *args, **kwargs):  # the disk fills up as this save writes its arrays
    calls.append(directory)
    if len(calls) == failing_save:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "d" / "0123"))
    return await write(self, directory, *args, **kwargs)

ocp.PyTreeCheckpointHandler.async_save = full
sys.argv = ["cat_jax.train", *sys.argv[1:]]
runpy.run_module("cat_jax.train", run_name="__main__", alter_sys=True)
"""


def test_a_full_disk_is_one_line_naming_the_disk_and_the_last_checkpoint_and_resume_is_exact(tmp_path, reference_12):
    """The third save (step 12) hits a full disk: exit 2 with one line (the disk, the last good
    checkpoint, step 8), no traceback; with space again the same command ends as if uninterrupted."""
    model_dir = tmp_path / "m"
    args = train_args("train_small_ce.gin", model_dir, 12, "--gin.train.checkpoint_period=4")
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_AT_SAVE, "3", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "Error" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"ERROR: The disk holding {model_dir}") and "No space left on device" in errors[0]
    assert f"The latest checkpoint in {model_dir} is step 8; the same command resumes." in errors[0]
    resumed = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step 8" in resumed.stderr
    assert_trees_equal(final_state(model_dir)[1], reference_12)
    steps = [r["step"] for r in read_jsonl(os.path.join(model_dir, "train_metrics.jsonl")) if "train/loss" in r]
    assert steps == list(range(1, 13))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    args = train_args("train_small_ce.gin", tmp_path / "m", 400, "--gin.train.checkpoint_period=1000")
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cat_jax.train", *args],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stderr:
        if " step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest[-3000:]
    assert "Preemption signal: saved step" in rest
    saved = int(rest.split("Preemption signal: saved step ")[1].split()[0])
    step, _ = _final_params(tmp_path / "m")
    assert step == saved and 3 <= saved < 400


def test_init_from_checkpoint_is_params_only_and_logged(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_ce.gin",
            tmp_path / "ft",
            2,
            f"--gin.train.initial_checkpoint_dir='{ref_dir}'",
            "--gin.LEARNING_RATE=0.0",
        ),
    )
    assert f"parameters from {ref_dir}" in proc.stderr
    _, init = _final_params(ref_dir)
    _, after = _final_params(tmp_path / "ft")
    assert_trees_equal(init, after)  # learning rate 0: the restored parameters, unchanged


def test_eval_defaults_to_the_task_and_lengths_the_model_was_trained_on(uninterrupted):
    model_dir, _ = uninterrupted
    proc = run_module(
        "cat_jax.eval",
        [
            "--gin_file=gin_configs/runs/eval.gin",
            f"--gin.CHECKPOINT_DIR={model_dir}",
            "--gin.MAX_EXAMPLES=8",
            "--gin.BATCH_SIZE=8",
        ],
    )
    assert "'mixture_or_task_name': 'cmudict_syllables'" in proc.stderr and "run_info.json" in proc.stderr
    result = json.loads(proc.stdout)
    assert list(result["metrics"]) == ["cmudict_syllables"] and result["num_examples"] == 8


def test_damaged_newest_checkpoint_falls_back_and_the_run_ends_as_if_uninterrupted(tmp_path, reference_12):
    """A flipped bit in the newest step: the trainer names it, moves it aside, resumes from the
    previous step and ends bit-identical to an uninterrupted run. With no good step left it stops
    (exit 2) rather than start from scratch over the existing run."""
    model_dir = tmp_path / "m"
    args = train_args("train_small_ce.gin", model_dir, 12, "--gin.train.checkpoint_period=4")
    run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=8"])
    data = max((model_dir / "8" / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    proc = run_module("cat_jax.train", args)
    assert "CHECKPOINT DAMAGED: step 8" in proc.stderr and "does not match its checksum" in proc.stderr
    assert "resuming from this run's checkpoint at step 4" in proc.stderr
    assert [p.name.split(".")[0] for p in (model_dir / "damaged_checkpoints").iterdir()] == ["8"]
    assert_trees_equal(final_state(model_dir)[1], reference_12)
    for step in (4, 8, 12):
        if (model_dir / str(step)).exists():
            (model_dir / str(step) / "state" / "_METADATA").unlink()
    stopped = run_module(
        "cat_jax.train", train_args("train_small_ce.gin", model_dir, 16, "--gin.train.checkpoint_period=4"), check=False
    )
    assert stopped.returncode == 2 and "No usable checkpoint is left" in stopped.stderr
    assert "starting from scratch" not in stopped.stderr
