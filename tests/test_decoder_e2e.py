"""Decoder-only pairs end to end on CPU, through the real binaries: two tiny Hub-style Llama
checkpoints sharing one tokenizer (built here without torch: cat_jax's exporter writes the weights,
the llama3 tokenizer fixture is copied beside them) are imported; the large is fine-tuned, the
small CAT-trained against it (and trained by CE, distillation, CAT-distill; SALT trains a large one
from the small), both evaluated and inferred; a kill -9 of the CAT run resumes bit-exactly."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import DATA_CACHE, REPO, TINY_TASK, run_module
from helpers import TOKENIZER, assert_trees_equal, final_state, kill_when, make_hub_checkpoint
from tolerances import DEEP, assert_close, undecided

from cat_jax.metric_writers import read_jsonl

SHAPES = {
    "small": dict(emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64),
    "large": dict(emb_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
}
LENGTHS = {"inputs": 32, "targets": 8}
DATA_ARGS = [
    f"--gin.load_split.cache_dir='{DATA_CACHE}'",
    f"--gin.MIXTURE_OR_TASK_NAME='{TINY_TASK}'",
    f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
    "--gin.BATCH_SIZE=8",
    "--gin.DatasetConfig.max_examples=256",
    "--gin.train.eval_period=0",
    "--gin.train.log_every_steps=1",
    "--gin.learning_rate_schedule.warmup_steps=2",
]


def import_args(source, model_dir) -> list[str]:
    return [
        "--gin_file=gin_configs/runs/import_checkpoint.gin",
        f"--gin.SOURCE='{source}'",
        f"--gin.MODEL_DIR='{model_dir}'",
    ]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{"small": imported MODEL_DIR, "large": ..., "params": {name: the exported parameters}}."""
    root = tmp_path_factory.mktemp("pair")
    out = {"params": {}}
    for seed, name in enumerate(("small", "large"), start=1):
        hub = root / f"{name}_hub"
        out["params"][name] = make_hub_checkpoint(hub, seed, SHAPES[name])
        run_module("cat_jax.import_checkpoint", import_args(hub, root / name))
        out[name] = root / name
    return out


def restored(model_dir, dtype: str = "float32"):
    from cat_jax import partitioning
    from cat_jax.frozen_model import load_frozen_model

    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    return load_frozen_model(str(model_dir), mesh=mesh, rules=partitioning.logical_axis_rules(), dtype=dtype)


def test_a_hub_pair_sharing_a_tokenizer_imports_as_one_cascade_pair(pair):
    """Fast: the two imports hold the exported tensors bitwise and record one tokenizer, which
    tokenizes a prompt as transformers' tokenizer(prompt) did (BOS included)."""
    from cat_jax import models, vocabulary_store
    from cat_jax.frozen_model import check_vocabulary
    from cat_jax.models.convert.tree import flatten

    infos = {n: json.loads((pair[n] / "run_info.json").read_text()) for n in ("small", "large")}
    assert infos["small"]["vocabulary"] == infos["large"]["vocabulary"]
    assert infos["small"]["vocabulary"]["class"] == "HFTokenizerVocabulary"
    vocab = vocabulary_store.model_vocabulary(str(pair["small"]))
    check_vocabulary(str(pair["large"]), infos["large"], models.config_from_run_info(infos["large"]), vocab)
    for name in ("small", "large"):
        params = {k: np.asarray(v) for k, v in flatten(restored(pair[name]).params).items()}
        assert sorted(params) == sorted(pair["params"][name])
        for path, value in pair["params"][name].items():
            np.testing.assert_array_equal(params[path], value, err_msg=path)
    expected = json.loads((REPO / "tests" / "fixtures" / "hf_tokenizers" / "expected.json").read_text())["llama3"]
    for case in expected["prompts"]:
        assert vocab.encode_prompt(case["prompt"]) == case["input_ids"]


# ---- training -------------------------------------------------------------------------------------


def student_args(run_file: str, model_dir, initial, steps: int, *extra: str) -> list[str]:
    """A decoder run from an imported checkpoint, the task tokenized with its tokenizer."""
    return [
        f"--gin_file=gin_configs/runs/{run_file}",
        *DATA_ARGS,
        "--gin.MODEL_CONFIG=None",
        f"--gin.train.initial_checkpoint_dir='{initial}'",
        f"--gin.get_vocabulary.from_model_dir='{initial}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        *extra,
    ]


