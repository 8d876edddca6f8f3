"""SuperGLUE, WMT and FLAN-style tasks: well-formed examples under `tfds.testing.mock_data` (no
download: the builders' metadata comes from their code), WMT22 from a fixture directory, metrics.

Mock data is random: strings of letters and spaces, labels drawn from each ClassLabel, integers
below MAX_VALUE (so the SuperGLUE idx, hence the ids, are distinct with overwhelming probability;
the draws are seeded, so the test is deterministic).
"""

from __future__ import annotations

import re
from pathlib import Path

import gin
import numpy as np
import pytest
import sacrebleu
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from cat_jax import data as data_lib
from cat_jax import metrics
from cat_jax.data.arrays import sampled_ids
from tasks import flan, superglue, wmt
from tasks.vocab import VOCABULARY

NUM_EXAMPLES = 6
MAX_VALUE = 2**30
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "wmt22"


@pytest.fixture(scope="module")
def mocked():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, max_value=MAX_VALUE):
        yield


def _examples(name: str, split: str) -> list[dict[str, object]]:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False, num_epochs=1)
    out = []
    for ex in ds.as_numpy_iterator():
        out.append({k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in ex.items()})
    return out


def _check_well_formed(name: str, split: str, examples: list[dict[str, object]]) -> None:
    assert examples, f"{name}/{split} yielded nothing"
    ids = [ex["id"] for ex in examples]
    assert len(set(ids)) == len(ids), ids
    for ex in examples:
        assert ex["id"].startswith(f"{name}:{split}:"), ex["id"]
        for feature in ("inputs", "targets"):
            tokens = ex[feature].tolist()
            assert tokens[-1] == VOCABULARY.eos_id
            text = VOCABULARY.decode(tokens)
            assert text == ex[f"{feature}_pretokenized"]
            assert text.strip(), f"{name}: empty {feature}"


# --- registration ---------------------------------------------------------------------------------


def test_every_task_is_registered_with_module_and_quality():
    expected = {
        **dict.fromkeys(superglue.SUPERGLUE_TASKS, "tasks.superglue"),
        **dict.fromkeys(wmt.WMT19_TASKS + wmt.WMT22_TASKS, "tasks.wmt"),
        **dict.fromkeys(flan.FLAN_TASKS + (flan.MIXTURE_NAME,), "tasks.flan"),
    }
    for name, module in expected.items():
        assert tasks.REGISTERED_BY[name] == module
        if name != flan.MIXTURE_NAME:
            assert metrics.get_quality(name) is not None
            assert seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary is VOCABULARY
    assert len(superglue.SUPERGLUE_TASKS) == 8


# --- SuperGLUE ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", superglue.SUPERGLUE_TASKS)
def test_superglue_examples(mocked, name):
    benchmark = name.removeprefix("superglue_")
    for split in ("train", "validation"):
        examples = _examples(name, split)
        assert len(examples) == NUM_EXAMPLES
        _check_well_formed(name, split, examples)
        for ex in examples:
            assert ex["inputs_pretokenized"].startswith(f"{benchmark} ")
            key = ex["id"].split(":")[-1]
            if benchmark == "multirc":
                assert re.fullmatch(r"p\d+-q\d+-a\d+", key), key
            elif benchmark == "record":
                assert re.fullmatch(r"p\d+-q\d+", key), key
                answers = ex["answers"].split(superglue.ANSWER_SEPARATOR)
                assert ex["targets_pretokenized"] == answers[0]
            else:
                assert re.fullmatch(r"\d+", key), key
            if benchmark != "record":
                assert ex["targets_pretokenized"] in superglue.LABELS[benchmark]


def test_superglue_postprocessing_and_metrics_end_to_end(mocked):
    # MultiRC: targets carry their question; the metric groups answers by it.
    multirc = seqio.get_mixture_or_task("superglue_multirc")
    examples = _examples("superglue_multirc", "validation")
    targets = [multirc.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True) for ex in examples]
    assert all(t["group"] == ex["id"].rsplit("-a", 1)[0] for t, ex in zip(targets, examples))
    preds = [ex["targets_pretokenized"] for ex in examples]
    assert multirc.metric_fns[0](targets, preds)["exact_match"] == 100.0
    assert metrics.get_quality("superglue_multirc").per_example(targets, preds) == [1.0] * len(preds)
    # ReCoRD: every gold answer is accepted.
    record = seqio.get_mixture_or_task("superglue_record")
    ex = _examples("superglue_record", "validation")[0]
    gold = record.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
    assert len(gold) > 1
    assert metrics.get_quality("superglue_record").per_example([gold], [gold[-1]]) == [1.0]
    assert record.metric_fns[0]([gold], [gold[-1]]) == {"exact_match": 100.0, "f1": 100.0}


