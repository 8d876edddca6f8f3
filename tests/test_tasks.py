"""The offline tasks: registration, splits, content, metrics wiring and the vocabulary switch."""

import io

import gin
import numpy as np
import pytest
import sentencepiece
import seqio
import tensorflow as tf

import tasks
from cat_jax import metrics
from cat_jax.errors import ConfigError
from tasks import offline, vocab
from tasks.__main__ import catalogue

TASKS = ("cmudict_g2p", "cmudict_syllables", "num2words_fr", "num2words_de")


def _source_rows(name: str, split: str) -> list[dict[str, str]]:
    ds = seqio.get_mixture_or_task(name).source.get_dataset(split=split, shuffle=False)
    batches = list(ds.batch(50_000).as_numpy_iterator())
    return [{k: batch[k][i].decode() for k in batch} for batch in batches for i in range(len(batch["id"]))]


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, list[dict[str, str]]]]:
    return {name: {split: _source_rows(name, split) for split in offline.SPLITS} for name in TASKS}


def _find(rows, name: str, key: str) -> dict[str, str]:
    (row,) = [r for r in rows[name][offline.split_of(key)] if r["id"] == f"{name}:{key}"]
    return row


@pytest.mark.parametrize("name", TASKS)
def test_every_split_yields_tokenized_examples(name):
    task = seqio.get_mixture_or_task(name)
    for split in offline.SPLITS:
        ex = next(task.get_dataset({"inputs": 64, "targets": 64}, split=split, shuffle=False).as_numpy_iterator())
        assert ex["id"].decode().startswith(f"{name}:")
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS
        assert vocab.VOCABULARY.decode(ex["targets"].tolist()) == ex["targets_pretokenized"].decode()


def test_splits_disjoint_ids_unique_and_sized(rows):
    for name in TASKS:
        per_split = {split: [r["id"] for r in rows[name][split]] for split in offline.SPLITS}
        all_ids = sum(per_split.values(), [])
        assert len(all_ids) == len(set(all_ids))
        fractions = {s: len(ids) / len(all_ids) for s, ids in per_split.items()}
        assert fractions["train"] == pytest.approx(0.8, abs=0.02)
        assert fractions["validation"] == pytest.approx(0.1, abs=0.02)
        assert seqio.get_mixture_or_task(name).num_input_examples("validation") == len(per_split["validation"])
    assert len(sum(rows["cmudict_g2p"].values(), [])) > 100_000
    assert len(sum(rows["num2words_fr"].values(), [])) == 1000 + 6 * offline.NUMBERS_PER_DECADE + 1


def test_split_of_is_a_fixed_hash():
    # SHA-256 of the key: these assignments must never change between runs, hosts or versions.
    got = {k: offline.split_of(k) for k in ("hello", "world", "1000000000", "f", "8", "19")}
    assert got == {
        "hello": "train",
        "world": "train",
        "1000000000": "validation",
        "f": "validation",
        "8": "test",
        "19": "test",
    }


def test_example_content(rows):
    hello = _find(rows, "cmudict_g2p", "hello")
    assert hello["inputs"] == "phonemes: hello"
    assert hello["targets"] == "HH AH0 L OW1"
    assert hello["alternatives"] == "HH AH0 L OW1|HH EH0 L OW1"
    assert _find(rows, "cmudict_syllables", "hello")["targets"] == "2"
    assert _find(rows, "cmudict_syllables", "hello")["id"] == "cmudict_syllables:hello"
    assert _find(rows, "num2words_fr", "21")["targets"] == "vingt et un"
    assert _find(rows, "num2words_fr", "21")["inputs"] == "french: 21"
    assert _find(rows, "num2words_de", "21")["targets"] == "einundzwanzig"
    assert _find(rows, "num2words_fr", "1000000000")["targets"] == "un milliard"
    g2p_words = {r["id"].split(":", 1)[1] for r in sum(rows["cmudict_g2p"].values(), [])}
    assert all(offline._WORD.match(w) for w in g2p_words)  # pylint: disable=protected-access
    assert "o'clock" in g2p_words and "a." not in g2p_words


