"""Hugging Face T5-family checkpoints (as the Hub ships them) <-> cat_jax parameter trees.

A Hub directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`), and the tokenizer: `spiece.model` (+ `tokenizer_config.json`,
whose `extra_ids` defaults to 100 as in `T5Tokenizer`), or none for ByT5's byte vocabulary.

Names and layouts (PyTorch `nn.Linear` weights are [out, in]; ours are [in, out] kernels):

    shared.weight [V, d]                                     token_embedder/embedding
    encoder.block.{i}.layer.0.layer_norm.weight              encoder/layers_{i}/pre_attention_norm/scale
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
                                            encoder/layers_{i}/attention/{query,key,value,out}/kernel (T)
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, heads]
                                                             encoder/relpos_bias/rel_embedding [heads, buckets] (T)
    encoder.block.{i}.layer.1.layer_norm.weight              encoder/layers_{i}/pre_mlp_norm/scale
    encoder.block.{i}.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}.weight   encoder/layers_{i}/mlp/.../kernel (T)
    encoder.final_layer_norm.weight                          encoder/encoder_norm/scale
    decoder.block.{i}.layer.{0,1,2}: self-attention (SelfAttention), cross-attention
        (EncDecAttention), MLP, each with its layer_norm     decoder/layers_{i}/{pre_self_attention_norm,
                                                             self_attention, pre_cross_attention_norm,
                                                             encoder_decoder_attention, pre_mlp_norm, mlp}
    decoder.final_layer_norm.weight                          decoder/decoder_norm/scale
    lm_head.weight [V, d] (untied models only)               decoder/logits_dense/kernel [d, V] (T)

`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (copies of `shared.weight`) and a
tied `lm_head.weight` may be present or not; when present they must equal `shared.weight`.
Tensors of any float dtype are read one at a time and converted to float32.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cat_jax.errors import ConversionError
from cat_jax.models.convert.hub import SafetensorsFiles, read_config
from cat_jax.models.convert.tree import as_float32, check_names_and_shapes
from cat_jax.models.t5.config import T5Config

log = logging.getLogger("cat_jax")

SUPPORTED_MODEL_TYPES = ("t5", "mt5")
ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}
FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated-gelu", "gated-silu": "gated-silu"}
ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
DEFAULT_EXTRA_IDS = 100  # transformers.T5Tokenizer's default


def config_from_hf(hf: Mapping[str, Any], where: str) -> T5Config:
    """The T5Config of a Hub `config.json` (T5 v1.0, v1.1, Flan-T5, mT5, ByT5 shapes)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES or any(a.endswith("EncoderModel") for a in archs):
        raise ConversionError(
            f"{where}: config.json describes model_type={model_type!r}, architectures={archs}; cat_jax "
            f"imports T5-family encoder-decoders ({', '.join(SUPPORTED_MODEL_TYPES)}, "
            "T5ForConditionalGeneration / MT5ForConditionalGeneration), not this architecture."
        )
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise ConversionError(
            f"{where}: feed_forward_proj={proj!r} is not supported; cat_jax knows {', '.join(FEED_FORWARD)}."
        )
    try:
        return T5Config(
            vocab_size=int(hf["vocab_size"]),
            emb_dim=int(hf["d_model"]),
            num_heads=int(hf["num_heads"]),
            head_dim=int(hf["d_kv"]),
            mlp_dim=int(hf["d_ff"]),
            num_encoder_layers=int(hf["num_layers"]),
            num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
            dropout_rate=0.0,
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            mlp_activation=FEED_FORWARD[proj],
            logits_via_embedding=bool(hf.get("tie_word_embeddings", True)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: config.json lacks {e.args[0]!r}, which a T5 config has.") from e
    except ValueError as e:
        raise ConversionError(f"{where}: config.json does not give a valid T5 shape: {e}") from e


def config_to_hf(config: T5Config, model_type: str = "t5", dtype: str = "float32") -> dict[str, Any]:
    """A Hub `config.json` for `config` (the inverse of `config_from_hf`)."""
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.mlp_activation,
        "dense_act_fn": {"relu": "relu", "gated-gelu": "gelu_new", "gated-silu": "silu"}[config.mlp_activation],
        "is_gated_act": config.gated_mlp,
        "tie_word_embeddings": config.logits_via_embedding,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "vocab_size": config.vocab_size,
        "dropout_rate": config.dropout_rate,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def _mlp_names(config: T5Config) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if config.gated_mlp else ("wi", "wo")


def name_map(config: T5Config) -> dict[str, tuple[str, bool]]:
    """{our path: (Hub name, transposed)} for every parameter of `config`'s model."""
    out: dict[str, tuple[str, bool]] = {"token_embedder/embedding": ("shared.weight", False)}

    def attention(ours: str, theirs: str) -> None:
        for mine, hub in _ATTENTION.items():
            out[f"{ours}/{mine}/kernel"] = (f"{theirs}.{hub}.weight", True)

    def mlp(ours: str, theirs: str) -> None:
        for name in _mlp_names(config):
            out[f"{ours}/{name}/kernel"] = (f"{theirs}.{name}.weight", True)

    for stack, layers, final in (
        ("encoder", config.num_encoder_layers, "encoder_norm"),
        ("decoder", config.num_decoder_layers, "decoder_norm"),
    ):
        out[f"{stack}/relpos_bias/rel_embedding"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            True,
        )
        out[f"{stack}/{final}/scale"] = (f"{stack}.final_layer_norm.weight", False)
        for i in range(layers):
            ours, theirs = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            if stack == "encoder":
                out[f"{ours}/pre_attention_norm/scale"] = (f"{theirs}.0.layer_norm.weight", False)
                attention(f"{ours}/attention", f"{theirs}.0.SelfAttention")
                out[f"{ours}/pre_mlp_norm/scale"] = (f"{theirs}.1.layer_norm.weight", False)
                mlp(f"{ours}/mlp", f"{theirs}.1.DenseReluDense")
            else:
                out[f"{ours}/pre_self_attention_norm/scale"] = (f"{theirs}.0.layer_norm.weight", False)
                attention(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
                out[f"{ours}/pre_cross_attention_norm/scale"] = (f"{theirs}.1.layer_norm.weight", False)
                attention(f"{ours}/encoder_decoder_attention", f"{theirs}.1.EncDecAttention")
                out[f"{ours}/pre_mlp_norm/scale"] = (f"{theirs}.2.layer_norm.weight", False)
                mlp(f"{ours}/mlp", f"{theirs}.2.DenseReluDense")
    if not config.logits_via_embedding:
        out["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
    return out


def read(directory: str) -> tuple[T5Config, dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """(config, config.json, an iterator over (our path, float32 array) one tensor at a time).

    Every name and shape is checked before the first tensor is read: unknown or missing tensors
    and shape mismatches are a ConversionError listing them.
    """
    hf = read_config(directory)
    config = config_from_hf(hf, directory)
    files = SafetensorsFiles(directory)
    names = name_map(config)
    by_hub = {hub: ours for ours, (hub, _) in names.items()}
    available = dict(files.shapes)
    if "shared.weight" not in available:
        for alias in ALIASES:
            if alias in available:
                available["shared.weight"] = available[alias]
                files.files["shared.weight"] = files.files[alias]
                break
    optional = set(ALIASES) | ({"lm_head.weight"} if config.logits_via_embedding else set())
    shapes = {}
    for hub, shape in available.items():
        if hub in by_hub:
            transposed = names[by_hub[hub]][1]
            shapes[by_hub[hub]] = tuple(reversed(shape)) if transposed else tuple(shape)
        elif hub not in optional:
            shapes[hub] = tuple(shape)  # reported as having no place in the model
    check_names_and_shapes(
        config, shapes, f"Hugging Face checkpoint {directory}", source_name=lambda p: names.get(p, (None,))[0]
    )
    for name in optional & set(available):
        if available[name] != available["shared.weight"]:
            raise ConversionError(
                f"{directory}: {name} has shape {available[name]} but shared.weight "
                f"{available['shared.weight']}; with tie_word_embeddings they are one tensor."
            )

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for ours, (hub, transposed) in names.items():
            array = as_float32(files.get(hub))
            yield ours, (array.T if transposed else array)
            del array  # one tensor in memory at a time
        for name in sorted((optional & set(files.shapes)) - {"shared.weight"}):
            if not np.array_equal(files.get(name), files.get("shared.weight")):
                raise ConversionError(
                    f"{directory}: {name} differs from shared.weight, but they are one tensor (the "
                    "token embedding, or a tied LM head); the checkpoint is inconsistent."
                )

    return config, hf, tensors()


def tensors_for_export(
    config: T5Config, params: Mapping[str, np.ndarray], dtype: Callable[[np.ndarray], np.ndarray] = np.asarray
) -> dict[str, np.ndarray]:
    """{Hub name: contiguous array} of a flat cat_jax parameter dict, as save_pretrained writes it
    (tied embeddings once, as `shared.weight`)."""
    out = {}
    for ours, (hub, transposed) in name_map(config).items():
        array = np.asarray(params[ours])
        out[hub] = np.ascontiguousarray(dtype(array.T if transposed else array))
    return out


def tokenizer_config(kind: str, extra_ids: int) -> dict[str, Any]:
    """`tokenizer_config.json` for T5Tokenizer (SentencePiece) or ByT5Tokenizer (bytes)."""
    common = {
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": extra_ids,
        "model_max_length": 512,
    }
    cls = "T5Tokenizer" if kind == "sentencepiece" else "ByT5Tokenizer"
    return {"tokenizer_class": cls, **common}


def tokenizer_of(directory: str, hf: Mapping[str, Any]) -> tuple[str, str | None, int]:
    """(kind, SentencePiece model path or None, extra ids) of a Hub directory's tokenizer."""
    tok: dict[str, Any] = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            tok = json.load(f)
    spiece = os.path.join(directory, "spiece.model")
    if tok.get("tokenizer_class") == "ByT5Tokenizer" or (
        not os.path.isfile(spiece) and "byt5" in str(hf.get("_name_or_path", "")).lower()
    ):
        return "byte", None, int(tok.get("extra_ids", 125))
    if not os.path.isfile(spiece):
        raise ConversionError(
            f"{directory} has no spiece.model (the SentencePiece vocabulary the Hub ships beside a T5 "
            "model). Copy it there, or give --gin.import_checkpoint.sentencepiece_model=PATH."
        )
    return "sentencepiece", spiece, int(tok.get("extra_ids", DEFAULT_EXTRA_IDS))
