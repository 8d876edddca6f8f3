"""Cascades with decoder-only models end to end on CPU: `python -m cat_jax.cascade_eval` on a pair
of tiny imported Hub-style decoders sharing a tokenizer (tests/fixtures/hf_decoder: gemma in front
of gemma2), with a decoder trained from scratch on that tokenizer and a tiny T5 on bytes (a
heterogeneous cascade: each model reads the split's text in its own tokens) beside them; every rule,
a k-tier cascade with an ensemble and a budget, each curve's ends equal to each model alone, FLOPs
equal to each model's own count, re-analysis byte for byte; `python -m cat_jax.speculative_eval`
on the decoder pair (lossless = the verifier token for token, per-example records), and the named
errors before any decoding (two tokenizers in speculative decoding, a missing run_info)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cascade_helpers import CURVE_FILES, LABELS, TIER_FILES, expected_endpoints, read_curves, read_examples, reanalyse
from conftest import DATA_CACHE, REPO, run_module, train_args

from cat_jax import hf_tokenizer, models, vocabularies
from cat_jax.cascade.speculative import ALPHA_EXTREMES, report

pytestmark = pytest.mark.slow  # imports, two trainings and two decoding jobs: minutes on CPU

FIXTURES = REPO / "tests" / "fixtures" / "hf_decoder"
MIXTURE = "offline_mix"
TASKS = ("cmudict_g2p", "cmudict_syllables", "num2words_fr", "num2words_de")
BLEU_TASKS = ("num2words_fr", "num2words_de")
PER_TASK = 8
LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"
SMALL = ("gemma", "tiny", "t5")  # tiny: a decoder trained on gemma's tokenizer; t5: on bytes
DECODERS = ("large", "gemma", "tiny")


def _import(source: str, model_dir) -> None:
    run_module(
        "cat_jax.import_checkpoint",
        [
            "--gin_file=gin_configs/runs/import_checkpoint.gin",
            f"--gin.SOURCE='{FIXTURES / source}'",
            f"--gin.MODEL_DIR='{model_dir}'",
        ],
    )


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The Hub fixtures imported: gemma2 (the large model), gemma (its tokenizer), qwen2 (another)."""
    root = tmp_path_factory.mktemp("decoder_hub_models")
    dirs = {name: root / name for name in ("large", "gemma", "qwen2")}
    for source, name in (("gemma2", "large"), ("gemma", "gemma"), ("qwen2", "qwen2")):
        _import(source, dirs[name])
    return dirs


