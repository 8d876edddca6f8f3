"""The job of `python -m cat_jax.export_checkpoint`: a cat_jax MODEL_DIR -> a Hugging Face directory.

Writes `config.json` and `model.safetensors` (PyTorch names and layouts, as `save_pretrained`
writes them) and the tokenizer. A T5-family model: `tokenizer_config.json` and, for a SentencePiece
vocabulary, `spiece.model`, what `transformers.T5ForConditionalGeneration.from_pretrained(dir)` and
`T5Tokenizer.from_pretrained(dir)` (ByT5Tokenizer for bytes) load; a model imported from mT5 is
written back as mT5 (model_type "mt5"). A decoder-only model: its model_type's config and the
tokenizer files its MODEL_DIR stores, what `AutoModelForCausalLM` and `AutoTokenizer` load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any

import gin
import jax
import numpy as np

import cat_jax.models.decoder.convert as decoder_hf
from cat_jax import model_dir as model_dir_lib
from cat_jax import models, vocabulary_store
from cat_jax.checkpoints import restore_params
from cat_jax.errors import ConversionError
from cat_jax.models.convert import hub
from cat_jax.models.convert.tree import flatten, unstack_layers
from cat_jax.models.t5.convert import hf

log = logging.getLogger("cat_jax")

DTYPES = ("float32", "bfloat16")


def read_params(model_dir: str, step: int | None = None) -> tuple[Any, dict[str, Any], dict[str, np.ndarray], int]:
    """(model config, run_info, {path: float32 numpy array}, step) of a MODEL_DIR's checkpoint, on
    the host, in the per-layer layout the Hub's names follow (a scanned checkpoint is unstacked:
    the config returned then says scan_layers=False)."""
    info = model_dir_lib.read_run_info(model_dir)
    if info is None:
        raise ConversionError(f"{model_dir} has no {model_dir_lib.RUN_INFO}: not a cat_jax MODEL_DIR.")
    model = models.from_run_info(info)
    config = model.config
    abstract, _ = model.abstract_params()
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
    params, meta = restore_params(model_dir, template, step=step)
    if getattr(config, "scan_layers", False):
        params, config = unstack_layers(params), config.replace(scan_layers=False)
    return config, info, {k: np.asarray(v) for k, v in flatten(params).items()}, int(meta["step"])


@gin.configurable
def export_checkpoint(
    *, model_dir: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, step: int | None = None, dtype: str = "float32"
) -> str:
    """Write MODEL_DIR's checkpoint (latest step unless given) as a Hugging Face directory."""
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    if dtype not in DTYPES:
        raise ConversionError(f"export_checkpoint.dtype={dtype!r}; choose one of {DTYPES}.")
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConversionError(
            f"OUTPUT_DIR {output_dir} is not empty; nothing was written. Export into a new directory."
        )
    config, info, params, step = read_params(model_dir, step)
    if config.family == "decoder":
        return _export_decoder(model_dir, output_dir, config, info, params, step, dtype)
    model_type = ((info.get("imported_from") or {}).get("model_type")) or "t5"
    cast = (lambda a: a.astype(ml_dtypes.bfloat16)) if dtype == "bfloat16" else (lambda a: a)
    tensors = hf.tensors_for_export(config, params, cast)
    record = info.get("vocabulary_files") or {}
    vocab = vocabulary_store.model_vocabulary(model_dir, info)
    tmp = f"{output_dir}.export-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, hub.SINGLE), metadata={"format": "pt"})
        with open(os.path.join(tmp, hub.CONFIG), "w") as f:
            json.dump(hf.config_to_hf(config, model_type, dtype), f, indent=2, sort_keys=True)
        kind = record.get("kind", "byte")
        if kind == "sentencepiece":
            shutil.copyfile(os.path.join(model_dir, record["file"]), os.path.join(tmp, "spiece.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(hf.tokenizer_config(kind, int(record.get("extra_ids", 0))), f, indent=2, sort_keys=True)
        if vocab.vocab_size > config.vocab_size:
            raise ConversionError(
                f"The vocabulary ({vocab.vocab_size} ids) exceeds the model's vocab_size {config.vocab_size}."
            )
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Exported step %d of %s (%d tensors, %s) to %s", step, model_dir, len(tensors), dtype, output_dir)
    return output_dir


def _export_decoder(
    model_dir: str,
    output_dir: str,
    config: Any,
    info: dict[str, Any],
    params: dict[str, np.ndarray],
    step: int,
    dtype: str,
) -> str:
    """A decoder-only model as its model_type's Hub directory, with the tokenizer files its
    MODEL_DIR stores (built beside OUTPUT_DIR, then renamed into place)."""
    vocab = vocabulary_store.model_vocabulary(model_dir, info)
    if vocab.vocab_size > config.vocab_size:
        raise ConversionError(
            f"The vocabulary ({vocab.vocab_size} ids) exceeds the model's vocab_size {config.vocab_size}."
        )
    ids = {name: getattr(vocab, attr, None) for name, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"))}
    tmp = f"{output_dir}.export-{uuid.uuid4().hex[:8]}"
    try:
        decoder_hf.export_hf(config, params, tmp, dtype, {k: v for k, v in ids.items() if v is not None})
        if hasattr(vocab, "write_files"):
            vocab.write_files(tmp)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Exported step %d of %s (%s, %s) to %s", step, model_dir, config.model_type, dtype, output_dir)
    return output_dir
