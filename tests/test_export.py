"""Exported splits (`python -m cat_jax.export_task`, `data_source.exported_dir`): the same arrays,
batches, vocabulary and metrics as the live seqio pipeline, and the binaries on a host where
TensorFlow and seqio cannot be imported."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import gin
import numpy as np
import pytest
from conftest import REPO, SUBPROCESS_ENV, TINY_TASK, run_module, train_args

from cat_jax import data, evaluation, model_dir, vocabularies
from cat_jax.errors import ExportedDataError, UnknownTaskError
from cat_jax.jobs import export_task as data_export

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

LENGTHS = {"inputs": 32, "targets": 8}  # TINY_ARGS' lengths
TRAIN_CAP = 256  # TINY_ARGS' DatasetConfig.max_examples
MIX_LENGTHS = {"inputs": 16, "targets": 12}
MIX_CAP = 24
BLOCKED = ("tensorflow", "seqio", "tensorflow_datasets", "tensorflow_text")

# Runs `python -m <module> args` with TensorFlow and seqio unimportable (a host without them).
TF_FREE_RUNNER = textwrap.dedent(f"""
    import runpy, sys
    for name in {BLOCKED!r}:
        sys.modules[name] = None  # `import name` raises ImportError
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


@contextlib.contextmanager
def exported_source(path, setting="exported_dir"):
    """`--gin.data_source.exported_dir=path` (or `setting`: streaming_dir) for the duration."""
    with gin.unlock_config():
        gin.bind_parameter(f"data_source.{setting}", str(path))
    try:
        yield
    finally:
        with gin.unlock_config():
            gin.bind_parameter(f"data_source.{setting}", None)


def run_tf_free(module: str, args: list[str], tmp_path, check: bool = True) -> subprocess.CompletedProcess:
    runner = tmp_path / "tf_free_runner.py"
    runner.write_text(TF_FREE_RUNNER)
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.run(
        [sys.executable, str(runner), module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} (TensorFlow unimportable) exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def assert_arrays_equal(a: data.ExampleArrays, b: data.ExampleArrays) -> None:
    assert sorted(a.features) == sorted(b.features)
    for k in a.features:
        assert a.features[k].dtype == b.features[k].dtype, k
        np.testing.assert_array_equal(a.features[k], b.features[k], err_msg=k)
    for f in data.TEXT_FIELDS + data.LENGTH_FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def assert_batches_equal(
    live: data.ExampleArrays, exp: data.ExampleArrays, batch_size: int, steps: int, live_rates, exp_rates
) -> None:
    a = data.TrainBatches(live, batch_size, seed=3, rates=live_rates)
    b = data.TrainBatches(exp, batch_size, seed=3, rates=exp_rates)
    for step in range(steps):
        x, y = a.batch(step), b.batch(step)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {step} {k}")


def assert_eval_batches_equal(live: data.ExampleArrays, exp: data.ExampleArrays, batch_size: int) -> None:
    pairs = list(zip(data.eval_batches(live, batch_size), data.eval_batches(exp, batch_size), strict=True))
    assert pairs
    for (x, xm), (y, ym) in pairs:
        np.testing.assert_array_equal(xm, ym)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """TINY_TASK's train and validation splits, exported through the real entry point."""
    out = tmp_path_factory.mktemp("exported_task")
    proc = run_module(
        "cat_jax.export_task",
        [
            "--gin_file=gin_configs/runs/export_task.gin",
            f"--gin.MIXTURE_OR_TASK_NAME={TINY_TASK}",
            "--gin.SPLIT=['train', 'validation']",
            f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
            f"--gin.MAX_EXAMPLES={TRAIN_CAP}",
            f"--gin.EXPORT_DIR={out}",
        ],
    )
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(m["name"], m["split"], m["num_examples"]) for m in lines] == [
        (TINY_TASK, "train", TRAIN_CAP),
        (TINY_TASK, "validation", TRAIN_CAP),
    ]
    return out


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("exported_mix")
    data_export.export_split("offline_mix", ["train", "validation"], MIX_LENGTHS, str(out), max_examples=MIX_CAP)
    return out


