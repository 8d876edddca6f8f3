"""Hugging Face tokenizers as transformers applies them (cat_jax.hf_tokenizer), in both worlds.

The reference is transformers itself: tests/fixtures/hf_tokenizers/make_fixtures.py built Hub-style
tokenizer folders and recorded `AutoTokenizer.from_pretrained(dir)(prompt)["input_ids"]` and
`decode(ids, skip_special_tokens=True)`; no transformers is needed here.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import gin
import numpy as np
import pytest

from cat_jax import hf_tokenizer, model_dir, vocabularies, vocabulary_store
from cat_jax.data import file_source
from cat_jax.errors import ConfigError, TeacherMismatchError
from cat_jax.frozen_model import check_vocabulary

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf_tokenizers"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
STYLES = sorted(k for k in EXPECTED if not k.startswith("_"))


def vocab_of(name: str, **kwargs) -> hf_tokenizer.HFTokenizerVocabulary:
    return hf_tokenizer.HFTokenizerVocabulary(str(FIXTURES / name), **kwargs)


def copy_style(name: str, tmp_path: Path) -> Path:
    """A fresh copy of a fixture folder under tmp_path."""
    target = tmp_path / f"{name}_{len(list(tmp_path.iterdir()))}"
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


@pytest.mark.parametrize("style", STYLES)
def test_ids_and_text_equal_transformers(style):
    vocab, expected = vocab_of(style), EXPECTED[style]
    assert vocab.tokenizer_class == expected["class"]
    assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.tokenizer_pad_id) == (
        expected["len"],
        expected["bos_token_id"],
        expected["eos_token_id"],
        expected["unk_token_id"],
        expected["pad_token_id"],
    )
    assert sorted(vocab.stop_ids) == expected["stop_ids"] and vocab.pad_id == 0
    for row in expected["prompts"]:
        prompt = row["prompt"]
        assert vocab.encode_prompt(prompt) == row["input_ids"], prompt
        assert vocab.encode_continuation(prompt) == vocab.encode(prompt) == row["ids_without_special"], prompt
        assert vocab.decode(row["input_ids"]) == row["decoded_to_stop"], prompt
        assert (
            list(vocab.prompt_prefix_ids) + row["ids_without_special"] + list(vocab.prompt_suffix_ids)
            == row["input_ids"]
        ), prompt
    # Where no stop id comes before the end, decode is transformers' decode of every id.
    whole = [r for r in expected["prompts"] if not set(r["input_ids"][:-1]) & set(vocab.stop_ids)]
    assert len(whole) >= 12 and all(vocab.decode(r["input_ids"]) == r["decoded"] for r in whole)


def test_the_styles_differ_where_the_hub_files_do():
    """BOS from the post-processor (llama3), none (qwen2), from add_bos_token (gemma, llama2), and an
    add_eos_token that overrides tokenizer.json's stored template (gemma_json); id 0 is a real token."""
    first = {s: EXPECTED[s]["prompts"][1]["input_ids"] for s in STYLES}  # "Hello world"
    assert vocab_of("llama3").prompt_prefix_ids == (EXPECTED["llama3"]["bos_token_id"],)
    assert vocab_of("qwen2").prompt_prefix_ids == () and first["qwen2"][0] != EXPECTED["qwen2"]["eos_token_id"]
    assert vocab_of("gemma").prompt_prefix_ids == (2,) and vocab_of("gemma").prompt_suffix_ids == ()
    assert vocab_of("gemma_json").prompt_suffix_ids == (1,) and first["gemma_json"][-1] == 1
    bang = EXPECTED["llama3"]["prompts"][8]
    assert bang["prompt"] == "!!! bang" and 0 in bang["input_ids"]
    assert vocab_of("llama3").decode(bang["input_ids"]) == "!!! bang"
    # The Llama 3 style eos text inside a prompt is a stop id: decode ends there, as generation would.
    eos_row = EXPECTED["llama3"]["prompts"][-1]
    assert eos_row["decoded_to_stop"] != eos_row["decoded"]


@pytest.mark.parametrize("style", [s for s in STYLES if "backend_tokenizer" in EXPECTED[s]])
def test_sentencepiece_conversion_equals_transformers(style):
    """A folder with only tokenizer.model: our converted tokenizer is transformers' (vocab, merges,
    normalizer, pre-tokenizer, decoder, added tokens, template)."""
    ours = json.loads(vocab_of(style).backend_tokenizer.to_str())
    theirs = EXPECTED[style]["backend_tokenizer"]
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == theirs[key], key
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"] and len(theirs["model"]["merges"]) > 100