@pytest.fixture(scope="module")
def model_dirs(imported, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_cascade_models")
    dirs = {**imported, "tiny": root / "tiny", "t5": root / "t5"}
    trainings = (
        (
            "train_small_ce.gin",
            dirs["tiny"],
            (
                "--gin_file=gin_configs/models/decoder/decoder_tiny.gin",
                f"--gin.get_vocabulary.from_model_dir='{dirs['gemma']}'",
                f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
            ),
        ),
        ("train_small_ce.gin", dirs["t5"], ("--gin_file=gin_configs/models/tiny.gin",)),
    )
    with ThreadPoolExecutor(2) as pool:  # the two runs overlap their start-up and compilation
        runs = [
            pool.submit(run_module, "cat_jax.train", train_args(run_file, model_dir, 2, *extra))
            for run_file, model_dir, extra in trainings
        ]
        for run in runs:
            run.result()
    return dirs


def _cascade_args(model_dirs, output_dir, *extra: str) -> list[str]:
    smalls = {name: str(model_dirs[name]) for name in SMALL}
    return [
        "--gin_file=gin_configs/runs/cascade_eval.gin",
        f"--gin.load_split.cache_dir='{DATA_CACHE}'",
        f"--gin.get_vocabulary.from_model_dir='{model_dirs['large']}'",  # the task in the decoders' tokens
        f"--gin.LARGE_MODEL_DIR='{model_dirs['large']}'",
        f"--gin.SMALL_MODEL_DIRS={smalls!r}",
        f"--gin.OUTPUT_DIR='{output_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        f"--gin.MAX_EXAMPLES={PER_TASK}",
        LENGTHS,
        "--gin.BATCH_SIZE=8",
        "--gin.run_cascade_eval.num_thresholds=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def outputs(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder_cascade_out")
    proc = run_module(
        "cat_jax.cascade_eval",
        _cascade_args(
            model_dirs,
            out,
            "--gin.run_cascade_eval.tiers=[['gemma', 'tiny'], ['large']]",
            "--gin.TARGET_DEFERRAL_RATE=0.3",
        ),
    )
    return out, proc


def test_every_rule_curve_ends_at_each_model_alone(outputs):
    out, proc = outputs
    rows = read_examples(out)
    assert list(rows) == ["large", *SMALL]
    assert all(len(r) == PER_TASK * len(TASKS) for r in rows.values())
    curves = read_curves(out)
    assert set(curves) == {(g, s, r) for g in (*TASKS, MIXTURE) for s in SMALL for r in LABELS}
    for (group, small, rule), points in curves.items():
        others = tuple(s for s in SMALL if s != small) if rule == "peer_agreement" else ()
        q0, f0, q1, f1 = expected_endpoints(
            rows, group, small, MIXTURE, BLEU_TASKS, others, embedding=rule == "post_hoc_embed"
        )
        first, last = points[0], points[-1]
        assert first["deferral_rate"] == 0.0 and last["deferral_rate"] == 1.0
        assert first["quality"] == pytest.approx(q0, abs=1e-9) and last["quality"] == pytest.approx(q1, abs=1e-9)
        assert first["relative_flops"] == pytest.approx(f0, rel=1e-9)
        assert last["relative_flops"] == pytest.approx(f1, rel=1e-9)
    # post_hoc reads each small decoder's mean final hidden state, post_hoc_embed the large model's
    # prompt representation: both recorded, for every example.
    hidden = np.load(out / "examples_hidden.npz")
    assert hidden["model0_embedding"].shape == (PER_TASK * len(TASKS), 16)  # gemma2's width
    assert hidden["model1"].shape == (PER_TASK * len(TASKS), 16) and np.isfinite(hidden["model1"]).all()
    assert "Decoded 32 validation examples with model 't5'" in proc.stderr


def _info(model_dir) -> dict:
    return json.loads((model_dir / "run_info.json").read_text())


def test_flops_are_each_models_own_count_of_its_own_tokens(outputs, model_dirs):
    """A decoder's prompt is its tokenizer's `tokenizer(prompt)` (gemma adds BOS, no EOS); T5's
    inputs are bytes then EOS. Each row's FLOPs: the model's forward pass at those lengths."""
    out, _ = outputs
    rows = read_examples(out)
    gemma_tokens = hf_tokenizer.HFTokenizerVocabulary(str(model_dirs["gemma"]))
    byte_tokens = vocabularies.ByteVocabulary()
    own = {name: models.from_run_info(_info(model_dirs[name])) for name in (*DECODERS, "t5")}
    differ = 0
    for i, large_row in enumerate(rows["large"]):
        prompt = len(gemma_tokens.encode_prompt(large_row["input"]))
        encoder = len(byte_tokens.encode(large_row["input"])) + 1
        assert prompt <= 32 and encoder <= 32  # nothing truncated: the lengths are the texts'
        differ += prompt != encoder
        for name, length in {**dict.fromkeys(DECODERS, prompt), "t5": encoder}.items():
            r = rows[name][i]
            assert r["id"] == large_row["id"] and r["input"] == large_row["input"]
            assert r["flops"] == own[name].forward_flops(length, len(r["token_logprobs"])), (name, r["id"])
        depth = own["large"].input_layers  # post_hoc_embed: the large prompt through every layer
        assert large_row["embedding_flops"] == own["large"].embedding_flops(float(prompt), depth)
        assert 0 < large_row["embedding_flops"] < own["large"].forward_flops(prompt, 1)
    assert differ > 0


def test_k_tier_ensemble_and_budget(outputs):
    out, _ = outputs
    tier_rows = json.loads((out / "tier_summary.json").read_text())
    assert sorted((r["task"], r["cascade"], r["rules"]) for r in tier_rows) == sorted(
        (g, "gemma+tiny > large", "abc") for g in (*TASKS, MIXTURE)
    )
    rows = read_examples(out)
    for r in tier_rows:
        alone = {a["tier"]: a for a in r["tiers_alone"]}
        assert alone["large"]["relative_flops"] == 1.0
        pick = lambda m, task=r["task"]: [x for x in rows[m] if task in (x["task"], MIXTURE)]
        ensemble = sum(x["flops"] for m in ("gemma", "tiny") for x in pick(m))
        assert alone["gemma+tiny"]["relative_flops"] == pytest.approx(ensemble / sum(x["flops"] for x in pick("large")))
        assert r["calibration"][0]["validation"]["deferral_rate"] <= 0.3 + 1e-12
    for r in json.loads((out / "summary.json").read_text()):
        (calibrated,) = r["calibration"]
        assert calibrated["budget"] == "deferral_rate" and calibrated["validation"]["deferral_rate"] <= 0.3 + 1e-12


def test_reanalysis_reproduces_the_live_run_byte_for_byte(outputs, tmp_path):
    out, _ = outputs
    proc = reanalyse(out, tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imported []" in proc.stdout
    for name in (*CURVE_FILES, *TIER_FILES, "cascade_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_cascade_refuses_a_model_without_run_info_before_decoding(model_dirs, tmp_path):
    dirs = {**model_dirs, "t5": tmp_path / "absent"}
    proc = run_module("cat_jax.cascade_eval", _cascade_args(dirs, tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{tmp_path / 'absent'!s}' has no run_info.json" in proc.stderr
    assert "Decoded" not in proc.stderr and not (tmp_path / "out").exists()


def _speculative_args(large, small, output_dir, *extra: str) -> list[str]:
    return [
        "--gin_file=gin_configs/runs/speculative_eval.gin",
        f"--gin.load_split.cache_dir='{DATA_CACHE}'",
        f"--gin.LARGE_MODEL_DIR='{large}'",
        f"--gin.SMALL_MODEL_DIRS={{'gemma': '{small}'}}",
        f"--gin.OUTPUT_DIR='{output_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        "--gin.MAX_EXAMPLES=4",
        LENGTHS,
        "--gin.BATCH_SIZE=8",
        *extra,
    ]


def test_speculative_eval_on_a_decoder_pair_writes_records_and_lossless_is_the_verifier(model_dirs, tmp_path):
    """The task in bytes, the pair in gemma's tokens (the split re-tokenized for them)."""
    out = tmp_path / "spec"
    proc = run_module(
        "cat_jax.speculative_eval",
        _speculative_args(
            model_dirs["large"],
            model_dirs["gemma"],
            out,
            "--gin.GAMMAS=[1, 3]",
            "--gin.run_speculative_eval.rules=['lossless', 'chow']",
            "--gin.run_speculative_eval.num_alphas=2",
            "--gin.run_speculative_eval.timing_repeats=1",
        ),
    )
    assert f"wrote {4 + 5 * 2 + 1} files to {out}" in proc.stdout
    records = report.read_examples(out / report.EXAMPLES)
    n = 4 * len(TASKS)
    assert len(records) == n * (2 + 2 * (1 + 2))  # two models alone; per gamma lossless and 2 chow alphas
    by_run = {}
    for r in records:
        by_run.setdefault((r["drafter"], r["rule"], r["gamma"], r["alpha"]), []).append(r)
    large = by_run[("large", "alone", 0, None)]
    gemma = by_run[("gemma", "alone", 0, None)]
    eos = hf_tokenizer.HFTokenizerVocabulary(str(model_dirs["large"])).eos_id
    for gamma in (1, 3):
        lossless = by_run[("gemma", "lossless", gamma, None)]
        assert [r["prediction_ids"] for r in lossless] == [r["prediction_ids"] for r in large]
        assert [r["prediction"] for r in lossless] == [r["prediction"] for r in large]
        for r in lossless:
            assert r["drafted"] == gamma * r["large_calls"] and 0 <= r["accepted"] <= r["drafted"]
            ids = r["prediction_ids"]
            assert 1 <= len(ids) <= 8 and (len(ids) == 8 or ids[-1] == eos)
        small_end = by_run[("gemma", "chow", gamma, ALPHA_EXTREMES["chow"][1])]  # the drafter's extreme
        assert [r["prediction_ids"] for r in small_end] == [r["prediction_ids"] for r in gemma]
    assert all(r["drafted"] is None for r in large) and large[0]["flops"] > 0


def test_speculative_eval_refuses_two_tokenizers_before_decoding(imported, tmp_path):
    proc = run_module(
        "cat_jax.speculative_eval",
        _speculative_args(imported["large"], imported["qwen2"], tmp_path / "out"),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ERROR: small model 'gemma'" in proc.stderr and "both must share one vocabulary" in proc.stderr
    assert "Qwen2Tokenizer" in proc.stderr and "GemmaTokenizerFast" in proc.stderr
    assert "Large model alone" not in proc.stderr and not (tmp_path / "out").exists()
