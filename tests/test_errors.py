"""Each clear error of the binaries: triggered through the entry point, checked by message."""

from __future__ import annotations


from conftest import REPO, run_module, train_args


def test_unknown_task_lists_close_matches(tmp_path):
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "m", 2,
                                                  "--gin.MIXTURE_OR_TASK_NAME='cmudict_g2q'"), check=False)
    assert proc.returncode == 2
    assert "cmudict_g2q" in proc.stderr and "cmudict_g2p" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gin_typo_names_the_binding(tmp_path):
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "m", 2,
                                                  "--gin.train.lerning_rate=0.1"), check=False)
    assert proc.returncode == 2
    assert "lerning_rate" in proc.stderr and "Invalid gin configuration" in proc.stderr


def test_missing_required_macro_names_it(tmp_path):
    proc = run_module("cat_jax.train", ["--gin_file=gin_configs/runs/train_small_ce.gin",
                                        "--gin.TRAIN_STEPS=2"], check=False)
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
    assert not (REPO / "gs:").exists()   # nothing created relative to the working directory


def test_eval_of_missing_checkpoint(tmp_path):
    proc = run_module("cat_jax.eval", ["--gin_file=gin_configs/runs/eval.gin",
                                       f"--gin.CHECKPOINT_DIR='{tmp_path / 'nothing'}'"], check=False)
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr and "Traceback" not in proc.stderr


def test_infer_of_missing_checkpoint(tmp_path):
    proc = run_module("cat_jax.infer", ["--gin_file=gin_configs/runs/infer.gin",
                                        f"--gin.CHECKPOINT_DIR='{tmp_path / 'nothing'}'",
                                        f"--gin.OUTPUT_FILE='{tmp_path / 'p.jsonl'}'"], check=False)
    assert proc.returncode == 2
    assert str(tmp_path / "nothing") in proc.stderr


def test_nan_loss_stops_nonzero_and_keeps_last_good_checkpoint(tmp_path):
    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 2,
                                           "--gin.train.checkpoint_period=2"))
    proc = run_module("cat_jax.train", train_args(
        "train_small_ce.gin", model_dir, 20, "--gin.train.checkpoint_period=1",
        "--gin.LEARNING_RATE=1e38",
        "--gin.learning_rate_schedule.warmup_steps=0", "--gin.learning_rate_schedule.decay='constant'"),
        check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Non-finite loss" in proc.stderr and "last good checkpoint is step" in proc.stderr
    bad_step = int(proc.stderr.split("Non-finite loss")[1].split("at step ")[1].split(";")[0])
    from test_train import _final_params
    import numpy as np
    import jax
    step, params = _final_params(model_dir)
    assert step < bad_step
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_changed_model_config_is_refused_with_differences(tmp_path):
    model_dir = tmp_path / "m"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    proc = run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 2,
                                                  "--gin.T5Config.mlp_dim=128"), check=False)
    assert proc.returncode == 2
    assert "mlp_dim" in proc.stderr and "new MODEL_DIR" in proc.stderr
