"""The job of `python -m cat_jax.import_checkpoint`: a pretrained checkpoint -> a cat_jax MODEL_DIR.

SOURCE is a local directory in one of these formats, detected and logged:
  - `hf`: a Hugging Face Hub directory, its family from config.json's `model_type`: T5 / Flan-T5 /
    mT5 / ByT5 (`models/t5/convert/hf.py`), or a decoder-only llama, mistral, qwen2, qwen3, gemma
    or gemma2 (`models/decoder/convert.py`); any other model_type is a named error;
  - `t5x_legacy`, `t5x_orbax`: a T5X checkpoint_<step> directory or its model directory
    (`models/t5/convert/t5x.py`).
The result is an ordinary MODEL_DIR: an orbax checkpoint at step 0 holding the parameters,
`run_info.json` (the model's family and config, the vocabulary's identity and files, where it was
imported from) and the vocabulary (`spiece.model`, or a decoder's tokenizer files as the Hub ships
them). Every binary takes it: `train.initial_checkpoint_dir` (fine-tuning),
TEACHER_MODEL_DIR, CHECKPOINT_DIR, LARGE_MODEL_DIR / SMALL_MODEL_DIRS.

Nothing is written into MODEL_DIR until every tensor's name and shape has been checked, and the
directory appears only when complete (built beside it, then renamed). Tensors are converted one at
a time into memory-mapped scratch files that orbax writes from without copying, so host memory
holds about one tensor: an xl model imports on a 24 GiB host (the scratch needs the model's size
in free disk, next to MODEL_DIR, for the duration).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import gin
import numpy as np

import cat_jax.models.decoder.convert as decoder_hf
from cat_jax import hf_tokenizer, models, vocabularies, vocabulary_store
from cat_jax import model_dir as model_dir_lib
from cat_jax.checkpoints import save_host_state
from cat_jax.errors import ConfigError, ConversionError, ModelDirError
from cat_jax.models.convert import hub
from cat_jax.models.convert.tree import unflatten
from cat_jax.models.t5.convert import hf, t5x

log = logging.getLogger("cat_jax")

FORMATS = ("auto", "hf", "t5x_legacy", "t5x_orbax")
IMPORTED_STEP = 0


def detect_format(source: str) -> str:
    """The format of a SOURCE directory, or a ConversionError naming what was looked for."""
    if not os.path.isdir(source):
        raise ConversionError(
            f"SOURCE {source!r} is not a directory. Download or copy the checkpoint "
            "first (e.g. `huggingface-cli download google/flan-t5-small --local-dir DIR`, "
            "`gcloud storage cp -r gs://.../checkpoint_N DIR`)."
        )
    if hub.is_hf_dir(source):
        return "hf"
    kind = t5x.detect(source)
    if kind is not None:
        return kind
    if os.path.isfile(os.path.join(source, hub.CONFIG)):
        raise ConversionError(
            f"{source} has config.json but no {hub.SINGLE} or {hub.INDEX}: cat_jax reads "
            "safetensors only (a pytorch_model.bin checkpoint can be re-saved with "
            "`model.save_pretrained(dir, safe_serialization=True)`)."
        )
    raise ConversionError(
        f"{source} is in no format cat_jax knows: expected a Hugging Face directory (config.json + "
        f"{hub.SINGLE} or {hub.INDEX}), a T5X checkpoint_<step> directory (a msgpack `checkpoint` file, "
        f"or an Orbax `state/`), or a T5X model directory holding checkpoint_<step> directories. It "
        f"holds: {sorted(os.listdir(source))[:12]}."
    )


def hub_family(source: str) -> str:
    """The family of a Hub directory, from its config.json's model_type; a ConversionError naming
    the supported model types otherwise."""
    model_type = hub.read_config(source).get("model_type")
    if model_type in hf.SUPPORTED_MODEL_TYPES:
        return "t5"
    if model_type in decoder_hf.SUPPORTED_MODEL_TYPES:
        return "decoder"
    raise ConversionError(
        f"{source}: config.json's model_type={model_type!r} is not supported. Supported: "
        f"{', '.join(hf.SUPPORTED_MODEL_TYPES)} (encoder-decoders) and {', '.join(decoder_hf.SUPPORTED_MODEL_TYPES)} "
        "(decoder-only)."
    )


def _hub_tokenizer(source: str) -> Any:
    """A decoder checkpoint's own tokenizer (tokenizer.json, or tokenizer.model, with its configs)."""
    try:
        return hf_tokenizer.HFTokenizerVocabulary(source)
    except ConfigError as e:
        raise ConversionError(
            f"{source}: its tokenizer cannot be read ({e}). Copy the checkpoint's tokenizer "
            "files (tokenizer.json or tokenizer.model, tokenizer_config.json) beside it."
        ) from e