def test_llama_add_prefix_space_converts_the_sentencepiece_model(tmp_path):
    """LlamaTokenizerFast builds from tokenizer.model when tokenizer_config sets add_prefix_space, even
    beside a tokenizer.json (here a different tokenizer's: transformers ignores it, checked by hand
    with transformers 4.57.6)."""
    copy = copy_style("llama2", tmp_path)
    shutil.copyfile(FIXTURES / "llama3" / "tokenizer.json", copy / "tokenizer.json")
    edit_json(copy / "tokenizer_config.json", add_prefix_space=True)
    vocab = hf_tokenizer.HFTokenizerVocabulary(str(copy))
    assert all(vocab.encode_prompt(r["prompt"]) == r["input_ids"] for r in EXPECTED["llama2"]["prompts"])
    (copy / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="sets add_prefix_space.*tokenizer.model"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))


def test_identity_is_content_not_path(tmp_path):
    base = vocabularies.identity(vocab_of("llama3"))
    assert base["class"] == "HFTokenizerVocabulary" and base["size"] == 404
    assert base["tokenizer_class"] == "PreTrainedTokenizerFast"
    # A copy, a re-formatted tokenizer.json (merges as "a b" strings) and changes that do not
    # touch tokenization (a chat template, model_max_length, generation_config) keep the identity.
    copy = copy_style("llama3", tmp_path)
    data = json.loads((copy / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (copy / "tokenizer.json").write_text(json.dumps(data, indent=4))
    edit_json(copy / "tokenizer_config.json", chat_template="{{ messages }}", model_max_length=8192)
    edit_json(copy / "generation_config.json", eos_token_id=401)
    again = hf_tokenizer.HFTokenizerVocabulary(str(copy))
    assert vocabularies.identity(again) == base and again == vocab_of("llama3")
    assert again.stop_ids == (401,) != vocab_of("llama3").stop_ids
    # What changes tokenization changes it: a merge, a template setting, a special token.
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (copy / "tokenizer.json").write_text(json.dumps(data))
    assert vocabularies.identity(hf_tokenizer.HFTokenizerVocabulary(str(copy))) != base
    gemma = vocabularies.identity(vocab_of("gemma"))
    copy = copy_style("gemma", tmp_path)
    edit_json(copy / "tokenizer_config.json", add_bos_token=False)
    changed = hf_tokenizer.HFTokenizerVocabulary(str(copy))
    assert changed.encode_prompt("Hello world") == EXPECTED["gemma"]["prompts"][1]["input_ids"][1:]
    assert vocabularies.identity(changed) != gemma
    copy = copy_style("llama2", tmp_path)
    edit_json(copy / "tokenizer_config.json", eos_token="<unk>")
    assert vocabularies.identity(hf_tokenizer.HFTokenizerVocabulary(str(copy))) != vocabularies.identity(
        vocab_of("llama2")
    )
    # Two tokenizers of one style trained differently differ.
    assert vocabularies.identity(vocab_of("llama2")) != vocabularies.identity(vocab_of("mistral"))


@pytest.mark.parametrize("style", ["llama3", "gemma"])
def test_model_dir_round_trip(style, tmp_path):
    vocab = vocab_of(style)
    directory = tmp_path / "model_dir"
    directory.mkdir()
    record = vocabulary_store.write_vocabulary(str(directory), vocab)
    assert record == {"kind": "hf_tokenizer", "files": list(vocab.files)}
    assert "tokenizer_config.json" in record["files"] and "generation_config.json" in record["files"]
    for name in record["files"]:
        assert (directory / name).read_bytes() == (FIXTURES / style / name).read_bytes()
    model_dir.write_run_info(str(directory), {"vocabulary": model_dir.vocab_info(vocab), "vocabulary_files": record})
    (directory / "tokenizer.json.tmp.stray").write_text("not read")
    rebuilt = vocabulary_store.model_vocabulary(str(directory))
    assert isinstance(rebuilt, hf_tokenizer.HFTokenizerVocabulary)
    assert model_dir.vocab_info(rebuilt) == model_dir.vocab_info(vocab)
    assert rebuilt.stop_ids == vocab.stop_ids and rebuilt.directory == str(directory)
    for row in EXPECTED[style]["prompts"]:
        assert rebuilt.encode_prompt(row["prompt"]) == row["input_ids"]
    (directory / "generation_config.json").unlink()
    with pytest.raises(ConfigError, match=r"lacks the tokenizer files \['generation_config.json'\]"):
        vocabulary_store.model_vocabulary(str(directory))


def test_check_vocabulary_names_both_tokenizers(tmp_path):
    config = types.SimpleNamespace(vocab_size=512)
    teacher = vocab_of("qwen2")
    info = {
        "vocabulary": model_dir.vocab_info(teacher),
        "model_config": {"vocab_size": 512},
        "imported_from": {"source": "/hub/Qwen2.5-7B"},
    }
    check_vocabulary("/runs/teacher", info, config, vocab_of("qwen2"))
    copy = copy_style("qwen2", tmp_path)  # the same tokenizer elsewhere is the same vocabulary
    check_vocabulary("/runs/teacher", info, config, hf_tokenizer.HFTokenizerVocabulary(str(copy)))
    with pytest.raises(TeacherMismatchError) as err:
        check_vocabulary("/runs/teacher", info, config, vocab_of("llama3"))
    message = str(err.value)
    for part in (
        "/runs/teacher",
        "/hub/Qwen2.5-7B",
        "Qwen2TokenizerFast",
        "PreTrainedTokenizerFast",
        str(FIXTURES / "llama3"),
        "get_vocabulary.from_model_dir=/runs/teacher",
    ):
        assert part in message, part


def test_export_description_round_trip(tmp_path):
    vocab = vocab_of("mistral")
    desc = vocabularies.describe(vocab, str(tmp_path))
    assert desc["class"] == "HFTokenizerVocabulary" and desc["eos_id"] == 2 and desc["pad_id"] == 0
    assert desc["prompt_prefix_ids"] == [1] and desc["stop_ids"] == [2] and desc["bos_id"] == 1
    assert sorted(p.name for p in (tmp_path / desc["tokenizer_dir"]).iterdir()) == sorted(desc["tokenizer_files"])
    rebuilt = vocabularies.from_description(json.loads(json.dumps(desc)), str(tmp_path))
    assert vocabularies.identity(rebuilt) == vocabularies.identity(vocab)
    assert file_source.vocabularies_key(desc) != file_source.vocabularies_key(vocabularies.describe(vocab_of("llama2")))
    shutil.rmtree(tmp_path / desc["tokenizer_dir"])
    with pytest.raises(FileNotFoundError, match="export the split again"):
        vocabularies.from_description(desc, str(tmp_path))


def test_bad_tokenizer_folders_are_named_errors(tmp_path):
    copy = copy_style("qwen2", tmp_path)
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer_config.json"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    copy = copy_style("llama3", tmp_path)
    edit_json(copy / "tokenizer_config.json", tokenizer_class="BertTokenizer")
    with pytest.raises(ConfigError, match="BertTokenizer.*GemmaTokenizerFast"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    copy = copy_style("gemma", tmp_path)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json and no tokenizer.model"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    copy = copy_style("qwen2", tmp_path)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json, the only file a Qwen2TokenizerFast"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    copy = copy_style("mistral", tmp_path)  # no added_tokens_decoder: transformers' legacy files
    (copy / "added_tokens.json").write_text("{}")
    with pytest.raises(ConfigError, match="added_tokens.json"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    copy = copy_style("llama2", tmp_path)
    edit_json(copy / "tokenizer_config.json", bos_token=None)
    with pytest.raises(ConfigError, match="add_bos_token is true but bos_token is null"):
        hf_tokenizer.HFTokenizerVocabulary(str(copy))
    with pytest.raises(ConfigError, match="Unknown tokenizer files"):
        vocab_of("llama3", files=["vocab.json"])


# ---- the seqio side (tasks.vocab) ----


@pytest.fixture
def hf_vocabulary_bound():
    """get_vocabulary bound to the llama3 fixture for the test's duration."""
    import tasks.vocab  # noqa: F401  (registers get_vocabulary with gin)

    with gin.unlock_config():
        gin.bind_parameter("get_vocabulary.kind", "hf_tokenizer")
        gin.bind_parameter("get_vocabulary.hf_tokenizer_dir", str(FIXTURES / "llama3"))
    try:
        yield
    finally:
        with gin.unlock_config():
            gin.bind_parameter("get_vocabulary.kind", "byte")
            gin.bind_parameter("get_vocabulary.hf_tokenizer_dir", None)


def test_seqio_vocabulary_tokenizes_in_tf_data_as_in_python(hf_vocabulary_bound):
    import seqio
    import tensorflow as tf

    from tasks import vocab as task_vocab

    lazy = task_vocab.VOCABULARY
    live = vocabularies.resolve(lazy)
    assert isinstance(live, task_vocab.HFTokenizerVocabulary) and isinstance(live, seqio.Vocabulary)
    assert vocabularies.identity(lazy) == vocabularies.identity(vocab_of("llama3"))
    prompts = [r["prompt"] for r in EXPECTED["llama3"]["prompts"]]
    features = {"targets": seqio.Feature(lazy, add_eos=True)}
    ds = tf.data.Dataset.from_tensor_slices({"targets": prompts})
    ds = seqio.preprocessors.append_eos(seqio.preprocessors.tokenize(ds, features), features)
    rows = [r["targets"].tolist() for r in ds.as_numpy_iterator()]
    assert rows == [r["ids_without_special"] + [live.eos_id] for r in EXPECTED["llama3"]["prompts"]]
    assert live.eos_id == 401 and lazy.eos_id == 401 and lazy.vocab_size == 404
    padded = np.zeros((2, 3, 12), np.int32)  # [batch, beams, length]: 0 is "!" here, a stop id ends it
    padded[0, 1, :4] = [39, 68, 401, 0]
    text = live.decode_tf(tf.constant(padded)).numpy()
    assert text.shape == (2, 3) and text[0, 1].decode() == live.decode([39, 68]) == "He"
    assert text[1, 0].decode() == "!" * 12 == lazy.decode(padded[1, 0].tolist())
    with pytest.raises(ValueError, match="one string"):
        live.encode_tf(tf.constant(["a", "b"]))


def test_get_vocabulary_from_model_dir_and_errors(tmp_path):
    from tasks import vocab as task_vocab

    directory = tmp_path / "imported"
    directory.mkdir()
    source = vocab_of("gemma")
    record = vocabulary_store.write_vocabulary(str(directory), source)
    model_dir.write_run_info(str(directory), {"vocabulary": model_dir.vocab_info(source), "vocabulary_files": record})
    live = task_vocab.get_vocabulary(from_model_dir=str(directory))
    assert isinstance(live, task_vocab.HFTokenizerVocabulary)
    assert vocabularies.identity(live) == vocabularies.identity(source)
    assert live.encode_prompt("Hello world") == EXPECTED["gemma"]["prompts"][1]["input_ids"]
    with pytest.raises(ConfigError, match="hf_tokenizer_dir"):
        task_vocab.get_vocabulary(kind="hf_tokenizer")
    with pytest.raises(ConfigError, match="is not a directory"):
        task_vocab.get_vocabulary(kind="hf_tokenizer", hf_tokenizer_dir=str(tmp_path / "missing"))


def test_exported_task_carries_the_tokenizer(hf_vocabulary_bound, tmp_path):
    """A task tokenized with a Hugging Face tokenizer exports and reads back without seqio's
    vocabulary: the same arrays and the same identity."""
    from cat_jax import data
    from cat_jax.jobs import export_task as data_export
    from tests.test_export import MIX_LENGTHS, assert_arrays_equal, exported_source

    live_vocab = data.get_vocabulary_of("num2words_fr")
    live = data.load_split("num2words_fr", "validation", MIX_LENGTHS, max_examples=8)
    manifest = data_export.export_one("num2words_fr", "validation", MIX_LENGTHS, str(tmp_path), max_examples=8)
    assert manifest["vocabulary"]["tokenizer_files"] == list(vocab_of("llama3").files)
    with exported_source(tmp_path):
        exp_vocab = data.get_vocabulary_of("num2words_fr")
        exp = data.load_split("num2words_fr", "validation", MIX_LENGTHS, max_examples=8)
    assert isinstance(exp_vocab, hf_tokenizer.HFTokenizerVocabulary)
    assert vocabularies.identity(exp_vocab) == vocabularies.identity(live_vocab)
    assert_arrays_equal(live, exp)
    targets = live.features["decoder_target_tokens"]
    assert (targets == live_vocab.eos_id).any(axis=1).all()
    for row in targets:
        assert exp_vocab.decode(row.tolist()) == live_vocab.decode(row.tolist())
