"""`DecoderConfig`: the architecture of a decoder-only language model, bound from gin model files.

One config covers Llama (2, 3, 3.1, 3.2), Mistral, Qwen2 / Qwen2.5, Qwen3, Gemma and Gemma 2: they
differ only in the switches below (`model_type` names the Hugging Face family a checkpoint is read
from and written back as; the network itself never looks at it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import gin
import jax.numpy as jnp

from cat_jax.errors import ConfigError
from cat_jax.models.attention import ATTENTION_IMPLS
from cat_jax.models.stack import REMAT_POLICIES

FAMILY = "decoder"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The gated MLP's activation: down(act(gate x) * up x). silu: SwiGLU (Llama, Mistral, Qwen);
# gelu_tanh: GeGLU with the tanh approximation (Gemma 2, Hugging Face's "gelu_pytorch_tanh");
# gelu: exact GeGLU (what transformers runs for a Gemma config.json saying hidden_act "gelu").
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_SCALINGS = ("none", "llama3")
# Which layers use the sliding window: every layer (Mistral) or layers 0, 2, 4, ... (Gemma 2; the
# odd layers attend globally).
SLIDING_WINDOW_LAYERS = ("all", "even")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@gin.configurable("DecoderConfig")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shapes and switches of a decoder-only transformer (pre-norm, rotary, grouped-query attention).

    Sizes: `emb_dim` (hidden size d), `num_layers`, `num_heads` query heads and `num_kv_heads`
    key/value heads (grouped-query attention; `num_heads` is a multiple of it) of `head_dim` each
    (independent of d / heads), `mlp_dim` of the gated MLP. `vocab_size` is left to the trainer,
    which fills it from the task's vocabulary unless a model file of a pretrained checkpoint fixes
    it.

    Positions: rotary embeddings with base `rope_theta`; `rope_scaling='llama3'` rescales their
    frequencies as Llama 3.1 does (`rope_scaling_factor`, `rope_low_freq_factor`,
    `rope_high_freq_factor`, `rope_original_max_position`). `max_position_embeddings` is the
    context length the checkpoint was trained for (recorded, not enforced by the network).

    Switches: `rms_norm_eps`; `norm_plus_one` (Gemma: RMSNorm multiplies by 1 + scale, the scale
    stored as trained, initialised at 0); `scale_embeddings` (Gemma: token embeddings times
    sqrt(d)); `qkv_bias` (Qwen2); `qk_norm` (Qwen3: RMSNorm over head_dim of queries and keys);
    `tie_embeddings` (logits through the token embedding); `sandwich_norms` (Gemma 2: an RMSNorm
    after attention and after the MLP, before each residual add); `attn_logit_softcap` and
    `final_logit_softcap` (Gemma 2: cap * tanh(x / cap) of the attention scores and of the logits);
    `query_pre_attn_scalar` (Gemma 2: scores scaled by its -1/2 power instead of head_dim's);
    `sliding_window` (keys more than `sliding_window - 1` positions back are invisible) on the
    layers `sliding_window_layers` says.

    `dtype` is the compute dtype; parameters are float32, softmax and norm statistics are computed
    in float32.

    Execution: `attention_impl` is one of ATTENTION_IMPLS (`cat_jax.models.attention`: "einsum", or
    "dot_product" for `jax.nn.dot_product_attention`, which cannot soft-cap the scores, so it is
    refused with `attn_logit_softcap`); (`cat_jax.models.stack`) `remat_policy` is one of
    REMAT_POLICIES ("none", "full", "save_dot"), applied to each layer; `scan_layers` runs the
    layers as one `nn.scan` over
    parameters stacked on a leading "layers" axis (`layers/...` instead of `layers_{i}/...`). A
    scanned stack runs one layer body, so every layer must attend alike: sliding windows on the
    even layers only (Gemma 2) cannot be scanned (a ConfigError).

    run_info.json: `to_dict` leaves `remat_policy` out. It changes neither the parameters nor any
    value, only what the backward pass keeps, so it is a setting of a training run (its
    operative_config.gin records it), not of the model: a checkpoint trained with remat restores as
    a teacher, for eval or for fine-tuning with any policy, resuming may change it, and run_infos
    written before the field existed read the same. `scan_layers` is recorded: it is the
    checkpoint's parameter layout (absent in older run_infos: False, their layout).
    """

    family: ClassVar[str] = FAMILY

    model_type: str = "llama"
    vocab_size: int | None = None
    emb_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sandwich_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    sliding_window_layers: str = "all"
    dtype: str = "float32"
    attention_impl: str = "einsum"
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        for name in (
            "emb_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_position_embeddings",
            "rope_original_max_position",
        ):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.vocab_size is not None and not (_positive_int(self.vocab_size) and self.vocab_size > 1):
            raise ValueError(
                f"DecoderConfig.vocab_size must be an int > 1 or None (filled in from the task's "
                f"vocabulary), got {self.vocab_size!r}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each key/value head serves a group of query heads."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"DecoderConfig.head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}."
            )
        choices = (
            ("model_type", MODEL_TYPES),
            ("activation", ACTIVATIONS),
            ("rope_scaling", ROPE_SCALINGS),
            ("sliding_window_layers", SLIDING_WINDOW_LAYERS),
            ("dtype", COMPUTE_DTYPES),
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecoderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"DecoderConfig.{name} must be a positive number, got {getattr(self, name)!r}.")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(
                f"DecoderConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed "
                f"rope_low_freq_factor ({self.rope_low_freq_factor}) for llama3 rope scaling."
            )
        if not (_positive_number(self.rms_norm_eps) and self.rms_norm_eps < 1):
            raise ValueError(f"DecoderConfig.rms_norm_eps must be a float in (0, 1), got {self.rms_norm_eps!r}.")
        for name in (
            "norm_plus_one",
            "scale_embeddings",
            "qkv_bias",
            "qk_norm",
            "tie_embeddings",
            "sandwich_norms",
            "scan_layers",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecoderConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not _positive_number(value):
                raise ValueError(f"DecoderConfig.{name} must be a positive number or None, got {value!r}.")
        if self.attention_impl == "dot_product" and self.attn_logit_softcap is not None:
            raise ValueError(
                f"DecoderConfig.attention_impl='dot_product' cannot soft-cap attention scores, but "
                f"attn_logit_softcap is {self.attn_logit_softcap} (Gemma 2): use attention_impl='einsum' "
                "for this model."
            )
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            raise ValueError(
                f"DecoderConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}."
            )

        if self.scan_layers and self.sliding_window is not None and self.sliding_window_layers != "all":
            raise ConfigError(
                f"DecoderConfig.scan_layers: the layers of this model attend differently (a sliding window of "
                f"{self.sliding_window} on the {self.sliding_window_layers} layers only), and a scanned stack runs "
                "one layer body for all of them. Set scan_layers=False for this model."
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The jnp dtype activations are computed in."""
        return jnp.dtype(self.dtype)

    @property
    def attention_scale(self) -> float:
        """The factor the query-key dot products are multiplied by."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (0-based), or None where it attends globally."""
        if self.sliding_window is None or (self.sliding_window_layers == "even" and layer % 2):
            return None
        return self.sliding_window

    def replace(self, **changes: Any) -> DecoderConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field but `remat_policy`, with `family` ("decoder") (run_info's
        model_config; see the class docstring)."""
        values = dataclasses.asdict(self)
        del values["remat_policy"]
        return {"family": self.family, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecoderConfig:
        """Inverse of `to_dict`; unknown keys or another family are an error, missing fields take their
        defaults."""
        values = dict(values)
        family = values.pop("family", FAMILY)
        if family != FAMILY:
            raise ValueError(f"A {family!r} model config is not a DecoderConfig (family {FAMILY!r}).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown DecoderConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)
