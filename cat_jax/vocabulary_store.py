"""The vocabulary a MODEL_DIR stores: its files, the `vocabulary_files` record of run_info.json
that names them, and the vocabulary rebuilt from them without TensorFlow.

A leaf (vocabularies, hf_tokenizer, errors): `cat_jax.model_dir` writes what it stores at the start
of a run, `tasks.vocab` tokenizes with it (`get_vocabulary.from_model_dir`), the checkpoint
converters import and export it.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from cat_jax import vocabularies
from cat_jax.errors import ModelDirError

RUN_INFO = "run_info.json"
SENTENCEPIECE_FILE = "spiece.model"  # the name the Hugging Face Hub uses


def read_run_info(model_dir: str) -> dict[str, Any] | None:
    """MODEL_DIR's run_info.json, or None where there is none."""
    path = os.path.join(model_dir, RUN_INFO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stored_record(model_dir: str) -> dict[str, Any] | None:
    """The `vocabulary_files` record of MODEL_DIR's run_info.json; None where it stores no
    vocabulary files (or is no MODEL_DIR)."""
    return (read_run_info(model_dir) or {}).get("vocabulary_files")


def _read_bytes(path: str) -> bytes:
    """A file's bytes: local paths directly, others (gs://) through tf.io.gfile where available."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def vocabulary_files(vocab) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(run_info's `vocabulary_files` record, {file name: bytes} to store in MODEL_DIR).

    The record is {"kind": "byte"}, {"kind": "sentencepiece", "file": "spiece.model",
    "extra_ids": N} (the model file as its author shipped it plus seqio's extra-id count, so that
    `(file, extra_ids)` rebuilds the same vocabulary, identity included, with seqio or without), or
    {"kind": "hf_tokenizer", "files": [...]}: a Hugging Face checkpoint's tokenizer files under
    their Hub names (tokenizer.json / tokenizer.model, tokenizer_config.json, ...).
    """
    vocab = vocabularies.resolve(vocab)
    kind = vocabularies.identity(vocab)["class"]
    if kind == "ByteVocabulary":
        return {"kind": "byte", "extra_ids": int(vocab.extra_ids or 0)}, {}
    if kind == vocabularies.HF_TOKENIZER:
        return (
            {"kind": "hf_tokenizer", "files": list(vocab.files)},
            {name: _read_bytes(path) for name, path in vocab.files.items()},
        )
    if kind != "SentencePieceVocabulary":
        raise ModelDirError(
            f"Vocabulary {type(vocab).__name__} cannot be stored in a MODEL_DIR: cat_jax "
            "stores ByteVocabulary, SentencePieceVocabulary and Hugging Face tokenizers."
        )
    extra = (
        vocab.added_extra_ids if isinstance(vocab, vocabularies.SentencePieceVocabulary) else int(vocab.extra_ids or 0)
    )
    source = getattr(vocab, "sentencepiece_model_file", None)
    model = _read_bytes(source) if source else None
    if model is None or vocabularies.identity_of_model(
        vocabularies.add_extra_ids(model, extra)
    ) != vocabularies.identity(vocab):
        model, extra = vocabularies.sentencepiece_model_bytes(vocab), 0  # normalizer overrides etc.
    return {"kind": "sentencepiece", "file": SENTENCEPIECE_FILE, "extra_ids": extra}, {SENTENCEPIECE_FILE: model}


def write_vocabulary(model_dir: str, vocab) -> dict[str, Any]:
    """Stores the vocabulary's files in MODEL_DIR (a SentencePiece model: `spiece.model`; a Hugging
    Face tokenizer: its files under their Hub names); returns the record for run_info.json."""
    record, files = vocabulary_files(vocab)
    for name, data in files.items():
        path = os.path.join(model_dir, name)
        tmp = f"{path}.tmp.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return record


def model_vocabulary(model_dir: str, info: dict[str, Any] | None = None):
    """The TensorFlow-free vocabulary stored in a MODEL_DIR (`cat_jax.vocabularies`,
    `cat_jax.hf_tokenizer`)."""
    info = read_run_info(model_dir) if info is None else info
    record = (info or {}).get("vocabulary_files")
    if record is None:
        kind = ((info or {}).get("vocabulary") or {}).get("class")
        if kind == "ByteVocabulary":
            return vocabularies.ByteVocabulary()
        raise ModelDirError(
            f"{model_dir} records no vocabulary files (it was written before cat_jax stored them, or is "
            f"not a MODEL_DIR); give the vocabulary explicitly (get_vocabulary.kind / "
            f"sentencepiece_model_path)."
        )
    if record["kind"] == "byte":
        return vocabularies.ByteVocabulary(extra_ids=record.get("extra_ids", 0))
    if record["kind"] == "hf_tokenizer":
        from cat_jax import hf_tokenizer  # pylint: disable=import-outside-toplevel

        return hf_tokenizer.HFTokenizerVocabulary(model_dir, files=record["files"])
    return vocabularies.SentencePieceVocabulary(
        os.path.join(model_dir, record["file"]), extra_ids=record.get("extra_ids", 0)
    )
