"""`python -m cat_jax.cascade_eval` end to end on tiny checkpoints, and its configuration errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from cascade_helpers import LABELS, expected_endpoints, read_curves, read_examples, reanalyse, total
from conftest import DATA_CACHE, run_module, train_args
from tolerances import DEEP, assert_close

from cat_jax import data, metrics, partitioning
from cat_jax.cascade.analysis import analyse as analyse_records
from cat_jax.cascade.plan import LARGE, AnalysisConfig, Options
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import CheckpointError, ConfigError
from cat_jax.evaluation import Predictions, load_split
from cat_jax.frozen_model import load_frozen_model
from cat_jax.jobs import cascade_analyse as analyse
from cat_jax.jobs.cascade_eval import Decoded, run_cascade_eval, split_records
from cat_jax.models.t5 import T5Config, Transformer, encoder_flops, encoder_layers_flops, forward_flops

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

MIXTURE = "offline_mix"
TASKS = ("cmudict_g2p", "cmudict_syllables", "num2words_fr", "num2words_de")
BLEU_TASKS = ("num2words_fr", "num2words_de")
PER_TASK = 8
SMALL = ("ce", "ce2")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade_models")
    dirs = {"large": root / "large", "ce": root / "ce", "ce2": root / "ce2"}
    for name, run_file, steps in (
        ("large", "train_large.gin", 3),
        ("ce", "train_small_ce.gin", 2),
        ("ce2", "train_small_ce.gin", 3),
    ):
        run_module("cat_jax.train", train_args(run_file, dirs[name], steps, "--gin_file=gin_configs/models/tiny.gin"))
    return dirs


def _eval_args(model_dirs, output_dir, *extra: str) -> list[str]:
    smalls = {name: str(model_dirs[name]) for name in SMALL}
    return [
        "--gin_file=gin_configs/runs/cascade_eval.gin",
        "--gin_file=gin_configs/models/tiny.gin",
        f"--gin.load_split.cache_dir='{DATA_CACHE}'",
        f"--gin.LARGE_MODEL_DIR='{model_dirs['large']}'",
        f"--gin.SMALL_MODEL_DIRS={smalls!r}",
        f"--gin.OUTPUT_DIR='{output_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        f"--gin.MAX_EXAMPLES={PER_TASK}",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        "--gin.BATCH_SIZE=8",
        "--gin.run_cascade_eval.num_thresholds=5",
        *extra,
    ]


# The live run of the fixture also draws a 3-tier cascade and calibrates a deferral-rate budget.
TIERS = "--gin.run_cascade_eval.tiers=[['ce'], ['ce2'], ['large']]"
TARGET = "--gin.TARGET_DEFERRAL_RATE=0.3"
COMPARED = (
    "curves.csv",
    "curves.json",
    "summary.json",
    "summary.md",
    "tier_curves.csv",
    "tier_curves.json",
    "tier_summary.json",
)


@pytest.fixture(scope="module")
def outputs(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade_out")
    proc = run_module("cat_jax.cascade_eval", _eval_args(model_dirs, out, TIERS, TARGET))
    return out, proc


def test_examples_jsonl_has_every_model_and_example(outputs):
    out, proc = outputs
    rows = read_examples(out)
    assert list(rows) == ["large", *SMALL]
    fields = {
        "model",
        "id",
        "task",
        "input",
        "target",
        "prediction",
        "scored_target",
        "scored_prediction",
        "token_logprobs",
        "token_entropies",
        "token_margins",
        "quality",
        "flops",
        "embedding_flops",
    }
    for model_rows in rows.values():
        assert len(model_rows) == PER_TASK * len(TASKS)
        assert sorted({r["task"] for r in model_rows}) == sorted(TASKS)
        for r in model_rows:
            assert set(r) == fields
            assert r["quality"] in (0.0, 1.0) and r["flops"] > 0
            assert 1 <= len(r["token_logprobs"]) <= 8
            assert len(r["token_logprobs"]) == len(r["token_entropies"]) == len(r["token_margins"])
            assert all(0 <= m <= 1 for m in r["token_margins"])
            assert all(lp <= 0 for lp in r["token_logprobs"]) and all(h >= 0 for h in r["token_entropies"])
    assert [r["id"] for r in rows["ce"]] == [r["id"] for r in rows["large"]]
    # config, test and validation records (each with its hidden states), 4 + 3 curve and summary
    # files, and per group (5) 1 by-model, 2 by-rule and 1 k-tier plot: 1 + 4 + 7 + 20.
    assert f"wrote 32 files to {out}" in proc.stdout
    assert "Decoded 32 test examples with model 'ce2'" in proc.stderr
    assert "Decoded 32 validation examples with model 'ce2'" in proc.stderr
    validation = [json.loads(line) for line in (out / "validation_examples.jsonl").read_text().splitlines()]
    assert len(validation) == 3 * 32 and {r["model"] for r in validation} == {"large", *SMALL}


def _config(model_dir) -> T5Config:
    return T5Config.from_dict(json.loads((model_dir / "run_info.json").read_text())["model_config"])


def test_flops_count_actual_input_and_decoded_lengths(outputs, model_dirs):
    out, _ = outputs
    vocab = data.get_vocabulary_of(MIXTURE)
    config, large = _config(model_dirs["ce"]), _config(model_dirs["large"])
    rows = read_examples(out)
    for r, large_row in zip(rows["ce"], rows["large"]):
        input_length = min(len(vocab.encode(r["input"])) + 1, 32)  # EOS included, capped at Li
        assert r["flops"] == forward_flops(config, input_length, len(r["token_logprobs"]))
        assert r["embedding_flops"] is None
        # post_hoc_embed's embedding: all of the large encoder's layers (no cross-attention k/v).
        assert large_row["embedding_flops"] == encoder_layers_flops(large, input_length, large.num_encoder_layers)
        assert 0 < large_row["embedding_flops"] < encoder_flops(large, input_length)
    assert len({r["flops"] for r in rows["ce"]}) > 1
    assert json.loads((out / "cascade_config.json").read_text())["options"]["embed_layer"] == large.num_encoder_layers


def test_large_embedding_is_its_mean_encoder_output(outputs, model_dirs):
    """The recorded embedding: the large encoder's output averaged over each input's real tokens."""
    out, _ = outputs
    frozen = load_frozen_model(
        str(model_dirs["large"]), mesh=partitioning.make_mesh(), rules=partitioning.logical_axis_rules()
    )
    split = load_split(DatasetConfig(MIXTURE, {"inputs": 32, "targets": 8}, max_examples=PER_TASK), "test")
    tokens = split.arrays.features["encoder_input_tokens"]
    hidden = np.asarray(
        frozen.model.network.apply(
            {"params": frozen.params}, tokens, frozen.config.num_encoder_layers, method=Transformer.encoder_hidden
        ),
        np.float64,
    )
    mask = (tokens > 0)[..., None]
    expected = (hidden * mask).sum(1) / mask.sum(1)
    recorded = np.load(out / "examples_hidden.npz")["model0_embedding"]
    assert recorded.shape == (PER_TASK * len(TASKS), frozen.config.emb_dim)
    assert_close(recorded, expected, DEEP)  # the encoder in another batch shape: another program


def test_curve_endpoints_match_the_examples(outputs):
    out, _ = outputs
    rows = read_examples(out)
    curves = read_curves(out)
    assert set(curves) == {(g, s, r) for g in (*TASKS, MIXTURE) for s in SMALL for r in LABELS}
    checked = 0
    for (group, small, rule), points in curves.items():
        others = tuple(s for s in SMALL if s != small) if rule == "peer_agreement" else ()
        q0, f0, q1, f1 = expected_endpoints(
            rows, group, small, MIXTURE, BLEU_TASKS, others, embedding=rule == "post_hoc_embed"
        )
        first, last = points[0], points[-1]
        assert first["deferral_rate"] == 0.0 and last["deferral_rate"] == 1.0 and last["threshold"] is None
        assert first["quality"] == pytest.approx(q0, abs=1e-9)
        assert last["quality"] == pytest.approx(q1, abs=1e-9)
        assert first["relative_flops"] == pytest.approx(f0, rel=1e-9)
        assert last["relative_flops"] == pytest.approx(f1, rel=1e-9)
        assert 2 <= len(points) <= 5  # num_thresholds=5
        rates = [p["deferral_rate"] for p in points]
        assert rates == sorted(rates)
        checked += 1
    assert checked == 5 * 2 * len(LABELS)
    with open(out / "curves.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == sum(len(p) for p in curves.values())
    assert set(csv_rows[0]) == {
        "task",
        "small_model",
        "rule",
        "threshold",
        "deferral_rate",
        "relative_flops",
        "quality",
    }


def test_summaries_and_plots(outputs):
    out, _ = outputs
    records = json.loads((out / "summary.json").read_text())
    assert len(records) == 5 * 2 * len(LABELS)
    curves = read_curves(out)
    for r in records:
        points = curves[(r["task"], r["small_model"], r["rule"])]
        assert r["small_only"] == points[0]["quality"] and r["large_only"] == points[-1]["quality"]
        assert r["best_quality"] == max(p["quality"] for p in points)
        assert r["relative_flops_to_match_large"] <= points[-1]["relative_flops"]
    md = (out / "summary.md").read_text()
    for group in (*TASKS, MIXTURE):
        assert f"## {group}\n" in md
    assert "| ce | chow_average |" in md
    for group in (*TASKS, MIXTURE):
        for name in (
            f"{group}__by_model__chow_average.png",
            f"{group}__by_rule__ce.png",
            f"{group}__by_rule__ce2.png",
            f"{group}__tiers.png",
        ):
            assert (out / name).read_bytes().startswith(PNG), name
    assert len(list(out.glob("*.png"))) == 4 * 5
    for r in records:  # AUC-DF against random deferral's straight line
        assert r["auc_df_random"] == pytest.approx((r["small_only"] + r["large_only"]) / 2)
        assert r["auc_df_gain"] == pytest.approx(r["auc"] - r["auc_df_random"])
        (calibrated,) = r["calibration"]
        assert calibrated["budget"] == "deferral_rate" and calibrated["target"] == 0.3
        assert calibrated["validation"]["deferral_rate"] <= 0.3 + 1e-12
    assert "Budget calibration" in md and "k-tier cascades" in md and "| ce > ce2 > large |" in md


def test_three_tier_cascade_costs_match_the_examples(outputs):
    out, _ = outputs
    rows = read_examples(out)
    tier_rows = json.loads((out / "tier_summary.json").read_text())
    assert sorted((r["task"], r["cascade"], r["rules"]) for r in tier_rows) == sorted(
        (g, "ce > ce2 > large", "chow_average > chow_average") for g in (*TASKS, MIXTURE)
    )
    curves = {c["task"]: c["points"] for c in json.loads((out / "tier_curves.json").read_text())}
    for r in tier_rows:
        pick = {m: [x for x in rows[m] if r["task"] in (x["task"], MIXTURE)] for m in rows}
        large = total(pick["large"], "flops")
        alone = {a["tier"]: a for a in r["tiers_alone"]}
        assert alone["ce"]["relative_flops"] == pytest.approx(total(pick["ce"], "flops") / large)
        assert alone["large"]["relative_flops"] == 1.0
        points = curves[r["task"]]
        assert (
            points[0]["exit_shares"] == [1.0, 0.0, 0.0] and points[0]["relative_flops"] == alone["ce"]["relative_flops"]
        )
        assert [p["relative_flops"] for p in points] == sorted(p["relative_flops"] for p in points)
        # Each point's FLOPs: every model run on the examples that reached it (ce always).
        for p in points:
            assert p["relative_flops"] >= alone["ce"]["relative_flops"] * (1 - 1e-12)
            assert p["relative_latency"] == pytest.approx(p["relative_flops"])  # one model per tier
        assert len(r["calibration"]) == 1 and r["calibration"][0]["validation"]["deferral_rate"] <= 0.3 + 1e-12


def test_reanalysis_reproduces_the_live_run_byte_for_byte(outputs, tmp_path):
    """`python -m cat_jax.cascade_analyse` from the records alone, without TensorFlow or seqio."""
    out, _ = outputs
    again = tmp_path / "again"
    proc = reanalyse(out, again)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imported []" in proc.stdout
    for name in COMPARED:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert (again / "cascade_config.json").read_bytes() == (out / "cascade_config.json").read_bytes()
    assert sorted(p.name for p in again.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))


def test_reanalysis_with_a_new_budget_and_missing_records(outputs, tmp_path):
    out, _ = outputs
    files = analyse.run(
        [
            str(out),
            "--output_dir",
            str(tmp_path / "b"),
            "--rules",
            "chow_average,oracle",
            "--target_relative_flops",
            "0.5",
        ]
    )
    assert str(tmp_path / "b" / "summary.json") in files
    rows = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert {r["rule"] for r in rows} == {"chow_average", "oracle"}
    assert [[c["budget"] for c in r["calibration"]] for r in rows] == [["deferral_rate", "relative_flops"]] * len(rows)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "validation_examples.jsonl").unlink()
    assert analyse.main([str(copy), "--output_dir", str(tmp_path / "c")]) == 2
    with pytest.raises(ConfigError, match="validation_examples.jsonl does not exist"):
        analyse.run([str(copy)])
    bare = tmp_path / "bare"  # records without the large model's embeddings
    shutil.copytree(out, bare)
    for name in ("examples_hidden.npz", "validation_examples_hidden.npz"):
        hidden = dict(np.load(bare / name))
        del hidden["model0_embedding"]
        np.savez(bare / name, **hidden)
    with pytest.raises(ConfigError, match="post_hoc_embed needs the large model's input embeddings"):
        analyse.run([str(bare), "--output_dir", str(tmp_path / "d")])
    assert analyse.run(
        [str(bare), "--output_dir", str(tmp_path / "d"), "--rules", "post_hoc,chow_sum", "--plot_rule", "post_hoc"]
    )


def test_unknown_rule_exits_with_the_known_rules(tmp_path):
    proc = run_module(
        "cat_jax.cascade_eval",
        _eval_args(
            {name: tmp_path / "absent" for name in ("large", *SMALL)},
            tmp_path / "out",
            "--gin.run_cascade_eval.rules=['chow_average', 'chow_avg']",
        ),
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown deferral rules ['chow_avg']" in proc.stderr and "chow_quantile" in proc.stderr
    assert not (tmp_path / "out").exists()


def _run(tmp_path, **kwargs):
    args = dict(
        large_model_dir=str(tmp_path / "large"),
        small_model_dirs={"ce": str(tmp_path / "ce")},
        dataset=DatasetConfig("cmudict_syllables", {"inputs": 32, "targets": 8}),
        output_dir=str(tmp_path / "out"),
    )
    return run_cascade_eval(**{**args, **kwargs})


def _write_run_info(model_dir, vocabulary, vocab_size):
    model_dir.mkdir()
    (model_dir / "run_info.json").write_text(
        json.dumps({"vocabulary": vocabulary, "model_config": {"vocab_size": vocab_size}})
    )


def test_configuration_errors_before_decoding(tmp_path):
    with pytest.raises(ConfigError, match="small_model_dirs=.* must name one or more"):
        _run(tmp_path, small_model_dirs={})
    with pytest.raises(ConfigError, match=r"plot_rule='chow_quantile'.*chow_quantile_0\.1"):
        _run(tmp_path, plot_rule="chow_quantile")
    with pytest.raises(ConfigError, match="quantiles"):
        _run(tmp_path, quantiles=[0.5, 2.0])
    with pytest.raises(ConfigError, match=r"tiers=.*unknown: \['cat'\]"):
        _run(tmp_path, tiers=[["ce"], ["cat"], ["large"]])
    with pytest.raises(ConfigError, match="TARGET_DEFERRAL_RATE"):
        _run(tmp_path, target_deferral_rate=-0.1)
    with pytest.raises(CheckpointError, match="large"):
        _run(tmp_path)
    _write_run_info(tmp_path / "large", {"class": "ByteVocabulary", "size": 259}, 384)
    _write_run_info(tmp_path / "ce", {"class": "ByteVocabulary", "size": 300}, 384)
    # Models with different vocabularies make a cascade (each reads the text in its own tokens).
    with pytest.raises(CheckpointError, match="large holds no finished checkpoint"):
        _run(tmp_path)
    assert not (tmp_path / "out").exists()


def test_every_model_dir_is_checked_before_any_decoding(model_dirs, tmp_path):
    """A small model dir with run_info.json but no finished checkpoint stops the job before the large
    model (whose checkpoint is fine) is decoded."""
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(model_dirs["ce"] / "run_info.json", unfinished / "run_info.json")
    (unfinished / "3.orbax-checkpoint-tmp-0").mkdir()  # an interrupted save is not a checkpoint
    proc = run_module(
        "cat_jax.cascade_eval",
        _eval_args({"large": model_dirs["large"], "ce": model_dirs["ce"], "ce2": unfinished}, tmp_path / "out"),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{unfinished} holds no finished checkpoint" in proc.stderr
    assert "Decoded" not in proc.stderr and not (tmp_path / "out").exists()


def _fake_decoded(split, texts, seed):
    """Decoded outputs with the given prediction texts, 2 tokens each and 1000 FLOPs per input token."""
    n = len(texts)
    rng = np.random.default_rng(seed)
    logprobs = np.zeros((n, 4), np.float32)
    logprobs[:, :2] = -rng.random((n, 2))
    preds = Predictions(
        tokens=np.ones((n, 4), np.int32),
        logprobs=logprobs,
        entropies=-logprobs,
        margins=-logprobs,
        lengths=np.full(n, 2, np.int32),
        mean_hidden=rng.normal(size=(n, 3)).astype(np.float32),
        texts=list(texts),
    )
    return Decoded(preds, 1000.0 * split.arrays.input_lengths.astype(float))


def test_records_and_curves_on_known_predictions():
    """Large always right, small right on even rows only; same FLOPs for both (F_S / F_L = 1)."""
    dataset = DatasetConfig(MIXTURE, {"inputs": 32, "targets": 8}, max_examples=4)
    split = load_split(dataset, "validation")
    targets = [str(t) for t in split.arrays.targets_text]
    small_texts = [t if i % 2 == 0 else f"{t} extra" for i, t in enumerate(targets)]
    decoded = {LARGE: _fake_decoded(split, targets, 0), "ce": _fake_decoded(split, small_texts, 1)}
    records, _ = split_records(split, decoded)
    assert records.models[LARGE].quality.tolist() == [1.0] * 16
    assert records.models["ce"].quality.tolist() == [1.0, 0.0] * 8
    corpus = {task: metrics.get_quality(task).corpus for task in TASKS}
    config = AnalysisConfig(
        MIXTURE, "validation", None, {LARGE: "-", "ce": "-"}, Options(rules=("oracle", "chow_average")), {}
    )
    analysis = analyse_records(config, records, None, corpus)
    for group in (*TASKS, MIXTURE):
        rows = [i for i, t in enumerate(split.arrays.task_names) if group in (t, MIXTURE)]
        oracle = analysis.curves[(group, "ce", "oracle")]
        if group in BLEU_TASKS:
            refs = [targets[i] for i in rows]
            small_q = metrics.corpus_bleu(refs, [small_texts[i] for i in rows])
            assert oracle[0].quality == pytest.approx(small_q)
            # sacrebleu gives 0 to perfect one-word German hypotheses: no 4-grams to match.
            assert oracle[-1].quality == pytest.approx(metrics.corpus_bleu(refs, refs))
            if group == "num2words_fr":
                assert 0 < small_q < 100 and oracle[-1].quality == pytest.approx(100.0)
        else:
            assert oracle[0].quality == 0.5 and oracle[-1].quality == 1.0
        assert [p.deferral_rate for p in oracle] == [0.0, 0.5, 1.0]  # scores -1 (odd rows) then 0
        if group != "num2words_de":
            assert oracle[1].quality == pytest.approx(oracle[-1].quality)
        flops = split.arrays.input_lengths[rows].astype(float)
        odd = flops[[r % 2 == 1 for r in rows]].sum()  # the rows the oracle defers
        assert oracle[1].relative_flops == pytest.approx(1.0 + odd / flops.sum())
        assert analysis.standalone[(group, "ce")][0].relative_flops == pytest.approx(1.0)
    assert analysis.metric_names["num2words_fr"].startswith("BLEU")
    assert analysis.metric_names[MIXTURE] == "mean per-example quality"
