"""SALT: the distillation schedule, SALT_DS's score and selection, the scoring job, and a large
model trained by a smaller one through the real entry point (the switch, its FLOPs, resume)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA_CACHE, TINY_TASK, run_module, train_args
from helpers import assert_trees_equal, final_state
from tolerances import SHALLOW, assert_close

from cat_jax.errors import ConfigError
from cat_jax.losses import cascade_aware_loss
from cat_jax.metric_writers import read_jsonl
from cat_jax.salt.schedule import KDSchedule
from cat_jax.salt.selection import band_rows, sequence_scores

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

# The large model is tiny.gin; its teacher is smaller still (one layer each side).
SMALL = ["--gin.T5Config.num_encoder_layers=1", "--gin.T5Config.num_decoder_layers=1"]
TINY_MODEL = "--gin_file=gin_configs/models/tiny.gin"
SCORE_DATA = [
    f"--gin.MIXTURE_OR_TASK_NAME='{TINY_TASK}'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
    "--gin.MAX_EXAMPLES=256",
    f"--gin.load_split.cache_dir='{DATA_CACHE}'",
]


# ---- the schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("transition", [0, 1, 4])
def test_kd_weight_is_exact_at_the_boundaries(transition):
    s = KDSchedule(kd_steps=10, weight=0.6, transition_steps=transition)
    assert s.weight_at(0) == 0.6
    assert s.weight_at(10) == 0.0 and s.weight_at(11) == 0.0 and s.weight_at(10_000) == 0.0
    if transition == 0:
        assert s.weight_at(9) == 0.6  # step n_kd - 1 still distils fully
    else:
        assert s.weight_at(10 - transition) == 0.6  # the ramp's start
        assert s.weight_at(9) == pytest.approx(0.6 / transition)
        assert s.weight_at(10 - transition + 1) == pytest.approx(0.6 * (transition - 1) / transition)
    assert [s.distills(i) for i in (9, 10)] == [True, False]
    traced = jax.jit(s.weight_at)(jnp.arange(14))  # the jitted step's own computation
    assert_close(np.asarray(traced), [s.weight_at(i) for i in range(14)], SHALLOW)


@pytest.mark.parametrize(
    "bad",
    [
        dict(kd_steps=-1),
        dict(kd_steps=5, weight=0.0),
        dict(kd_steps=5, weight=1.5),
        dict(kd_steps=5, transition_steps=6),
        dict(kd_steps=5, temperature=0.0),
    ],
)
def test_kd_schedule_refuses_bad_settings(bad):
    with pytest.raises(ConfigError):
        KDSchedule(**bad)


def test_a_traced_weight_gives_the_loss_of_the_same_constant():
    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    weights = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    for alpha in (0.0, 0.3, 1.0):
        expected, _ = cascade_aware_loss(student, teacher, targets, weights, alpha=alpha, temperature=2.0, mask="none")
        traced, metrics = jax.jit(
            lambda a: cascade_aware_loss(student, teacher, targets, weights, alpha=a, temperature=2.0, mask="none")
        )(jnp.float32(alpha))
        assert_close(float(traced), float(expected), SHALLOW)  # jitted against eager
        assert "kd" in metrics
    with pytest.raises(ValueError, match="needs teacher_logits"):
        cascade_aware_loss(student, None, targets, weights, alpha=jnp.float32(0.5), mask="none")


# ---- SALT_DS's score and band ------------------------------------------------------------------


def _reference_scores(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    out = []
    for row_logits, row_targets, row_weights in zip(logits, targets, weights):
        losses = []
        for z, y, w in zip(row_logits, row_targets, row_weights):
            top = np.argsort(-z)[:k]
            if w > 0 and y in top:
                losses.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y])
        out.append(np.median(losses) if losses else np.nan)
    return np.array(out)


def test_salt_ds_score_equals_a_numpy_reference():
    rng = np.random.default_rng(1)
    batch, length, vocab, k = 5, 7, 13, 3
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    weights = np.ones((batch, length), np.float32)
    weights[1, 4:] = 0  # padding is never scored
    targets[0] = np.argsort(-logits[0], axis=-1)[:, 0]  # every token in the top-k (the top-1)
    targets[2] = np.argsort(-logits[2], axis=-1)[:, -1]  # no token in the top-k: NaN, never selected
    targets[3, :2] = np.argsort(-logits[3, :2], axis=-1)[:, 1]
    targets[3, 2:] = np.argsort(-logits[3, 2:], axis=-1)[:, -1]  # two learnable tokens: an even median
    expected = _reference_scores(logits, targets, weights, k)
    got = np.asarray(jax.jit(sequence_scores, static_argnums=3)(logits, targets, weights, k))
    assert np.isnan(expected[2]) and np.isnan(got[2])
    assert np.isfinite(np.delete(expected, 2)).all()
    finite = np.isfinite(expected)
    assert_close(got[finite], expected[finite], SHALLOW)
    padded = weights.copy()
    padded[4] = 0  # a row of padding only: NaN too
    assert np.isnan(np.asarray(sequence_scores(logits, targets, padded, k))[4])


def test_band_keeps_the_quantile_band_of_the_finite_scores():
    scores = np.array([5.0, np.nan, 1.0, 3.0, 2.0, 4.0, np.nan])
    assert band_rows(scores, 0.5, 1.0).tolist() == [0, 3, 5]  # median of 1..5 is 3
    assert band_rows(scores, 0.0, 0.25).tolist() == [2, 4]
    assert band_rows(scores, 0.0, 1.0).tolist() == [0, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="finite"):
        band_rows(np.full(3, np.nan), 0.0, 1.0)


# ---- the scoring job and SALT_DS's data ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """A CE-trained model smaller than the large model of these tests."""
    model_dir = tmp_path_factory.mktemp("salt") / "small"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 4, TINY_MODEL, *SMALL))
    return model_dir


def _score(small_dir, scores_dir, *extra):
    import gin

    from cat_jax import gin_utils
    from cat_jax.jobs.salt_score import salt_score

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            ["gin_configs/runs/salt_score.gin"],
            [
                f"SMALL_MODEL_DIR='{small_dir}'",
                f"SCORES_DIR='{scores_dir}'",
                "BATCH_SIZE=32",
                "salt_score.chunk_batches=2",
                *(a.removeprefix("--gin.") for a in SCORE_DATA),
                *extra,
            ],
        )
        return salt_score()
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def scores(small_teacher, tmp_path_factory):
    """The split scored in one go."""
    scores_dir = tmp_path_factory.mktemp("salt") / "scores"
    meta = _score(small_teacher, scores_dir)
    return scores_dir, meta


def test_scoring_job_writes_every_sequence_and_resumes_to_the_same_scores(small_teacher, scores, tmp_path):
    one_go, meta = scores
    assert meta["num_examples"] == 256 and meta["top_k"] == 10
    with np.load(os.path.join(one_go, "scores.npz")) as f:
        reference = dict(f)
    assert len(reference["scores"]) == 256 and len(set(reference["ids"].tolist())) == 256
    assert np.isfinite(reference["scores"]).sum() > 128
    assert not os.path.exists(os.path.join(one_go, "chunks"))
    # 256 sequences in chunks of 2 x 32: stopped after 3 of 4 chunks, then the same job goes on.
    resumed = tmp_path / "resumed"
    assert _score(small_teacher, resumed, "salt_score.max_chunks_per_run=3") == {"chunks_done": 3, "chunks": 4}
    assert json.load(open(resumed / "progress.json"))["done"] == [0, 1, 2]
    assert not (resumed / "scores.npz").exists()
    _score(small_teacher, resumed)
    with np.load(resumed / "scores.npz") as f:
        for key in ("task_names", "ids", "scores"):
            assert f[key].tobytes() == reference[key].tobytes(), key
    assert _score(small_teacher, one_go) == meta  # finished: nothing to do, nothing rewritten
    partial = tmp_path / "partial"
    _score(small_teacher, partial, "salt_score.max_chunks_per_run=1")
    with pytest.raises(ConfigError, match="another scoring job"):
        _score(small_teacher, partial, "TOP_K=5")


def test_distillation_batches_come_from_the_selected_band_then_from_everything(scores):
    import gin

    from cat_jax import data as data_lib
    from cat_jax.data.batches import TrainBatches
    from cat_jax.salt.selection import DataSelection, phased_batches

    scores_dir, _ = scores
    gin.clear_config()
    gin.bind_parameter("load_split.cache_dir", DATA_CACHE)
    try:
        dataset = {
            "mixture_or_task_name": TINY_TASK,
            "split": "train",
            "batch_size": 8,
            "seed": 0,
            "task_feature_lengths": {"inputs": 32, "targets": 8},
            "max_examples": 256,
        }
        batches = phased_batches(data_lib.data_source(), dataset, (0, 1), DataSelection(str(scores_dir)), kd_steps=3)
        arrays = data_lib.load_split(TINY_TASK, "train", dataset["task_feature_lengths"], max_examples=256)
        with pytest.raises(ConfigError, match="max_examples"):
            phased_batches(
                data_lib.data_source(),
                {**dataset, "max_examples": 128},
                (0, 1),
                DataSelection(str(scores_dir)),
                kd_steps=3,
            )
    finally:
        gin.clear_config()
    with np.load(os.path.join(scores_dir, "scores.npz")) as f:
        by_id = dict(zip(f["ids"].tolist(), f["scores"].tolist()))
    median = np.nanmedian(list(by_id.values()))
    row_of = {
        arrays.features["encoder_input_tokens"][i].tobytes()
        + arrays.features["decoder_target_tokens"][i].tobytes(): str(arrays.ids[i])
        for i in range(len(arrays))
    }

    def ids_of(batch):
        return [
            row_of[e.tobytes() + t.tobytes()]
            for e, t in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"])
        ]

    for step in range(3):
        assert all(by_id[i] >= median for i in ids_of(batches.batch(step))), step
    full = TrainBatches(arrays, 8, seed=0)
    for step in (3, 4, 40):
        assert ids_of(batches.batch(step)) == ids_of(full.batch(step))


# ---- a large model trained with its smaller teacher's help ---------------------------------------


def _salt_args(model_dir, teacher, scores_dir, steps, *extra):
    return train_args(
        "train_large_salt_ds.gin",
        model_dir,
        steps,
        TINY_MODEL,
        f"--gin.TEACHER_MODEL_DIR='{teacher}'",
        f"--gin.SCORES_DIR='{scores_dir}'",
        "--gin.KD_STEPS=4",
        "--gin.KD_TRANSITION_STEPS=2",
        "--gin.train.checkpoint_period=100",
        *extra,
    )


def _printed(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def salt_uninterrupted(small_teacher, scores, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("salt") / "large_salt_ds"
    proc = run_module("cat_jax.train", _salt_args(model_dir, small_teacher, scores[0], 7))
    return model_dir, proc


def test_salt_distils_then_stops_running_the_teacher(salt_uninterrupted, tmp_path):
    model_dir, proc = salt_uninterrupted
    rows = [r for r in read_jsonl(os.path.join(model_dir, "train_metrics.jsonl")) if "train/loss" in r]
    # Metrics of step k (logged at k + 1): w = 0.5 until the ramp of the last 2 steps, 0 from step 4.
    assert [r.get("train/kd_weight") for r in rows] == [0.5, 0.5, 0.5, 0.25, None, None, None]
    assert all("train/kd" in r for r in rows[:4]) and not any("train/kd" in r for r in rows[4:])
    assert "Step 4 starts plain cross-entropy after SALT's distillation phase" in proc.stderr
    assert "SALT_DS: the first 4 steps train on" in proc.stderr
    flops = _printed(proc)["step_flops"]
    ce = run_module(
        "cat_jax.train",
        train_args(
            "train_large.gin",
            tmp_path / "ce",
            7,
            TINY_MODEL,  # same schedule
            "--gin.train.max_steps_per_run=1",
        ),
    )
    ce_flops = _printed(ce)["step_flops"]
    assert list(ce_flops) == ["without a teacher"]
    # After the switch the compiled step is a CE step: the same FLOPs in XLA's cost analysis.
    assert flops["without a teacher"] == ce_flops["without a teacher"] > 0
    assert flops["with the teacher"] > 1.05 * flops["without a teacher"]
    info = json.load(open(model_dir / "run_info.json"))
    assert info["salt"]["kd_schedule"] == {"kd_steps": 4, "weight": 0.5, "transition_steps": 2, "temperature": 1.0}
    assert info["salt"]["kd_selection"]["min_quantile"] == 0.5


def test_salt_resumes_bitwise_across_the_switch(salt_uninterrupted, small_teacher, scores, tmp_path):
    ref_dir, _ = salt_uninterrupted
    model_dir = tmp_path / "large"
    args = _salt_args(model_dir, small_teacher, scores[0], 7)
    run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=3"])  # stops inside the phase
    crossing = run_module("cat_jax.train", args + ["--gin.train.max_steps_per_run=2"])  # 3 -> 5, switching at 4
    assert "Step 4 starts plain cross-entropy after SALT's distillation phase" in crossing.stderr
    after = run_module("cat_jax.train", args)  # 5 -> 7, teacher never run
    assert "after SALT's distillation phase: the teacher is not run" in after.stderr
    assert list(_printed(after)["step_flops"]) == ["without a teacher"]
    step, resumed = final_state(model_dir)
    assert step == 7
    assert_trees_equal(final_state(ref_dir)[1], resumed)


def test_salt_settings_that_cannot_work_are_refused(small_teacher, scores, tmp_path):
    import dataclasses

    from cat_jax.data.config import DatasetConfig
    from cat_jax.salt.objective import Salt
    from cat_jax.salt.selection import DataSelection

    dataset = dataclasses.asdict(DatasetConfig(TINY_TASK, {"inputs": 32, "targets": 8}, 8, max_examples=256))
    kd, selection = KDSchedule(kd_steps=4), DataSelection(str(scores[0]))
    Salt(kd, selection).check(has_teacher=True, streaming=False, dataset=dataset)
    with pytest.raises(ConfigError, match="none is configured"):
        Salt(kd).check(has_teacher=False, streaming=False, dataset=dataset)
    with pytest.raises(ConfigError, match="needs the in-memory data path"):
        Salt(kd, selection).check(has_teacher=True, streaming=True, dataset=dataset)
    with pytest.raises(ConfigError, match="no finished SALT_DS scores"):
        Salt(kd, DataSelection(str(tmp_path))).check(has_teacher=True, streaming=False, dataset=dataset)
    # Through the entry point: refused before anything is written.
    proc = run_module(
        "cat_jax.train",
        _salt_args(tmp_path / "run", small_teacher, scores[0], 2, "--gin.DatasetConfig.max_examples=128"),
        check=False,
    )
    assert proc.returncode != 0 and "were computed for max_examples=256" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# ---- the report --------------------------------------------------------------------------------


def _fake_run(model_dir, curve: dict[int, tuple[float, float]]):
    from cat_jax.metric_writers import MetricWriter

    writer = MetricWriter(str(model_dir), enabled=True)
    for step, (a, b) in curve.items():
        writer.write_scalars(step, {"train/loss": 1.0})
        writer.write_scalars(step, {"eval/task_a/accuracy": a, "eval/task_a/error_rate": 1 - a, "eval/task_b/bleu": b})
    writer.close()


def test_report_finds_the_steps_to_reach_the_baseline(tmp_path):
    from cat_jax.jobs.salt_report import main

    runs = {
        "ce0": {10: (0.1, 0.3), 20: (0.3, 0.5), 30: (0.5, 0.7)},
        "ce1": {10: (0.3, 0.1), 20: (0.5, 0.3), 30: (0.7, 0.5)},
        "salt0": {10: (0.5, 0.5), 20: (0.6, 0.6), 30: (0.8, 0.8), 40: (0.9, 0.9)},
        "salt1": {10: (0.3, 0.3), 20: (0.6, 0.6), 30: (0.6, 0.6)},
        "slow0": {10: (0.0, 0.0), 30: (0.1, 0.1)},
    }
    for name, curve in runs.items():
        _fake_run(tmp_path / name, curve)
    d = str(tmp_path)
    assert (
        main(["--output_dir", f"{d}/report", f"ce={d}/ce0,{d}/ce1", f"salt={d}/salt0,{d}/salt1", f"slow={d}/slow0"])
        == 0
    )
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    # quality = mean over tasks of each task's first metric: ce ends at mean(0.5, 0.7, 0.7, 0.5) = 0.6.
    assert summary["baseline_final_quality"] == pytest.approx(0.6)
    salt = summary["methods"]["salt"]
    assert summary["curves"]["salt"]["steps"] == [10, 20, 30]  # the steps both seeds evaluated
    assert salt["steps_to_baseline_final"] == 20 and salt["fraction_of_baseline_steps"] == pytest.approx(20 / 30)
    assert salt["final_quality"] == pytest.approx(0.7) and salt["final_quality_min"] == pytest.approx(0.6)
    assert summary["methods"]["ce"]["steps_to_baseline_final"] == 30
    assert summary["methods"]["slow"]["steps_to_baseline_final"] is None
    assert "not reached" in open(tmp_path / "report" / "summary.md").read()
    assert (tmp_path / "report" / "quality_vs_steps.png").stat().st_size > 0
    assert len(open(tmp_path / "report" / "curves.csv").readlines()) == 1 + 3 + 3 + 4 + 3 + 2
    assert main(["--output_dir", f"{d}/r2", f"ce={d}/ce0", "--metric", "task_b/bleu"]) == 0
    assert json.load(open(tmp_path / "r2" / "summary.json"))["baseline_final_quality"] == pytest.approx(0.7)
    assert main(["--output_dir", f"{d}/r3", f"salt={d}/salt0"]) == 2  # no CE baseline
