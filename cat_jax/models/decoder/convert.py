"""Hugging Face decoder-only checkpoints (llama, mistral, qwen2, qwen3, gemma, gemma2) <-> cat_jax.

A Hub directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`); its tokenizer files are not read here. Names and layouts (PyTorch
`nn.Linear` weights are [out, in]; H heads, K key/value heads of D dims, d = hidden size):

    model.embed_tokens.weight [V, d]                       embedder/embedding
    model.layers.{i}.input_layernorm.weight                layers_{i}/input_norm/scale
    model.layers.{i}.self_attn.q_proj.weight [H*D, d]      layers_{i}/attention/query/kernel [d, H, D]
    model.layers.{i}.self_attn.{k,v}_proj.weight [K*D, d]  layers_{i}/attention/{key,value}/kernel [d, K, D]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias (qwen2)   layers_{i}/attention/{query,key,value}/bias [., D]
    model.layers.{i}.self_attn.{q,k}_norm.weight (qwen3)   layers_{i}/attention/{query,key}_norm/scale
    model.layers.{i}.self_attn.o_proj.weight [d, H*D]      layers_{i}/attention/out/kernel [H, D, d]
    model.layers.{i}.post_attention_layernorm.weight       layers_{i}/pre_mlp_norm/scale (gemma2:
                                                           layers_{i}/post_attention_norm/scale)
    model.layers.{i}.pre_feedforward_layernorm.weight      layers_{i}/pre_mlp_norm/scale (gemma2)
    model.layers.{i}.post_feedforward_layernorm.weight     layers_{i}/post_mlp_norm/scale (gemma2)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight        layers_{i}/mlp/{gate,up,down}/kernel (T)
    model.norm.weight                                      final_norm/scale
    lm_head.weight [V, d] (untied models)                  lm_head/kernel [d, V] (T)

Gemma's RMSNorm weights are stored as trained (the network multiplies by 1 + weight). With tied
embeddings a `lm_head.weight` may be present or not; when present it must equal the embedding.
The config reading follows transformers 4.57's modeling code, including its defaults where a key is
absent (e.g. gemma's MLP uses `hidden_act`, gemma2's `hidden_activation`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cat_jax.errors import ConversionError
from cat_jax.models.convert.hub import CONFIG, SINGLE, SafetensorsFiles, is_hf_dir
from cat_jax.models.convert.tree import as_float32, flatten
from cat_jax.models.decoder.config import MODEL_TYPES, DecoderConfig
from cat_jax.models.decoder.model import abstract_params

SUPPORTED_MODEL_TYPES = MODEL_TYPES
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# transformers' activation names -> DecoderConfig.activation, and back.
ACTIVATIONS_IN = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}
ACTIVATIONS_OUT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# The class defaults transformers 4.57 applies when config.json leaves a key out.
_DEFAULT_MAX_POSITIONS = {
    "llama": 2048,
    "mistral": 131072,
    "qwen2": 32768,
    "qwen3": 32768,
    "gemma": 8192,
    "gemma2": 8192,
}
_TIED_BY_DEFAULT = ("gemma", "gemma2")
_GEMMA = ("gemma", "gemma2")
_SHOWN = 12

# layouts: how one of our arrays is stored on the Hub
SAME, TRANSPOSED, HEADS_IN, HEADS_OUT, HEADS_BIAS = "same", "transposed", "heads_in", "heads_out", "heads_bias"


def read_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CONFIG)) as f:
        return json.load(f)


def _sliding(hf: Mapping[str, Any], model_type: str, num_layers: int, where: str) -> tuple[int | None, str]:
    """(sliding_window, sliding_window_layers) of a config.json."""
    if model_type in ("llama", "gemma"):
        return None, "all"
    window = hf.get("sliding_window", 4096)
    if model_type == "mistral":
        return window, "all"
    if model_type == "gemma2":
        default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    else:  # qwen2, qwen3: layers from max_window_layers on slide, when use_sliding_window
        window = window if hf.get("use_sliding_window", False) else None
        start = hf.get("max_window_layers", 28)
        default = [
            "sliding_attention" if window is not None and i >= start else "full_attention" for i in range(num_layers)
        ]
    sliding = [t == "sliding_attention" for t in (hf.get("layer_types") or default)]
    if window is None or not any(sliding):
        return None, "all"
    if all(sliding):
        return window, "all"
    if sliding == [i % 2 == 0 for i in range(num_layers)]:
        return window, "even"
    raise ConversionError(
        f"{where}: config.json's layer_types {hf.get('layer_types') or default} mix sliding and "
        "global layers in a pattern cat_jax does not support (every layer, or layers 0, 2, 4, "
        "... as Gemma 2)."
    )


def _rope(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    scaling = hf.get("rope_scaling")
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {"rope_scaling": "none"}
    if kind != "llama3":
        raise ConversionError(
            f"{where}: rope_scaling type {kind!r} is not supported; cat_jax knows 'default' and 'llama3'."
        )
    return {
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_original_max_position": int(scaling["original_max_position_embeddings"]),
    }


def config_from_hf(hf: Mapping[str, Any], where: str) -> DecoderConfig:
    """The DecoderConfig of a Hub `config.json` of one of SUPPORTED_MODEL_TYPES."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{where}: config.json describes model_type={model_type!r} (architectures "
            f"{hf.get('architectures')}); cat_jax imports the decoder-only model types "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (and T5-family encoder-decoders: t5, mt5)."
        )
    unsupported = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if unsupported:
        raise ConversionError(
            f"{where}: config.json sets {unsupported}; cat_jax's decoder has no such biases "
            f"(only Qwen2's q/k/v biases)."
        )
    act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
    act = hf.get(act_key) or ("gelu_pytorch_tanh" if model_type in _GEMMA else "silu")
    if act not in ACTIVATIONS_IN:
        raise ConversionError(f"{where}: {act_key}={act!r} is not supported; cat_jax knows {sorted(ACTIVATIONS_IN)}.")
    try:
        heads, num_layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        window, pattern = _sliding(hf, model_type, num_layers, where)
        gemma2 = model_type == "gemma2"
        return DecoderConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            emb_dim=int(hf["hidden_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            mlp_dim=int(hf["intermediate_size"]),
            activation=ACTIVATIONS_IN[act],
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            **_rope(hf, where),
            max_position_embeddings=int(hf.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[model_type]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            norm_plus_one=model_type in _GEMMA,
            scale_embeddings=model_type in _GEMMA,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            sandwich_norms=gemma2,
            attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_logit_softcap=hf.get("final_logit_softcapping", 30.0) if gemma2 else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma2 else None,
            sliding_window=window,
            sliding_window_layers=pattern,
        )
    except KeyError as e:
        raise ConversionError(f"{where}: config.json lacks {e.args[0]!r}, which a {model_type} config has.") from e
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: config.json does not give a valid {model_type} shape: {e}") from e


# What each model_type fixes (the rest of DecoderConfig is free).
_FIXED = {
    "llama": dict(
        norm_plus_one=False,
        scale_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        sandwich_norms=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        sliding_window=None,
    ),
    "mistral": dict(
        norm_plus_one=False,
        scale_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        sandwich_norms=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        sliding_window_layers="all",
    ),
    "qwen2": dict(
        norm_plus_one=False,
        scale_embeddings=False,
        qkv_bias=True,
        qk_norm=False,
        sandwich_norms=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        sliding_window_layers="all",
    ),
    "qwen3": dict(
        norm_plus_one=False,
        scale_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
        sandwich_norms=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        sliding_window_layers="all",
    ),
    "gemma": dict(
        norm_plus_one=True,
        scale_embeddings=True,
        qkv_bias=False,
        qk_norm=False,
        sandwich_norms=False,
        attn_logit_softcap=None,
        final_logit_softcap=None,
        query_pre_attn_scalar=None,
        sliding_window=None,
    ),
    "gemma2": dict(
        norm_plus_one=True,
        scale_embeddings=True,
        qkv_bias=False,
        qk_norm=False,
        sandwich_norms=True,
        sliding_window_layers="even",
    ),
}


def _rope_to_hf(config: DecoderConfig) -> dict[str, Any] | None:
    if config.rope_scaling == "none":
        return None
    return {
        "rope_type": "llama3",
        "factor": config.rope_scaling_factor,
        "low_freq_factor": config.rope_low_freq_factor,
        "high_freq_factor": config.rope_high_freq_factor,
        "original_max_position_embeddings": config.rope_original_max_position,
    }


def config_to_hf(
    config: DecoderConfig, dtype: str = "float32", extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A Hub `config.json` for `config` as its `model_type` (the inverse of `config_from_hf`); `extra`
    adds keys such as bos_token_id / eos_token_id / pad_token_id. A config the model_type cannot
    express (e.g. q/k norms as llama) is a ConversionError."""
    model_type = config.model_type
    wrong = {k: getattr(config, k) for k, v in _FIXED[model_type].items() if getattr(config, k) != v}
    if model_type == "gemma2" and config.sliding_window is None:
        wrong["sliding_window"] = None
    if wrong:
        raise ConversionError(
            f"A {model_type} checkpoint cannot express {wrong} (it needs "
            f"{ {k: _FIXED[model_type].get(k) for k in wrong} }); set DecoderConfig.model_type "
            "to the family these switches belong to."
        )
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.emb_dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_to_hf(config),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": ACTIVATIONS_OUT[config.activation],
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if model_type in ("llama", "qwen3", "gemma", "gemma2"):
        out["attention_bias"] = False
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        out.update(
            use_sliding_window=config.sliding_window is not None,
            sliding_window=config.sliding_window,
            max_window_layers=0 if config.sliding_window is not None else config.num_layers,
        )
    if model_type == "gemma2":
        out.update(
            hidden_activation=out["hidden_act"],
            sliding_window=config.sliding_window,
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            layer_types=[
                "sliding_attention" if config.layer_window(i) else "full_attention" for i in range(config.num_layers)
            ],
        )
    out.update(extra or {})
    return out


def name_map(config: DecoderConfig) -> dict[str, tuple[str, str]]:
    """{our path: (Hub name, layout)} for every parameter of `config`'s model."""
    out = {"embedder/embedding": ("model.embed_tokens.weight", SAME), "final_norm/scale": ("model.norm.weight", SAME)}
    for i in range(config.num_layers):
        ours, hub = f"layers_{i}", f"model.layers.{i}"
        out[f"{ours}/input_norm/scale"] = (f"{hub}.input_layernorm.weight", SAME)
        for mine, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{ours}/attention/{mine}/kernel"] = (f"{hub}.self_attn.{theirs}_proj.weight", HEADS_IN)
            if config.qkv_bias:
                out[f"{ours}/attention/{mine}/bias"] = (f"{hub}.self_attn.{theirs}_proj.bias", HEADS_BIAS)
        if config.qk_norm:
            out[f"{ours}/attention/query_norm/scale"] = (f"{hub}.self_attn.q_norm.weight", SAME)
            out[f"{ours}/attention/key_norm/scale"] = (f"{hub}.self_attn.k_norm.weight", SAME)
        out[f"{ours}/attention/out/kernel"] = (f"{hub}.self_attn.o_proj.weight", HEADS_OUT)
        if config.sandwich_norms:
            out[f"{ours}/post_attention_norm/scale"] = (f"{hub}.post_attention_layernorm.weight", SAME)
            out[f"{ours}/pre_mlp_norm/scale"] = (f"{hub}.pre_feedforward_layernorm.weight", SAME)
            out[f"{ours}/post_mlp_norm/scale"] = (f"{hub}.post_feedforward_layernorm.weight", SAME)
        else:
            out[f"{ours}/pre_mlp_norm/scale"] = (f"{hub}.post_attention_layernorm.weight", SAME)
        for name in ("gate", "up", "down"):
            out[f"{ours}/mlp/{name}/kernel"] = (f"{hub}.mlp.{name}_proj.weight", TRANSPOSED)
    if not config.tie_embeddings:
        out["lm_head/kernel"] = ("lm_head.weight", TRANSPOSED)
    return out


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """{our path: shape} of every parameter the model of `config` has (nothing is allocated)."""
    abstract, _ = abstract_params(config)
    return {path: tuple(leaf.shape) for path, leaf in flatten(abstract).items()}


def _hub_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == TRANSPOSED:
        return tuple(reversed(shape))
    if layout == HEADS_IN:  # [d, heads, D] -> [heads * D, d]
        return (shape[1] * shape[2], shape[0])
    if layout == HEADS_OUT:  # [heads, D, d] -> [d, heads * D]
        return (shape[2], shape[0] * shape[1])
    if layout == HEADS_BIAS:  # [heads, D] -> [heads * D]
        return (shape[0] * shape[1],)
    return shape


def to_ours(array: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """A Hub tensor in our layout (`shape`)."""
    if layout in (HEADS_IN, HEADS_OUT):
        return array.T.reshape(shape)
    return array.T if layout == TRANSPOSED else array.reshape(shape)


def to_hub(array: np.ndarray, layout: str) -> np.ndarray:
    """One of our arrays in the Hub's layout (the inverse of `to_ours`)."""
    if layout == HEADS_IN:
        return array.reshape(array.shape[0], -1).T
    if layout == HEADS_OUT:
        return array.reshape(-1, array.shape[-1]).T
    if layout == HEADS_BIAS:
        return array.reshape(-1)
    return array.T if layout == TRANSPOSED else array


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(sorted(names)[:_SHOWN]) + more


def read(directory: str) -> tuple[DecoderConfig, dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """(config, config.json, an iterator over (our path, float32 array) one tensor at a time).

    Every name and shape is checked before the first tensor is read: missing or unknown tensors and
    shape mismatches are a ConversionError listing them.
    """
    if not is_hf_dir(directory):
        raise ConversionError(
            f"{directory} is not a Hugging Face checkpoint directory (config.json and "
            "model.safetensors or model.safetensors.index.json)."
        )
    hf = read_config(directory)
    config = config_from_hf(hf, directory)
    files = SafetensorsFiles(directory)
    names = name_map(config)
    ours_shapes = expected_shapes(config)
    want = {hub: _hub_shape(ours_shapes[path], layout) for path, (hub, layout) in names.items()}
    optional = {"lm_head.weight": want["model.embed_tokens.weight"]} if config.tie_embeddings else {}
    missing = [hub for hub in want if hub not in files.shapes]
    extra = [hub for hub in files.shapes if hub not in want and hub not in optional]
    wrong = [
        f"{hub}: {files.shapes[hub]} where the config needs {shape}"
        for hub, shape in {**want, **optional}.items()
        if hub in files.shapes and files.shapes[hub] != shape
    ]
    problems = [
        f"{what}: {_listing(items)}"
        for what, items in (
            ("missing tensors", missing),
            ("tensors the model has no place for", extra),
            ("shape mismatches", wrong),
        )
        if items
    ]
    if problems:
        raise ConversionError(
            f"Hugging Face checkpoint {directory} does not fit the {config.model_type} model its "
            "config.json describes:\n  "
            + "\n  ".join(problems)
            + "\nCheck that the checkpoint is complete and that its config matches its tensors."
        )

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for path, (hub, layout) in names.items():
            yield path, to_ours(as_float32(files.get(hub)), layout, ours_shapes[path])
        if "lm_head.weight" in optional and "lm_head.weight" in files.shapes:
            if not np.array_equal(files.get("lm_head.weight"), files.get("model.embed_tokens.weight")):
                raise ConversionError(
                    f"{directory}: lm_head.weight differs from model.embed_tokens.weight, but "
                    "tie_word_embeddings makes them one tensor; the checkpoint is inconsistent."
                )

    return config, hf, tensors()


def import_hf(directory: str) -> tuple[DecoderConfig, dict[str, np.ndarray]]:
    """(config, {our path: float32 array}) of a Hub directory, all in memory (`read` streams)."""
    config, _, tensors = read(directory)
    return config, dict(tensors)


def tensors_for_export(
    config: DecoderConfig, params: Mapping[str, np.ndarray], cast: Callable[[np.ndarray], np.ndarray] = np.asarray
) -> dict[str, np.ndarray]:
    """{Hub name: contiguous array} of a flat parameter dict, as save_pretrained writes it (a tied
    LM head is not stored)."""
    return {
        hub: np.ascontiguousarray(cast(to_hub(np.asarray(params[path]), layout)))
        for path, (hub, layout) in name_map(config).items()
    }


def export_hf(
    config: DecoderConfig,
    params: Mapping[str, np.ndarray],
    directory: str,
    dtype: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
) -> str:
    """Writes `config.json` and `model.safetensors` (float32 or bfloat16) into a new or empty
    `directory`, which `transformers.AutoModelForCausalLM.from_pretrained` loads; returns it."""
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

    casts = {"float32": lambda a: a.astype(np.float32), "bfloat16": lambda a: a.astype(ml_dtypes.bfloat16)}
    if dtype not in casts:
        raise ConversionError(f"Export dtype {dtype!r}; choose one of {sorted(casts)}.")
    if os.path.exists(directory) and os.listdir(directory):
        raise ConversionError(f"{directory} is not empty; nothing was written. Export into a new directory.")
    hf_config = config_to_hf(config, dtype, extra_config)
    tensors = tensors_for_export(config, params, casts[dtype])
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SINGLE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return directory