def _vocabulary(kind: str, spiece: str | None, extra_ids: int) -> Any:
    if kind == "byte":
        return vocabularies.ByteVocabulary(extra_ids=extra_ids)
    if spiece is None or not os.path.isfile(spiece):
        raise ConversionError(f"SentencePiece model {spiece!r} does not exist.")
    return vocabularies.SentencePieceVocabulary(spiece, extra_ids=extra_ids)


def _check_empty(model_dir: str) -> None:
    if "://" in model_dir:
        raise ModelDirError(f"MODEL_DIR {model_dir!r} is a URL; give a local (or mounted) path.")
    if os.path.exists(model_dir) and (not os.path.isdir(model_dir) or os.listdir(model_dir)):
        info = model_dir_lib.read_run_info(model_dir) if os.path.isdir(model_dir) else None
        what = ("a cat_jax run" if info else "files") + (
            f" imported from {info['imported_from'].get('source')}" if info and info.get("imported_from") else ""
        )
        raise ModelDirError(
            f"MODEL_DIR {model_dir} already holds {what}; nothing was written. Import into a new (or empty) directory."
        )


def _write_scratch(tensors: Iterator[tuple[str, np.ndarray]], scratch: str, total: int) -> dict[str, np.ndarray]:
    """Each tensor into a memory-mapped .npy file (read back read-only); {path: memmap}."""
    os.makedirs(scratch)
    out: dict[str, np.ndarray] = {}
    started, written = time.perf_counter(), 0
    for k, (path, array) in enumerate(tensors, start=1):
        file = os.path.join(scratch, f"{k:05d}.npy")
        mm = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=array.shape)
        mm[...] = array
        mm.flush()
        del mm
        written += array.nbytes
        out[path] = np.load(file, mmap_mode="r")
        if k == total or k % 50 == 0:
            rate = written / 2**20 / max(time.perf_counter() - started, 1e-9)
            log.info("Converted %d/%d tensors (%.1f MiB, %.0f MiB/s)", k, total, written / 2**20, rate)
    return out