def test_export_writes_arrays_and_manifest(task_dir):
    names = sorted(os.listdir(task_dir))
    assert names == [f"{TINY_TASK}.{s}.{e}" for s in ("train", "validation") for e in ("json", "npz")]
    manifest = json.loads((task_dir / f"{TINY_TASK}.train.json").read_text())
    assert manifest["task_feature_lengths"] == LENGTHS and manifest["max_examples"] == TRAIN_CAP
    assert manifest["vocabulary"] == {
        "class": "ByteVocabulary",
        "size": 259,
        "eos_id": 1,
        "pad_id": 0,
        "unk_id": 2,
        "extra_ids": 0,
    }
    assert manifest["rates"] is None
    task = manifest["tasks"][TINY_TASK]
    assert task["postprocess_fn"] == "tasks.offline:postprocess_text"
    assert task["metric_fns"] == ["cat_jax.metrics:accuracy"]
    assert task["quality"] == {"per_example": "cat_jax.metrics:exact_match_scores", "corpus": None}
    assert "python -m cat_jax.export_task" in manifest["export_command"]
    loaded = data.ExampleArrays.load(str(task_dir / f"{TINY_TASK}.train.npz"))
    assert len(loaded) == TRAIN_CAP and loaded.extras.shape == (TRAIN_CAP,)


def test_task_arrays_and_batches_equal_live(task_dir):
    live_train = data.load_split(TINY_TASK, "train", LENGTHS, max_examples=TRAIN_CAP)
    live_val = data.load_split(TINY_TASK, "validation", LENGTHS, max_examples=16)
    with exported_source(task_dir):
        exp_train = data.load_split(TINY_TASK, "train", LENGTHS, max_examples=TRAIN_CAP)
        exp_val = data.load_split(TINY_TASK, "validation", LENGTHS, max_examples=16)  # below the cap
        assert data.mixture_rates(TINY_TASK) is None
    assert_arrays_equal(live_train, exp_train)
    assert_arrays_equal(live_val, exp_val)
    assert_batches_equal(live_train, exp_train, 8, 40, None, None)  # 32 steps an epoch: crosses one
    assert_eval_batches_equal(live_val, exp_val, 8)


def test_mixture_arrays_rates_and_batches_equal_live(mix_dir):
    live_rates = data.mixture_rates("offline_mix")
    live_train = data.load_split("offline_mix", "train", MIX_LENGTHS, max_examples=MIX_CAP)
    live_val = data.load_split("offline_mix", "validation", MIX_LENGTHS, max_examples=10)
    with exported_source(mix_dir):
        exp_rates = data.mixture_rates("offline_mix")
        exp_train = data.load_split("offline_mix", "train", MIX_LENGTHS, max_examples=MIX_CAP)
        exp_val = data.load_split("offline_mix", "validation", MIX_LENGTHS, max_examples=10)
        leaf = data.get_task_or_mixture("num2words_fr")  # a task exported inside the mixture
        assert leaf.name == "num2words_fr" and data.get_vocabulary_of("num2words_fr").eos_id == 1
    assert exp_rates == live_rates
    assert_arrays_equal(live_train, exp_train)
    assert_arrays_equal(live_val, exp_val)
    assert_batches_equal(live_train, exp_train, 16, 14, live_rates, exp_rates)
    assert_eval_batches_equal(live_val, exp_val, 16)


def test_byte_vocabulary_matches_seqio(task_dir):
    live = data.get_vocabulary_of(TINY_TASK)
    with exported_source(task_dir):
        exp = data.get_vocabulary_of(TINY_TASK)
    assert isinstance(exp, vocabularies.ByteVocabulary)
    assert model_dir.vocab_info(exp) == model_dir.vocab_info(live) == {"class": "ByteVocabulary", "size": 259}
    assert (exp.eos_id, exp.pad_id, exp.unk_id, exp.vocab_size) == (
        live.eos_id,
        live.pad_id,
        live.unk_id,
        live.vocab_size,
    )
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 300, size=12).tolist() for _ in range(50)]
    rows += [live.encode("héllo wörld ✓") + [1, 7, 8], [0, 0, 5, 2, 300], list(live.encode("日本"))[:-1]]
    for ids in rows:
        assert exp.decode(ids) == live.decode(ids)
        assert evaluation.detokenize(exp, np.array(ids)) == evaluation.detokenize(live, np.array(ids))
    assert exp.encode("héllo") == list(live.encode("héllo"))