def test_superglue_through_load_split(mocked):
    arrays = data_lib.load_split("superglue_record", "validation", {"inputs": 64, "targets": 16}, max_examples=3)
    assert len(arrays) == 3
    assert all(i.startswith("superglue_record:validation:p") for i in arrays.ids)
    assert "answers" in arrays.example(0)


def test_superglue_text_helpers():
    assert superglue.star_word(tf.constant("The cat saw it ."), 3).numpy() == b"The cat saw *it* ."
    assert superglue.star_word(tf.constant("short"), 7).numpy() == b"short"
    rendered = superglue.render("q: {a} | {b}!", {"a": tf.constant("x"), "b": tf.constant("y")})
    assert rendered.numpy() == b"q: x | y!"
    labels = superglue.label_text(tf.constant([0, 1, -1]), ("no", "yes"))
    assert labels.numpy().tolist() == [b"no", b"yes", superglue.UNKNOWN_LABEL.encode()]


# --- WMT19 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", wmt.WMT19_TASKS)
def test_wmt19_examples(mocked, name):
    src, tgt = name.split("_")[-2:]
    for split in wmt.WMT19_SPLITS:
        examples = _examples(name, split)
        _check_well_formed(name, split, examples)
        prefix = f"translate {wmt.LANGUAGES[src]} to {wmt.LANGUAGES[tgt]}: "
        for ex in examples:
            assert ex["inputs_pretokenized"].startswith(prefix)
            assert re.fullmatch(rf"{name}:{split}:\d{{5}}-of-\d{{5}}:\d+", ex["id"]), ex["id"]


def test_wmt19_directions_share_ids_and_swap_text(mocked):
    de_en = _examples("wmt19_translate_de_en", "validation")
    en_de = _examples("wmt19_translate_en_de", "validation")
    for a, b in zip(de_en, en_de):
        assert a["id"].split(":", 1)[1] == b["id"].split(":", 1)[1]
        assert a["targets_pretokenized"] == b["inputs_pretokenized"].split(": ", 1)[1]
    refs = [ex["targets_pretokenized"] for ex in de_en]
    task = seqio.get_mixture_or_task("wmt19_translate_de_en")
    assert task.metric_fns[0](refs, refs)["bleu"] == pytest.approx(100.0)


# --- FLAN-style -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", flan.FLAN_TASKS)
def test_flan_examples(mocked, name):
    dataset = next(d for d in flan.DATASETS if name in d.task_names())
    examples = _examples(name, "validation")
    _check_well_formed(name, "validation", examples)
    for ex in examples:
        if dataset.answers is not None:
            assert ex["targets_pretokenized"] in dataset.answers
            assert "OPTIONS:\n" + "\n".join(f"- {a}" for a in dataset.answers) in ex["inputs_pretokenized"]
        elif dataset.name == "copa":
            assert f"- {ex['targets_pretokenized']}" in ex["inputs_pretokenized"]
        else:
            assert "English" in ex["inputs_pretokenized"]


def test_flan_templates_render_the_same_example_differently(mocked):
    for dataset in flan.DATASETS:
        assert len(dataset.templates) >= 3
        per_template = [_examples(name, "train")[0] for name in dataset.task_names()]
        assert len({ex["inputs_pretokenized"] for ex in per_template}) == len(per_template)
        assert len({ex["targets_pretokenized"] for ex in per_template}) == 1
        assert len({ex["id"].split(":", 1)[1] for ex in per_template}) == 1  # same source example
        assert len({ex["id"] for ex in per_template}) == len(per_template)  # ids differ by template


def test_flan_mixture_tasks_and_rates():
    mixture = seqio.get_mixture_or_task(flan.MIXTURE_NAME)
    assert sorted(t.name for t in mixture.tasks) == sorted(flan.FLAN_TASKS)

    class FakeTask:
        def __init__(self, n):
            self.n = n

        def num_input_examples(self, split):
            assert split == "train"
            return self.n

    assert flan.flan_rate(FakeTask(9427), num_templates=3) == pytest.approx(1000.0)
    assert flan.flan_rate(FakeTask(250), num_templates=3) == pytest.approx(250 / 3)


# --- WMT22 from local files -----------------------------------------------------------------------


@pytest.fixture
def wmt22_dir():
    with gin.unlock_config():
        gin.bind_parameter(wmt.WMT22_GIN_PARAMETER, str(FIXTURE))
    yield FIXTURE
    with gin.unlock_config():
        gin.bind_parameter(wmt.WMT22_GIN_PARAMETER, None)


