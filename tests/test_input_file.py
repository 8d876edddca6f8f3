"""`--gin.INPUT_FILE=FILE.jsonl`: a JSONL file of prompts as a one-off task for eval and infer, for
both model families (cat_jax/data/jsonl_source.py); bad files are named errors with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, run_module, train_args
from helpers import make_hub_checkpoint

SMALL = dict(emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
EXPECTED = json.loads((REPO / "tests" / "fixtures" / "hf_tokenizers" / "expected.json").read_text())


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny Llama imported from a Hub-style directory (llama3 tokenizer: BOS on every prompt)."""
    from cat_jax.jobs.import_checkpoint import import_checkpoint

    root = tmp_path_factory.mktemp("decoder")
    make_hub_checkpoint(root / "hub", 1, SMALL)
    import_checkpoint(source=str(root / "hub"), model_dir=str(root / "model"))
    return root / "model"


@pytest.mark.parametrize("name", sorted(k for k in EXPECTED if not k.startswith("_")))
def test_prompts_reach_a_decoder_as_transformers_tokenizer_gives_them(name, tmp_path):
    """The JSONL split's prompt rows (the decoder family's batch) equal transformers'
    `tokenizer(prompt)` input_ids recorded in tests/fixtures/hf_tokenizers/expected.json, for every
    recorded tokenizer (BOS or none, tokenizer.json or SentencePiece); a missing target is empty."""
    from cat_jax import models, vocabulary_store
    from cat_jax.data.jsonl_source import JsonlSource
    from cat_jax.data.source import load_split_from
    from cat_jax.hf_tokenizer import HFTokenizerVocabulary
    from cat_jax.models.decoder.config import DecoderConfig

    model_dir = tmp_path / "model"  # a MODEL_DIR's vocabulary record and files, as an import writes them
    model_dir.mkdir()
    tokenizer = HFTokenizerVocabulary(str(REPO / "tests" / "fixtures" / "hf_tokenizers" / name))
    record = vocabulary_store.write_vocabulary(str(model_dir), tokenizer)
    (model_dir / "run_info.json").write_text(json.dumps({"vocabulary_files": record}))
    cases = EXPECTED[name]["prompts"]
    source = JsonlSource.open(write_jsonl(tmp_path / "prompts.jsonl", [{"inputs": c["prompt"]} for c in cases]))
    assert source.task_name == "input_file:prompts" and not source.has_targets
    source.default_vocabulary_from(str(model_dir))
    # The data layer's inputs end in EOS (dropped by make_batch), so a room of the longest prompt + 1
    # holds every prompt whole, with or without a BOS.
    length = max(len(c["input_ids"]) for c in cases) + 1
    arrays = load_split_from(source, source.task_name, "test", {"inputs": length, "targets": 4})
    assert arrays.num_truncated_inputs == 0 and list(arrays.targets_text) == [""] * len(cases)
    vocab = vocabulary_store.model_vocabulary(str(model_dir))
    shape = dict(emb_dim=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, mlp_dim=8)
    batch = models.build(DecoderConfig(vocab_size=vocab.vocab_size, **shape)).make_batch(arrays.features, vocab)
    for r, case in enumerate(cases):
        assert batch["prompt_tokens"][r][batch["prompt_mask"][r] > 0].tolist() == case["input_ids"], case["prompt"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"inputs": "a"}', "not json {"], "line 2 is not JSON"),
        # The binary's handling is the same for every InputFileError: one case in the fast tier.
        pytest.param([{"inputs": "a"}, {"prompt": "b"}], "line 2 has no string 'inputs'", marks=pytest.mark.slow),
        pytest.param([], "holds no examples", marks=pytest.mark.slow),
    ],
)
def test_bad_input_files_are_named_errors_with_exit_2(lines, message, decoder_dir, tmp_path):
    from cat_jax.data.jsonl_source import read_lines
    from cat_jax.errors import InputFileError

    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = run_module(
        "cat_jax.infer",
        [
            "--gin_file=gin_configs/runs/infer.gin",
            f"--gin.CHECKPOINT_DIR='{decoder_dir}'",
            f"--gin.OUTPUT_FILE='{out}'",
            f"--gin.INPUT_FILE='{path}'",
        ],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"ERROR: INPUT_FILE {path}" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    with pytest.raises(InputFileError, match=message):
        read_lines(path)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("t5") / "model"
    run_module("cat_jax.train", train_args("train_small_ce.gin", model_dir, 1))
    return model_dir


ROWS = [{"inputs": "hello", "targets": "2"}, {"inputs": "cascade", "targets": "2"}, {"inputs": "a"}]


def _infer_and_eval(model_dir, tmp_path, rows, *extra):
    from cat_jax import vocabulary_store

    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    common = [f"--gin.CHECKPOINT_DIR='{model_dir}'", f"--gin.INPUT_FILE='{path}'", "--gin.BATCH_SIZE=4", *extra]
    out = tmp_path / "preds.jsonl"
    infer = run_module(
        "cat_jax.infer", ["--gin_file=gin_configs/runs/infer.gin", *common, f"--gin.OUTPUT_FILE='{out}'"]
    )
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["input"] for p in preds] == [r["inputs"] for r in rows]
    assert [p["target"] for p in preds] == [r.get("targets", "") for r in rows]
    assert {p["task"] for p in preds} == {"input_file:prompts"}
    vocab = vocabulary_store.model_vocabulary(str(model_dir))
    for p in preds:
        assert len(p["prediction_ids"]) == len(p["token_logprobs"]) >= 1
        assert vocab.decode(p["prediction_ids"]) == p["prediction"]
        assert np.all(np.asarray(p["token_logprobs"]) <= 0)
    evaluation = run_module(
        "cat_jax.eval", ["--gin_file=gin_configs/runs/eval.gin", *common, f"--gin.OUTPUT_DIR='{tmp_path / 'eval'}'"]
    )
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "eval").glob("metrics_*.json")]
    return infer, evaluation, preds, result


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_eval_and_infer_read_an_input_file(family, request, tmp_path):
    model_dir = request.getfixturevalue(f"{family}_dir")
    # The imported decoder records no training lengths: they are given; the T5 run's are its own.
    extra = [] if family == "t5" else ["--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"]
    _, _, preds, result = _infer_and_eval(model_dir, tmp_path, ROWS, *extra)
    assert result["num_examples"] == 3
    exact = [float(p["prediction"].split() == p["target"].split()) for p in preds]
    assert result["metrics"] == {"input_file:prompts": {"exact_match": pytest.approx(100 * np.mean(exact))}}