def _tiny_sentencepiece(path):
    import sentencepiece

    lines = ["phonemes: hello", "HH AH0 L OW1", "french: 21", "vingt et un", "syllables: world"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=40,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_export_matches_seqio(tmp_path):
    model = _tiny_sentencepiece(tmp_path / "tiny.model")
    out = tmp_path / "exported"
    bindings = {"get_vocabulary.kind": "sentencepiece", "get_vocabulary.sentencepiece_model_path": str(model)}
    try:
        with gin.unlock_config():
            for k, v in bindings.items():
                gin.bind_parameter(k, v)
        live_vocab = data.get_vocabulary_of("num2words_fr")
        live = data.load_split("num2words_fr", "validation", MIX_LENGTHS, max_examples=8)
        data_export.export_split("num2words_fr", "validation", MIX_LENGTHS, str(out), max_examples=8)
    finally:
        with gin.unlock_config():
            gin.bind_parameter("get_vocabulary.kind", "byte")
            gin.bind_parameter("get_vocabulary.sentencepiece_model_path", None)
    manifest = json.loads((out / "num2words_fr.validation.json").read_text())
    copied = out / manifest["vocabulary"]["sentencepiece_model"]
    assert copied.exists() and manifest["vocabulary"]["source_model_file"] == str(model)
    with exported_source(out):
        exp_vocab = data.get_vocabulary_of("num2words_fr")
        exp = data.load_split("num2words_fr", "validation", MIX_LENGTHS, max_examples=8)
    assert isinstance(exp_vocab, vocabularies.SentencePieceVocabulary)
    assert_arrays_equal(live, exp)
    info = model_dir.vocab_info(exp_vocab)
    assert info == model_dir.vocab_info(live_vocab) and info["class"] == "SentencePieceVocabulary"
    assert "sentencepiece_sha256" in info and str(model) not in json.dumps(info)  # content, not path
    assert (exp_vocab.eos_id, exp_vocab.unk_id, exp_vocab.vocab_size) == (
        live_vocab.eos_id,
        live_vocab.unk_id,
        live_vocab.vocab_size,
    )
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids = rng.integers(0, live_vocab.vocab_size + 5, size=10).tolist()
        assert exp_vocab.decode(ids) == live_vocab.decode(ids)
    for row in exp.features["decoder_target_tokens"]:
        assert exp_vocab.decode(row.tolist()) == live_vocab.decode(row.tolist())


def test_errors_name_the_file_and_the_export_command(task_dir, tmp_path):
    with exported_source(task_dir):
        with pytest.raises(ExportedDataError) as missing:
            data.load_split(TINY_TASK, "test", LENGTHS)
        with pytest.raises(ExportedDataError) as lengths:
            data.load_split(TINY_TASK, "train", {"inputs": 64, "targets": 8}, max_examples=TRAIN_CAP)
        with pytest.raises(ExportedDataError) as cap:
            data.load_split(TINY_TASK, "train", LENGTHS)  # every example, but the export has 256
        with pytest.raises(UnknownTaskError, match="not exported"):
            data.get_task_or_mixture("offline_mix")
    assert str(task_dir / f"{TINY_TASK}.test.npz") in str(missing.value)
    assert "python -m cat_jax.export_task" in str(missing.value) and "--gin.SPLIT=test" in str(missing.value)
    assert "{'inputs': 32, 'targets': 8}" in str(lengths.value) and "{'inputs': 64, 'targets': 8}" in str(lengths.value)
    assert "max_examples=256" in str(cap.value) and "python -m cat_jax.export_task" in str(cap.value)
    with exported_source(tmp_path / "nowhere"):
        with pytest.raises(ExportedDataError, match="not a directory"):
            data.load_split(TINY_TASK, "train", LENGTHS)


def test_metrics_without_tensorflow_equal_live(mix_dir, tmp_path):
    """Task metrics on exported data in a process that cannot import TensorFlow or seqio (g2p's
    targets are lists of alternatives: they come from the postprocessed targets stored at export)."""
    live = data.load_split("offline_mix", "validation", MIX_LENGTHS, max_examples=MIX_CAP)
    texts = [t if i % 3 else "  wrong  " for i, t in enumerate(live.targets_text.tolist())]
    g2p = np.flatnonzero(live.task_names == "cmudict_g2p")
    alternatives = [i for i in g2p if "|" in json.loads(live.extras[i])["alternatives"]]
    for i in alternatives:  # a prediction equal to the second pronunciation counts as right
        texts[i] = json.loads(live.extras[i])["alternatives"].split("|")[1]
    expected = evaluation.task_metrics(live, texts)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = tmp_path / "metrics_tf_free.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None
        import gin
        from cat_jax import data, evaluation
        gin.bind_parameter("data_source.exported_dir", {str(mix_dir)!r})
        arrays = data.load_split("offline_mix", "validation", {MIX_LENGTHS!r}, max_examples={MIX_CAP})
        texts = json.load(open({str(tmp_path / "texts.json")!r}))
        print(json.dumps(evaluation.task_metrics(arrays, texts)))
        from cat_jax import metrics  # cascade_eval's per-example quality, registered from the manifest
        assert all(metrics.get_quality(t) for t in set(arrays.task_names.tolist()))
        assert metrics.get_quality("num2words_fr").corpus is metrics.corpus_bleu
        assert sys.modules["tensorflow"] is None and sys.modules["seqio"] is None
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, **SUBPROCESS_ENV),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.keys() == expected.keys()
    for task in expected:
        assert got[task] == pytest.approx(expected[task]), task
    assert "cannot be used here" in proc.stderr  # the postprocess_fn fallback is logged


