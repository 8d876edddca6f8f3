"""Each clear error of the binaries: triggered through the entry point, checked by message."""

from __future__ import annotations

import pytest
from conftest import REPO, TINY_TASK, run_module, train_args
from helpers import final_state

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow


def test_unknown_task_lists_close_matches_and_leaves_no_model_dir(tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", tmp_path / "m", 2, "--gin.MIXTURE_OR_TASK_NAME='cmudict_g2q'"),
        check=False,
    )
    assert proc.returncode == 2
    assert "cmudict_g2q" in proc.stderr and "cmudict_g2p" in proc.stderr
    assert "Traceback" not in proc.stderr and "In call to configurable" not in proc.stderr
    assert not (tmp_path / "m").exists()  # a failed start leaves no empty MODEL_DIR behind


def test_misspelled_macro_is_refused_with_the_closest_names(tmp_path):
    proc = run_module(
        "cat_jax.train", train_args("train_small_ce.gin", tmp_path / "m", 2, "--gin.LEARNIG_RATE=1e6"), check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--gin.LEARNIG_RATE (did you mean LEARNING_RATE?)" in proc.stderr
    assert "no gin file uses this macro" in proc.stderr and not (tmp_path / "m").exists()


def test_missing_split_is_a_named_error(tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", tmp_path / "m", 2, "--gin.DatasetConfig.split='dev'"),
        check=False,
    )
    assert proc.returncode == 2
    assert "has no split 'dev'; it has ['train', 'validation', 'test']" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gin_typo_names_the_binding(tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", tmp_path / "m", 2, "--gin.train.lerning_rate=0.1"),
        check=False,
    )
    assert proc.returncode == 2
    assert "lerning_rate" in proc.stderr and "Invalid gin configuration" in proc.stderr


def test_missing_required_macro_names_it(tmp_path):
    proc = run_module(
        "cat_jax.train", ["--gin_file=gin_configs/runs/train_small_ce.gin", "--gin.TRAIN_STEPS=2"], check=False
    )
    assert proc.returncode == 2
    assert "MODEL_DIR" in proc.stderr or "model_dir" in proc.stderr


def test_unknown_gin_file_lists_shipped_files(tmp_path):
    proc = run_module("cat_jax.train", ["--gin_file=runs/train_smal.gin"], check=False)
    assert proc.returncode == 2
    assert "train_smal.gin" in proc.stderr and "gin_configs/runs/train_small_ce.gin" in proc.stderr


def test_unwritable_model_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", blocker / "m", 2), check=False)
    assert proc.returncode == 2
    assert "cannot be written" in proc.stderr and str(blocker / "m") in proc.stderr


def test_url_model_dir_is_refused(tmp_path):
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", "gs://bucket/run", 2), check=False)
    assert proc.returncode == 2
    assert "gs://bucket/run" in proc.stderr and "gcsfuse" in proc.stderr
    assert not (REPO / "gs:").exists()  # nothing created relative to the working directory


def test_eval_of_missing_checkpoint(tmp_path):
    proc = run_module(
        "cat_jax.eval",
        ["--gin_file=gin_configs/runs/eval.gin", f"--gin.CHECKPOINT_DIR='{tmp_path / 'nothing'}'"],
        check=False,
    )
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr and "Traceback" not in proc.stderr


def test_infer_of_missing_checkpoint(tmp_path):
    proc = run_module(
        "cat_jax.infer",
        [
            "--gin_file=gin_configs/runs/infer.gin",
            f"--gin.CHECKPOINT_DIR='{tmp_path / 'nothing'}'",
            f"--gin.OUTPUT_FILE='{tmp_path / 'p.jsonl'}'",
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr


def test_overflowing_update_stops_with_exit_3_and_the_newest_checkpoint_stays_finite(tmp_path):
    """At learning rate 1e39 the loss of step 1 is finite but the update overflows the parameters:
    the state check inside the step stops the run before that state is saved."""
    import jax
    import numpy as np

    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 2, "--gin.train.checkpoint_period=2"))
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_ce.gin",
            model_dir,
            20,
            "--gin.train.checkpoint_period=1",
            "--gin.LEARNING_RATE=1e39",
            "--gin.learning_rate_schedule.warmup_steps=0",
            "--gin.learning_rate_schedule.decay='constant'",
            "--gin.train.allow_config_change=True",
        ),
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Non-finite update (parameters or optimizer state) at step 3" in proc.stderr
    assert "the last good checkpoint is step 2" in proc.stderr
    step, state = final_state(model_dir)
    assert step == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state) if x.dtype.kind == "f")