def test_numbers_cover_every_magnitude():
    numbers = np.array(offline.numbers())
    assert numbers[0] == 0 and numbers[-1] == 10**9
    assert len(np.unique(numbers)) == len(numbers)
    assert set(range(1000)) <= set(numbers.tolist())
    for d in range(3, 9):
        in_decade = np.sum((numbers >= 10**d) & (numbers < 10 ** (d + 1)))
        assert in_decade == offline.NUMBERS_PER_DECADE


def test_syllable_count():
    assert offline.syllable_count("HH AH0 L OW1") == 2
    assert offline.syllable_count("K AE1 T") == 1


def test_g2p_postprocess_feeds_alternatives_to_metrics():
    task = seqio.get_mixture_or_task("cmudict_g2p")
    example = {"alternatives": b"HH AH0 L OW1|HH EH0 L OW1"}
    target = task.postprocess_fn("HH AH0 L OW1", example=example, is_target=True)
    assert target == ["HH AH0 L OW1", "HH EH0 L OW1"]
    prediction = task.postprocess_fn(" HH EH0  L OW1 ", example=example, is_target=False)
    assert metrics.exact_match_any([target], [prediction]) == {"exact_match": 100.0}
    assert metrics.phoneme_error_rate([target], ["HH EH0 L"]) == {"phoneme_error_rate": 25.0}
    assert [f.__name__ for f in task.metric_fns] == ["exact_match_any", "phoneme_error_rate"]


def test_mixture_rates_are_train_sizes():
    mixture = seqio.get_mixture_or_task("offline_mix")
    assert sorted(t.name for t in mixture.tasks) == sorted(TASKS)
    for task in mixture.tasks:
        assert mixture.get_rate(task) == task.num_input_examples("train")


def test_quality_registered_for_every_task():
    assert metrics.get_quality("num2words_fr").corpus is metrics.corpus_bleu
    assert metrics.get_quality("cmudict_g2p").per_example([["A", "B"]], ["B"]) == [1.0]
    assert metrics.get_quality("cmudict_syllables").corpus is None


def test_catalogue_lists_everything():
    text = "\n".join(catalogue())
    for name in TASKS + ("offline_mix",):
        assert name in text
        assert tasks.REGISTERED_BY[name] == "tasks.offline"
    assert "cmudict_g2p  splits: train, validation, test  metrics: exact_match_any, phoneme_error_rate" in text


def test_vocabulary_is_byte_by_default_and_errors_are_clear():
    assert isinstance(vocab.get_vocabulary(), seqio.ByteVocabulary)
    assert vocab.VOCABULARY.vocab_size == 259
    assert vocab.VOCABULARY.encode("hi") == [107, 108]
    with pytest.raises(ValueError, match="sentencepiece_model_path"):
        vocab.get_vocabulary(kind="sentencepiece")
    with pytest.raises(ConfigError, match="/no/such.model"):
        vocab.get_vocabulary(kind="sentencepiece", sentencepiece_model_path="/no/such.model")
    with pytest.raises(ValueError, match="unknown kind"):
        vocab.get_vocabulary(kind="bpe")


def test_gin_switches_the_tasks_vocabulary(tmp_path):
    lines = [
        "phonemes: hello",
        "HH AH0 L OW1",
        "french: 21",
        "vingt et un",
        "syllables: world",
        "abcdefghijklmnopqrstuvwxyz-0123456789",
    ] * 20  # every character of the French numbers
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=60,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path / "tiny.model"
    path.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    task = seqio.get_mixture_or_task("num2words_fr")
    try:
        gin.parse_config(
            [
                "get_vocabulary.kind = 'sentencepiece'",
                f"get_vocabulary.sentencepiece_model_path = '{path}'",
            ]
        )
        assert isinstance(vocab.VOCABULARY.resolved, seqio.SentencePieceVocabulary)
        assert task.output_features["targets"].vocabulary.vocab_size == processor.get_piece_size()
        ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
        expected = processor.encode(ex["targets_pretokenized"].decode()) + [1]
        assert ex["targets"].tolist() == expected
        assert vocab.VOCABULARY.decode_tf(tf.constant(expected)).numpy().decode() == ex["targets_pretokenized"].decode()
    finally:
        gin.clear_config()
    assert isinstance(vocab.VOCABULARY.resolved, seqio.ByteVocabulary)