def test_wmt22_from_fixture_directory(wmt22_dir):
    sources = (wmt22_dir / "de-en" / "test.de").read_text(encoding="utf-8").splitlines()
    references = (wmt22_dir / "de-en" / "test.en").read_text(encoding="utf-8").splitlines()
    examples = _examples("wmt22_de_en", "test")
    _check_well_formed("wmt22_de_en", "test", examples)
    assert [ex["id"] for ex in examples] == [f"wmt22_de_en:test:{i}" for i in range(len(sources))]
    assert [ex["inputs_pretokenized"] for ex in examples] == [f"translate German to English: {s}" for s in sources]
    assert [ex["targets_pretokenized"] for ex in examples] == references
    assert seqio.get_mixture_or_task("wmt22_de_en").num_input_examples("validation") == 3
    # The same through cat_jax.data, the way train/eval read it.
    # MAX_EXAMPLES=4 is the uniform sample of 4 ids (cat_jax.data.sampled_ids), kept in source order.
    arrays = data_lib.load_split("wmt22_de_en", "test", {"inputs": 128, "targets": 64}, max_examples=4)
    all_ids = [ex["id"] for ex in examples]
    sample = sampled_ids("wmt22_de_en", all_ids, 4)
    assert len(sample) == 4 and arrays.ids.tolist() == [i for i in all_ids if i in sample]


def test_wmt22_bleu_through_sacrebleu(wmt22_dir):
    task = seqio.get_mixture_or_task("wmt22_de_en")
    examples = _examples("wmt22_de_en", "test")
    targets = [task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True) for ex in examples]
    assert task.metric_fns[0](targets, targets)["bleu"] == pytest.approx(100.0)
    hyps = ["The dog sleeps in the garden.", *targets[1:]]
    expected = sacrebleu.corpus_bleu(hyps, [targets]).score
    assert 0 < expected < 100
    assert task.metric_fns[0](targets, hyps)["bleu"] == pytest.approx(expected)
    assert metrics.get_quality("wmt22_de_en").score(targets, hyps) == pytest.approx(expected)


def test_wmt22_function_argument_and_errors(tmp_path):
    rows = wmt.read_wmt22("de", "en", "validation", directory=str(FIXTURE))
    assert rows[1] == ("Wo ist der Bahnhof?", "Where is the train station?")
    with pytest.raises(ValueError, match=re.escape(wmt.WMT22_GIN_PARAMETER)):
        _examples("wmt22_de_en", "test")  # no directory configured
    with pytest.raises(FileNotFoundError, match=r"en-de/test\.en.*wmt22_files\.wmt22_dir"):
        wmt.read_wmt22("en", "de", "test", directory=str(FIXTURE))
    (tmp_path / "de-en").mkdir()
    (tmp_path / "de-en" / "test.de").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "de-en" / "test.en").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line-aligned"):
        wmt.read_wmt22("de", "en", "test", directory=str(tmp_path))


# --- metrics --------------------------------------------------------------------------------------


def test_classification_and_qa_metrics():
    assert metrics.macro_f1(["a", "b", "c", "a"], ["a", "b", "c", "a"]) == {"macro_f1": 100.0}
    # a: P=1 R=0.5 F1=2/3; b: P=0.5 R=1 F1=2/3; c: absent everywhere.
    assert metrics.macro_f1(["a", "a", "b"], ["a", "b", "b"])["macro_f1"] == pytest.approx(200 / 3)
    targets = [{"group": "q1", "value": "True"}, {"group": "q1", "value": "False"}, {"group": "q2", "value": "True"}]
    scores = metrics.multirc(targets, ["True", "False", "False"])
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1a"] == pytest.approx(100 * 2 / 3)
    assert metrics.label_match_scores(targets, ["True", "True", "True"]) == [1.0, 0.0, 1.0]
    assert metrics.squad_normalize("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.squad([["Barack Obama", "Obama"]], ["obama"]) == {"exact_match": 100.0, "f1": 100.0}
    assert metrics.squad(["New York City"], ["New York"])["f1"] == pytest.approx(100 * 0.8)


# --- streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wmt19_translate_de_en", flan.FLAN_TASKS[0]])
def test_tfds_tasks_stream_through_array_record(mocked, tmp_path, name):
    """A WMT and a FLAN-style task exported for streaming read back as the live pipeline's examples,
    and stream as training batches."""
    from cat_jax.data import stream_export, streaming

    lengths = {"inputs": 64, "targets": 16}
    manifest = stream_export.export_streaming_one(name, "train", str(tmp_path), examples_per_shard=4)
    source = streaming.StreamingSource(str(tmp_path))
    got = source.load_split(name, "train", lengths)
    live = data_lib.load_split(name, "train", lengths, cache_dir=None)
    order = {i: k for k, i in enumerate(live.ids.tolist())}
    rows = [order[i] for i in got.ids.tolist()]
    assert sorted(rows) == list(range(len(live))) and manifest["num_examples"] == len(live)
    for k in data_lib.MODEL_FEATURES:
        np.testing.assert_array_equal(got.features[k], live.features[k][rows], err_msg=k)
    np.testing.assert_array_equal(got.targets_text, live.targets_text[rows])
    batch = source.train_batches(name, "train", lengths, 8, 0, None, (0, 1)).batch(0)
    assert batch["encoder_input_tokens"].shape == (8, 64) and batch["decoder_loss_weights"].sum() > 0
