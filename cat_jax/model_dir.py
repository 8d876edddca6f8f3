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
    diffs = config_differences(old["model_config"], info["model_config"])
    diffs += [f"vocabulary: {d}" for d in config_differences(old["vocabulary"], info["vocabulary"])]
    if diffs:
        raise ModelDirError(
            f"MODEL_DIR {model_dir} holds a run of a different model:\n  " + "\n  ".join(diffs)
            + "\nUse a new MODEL_DIR for this configuration, or restore the old one's settings.")