@pytest.mark.slow
def test_an_input_file_without_targets_has_no_metrics_and_long_prompts_are_reported(decoder_dir, tmp_path):
    rows = [{"inputs": "short"}, {"inputs": "a prompt far longer than the sixteen tokens the run allows it"}]
    infer, evaluation, preds, result = _infer_and_eval(
        decoder_dir, tmp_path, rows, "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}"
    )
    assert result["metrics"] == {"input_file:prompts": {}} and result["no_metrics"] == ["input_file:prompts"]
    assert "No metrics for input_file:prompts: its examples have no targets" in evaluation.stderr
    for proc in (infer, evaluation):
        assert "1 of 2 examples have inputs longer than 16 tokens" in proc.stderr
    assert result["num_truncated"] == {"inputs": 1, "targets": 0}


@pytest.mark.slow
def test_cascade_eval_and_speculative_eval_read_an_input_file(t5_dir, tmp_path):
    """The cascade jobs take INPUT_FILE as eval and infer do: the file's examples, each model's
    prediction equal to infer's (one model as large and small: greedy decoding is deterministic); a
    file without targets cannot be scored and is refused with exit 2 before anything is decoded."""
    rows = ROWS[:2]
    _, _, preds, _ = _infer_and_eval(t5_dir, tmp_path, rows)
    path = str(tmp_path / "prompts.jsonl")
    common = [
        f"--gin.LARGE_MODEL_DIR='{t5_dir}'",
        f"--gin.SMALL_MODEL_DIRS={{'ce': '{t5_dir}'}}",
        f"--gin.INPUT_FILE='{path}'",
        "--gin.TASK_FEATURE_LENGTHS=None",  # the large model's, as for infer
        "--gin.BATCH_SIZE=4",
    ]
    run_module(
        "cat_jax.cascade_eval",
        [
            "--gin_file=gin_configs/runs/cascade_eval.gin",
            *common,
            "--gin.run_cascade_eval.rules=['chow_average', 'entropy_mean', 'oracle']",  # no rule learned on a split
            f"--gin.OUTPUT_DIR='{tmp_path / 'cascade'}'",
        ],
    )
    records = [json.loads(line) for line in (tmp_path / "cascade" / "examples.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in records) == ["ce", "ce", "large", "large"]
    for r in records:
        assert r["task"] == "input_file:prompts"
        assert r["prediction"] == preds[[p["input"] for p in preds].index(r["input"])]["prediction"]
    run_module(
        "cat_jax.speculative_eval",
        [
            "--gin_file=gin_configs/runs/speculative_eval.gin",
            *common,
            "--gin.GAMMAS=[2]",
            f"--gin.OUTPUT_DIR='{tmp_path / 'speculative'}'",
        ],
    )
    spec = [json.loads(line) for line in (tmp_path / "speculative" / "examples.jsonl").read_text().splitlines()]
    assert {r["task"] for r in spec} == {"input_file:prompts"}
    by_input = {p["id"]: p["prediction"] for p in preds}
    for r in spec:
        if r["rule"] == "alone":
            assert r["prediction"] == by_input[r["id"]]

    write_jsonl(tmp_path / "no_targets.jsonl", [{"inputs": "hello"}])
    proc = run_module(
        "cat_jax.cascade_eval",
        [
            "--gin_file=gin_configs/runs/cascade_eval.gin",
            *common[:2],
            f"--gin.INPUT_FILE='{tmp_path / 'no_targets.jsonl'}'",
            f"--gin.OUTPUT_DIR='{tmp_path / 'refused'}'",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "has none" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "refused").exists()