def losses(model_dir) -> list[dict]:
    rows = [r for r in read_jsonl(os.path.join(model_dir, "train_metrics.jsonl")) if "train/loss" in r]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    return rows


@pytest.fixture(scope="module")
def large(pair, tmp_path_factory):
    """The large model fine-tuned 20 steps from its import (finetune.gin), in float32."""
    model_dir = tmp_path_factory.mktemp("large") / "large"
    run_module(
        "cat_jax.train",
        [
            "--gin_file=gin_configs/runs/finetune.gin",
            *DATA_ARGS,
            f"--gin.INITIAL_CHECKPOINT_DIR='{pair['large']}'",
            f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TRAIN_STEPS=20",
            "--gin.LEARNING_RATE=3e-3",
            # float32 compute (finetune.gin's is bfloat16): infer's log-probs are then checked at DEEP
            "--gin.train.compute_dtype=None",
        ],
    )
    return model_dir


def first_batch(student_dir):
    """The first training batch of every run here, as the student's model batch (numpy)."""
    import gin

    import tasks  # noqa: F401  (registers the task)
    from cat_jax import data, vocabulary_store

    with gin.unlock_config():
        gin.bind_parameter("get_vocabulary.from_model_dir", str(student_dir))
    try:
        arrays = data.load_split(TINY_TASK, "train", LENGTHS, max_examples=256, cache_dir=DATA_CACHE)
    finally:
        gin.clear_config()
    examples = data.TrainBatches(arrays, 8, seed=0).batch(0)
    return restored(student_dir).model.make_batch(examples, vocabulary_store.model_vocabulary(str(student_dir)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def first_step_reference(student_dir, teacher_dir, alpha: float, cat_mask: bool):
    """NumPy's (loss, mask fraction, tolerance of the mask fraction) of step 1: the student's
    initial parameters and the float32 teacher on the first batch (float64 maths)."""
    batch = first_batch(student_dir)
    student, teacher = restored(student_dir), restored(teacher_dir)
    s = np.asarray(student.logits_fn(student.params, batch), np.float64)
    t = np.asarray(teacher.logits_fn(teacher.params, batch), np.float64)
    # A teacher of another vocab_size (one tokenizer, other padding rows): cut, or padded with -1e9.
    t = np.concatenate([t, np.full((*t.shape[:-1], max(s.shape[-1] - t.shape[-1], 0)), -1e9)], -1)[..., : s.shape[-1]]
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"].astype(np.float64)
    correct = (s.argmax(-1) == targets) | (t.argmax(-1) == targets) if cat_mask else np.ones(targets.shape, bool)
    mask = weights * correct
    ls, lt = log_softmax(s), log_softmax(t)
    ce = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    loss = float((mask * (alpha * ce + (1 - alpha) * kl)).sum() / weights.sum())
    ambiguous = undecided(s, targets, DEEP) | undecided(t, targets, DEEP) if cat_mask else np.zeros(targets.shape)
    return loss, float(mask.sum() / weights.sum()), float((weights * ambiguous).sum() / weights.sum()) + 1e-6


@pytest.mark.slow
def test_the_large_model_fine_tunes_20_steps_from_its_import(large, pair):
    rows = losses(large)
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = np.mean([r["train/loss"] for r in rows[:5]]), np.mean([r["train/loss"] for r in rows[-5:]])
    assert last < 0.5 * first, (first, last)
    info = json.loads((large / "run_info.json").read_text())
    assert (
        info["model_family"] == "decoder"
        and info["vocabulary"] == json.loads((pair["large"] / "run_info.json").read_text())["vocabulary"]
    )
    assert info["dataset"]["mixture_or_task_name"] == TINY_TASK


CAT_STEPS = 8


def cat_args(pair, large, model_dir, *extra: str) -> list[str]:
    return student_args(
        "train_small_cat.gin",
        model_dir,
        pair["small"],
        CAT_STEPS,
        f"--gin.TEACHER_MODEL_DIR='{large}'",
        "--gin.TEACHER_DTYPE='float32'",
        *extra,
    )


@pytest.fixture(scope="module")
def small_cat(pair, large, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cat") / "small_cat"
    run_module("cat_jax.train", cat_args(pair, large, model_dir, "--gin.train.checkpoint_period=100"))
    return model_dir


@pytest.mark.slow
def test_the_small_model_cat_trains_against_the_fine_tuned_large(small_cat, pair, large):
    rows = losses(small_cat)
    assert [r["step"] for r in rows] == list(range(1, CAT_STEPS + 1))
    loss, mask_fraction, tolerance = first_step_reference(pair["small"], large, alpha=1.0, cat_mask=True)
    assert 0.0 < mask_fraction < 1.0  # the fine-tuned large gets some target tokens right, not all
    assert tolerance < 0.05
    assert rows[0]["train/mask_fraction"] == pytest.approx(mask_fraction, abs=tolerance)
    if tolerance <= 1e-6:  # the mask is decided: the loss is the masked cross-entropy
        assert_close(rows[0]["train/loss"], loss, DEEP, "CAT loss of step 1")
    info = json.loads((small_cat / "run_info.json").read_text())
    assert info["teacher"]["model_dir"] == str(large) and info["loss_options"]["mask"] == "small_or_large"


@pytest.mark.slow
@pytest.mark.parametrize(
    "run_file, alpha, cat_mask",
    [
        ("train_small_ce.gin", 1.0, False),
        ("train_small_distill.gin", 0.5, False),
        ("train_small_cat_distill.gin", 0.5, True),
    ],
)
def test_decoder_students_of_every_objective_start_from_the_reference_loss(
    run_file, alpha, cat_mask, pair, large, tmp_path
):
    teacher = (
        []
        if run_file == "train_small_ce.gin"
        else [f"--gin.TEACHER_MODEL_DIR='{large}'", "--gin.TEACHER_DTYPE='float32'"]
    )
    run_module("cat_jax.train", student_args(run_file, tmp_path / "m", pair["small"], 3, *teacher))
    rows = losses(tmp_path / "m")
    assert [r["step"] for r in rows] == [1, 2, 3]
    loss, mask_fraction, tolerance = first_step_reference(pair["small"], large, alpha, cat_mask)
    assert rows[0]["train/mask_fraction"] == pytest.approx(mask_fraction, abs=tolerance)
    if tolerance <= 1e-6:
        assert_close(rows[0]["train/loss"], loss, DEEP, f"{run_file}: loss of step 1")


@pytest.mark.slow
def test_salt_trains_a_decoder_large_model_from_the_small_one(pair, tmp_path):
    """SALT's distillation phase (weight 0.5 on KL(small || large)) and then CE, the small model
    as the teacher; step 1's loss is NumPy's."""
    run_module(
        "cat_jax.train",
        student_args(
            "train_large_salt.gin",
            tmp_path / "m",
            pair["large"],
            4,
            f"--gin.TEACHER_MODEL_DIR='{pair['small']}'",
            "--gin.KD_STEPS=2",
        ),
    )
    rows = losses(tmp_path / "m")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    loss, _, _ = first_step_reference(pair["large"], pair["small"], alpha=0.5, cat_mask=False)
    assert_close(rows[0]["train/loss"], loss, DEEP, "SALT loss of step 1")


@pytest.mark.slow
def test_models_of_one_tokenizer_and_different_vocab_sizes_teach_each_other(pair, tmp_path):
    """Qwen2.5 0.5B and 7B share a tokenizer but not vocab_size (151936, 152064): a teacher with
    more rows (CAT) has its logits cut to the student's, one with fewer (SALT's small teacher of a
    wider large model) padded with impossible ids; step 1 equals NumPy's either way."""
    make_hub_checkpoint(tmp_path / "wide_hub", 4, SHAPES["large"], vocab_size=640)
    run_module("cat_jax.import_checkpoint", import_args(tmp_path / "wide_hub", tmp_path / "wide"))
    cat = run_module(
        "cat_jax.train",
        student_args(
            "train_small_cat.gin",
            tmp_path / "cat",
            pair["small"],
            2,
            f"--gin.TEACHER_MODEL_DIR='{tmp_path / 'wide'}'",
            "--gin.TEACHER_DTYPE='float32'",
        ),
    )
    assert "Teacher vocab_size 640, student 512" in cat.stderr
    loss, mask_fraction, tolerance = first_step_reference(pair["small"], tmp_path / "wide", 1.0, cat_mask=True)
    rows = losses(tmp_path / "cat")
    assert rows[0]["train/mask_fraction"] == pytest.approx(mask_fraction, abs=tolerance)
    if tolerance <= 1e-6:
        assert_close(rows[0]["train/loss"], loss, DEEP, "CAT loss of step 1, wider teacher")
    run_module(
        "cat_jax.train",
        student_args(
            "train_large_salt.gin",
            tmp_path / "salt",
            tmp_path / "wide",
            2,
            f"--gin.TEACHER_MODEL_DIR='{pair['small']}'",
            "--gin.KD_STEPS=2",
        ),
    )
    loss, _, _ = first_step_reference(tmp_path / "wide", pair["small"], alpha=0.5, cat_mask=False)
    assert_close(losses(tmp_path / "salt")[0]["train/loss"], loss, DEEP, "SALT loss of step 1, narrower teacher")


@pytest.mark.slow
def test_a_killed_decoder_cat_run_resumes_bit_exactly(small_cat, pair, large, tmp_path):
    model_dir = tmp_path / "killed"
    args = cat_args(pair, large, model_dir, "--gin.train.checkpoint_period=1", "--gin.train.keep_checkpoints=2")
    kill_when(args, lambda lines: any(f" step 4/{CAT_STEPS} " in line for line in lines[-3:]))
    resumed = run_module("cat_jax.train", args)
    assert "resuming from this run's checkpoint at step" in resumed.stderr
    step, state = final_state(model_dir)
    assert step == CAT_STEPS
    assert_trees_equal(state, final_state(small_cat)[1])


# ---- eval and infer ------------------------------------------------------------------------------


def teacher_forced_logprobs(model_dir, rows: list[dict]) -> list[np.ndarray]:
    """log p(prediction_ids[j] | input, prediction_ids[:j]) of each infer line, by teacher forcing
    through Model.logits (float32)."""
    from cat_jax import vocabulary_store

    vocab = vocabulary_store.model_vocabulary(str(model_dir))
    frozen = restored(model_dir)
    n, li, lt = len(rows), LENGTHS["inputs"], LENGTHS["targets"]
    inputs = np.zeros((n, li), np.int32)
    targets = np.zeros((n, lt), np.int32)
    weights = np.zeros((n, lt), np.float32)
    for r, row in enumerate(rows):
        ids = [*vocab.encode(row["input"]), vocab.eos_id][:li]
        inputs[r, : len(ids)] = ids
        targets[r, : len(row["prediction_ids"])] = row["prediction_ids"]
        weights[r, : len(row["prediction_ids"])] = 1
    batch = frozen.model.make_batch(
        {"encoder_input_tokens": inputs, "decoder_target_tokens": targets, "decoder_loss_weights": weights}, vocab
    )
    logp = log_softmax(np.asarray(frozen.logits_fn(frozen.params, batch), np.float64))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return [picked[r, : len(row["prediction_ids"])] for r, row in enumerate(rows)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["large", "small_cat"])
def test_eval_and_infer_a_decoder_model(which, request, tmp_path):
    from cat_jax import vocabulary_store

    model_dir = request.getfixturevalue(which)
    common = [
        f"--gin.CHECKPOINT_DIR='{model_dir}'",
        "--gin.MAX_EXAMPLES=16",
        "--gin.BATCH_SIZE=8",
        "--gin.SPLIT='validation'",
    ]
    run_module("cat_jax.eval", ["--gin_file=gin_configs/runs/eval.gin", *common, f"--gin.OUTPUT_DIR='{tmp_path}'"])
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("metrics_validation_step*.json")]
    assert result["num_examples"] == 16 and set(result["metrics"]) == {TINY_TASK}
    assert result["metrics"][TINY_TASK] and "no_metrics" not in result
    out = tmp_path / "preds.jsonl"
    run_module("cat_jax.infer", ["--gin_file=gin_configs/runs/infer.gin", *common, f"--gin.OUTPUT_FILE='{out}'"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16
    vocab = vocabulary_store.model_vocabulary(str(model_dir))
    for row in rows:
        assert {"input", "prediction", "prediction_ids", "token_logprobs"} <= set(row)
        assert 1 <= len(row["prediction_ids"]) == len(row["token_logprobs"]) <= LENGTHS["targets"]
        assert vocab.decode(row["prediction_ids"]) == row["prediction"]
    for row, want in zip(rows, teacher_forced_logprobs(model_dir, rows)):
        assert_close(row["token_logprobs"], want, DEEP, f"token_logprobs of {row['id']}")


# ---- bad input ------------------------------------------------------------------------------------


def listing(directory) -> dict[str, int]:
    """Every path under `directory` (its own name included) and its size: what a refused run must
    leave as it found it."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = os.path.getsize(path)
    return out


def _edit_hub(directory, case: str) -> str:
    """A committed Hub fixture (qwen3) spoiled the way `case` says; returns the expected message."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(REPO / "tests" / "fixtures" / "hf_decoder" / "qwen3", directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(directory / "model.safetensors")
    if case == "model_type":
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        message = "model_type='gpt2'"
    elif case == "missing":
        del tensors["model.layers.1.self_attn.k_norm.weight"]
        message = "missing tensors: model.layers.1.self_attn.k_norm.weight"
    else:
        config.update(intermediate_size=25)
        message = "shape mismatches: "
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors")
    return message


@pytest.mark.parametrize(
    "case",
    [
        "model_type",
        # The binary's handling of every ConversionError is one path: the other two in the slow tier.
        pytest.param("missing", marks=pytest.mark.slow),
        pytest.param("shape", marks=pytest.mark.slow),
    ],
)
def test_a_bad_hub_checkpoint_is_refused_with_exit_2_and_nothing_written(case, tmp_path):
    """An unsupported model_type, a missing tensor, a shape mismatch (tests/test_decoder_convert.py
    checks the messages in full): exit 2, one line, and the existing MODEL_DIR (and its parent,
    where an import stages its files) exactly as before."""
    source = tmp_path / "hub"
    message = _edit_hub(source, case)
    parent = tmp_path / "runs"
    (parent / "model").mkdir(parents=True)
    before = listing(parent)
    proc = run_module("cat_jax.import_checkpoint", import_args(source, parent / "model"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ERROR: " in proc.stderr and message in proc.stderr and "Traceback" not in proc.stderr
    assert listing(parent) == before


@pytest.mark.slow
def test_a_teacher_whose_tokenizer_differs_is_refused_before_training(pair, tmp_path):
    """The teacher's tokenizer has the student's size (404 ids) but maps one id to another string:
    the check compares tokenizers, not sizes. Exit 2 before any step; the student's existing
    MODEL_DIR is untouched."""
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER, tokenizer)
    data = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tokenizer / "tokenizer.json").write_text(json.dumps(data))
    make_hub_checkpoint(tmp_path / "teacher_hub", 3, SHAPES["small"], tokenizer=tokenizer)
    run_module("cat_jax.import_checkpoint", import_args(tmp_path / "teacher_hub", tmp_path / "teacher"))
    teacher_vocab = json.loads((tmp_path / "teacher" / "run_info.json").read_text())["vocabulary"]
    student_vocab = json.loads((pair["small"] / "run_info.json").read_text())["vocabulary"]
    assert teacher_vocab["size"] == student_vocab["size"] and teacher_vocab != student_vocab
    student = tmp_path / "runs" / "student"
    student.mkdir(parents=True)
    before = listing(tmp_path / "runs")
    proc = run_module(
        "cat_jax.train",
        student_args(
            "train_small_cat.gin", student, pair["small"], 2, f"--gin.TEACHER_MODEL_DIR='{tmp_path / 'teacher'}'"
        ),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "their tokenizers differ" in proc.stderr and "Traceback" not in proc.stderr
    assert "step 1/" not in proc.stderr
    assert listing(tmp_path / "runs") == before


def test_the_tpu_vm_example_cat_trains_a_1b_student_against_an_8b_teacher_on_an_fsdp_mesh():
    """gin_configs/runs/cat_llama3_8b_teacher_tpu.gin builds what its header says (parsed only)."""
    import gin

    from cat_jax import gin_utils

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            ["gin_configs/runs/cat_llama3_8b_teacher_tpu.gin"],
            [
                "MODEL_DIR = '/m'",
                "TRAIN_STEPS = 10",
                "TEACHER_MODEL_DIR = '/t'",
                "INITIAL_CHECKPOINT_DIR = '/i'",
            ],
        )
        config = gin.query_parameter("train.model_config").scoped_configurable_fn()
        assert (config.model_type, config.emb_dim, config.num_layers, config.dtype) == ("llama", 2048, 16, "bfloat16")
        assert gin.query_parameter("make_mesh.mesh_shape") == [("data", -1), ("fsdp", 16), ("model", 1)]
        assert gin.query_parameter("%TEACHER_DTYPE") == "bfloat16"
        assert gin.query_parameter("%INITIAL_CHECKPOINT_DIR") == "/i"
        assert str(gin.query_parameter("train.initial_checkpoint_dir")) == "%INITIAL_CHECKPOINT_DIR"
        assert str(gin.query_parameter("get_vocabulary.from_model_dir")) == "%INITIAL_CHECKPOINT_DIR"
        assert gin.query_parameter("LossOptions.mask") == "small_or_large"
    finally:
        gin.clear_config()
