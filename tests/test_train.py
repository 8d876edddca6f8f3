"""The trainer through its real entry point: end to end, resume, restore order, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cat_jax.metric_writers import read_jsonl
from conftest import REPO, SUBPROCESS_ENV, run_module, train_args


def _final_params(model_dir, step=None):
    from cat_jax.frozen_model import load_frozen_model
    from cat_jax import partitioning
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    frozen = load_frozen_model(str(model_dir), mesh=mesh, rules=partitioning.logical_axis_rules(), step=step)
    return frozen.step, jax.tree_util.tree_map(np.asarray, frozen.params)


def _assert_trees_equal(a, b, atol=0.0):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A tiny run of 8 steps, never stopped (the reference for the resume tests)."""
    model_dir = tmp_path_factory.mktemp("ref") / "model"
    proc = run_module("cat_jax.train", train_args(
        "train_small_ce.gin", model_dir, 8, "--gin.train.checkpoint_period=4",
        "--gin.train.eval_period=8"))
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


def test_finished_run_exits_zero_and_says_so(uninterrupted):
    model_dir, _ = uninterrupted
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 8))
    assert "nothing to do" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["final_step"] == 8


def test_stop_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    ref_dir, _ = uninterrupted
    model_dir = tmp_path / "model"
    args = train_args("train_small_ce.gin", model_dir, 8, "--gin.train.checkpoint_period=4",
                      "--gin.train.eval_period=8")
    first = run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=3"])
    assert "max_steps_per_run reached: saved step 3" in first.stderr
    second = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step 3" in second.stderr
    _, ref = _final_params(ref_dir)
    step, resumed = _final_params(model_dir)
    assert step == 8
    _assert_trees_equal(ref, resumed, atol=1e-6)


def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(tmp_path):
    """Kill -9 during the run (checkpoint every step, so likely mid-save), restart, compare."""
    steps = 12
    args = train_args("train_small_ce.gin", tmp_path / "killed", steps, "--gin.train.checkpoint_period=1",
                      "--gin.train.keep_checkpoints=2")
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "cat_jax.train", *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    killed_at = None
    for line in proc.stderr:
        parts = line.split()
        if parts[1:3] == ["INFO", "step"] and parts[3].startswith("5/"):
            time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
    proc.wait(timeout=600)
    assert killed_at is not None, "the run finished before it could be killed"
    run_module("cat_jax.train", args)
    ref = run_module("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "ref", steps,
                                                 "--gin.train.checkpoint_period=100"))
    assert ref.returncode == 0
    _, a = _final_params(tmp_path / "killed")
    _, b = _final_params(tmp_path / "ref")
    _assert_trees_equal(a, b, atol=1e-6)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    args = train_args("train_small_ce.gin", tmp_path / "m", 400, "--gin.train.checkpoint_period=1000")
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "cat_jax.train", *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
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
    proc = run_module("cat_jax.train", train_args(
        "train_small_ce.gin", tmp_path / "ft", 2, f"--gin.train.initial_checkpoint_dir='{ref_dir}'",
        "--gin.LEARNING_RATE=0.0"))
    assert f"parameters from {ref_dir}" in proc.stderr
    _, init = _final_params(ref_dir)
    _, after = _final_params(tmp_path / "ft")
    _assert_trees_equal(init, after)   # learning rate 0: the restored parameters, unchanged
