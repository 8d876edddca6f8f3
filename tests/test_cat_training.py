"""Cascade-aware training end to end: a tiny large model, then a CAT student against it."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_module, train_args
from helpers import final_state
from tolerances import DEEP, assert_close, undecided

from cat_jax.metric_writers import read_jsonl

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("teacher") / "large"
    # 40 steps: enough to predict some target tokens (the EOS after the syllable count), so the CAT
    # mask keeps some tokens and drops others.
    run_module(
        "cat_jax.train",
        train_args(
            "train_large.gin", model_dir, 40, "--gin_file=gin_configs/models/tiny.gin", "--gin.LEARNING_RATE=1e-2"
        ),
    )
    return model_dir


def _checkpoint_files(model_dir):
    out = {}
    for root, _, files in os.walk(model_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, model_dir)] = f.read()
    return out


def _first_step_reference(teacher_dir):
    """NumPy's mask fraction, its tolerance and KL(teacher || student) of step 1 of a tiny student
    run: the student's initial parameters (seed 0) and the float32 teacher on the run's first
    batch. (A float32 teacher keeps the CAT mask well posed: a bfloat16 tiny teacher's target logit
    ties its best other one within bfloat16 rounding on a third of the tokens.)"""
    import gin
    from conftest import DATA_CACHE, TINY_TASK

    from cat_jax import data, gin_utils, partitioning
    from cat_jax.frozen_model import load_frozen_model
    from cat_jax.models.t5 import T5Config, T5Model
    from cat_jax.optimizers import make_optimizer
    from cat_jax.train_state import init_train_state, state_shardings

    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules()
    teacher = load_frozen_model(str(teacher_dir), mesh=mesh, rules=rules, dtype="float32")
    gin.clear_config()
    gin_utils.parse_gin(["gin_configs/models/tiny.gin"], [])
    config = T5Config().replace(vocab_size=teacher.config.vocab_size)
    gin.clear_config()
    model = T5Model(config)
    tx, _ = make_optimizer(3)
    _, shardings = state_shardings(model, tx, mesh, rules)
    student_params = init_train_state(model, tx, 0, shardings).params
    arrays = data.load_split(TINY_TASK, "train", {"inputs": 32, "targets": 8}, max_examples=256, cache_dir=DATA_CACHE)
    batch = data.TrainBatches(arrays, 8, seed=0).batch(0)
    student = np.asarray(model.logits(student_params, batch), np.float64)
    large = np.asarray(teacher.logits_fn(teacher.params, batch), np.float64)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    correct = (student.argmax(-1) == targets) | (large.argmax(-1) == targets)
    mask_fraction = float((weights * correct).sum() / weights.sum())
    # Where a model's target logit and its best other logit nearly tie, the jitted step may decide
    # "correct" the other way (tests/tolerances.py): the mask fraction may differ by those tokens'
    # share, no more.
    ambiguous = undecided(student, targets, DEEP) | undecided(large, targets, DEEP)
    tolerance = float((weights * ambiguous).sum() / weights.sum()) + 1e-6

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(large), log_softmax(student)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return mask_fraction, tolerance, float((weights * kl).sum() / weights.sum())


@pytest.fixture(scope="module")
def ce_student(tmp_path_factory):
    """A CE student trained on the same batches as the CAT students (the contrast)."""
    model_dir = tmp_path_factory.mktemp("ce") / "ce"
    run_module(
        "cat_jax.train", train_args("train_small_ce.gin", model_dir, 3, "--gin_file=gin_configs/models/tiny.gin")
    )
    return model_dir


def test_cat_student_end_to_end(teacher_dir, ce_student, tmp_path):
    before = _checkpoint_files(teacher_dir)
    student = tmp_path / "cat"
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            student,
            3,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{teacher_dir}'",
            "--gin.TEACHER_DTYPE='float32'",
        ),
    )
    assert f"Teacher: step 40 of {teacher_dir}, float32 parameters" in proc.stderr
    assert "'teacher':" in proc.stderr  # per-device bytes of the teacher are printed
    rows = [r for r in read_jsonl(os.path.join(student, "train_metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    mask_fraction, tolerance, _ = _first_step_reference(teacher_dir)
    assert 0.0 < mask_fraction < 1.0  # the mask drops some tokens and keeps some
    assert tolerance < 0.05  # near-ties are rare: the comparison still counts the mask
    assert rows[0]["train/mask_fraction"] == pytest.approx(mask_fraction, abs=tolerance)
    info = json.load(open(os.path.join(student, "run_info.json")))
    assert info["teacher"]["model_dir"] == str(teacher_dir) and info["teacher"]["step"] == 40
    assert info["loss_options"]["mask"] == "small_or_large"
    assert _checkpoint_files(teacher_dir) == before  # the teacher is never written back
    # The teacher mattered: the CAT student is not the CE student trained on the same batches.
    cat_params = jax.tree_util.tree_leaves(final_state(student)[1]["params"])
    ce_params = jax.tree_util.tree_leaves(final_state(ce_student)[1]["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(cat_params, ce_params))


def test_cat_distill_student_end_to_end(teacher_dir, tmp_path):
    student = tmp_path / "cat_distill"
    run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat_distill.gin",
            student,
            2,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{teacher_dir}'",
            "--gin.TEACHER_DTYPE='float32'",
        ),
    )
    rows = [r for r in read_jsonl(os.path.join(student, "train_metrics.jsonl")) if "train/loss" in r]
    mask_fraction, tolerance, kd = _first_step_reference(teacher_dir)
    assert kd > 0.1
    # The teacher's and the student's logits are summed in another order inside the jitted step.
    assert_close(rows[0]["train/kd"], kd, DEEP)
    assert rows[0]["train/mask_fraction"] == pytest.approx(mask_fraction, abs=tolerance)


def test_mask_start_step_reaches_the_train_step(teacher_dir, ce_student, tmp_path):
    """LossOptions.mask_start_step=2: steps 1-2 are the CE student's steps (every token counts,
    the same loss on the same batches), the mask applies from step 3; run_info records it."""
    student = tmp_path / "cat_warm"
    run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            student,
            3,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{teacher_dir}'",
            "--gin.TEACHER_DTYPE='float32'",
            "--gin.LossOptions.mask_start_step=2",
        ),
    )
    rows = [r for r in read_jsonl(os.path.join(student, "train_metrics.jsonl")) if "train/loss" in r]
    ce_rows = [r for r in read_jsonl(os.path.join(ce_student, "train_metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/mask_fraction"] for r in rows[:2]] == [1.0, 1.0]
    for row, ce_row in zip(rows[:2], ce_rows[:2]):
        assert_close(row["train/loss"], ce_row["train/loss"], DEEP)
    assert rows[2]["train/mask_fraction"] < 0.95  # the mask drops tokens from step 3 on
    info = json.load(open(os.path.join(student, "run_info.json")))
    assert info["loss_options"]["mask_start_step"] == 2


def test_teacher_parameters_bitwise_unchanged_and_student_updated(teacher_dir):
    from cat_jax import partitioning
    from cat_jax.frozen_model import load_frozen_model
    from cat_jax.models.t5 import T5Model
    from cat_jax.objectives.token_loss import LossOptions, token_loss
    from cat_jax.optimizers import make_optimizer
    from cat_jax.train_state import init_train_state, state_shardings
    from cat_jax.train_step import make_train_step

    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    rules = partitioning.logical_axis_rules()
    teacher = load_frozen_model(str(teacher_dir), mesh=mesh, rules=rules, dtype="bfloat16")
    snapshot = jax.tree_util.tree_map(np.array, teacher.params)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(snapshot))
    student_cfg = teacher.config.replace(dtype="float32")
    # No mask: random targets are wrong for both models, and the CAT mask would drop every token.
    model = T5Model(student_cfg)
    tx, schedule = make_optimizer(10)
    _, shardings = state_shardings(model, tx, mesh, rules)
    state = init_train_state(model, tx, 1, shardings)
    start = jax.tree_util.tree_map(np.array, state.params)
    rng = np.random.default_rng(0)
    tgt = rng.integers(3, 200, (4, 8)).astype(np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(3, 200, (4, 8)).astype(np.int32),
        "decoder_target_tokens": tgt,
        "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_loss_weights": np.ones((4, 8), np.float32),
    }
    step = jax.jit(
        make_train_step(token_loss(model, LossOptions(mask="none", alpha=0.5)), tx, schedule, teacher.logits_fn),
        donate_argnums=(0,),
    )
    for _ in range(3):
        state, metrics = step(state, batch, teacher.params)
    assert float(metrics["kd"]) > 0
    for a, b in zip(jax.tree_util.tree_leaves(snapshot), jax.tree_util.tree_leaves(teacher.params)):
        assert a.tobytes() == np.asarray(b).tobytes()
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(state.params))
    ]
    assert all(changed)


def test_cat_without_teacher_is_refused(tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_cat.gin", tmp_path / "s", 2, "--gin.TEACHER_MODEL_DIR=None"),
        check=False,
    )
    assert proc.returncode == 2
    assert "needs a frozen large model" in proc.stderr and "TEACHER_MODEL_DIR" in proc.stderr


def test_missing_teacher_checkpoint_is_refused(tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args("train_small_cat.gin", tmp_path / "s", 2, f"--gin.TEACHER_MODEL_DIR='{tmp_path / 'nope'}'"),
        check=False,
    )
    assert proc.returncode == 2
    assert str(tmp_path / "nope") in proc.stderr and "run_info.json" in proc.stderr


def _copy_teacher(teacher_dir, dst, edit):
    import shutil

    shutil.copytree(teacher_dir, dst)
    info = json.load(open(dst / "run_info.json"))
    edit(info)
    json.dump(info, open(dst / "run_info.json", "w"))
    return dst


def test_teacher_with_a_different_vocabulary_is_refused(teacher_dir, tmp_path):
    other = _copy_teacher(
        teacher_dir,
        tmp_path / "spm_teacher",
        lambda i: i["vocabulary"].update({"class": "SentencePieceVocabulary", "size": 32100}),
    )
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            tmp_path / "s",
            2,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{other}'",
        ),
        check=False,
    )
    assert proc.returncode == 2
    assert "must share one vocabulary" in proc.stderr and "SentencePieceVocabulary" in proc.stderr


def test_teacher_vocab_size_below_the_tokenizer_is_refused(teacher_dir, tmp_path):
    """A teacher's vocab_size may differ from the student's (tests/test_decoder_e2e.py trains with
    one), but not fall short of the tokenizer's 259 byte ids."""
    other = _copy_teacher(teacher_dir, tmp_path / "small_vocab", lambda i: i["model_config"].update(vocab_size=256))
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            tmp_path / "s",
            2,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{other}'",
        ),
        check=False,
    )
    assert proc.returncode == 2
    assert "vocab_size 256 is smaller than its tokenizer's 259 ids" in proc.stderr


def test_teacher_written_for_another_config_is_refused(teacher_dir, tmp_path):
    proc = run_module(
        "cat_jax.train",
        train_args(
            "train_small_cat.gin",
            tmp_path / "s",
            2,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.TEACHER_MODEL_DIR='{teacher_dir}'",
            "--gin.train.teacher_model_config=@teacher/T5Config()",
            "--gin.teacher/T5Config.emb_dim=128",
        ),
        check=False,
    )
    assert proc.returncode == 2
    assert "different model config" in proc.stderr and "emb_dim" in proc.stderr
