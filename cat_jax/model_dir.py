"""MODEL_DIR bookkeeping: writability, the run's identity (`run_info.json`) and its checks.

`run_info.json` records the model config, the vocabulary, the loss and the teacher a run was
trained against. Resuming into a MODEL_DIR written for a different model is refused with the
differences and the fix; a teacher is rebuilt from its own MODEL_DIR's `run_info.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from typing import Any

from cat_jax import vocabularies
from cat_jax.errors import ModelDirError
from cat_jax.models import T5Config

RUN_INFO = "run_info.json"
VOCAB_MULTIPLE = 128
SENTENCEPIECE_FILE = "spiece.model"  # the name the Hugging Face Hub uses


def prepare(model_dir: str) -> None:
    """Create MODEL_DIR and prove it is writable, or raise ModelDirError naming it."""
    if "://" in model_dir:
        raise ModelDirError(
            f"MODEL_DIR {model_dir!r} is a URL; cat_jax writes its run files with POSIX I/O. Mount the "
            f"bucket (e.g. gcsfuse) or use a shared file system, and pass its local path.")
    probe = os.path.join(model_dir, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(model_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ModelDirError(
            f"MODEL_DIR {model_dir!r} cannot be written ({e.strerror or e}). Choose a directory you "
            f"can write, e.g. --gin.MODEL_DIR=/tmp/cat_jax/run1.") from e


def vocab_info(vocab) -> dict[str, Any]:
    """What identifies a vocabulary: its class, size and (SentencePiece) the SHA-256 of its model.

    The same for seqio's vocabulary of a live run and the TensorFlow-free one rebuilt from an
    export (`cat_jax.vocabularies`), so a checkpoint trained either way serves the other. The
    SentencePiece model is identified by content, not path: the export holds a copy.
    """
    return vocabularies.identity(vocab)


def _read_bytes(path: str) -> bytes:
    """A file's bytes: local paths directly, others (gs://) through tf.io.gfile where available."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def vocabulary_files(vocab) -> tuple[dict[str, Any], bytes | None]:
    """(run_info's `vocabulary_files` record, the SentencePiece model bytes to store or None).

    The record is {"kind": "byte"} or {"kind": "sentencepiece", "file": "spiece.model",
    "extra_ids": N}: the model file as its author shipped it plus seqio's extra-id count, so that
    `(file, extra_ids)` rebuilds the same vocabulary (identity included) with seqio or without.
    """
    vocab = vocabularies.resolve(vocab)
    kind = vocabularies.identity(vocab)["class"]
    if kind == "ByteVocabulary":
        return {"kind": "byte", "extra_ids": int(vocab.extra_ids or 0)}, None
    if kind != "SentencePieceVocabulary":
        raise ModelDirError(f"Vocabulary {type(vocab).__name__} cannot be stored in a MODEL_DIR: cat_jax "
                            "stores ByteVocabulary and SentencePieceVocabulary.")
    extra = (vocab.added_extra_ids if isinstance(vocab, vocabularies.SentencePieceVocabulary)
             else int(vocab.extra_ids or 0))
    source = getattr(vocab, "sentencepiece_model_file", None)
    model = _read_bytes(source) if source else None
    if model is None or vocabularies.identity_of_model(vocabularies.add_extra_ids(model, extra)) != \
            vocabularies.identity(vocab):
        model, extra = vocabularies.sentencepiece_model_bytes(vocab), 0  # normalizer overrides etc.
    return {"kind": "sentencepiece", "file": SENTENCEPIECE_FILE, "extra_ids": extra}, model


def write_vocabulary(model_dir: str, vocab) -> dict[str, Any]:
    """Stores the vocabulary's files in MODEL_DIR (a SentencePiece model: `spiece.model`); returns
    the record for run_info.json."""
    record, model = vocabulary_files(vocab)
    if model is not None:
        path = os.path.join(model_dir, record["file"])
        tmp = f"{path}.tmp.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(model)
        os.replace(tmp, path)
    return record


def model_vocabulary(model_dir: str, info: dict[str, Any] | None = None):
    """The TensorFlow-free vocabulary stored in a MODEL_DIR (`cat_jax.vocabularies`)."""
    info = read_run_info(model_dir) if info is None else info
    record = (info or {}).get("vocabulary_files")
    if record is None:
        kind = ((info or {}).get("vocabulary") or {}).get("class")
        if kind == "ByteVocabulary":
            return vocabularies.ByteVocabulary()
        raise ModelDirError(
            f"{model_dir} records no vocabulary files (it was written before cat_jax stored them, or is "
            f"not a MODEL_DIR); give the vocabulary explicitly (get_vocabulary.kind / "
            f"sentencepiece_model_path).")
    if record["kind"] == "byte":
        return vocabularies.ByteVocabulary(extra_ids=record.get("extra_ids", 0))
    return vocabularies.SentencePieceVocabulary(os.path.join(model_dir, record["file"]),
                                                extra_ids=record.get("extra_ids", 0))


def with_vocab_size(config: T5Config, vocab) -> T5Config:
    """The config with vocab_size set from the vocabulary (rounded up to a multiple of 128)."""
    padded = int(math.ceil(vocab.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if config.vocab_size is not None and config.vocab_size < vocab.vocab_size:
        raise ModelDirError(
            f"T5Config.vocab_size={config.vocab_size} is smaller than the task vocabulary "
            f"({vocab.vocab_size} ids); leave it unset so the trainer sets it.")
    return config if config.vocab_size is not None else config.replace(vocab_size=padded)


def run_info(config: T5Config, vocab, loss_options, dataset, teacher) -> dict[str, Any]:
    return {
        "model_config": config.to_dict(),
        "vocabulary": vocab_info(vocab),
        "loss_options": dataclasses.asdict(loss_options),
        "dataset": dataclasses.asdict(dataset),
        "data_source": _data_source(),
        "teacher": teacher.describe() if teacher is not None else None,
    }


def _data_source() -> str:
    """'seqio' or 'exported:<dir>' (provenance only; not compared on resume)."""
    from cat_jax import data  # pylint: disable=import-outside-toplevel
    return data.data_source().describe()


def read_run_info(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, RUN_INFO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_run_info(model_dir: str, info: dict[str, Any]) -> None:
    """Written atomically: other processes may be reading it in `check_compatible`."""
    path = os.path.join(model_dir, RUN_INFO)
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} (in MODEL_DIR) vs {new.get(k)!r} (now)"
            for k in keys if old.get(k) != new.get(k)]


def check_compatible(model_dir: str, info: dict[str, Any]) -> None:
    """Refuse to resume a MODEL_DIR whose model config or vocabulary differs from this run's."""
    old = read_run_info(model_dir)
    if old is None:
        return
    diffs = config_differences(T5Config.from_dict(old["model_config"]).to_dict(), info["model_config"])
    diffs += [f"vocabulary: {d}" for d in config_differences(old["vocabulary"], info["vocabulary"])]
    if diffs:
        raise ModelDirError(
            f"MODEL_DIR {model_dir} holds a run of a different model:\n  " + "\n  ".join(diffs)
            + "\nUse a new MODEL_DIR for this configuration, or restore the old one's settings.")