def test_binaries_train_eval_infer_without_tensorflow(task_dir, tmp_path):
    model = tmp_path / "model"
    proc = run_tf_free(
        "cat_jax.train",
        train_args(
            "train_small_ce.gin", model, 4, "--gin.train.eval_period=4", f"--gin.data_source.exported_dir={task_dir}"
        ),
        tmp_path,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 4 and np.isfinite(summary["train"]["loss"])
    assert f"{TINY_TASK}/accuracy" in summary["eval"]
    assert "Loading cmudict_syllables/train from exported" in proc.stderr
    info = json.loads((model / "run_info.json").read_text())
    assert info["vocabulary"] == {"class": "ByteVocabulary", "size": 259}
    assert info["data_source"] == f"exported:{task_dir}"

    common = [
        f"--gin.CHECKPOINT_DIR={model}",
        f"--gin.MIXTURE_OR_TASK_NAME={TINY_TASK}",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.BATCH_SIZE=8",
        "--gin.MAX_EXAMPLES=16",
        "--gin.SPLIT=validation",
    ]
    tf_free_eval = run_tf_free(
        "cat_jax.eval",
        [
            "--gin_file=gin_configs/runs/eval.gin",
            *common,
            f"--gin.OUTPUT_DIR={tmp_path / 'eval_exported'}",
            f"--gin.data_source.exported_dir={task_dir}",
        ],
        tmp_path,
    )
    exported_metrics = json.loads(tf_free_eval.stdout)["metrics"]
    assert list(exported_metrics) == [TINY_TASK]

    out = tmp_path / "preds.jsonl"
    tf_free_infer = run_tf_free(
        "cat_jax.infer",
        [
            "--gin_file=gin_configs/runs/infer.gin",
            *common,
            f"--gin.OUTPUT_FILE={out}",
            f"--gin.data_source.exported_dir={task_dir}",
        ],
        tmp_path,
    )
    assert "wrote 16 predictions" in tf_free_infer.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    live_val = data.load_split(TINY_TASK, "validation", LENGTHS, max_examples=16)
    assert [r["id"] for r in rows] == live_val.ids.tolist()

    # The checkpoint trained on exported data serves the live seqio pipeline (same vocabulary
    # identity) and gives the same metrics there.
    live_eval = run_module(
        "cat_jax.eval", ["--gin_file=gin_configs/runs/eval.gin", *common, f"--gin.OUTPUT_DIR={tmp_path / 'eval_live'}"]
    )
    assert json.loads(live_eval.stdout)["metrics"] == exported_metrics


def test_tensorflow_free_host_without_the_switch_says_how_to_fix(tmp_path):
    """Without data_source.exported_dir the live pipeline needs seqio: the error says so."""
    proc = run_tf_free("cat_jax.train", train_args("train_small_ce.gin", tmp_path / "m", 1), tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--gin.data_source.exported_dir=DIR" in proc.stderr and "python -m cat_jax.export_task" in proc.stderr


OLD_EXPORTS = REPO / "tests" / "fixtures" / "old_exports"
OLD_LENGTHS = {"inputs": 16, "targets": 12}


def test_exports_written_by_an_earlier_cat_jax_still_load():
    """tests/fixtures/old_exports (offline_mix, 3 examples per task, written at commit 409bbd9):
    the .npz export loads as stored, the ArrayRecord export as the same examples and batches, both
    with the manifests' rates, vocabulary, postprocessed targets and metric fns."""
    manifest = json.loads((OLD_EXPORTS / "npz" / "offline_mix.validation.json").read_text())
    with np.load(OLD_EXPORTS / "npz" / "offline_mix.validation.npz", allow_pickle=False) as stored:
        stored = {k: stored[k] for k in stored.files}
    with exported_source(OLD_EXPORTS / "npz"):
        npz = data.load_split("offline_mix", "validation", OLD_LENGTHS, max_examples=3)
        npz_rates = data.mixture_rates("offline_mix")
        npz_vocab = data.get_vocabulary_of("offline_mix")
        npz_g2p = data.get_task_or_mixture("cmudict_g2p")
    with exported_source(OLD_EXPORTS / "array_record", "streaming_dir"):
        source = data.data_source()
        streamed = data.load_split("offline_mix", "validation", OLD_LENGTHS)
        stream_rates = data.mixture_rates("offline_mix")
        stream_vocab = data.get_vocabulary_of("offline_mix")
        stream_g2p = data.get_task_or_mixture("cmudict_g2p")
        batches = source.train_batches("offline_mix", "validation", OLD_LENGTHS, 6, 0, None, (0, 1))
    assert npz.ids.tolist() == stored["ids"].tolist() and len(npz) == 12
    for k in data.MODEL_FEATURES:
        np.testing.assert_array_equal(npz.features[k], stored[f"feature/{k}"], err_msg=k)
    assert_arrays_equal(npz, streamed)
    np.testing.assert_array_equal(npz.extras, streamed.extras)
    assert (
        npz_rates
        == stream_rates
        == manifest["rates"]
        == {"cmudict_g2p": 99284.0, "cmudict_syllables": 99284.0, "num2words_de": 15137.0, "num2words_fr": 15137.0}
    )
    assert (
        model_dir.vocab_info(npz_vocab)
        == model_dir.vocab_info(stream_vocab)
        == {"class": "ByteVocabulary", "size": 259}
    )
    rows = np.flatnonzero(npz.task_names == "cmudict_g2p")
    for task in (npz_g2p, stream_g2p):
        assert [fn.__name__ for fn in task.predict_metric_fns] == ["exact_match_any", "phoneme_error_rate"]
        targets = [task.postprocess_fn(npz.targets_text[i], example=npz.example(i), is_target=True) for i in rows]
        assert targets == [json.loads(stored["postprocessed_targets"][i]) for i in rows]
    picks = [batches.order[p] for p in range(6)]
    row_of = {i: k for k, i in enumerate(npz.ids.tolist())}
    ids = [streamed.ids[streamed.task_names == batches.tasks[t]][i] for t, i in picks]
    batch = batches.local_batch(0)
    for k in data.MODEL_FEATURES:
        np.testing.assert_array_equal(batch[k], npz.features[k][[row_of[i] for i in ids]], err_msg=k)


@pytest.mark.parametrize("kind, setting", [("npz", "exported_dir"), ("array_record", "streaming_dir")])
def test_both_file_sources_reopen_on_a_changed_manifest_and_name_the_export_command(kind, setting, tmp_path):
    folder = tmp_path / kind
    shutil.copytree(OLD_EXPORTS / kind, folder)
    source = data.data_source(**{setting: str(folder)})
    assert data.data_source(**{setting: str(folder)}) is source
    assert source.describe() == f"{source.kind}:{folder}"
    path = folder / ("offline_mix.validation.json" if kind == "npz" else "offline_mix.validation/manifest.json")
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": manifest["format"].rsplit("/", 1)[0] + "/0"}))
    reopened = data.data_source(**{setting: str(folder)})
    assert reopened is not source and reopened.manifests == {} and source.manifests
    with pytest.raises(UnknownTaskError) as unknown:
        reopened.provider("offline_mix")
    message = str(unknown.value)
    assert f"{path.relative_to(folder)} were written by an older cat_jax" in message
    assert f"(data_source.{setting})" in message and f"--gin.EXPORT_DIR={folder}" in message
    assert ("--gin.export_split.format='array_record'" in message) == (kind == "array_record")
    with pytest.raises(ExportedDataError, match=f"data_source.{setting}=.* is not a directory"):
        data.data_source(**{setting: str(tmp_path / "nowhere")})