@gin.configurable
def import_checkpoint(
    *,
    source: str = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    format: str = "auto",  # pylint: disable=redefined-builtin
    sentencepiece_model: str | None = None,
    extra_ids: int | None = None,
    byte_vocabulary: bool = False,
    t5x_gin_file: str | None = None,
) -> dict[str, Any]:
    """Import SOURCE into a new MODEL_DIR; returns the run_info written.

    Vocabulary: a Hub directory's own tokenizer (`spiece.model`, `tokenizer_config.json`'s
    extra_ids, default 100; ByT5: bytes) unless `sentencepiece_model` (+ `extra_ids`, default 100)
    or `byte_vocabulary=True` says otherwise; a T5X checkpoint carries none, so one of those is
    required. `t5x_gin_file`: a T5X gin file whose `network.T5Config.*` bindings complete the shape
    the tree gives (activation, max distance).
    """
    source = os.path.abspath(os.path.expanduser(source))
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    if format not in FORMATS:
        raise ConversionError(f"import_checkpoint.format={format!r}; choose one of {FORMATS}.")
    _check_empty(model_dir)
    detected = detect_format(source)
    if format != "auto" and format != detected:
        raise ConversionError(f"{source} looks like {detected}, not the format={format!r} asked for.")
    log.info("Importing %s (format: %s) into %s", source, detected, model_dir)
    if detected == "hf" and hub_family(source) == "decoder":
        return _import_decoder(source, model_dir)
    if detected == "hf":
        config, hf_config, tensors = hf.read(source)
        provenance = {
            "format": "hf",
            "model_type": hf_config.get("model_type"),
            "architectures": hf_config.get("architectures"),
        }
        kind, spiece, extra = (
            hf.tokenizer_of(source, hf_config) if not (sentencepiece_model or byte_vocabulary) else (None, None, 0)
        )
    else:
        config, provenance, tensors = t5x.read(source, t5x_gin_file)
        kind, spiece, extra = None, None, 0
    if byte_vocabulary:
        kind, spiece, extra = "byte", None, 0 if extra_ids is None else extra_ids
    elif sentencepiece_model:
        kind, spiece, extra = (
            "sentencepiece",
            os.path.abspath(sentencepiece_model),
            (hf.DEFAULT_EXTRA_IDS if extra_ids is None else extra_ids),
        )
    elif kind is None:
        raise ConversionError(
            "A T5X checkpoint does not carry its vocabulary: add "
            "--gin.import_checkpoint.sentencepiece_model=/path/to/sentencepiece.model (T5 and Flan-T5: "
            "a local copy of gs://t5-data/vocabs/cc_all.32000/sentencepiece.model; mT5: "
            "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model with extra_ids=0), or "
            "--gin.import_checkpoint.byte_vocabulary=True for ByT5."
        )
    elif extra_ids is not None:
        extra = extra_ids
    vocab = _vocabulary(kind, spiece, extra)
    if vocab.vocab_size > config.vocab_size:
        raise ConversionError(
            f"The vocabulary has {vocab.vocab_size} ids (with {extra} extra ids) but the model only "
            f"{config.vocab_size}: wrong tokenizer, or set import_checkpoint.extra_ids."
        )
    log.info("Model: %s; vocabulary: %s (%d ids, extra_ids=%d)", config, kind, vocab.vocab_size, extra)
    return _write_model_dir(source, model_dir, config, vocab, tensors, len(hf.name_map(config)), provenance)


def _import_decoder(source: str, model_dir: str) -> dict[str, Any]:
    """A decoder-only Hub checkpoint with its own tokenizer."""
    config, hf_config, tensors = decoder_hf.read(source)
    vocab = _hub_tokenizer(source)
    if vocab.vocab_size > config.vocab_size:
        raise ConversionError(
            f"{source}: the tokenizer has {vocab.vocab_size} ids but the model only "
            f"{config.vocab_size}: the tokenizer files belong to another checkpoint."
        )
    log.info(
        "Model: %s; vocabulary: the checkpoint's %s tokenizer (%d ids)", config, vocab.tokenizer_class, vocab.vocab_size
    )
    provenance = {
        "format": "hf",
        "model_type": hf_config.get("model_type"),
        "architectures": hf_config.get("architectures"),
    }
    return _write_model_dir(source, model_dir, config, vocab, tensors, len(decoder_hf.name_map(config)), provenance)


def _write_model_dir(
    source: str,
    model_dir: str,
    config: Any,
    vocab: Any,
    tensors: Iterator[tuple[str, np.ndarray]],
    total: int,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The MODEL_DIR of an imported model, built beside `model_dir` and renamed into place."""
    tmp = os.path.join(os.path.dirname(model_dir), f".{os.path.basename(model_dir)}.import-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        started = time.perf_counter()
        params = _write_scratch(tensors, os.path.join(tmp, "scratch"), total)
        info = {
            **models.build(config).describe(),
            "vocabulary": vocabularies.identity(vocab),
            "vocabulary_files": vocabulary_store.write_vocabulary(tmp, vocab),
            "imported_from": {"source": source, **provenance},
            "dataset": None,
            "loss_options": None,
            "teacher": None,
            "data_source": None,
        }
        save_host_state(tmp, IMPORTED_STEP, {"params": unflatten(params)}, {"imported_from": info["imported_from"]})
        del params
        shutil.rmtree(os.path.join(tmp, "scratch"))
        model_dir_lib.write_run_info(tmp, info)
        if os.path.isdir(model_dir):
            os.rmdir(model_dir)  # empty (checked above)
        os.replace(tmp, model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Imported %d tensors into %s in %.1f s", total, model_dir, time.perf_counter() - started)
    return info