def test_changed_model_config_is_refused_with_differences(tmp_path):
    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    proc = run_module(
        "cat_jax.train", train_args("train_small_ce.gin", model_dir, 2, "--gin.T5Config.mlp_dim=128"), check=False
    )
    assert proc.returncode == 2
    assert "mlp_dim" in proc.stderr and "new MODEL_DIR" in proc.stderr


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path):
    """A CE MODEL_DIR resumed with the CAT run file and a teacher, or another batch size and seed,
    would silently change the run: refused with the differences; allowed on request and recorded."""
    import json

    teacher, model_dir = tmp_path / "teacher", tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", teacher, 1))
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    info_before = (model_dir / "run_info.json").read_text()
    cat = run_module(
        "cat_jax.train",
        train_args("train_small_cat.gin", model_dir, 2, f"--gin.TEACHER_MODEL_DIR={teacher}"),
        check=False,
    )
    assert cat.returncode == 2, cat.stderr[-2000:]
    assert "loss_options.mask: 'none' (in MODEL_DIR) vs 'small_or_large' (now)" in cat.stderr
    assert "teacher: None (in MODEL_DIR)" in cat.stderr and "allow_config_change" in cat.stderr
    batch = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", model_dir, 2, "--gin.BATCH_SIZE=16", "--gin.SEED=3"),
        check=False,
    )
    assert batch.returncode == 2
    assert "dataset.batch_size: 8 (in MODEL_DIR) vs 16 (now)" in batch.stderr and "seed: 0" in batch.stderr
    assert (model_dir / "run_info.json").read_text() == info_before  # nothing rewritten
    allowed = run_module(
        "cat_jax.train",
        train_args("train_small_ce.gin", model_dir, 2, "--gin.BATCH_SIZE=16", "--gin.train.allow_config_change=True"),
    )
    assert "resuming" in allowed.stderr and "allow_config_change=True" in allowed.stderr
    info = json.loads((model_dir / "run_info.json").read_text())
    assert info["dataset"]["batch_size"] == 16
    assert info["history"][-1]["allowed_changes"] == ["dataset.batch_size: 8 (in MODEL_DIR) vs 16 (now)"]


def test_sigterm_during_start_up_exits_cleanly_and_says_what_is_saved(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cat_jax.train", *train_args("train_small_ce.gin", model_dir, 5)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stderr:
        if "Per-device bytes" in line:  # restored and the data loaded; logged as the compilation starts
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest[-3000:]
    assert "Stopped by SIGTERM while compiling the train step." in rest
    assert f"The latest checkpoint in {model_dir} is step 1; the same command resumes." in rest


@pytest.mark.parametrize(
    "binding,named",
    [
        ("--gin.TRAIN_STEPS=-1", "TRAIN_STEPS (train.train_steps) must be a positive integer; got -1"),
        ("--gin.BATCH_SIZE=0", "BATCH_SIZE (DatasetConfig.batch_size) must be a positive integer; got 0"),
        ("--gin.TASK_FEATURE_LENGTHS={'inputs': 0, 'targets': 8}", "TASK_FEATURE_LENGTHS['inputs'] must be a positive"),
        (
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': -1}",
            "TASK_FEATURE_LENGTHS['targets'] must be a positive",
        ),
        (
            "--gin.LEARNING_RATE=abc",
            "LEARNING_RATE (learning_rate_schedule.peak_value) must be a finite number >= 0; got 'abc'",
        ),
        ("--gin.T5Config.num_heads=0", "T5Config.num_heads must be a positive int"),
    ],
)
def test_a_bad_number_is_named_and_nothing_is_written(tmp_path, binding, named):
    model_dir = tmp_path / "m"
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 2) + [binding], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not model_dir.exists()


def test_an_unclosed_bracket_in_a_gin_file_is_a_named_error(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("train.seed = (\n")
    proc = run_module(
        "cat_jax.train", train_args("train_small_ce.gin", tmp_path / "m", 2) + [f"--gin_file={bad}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "an unclosed bracket or quote" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_binary_without_a_run_file_names_the_run_files_for_a_macro(tmp_path):
    proc = run_module("cat_jax.train", [f"--gin.MODEL_DIR={tmp_path / 'm'}", "--gin.TRAIN_STEPS=2"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no --gin_file was given" in proc.stderr and "gin_configs/runs/train_small_ce.gin" in proc.stderr


def test_inputs_are_checked_before_run_files_are_rewritten(tmp_path):
    """A resume whose data cannot be loaded (a split the task lacks; a changed dataset is allowed
    here) fails before run_info.json and config.gin are rewritten."""
    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    before = {name: (model_dir / name).read_bytes() for name in ("run_info.json", "config.gin")}
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_ce.gin",
            model_dir,
            2,
            "--gin.DatasetConfig.split='dev'",
            "--gin.train.allow_config_change=True",
        ),
        check=False,
    )
    assert proc.returncode == 2 and "has no split 'dev'" in proc.stderr, proc.stderr[-3000:]
    assert {name: (model_dir / name).read_bytes() for name in before} == before


def test_the_training_split_uses_the_configured_cache_and_a_damaged_entry_is_rebuilt(tmp_path):
    """`load_split.cache_dir` holds the training split too; a cache file damaged on disk is
    discarded (logged) and the split tokenized again, and the run goes on."""
    cache = tmp_path / "cache"
    args = [a for a in train_args("train_small_ce.gin", tmp_path / "m", 1) if "load_split.cache_dir" not in a]
    run_module("cat_jax.train", args + [f"--gin.load_split.cache_dir='{cache}'"])
    entries = sorted(cache.glob(f"{TINY_TASK}.train.*.npz"))
    assert len(entries) == 1, sorted(p.name for p in cache.iterdir())
    entries[0].write_bytes(entries[0].read_bytes()[:200])  # torn: a crash, a full disk
    args = [a for a in train_args("train_small_ce.gin", tmp_path / "m", 2) if "load_split.cache_dir" not in a]
    proc = run_module("cat_jax.train", args + [f"--gin.load_split.cache_dir='{cache}'"])
    assert "cannot be read" in proc.stderr and "discarded it, tokenizing again" in proc.stderr
    assert "resuming from this run's checkpoint at step 1" in proc.stderr
    from cat_jax.data.arrays import ExampleArrays

    assert len(ExampleArrays.load(str(entries[0]))) == 256  # rebuilt whole (DatasetConfig.max_examples)
