"""`T5Config`: the architecture of a T5-family encoder-decoder, bound from gin model files.

One config covers T5 v1.0 (`mlp_activation='relu'`, `logits_via_embedding=True`), T5 v1.1 /
Flan-T5 / mT5 (`'gated-gelu'`, an untied LM head) and `'gated-silu'` variants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gin
import jax.numpy as jnp

from cat_jax.errors import ConfigError
from cat_jax.models.attention import ATTENTION_IMPLS
from cat_jax.models.stack import REMAT_POLICIES

COMPUTE_DTYPES = ("float32", "bfloat16")
# relu: wo(relu(wi x)) (T5 v1.0); gated-*: wo(act(wi_0 x) * wi_1 x) with GELU (tanh approximation,
# Hugging Face's "gelu_new") or SiLU.
MLP_ACTIVATIONS = ("relu", "gated-gelu", "gated-silu")


@gin.configurable("T5Config")
@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Shapes of a T5-family encoder-decoder.

    `vocab_size` is left to the trainer, which fills it from the task's vocabulary
    (`config.replace(vocab_size=...)`) unless a model file of a pretrained checkpoint fixes it.
    `dtype` is the compute dtype; parameters are always float32. `mlp_activation` is one of
    MLP_ACTIVATIONS; `logits_via_embedding` ties the LM head to the token embedding (the logits
    are `(x * emb_dim**-0.5) @ embedding.T`, as in T5 v1.0); `layer_norm_epsilon` is the RMSNorm
    epsilon. The encoder and decoder layer counts are independent.

    Execution: `attention_impl` is one of ATTENTION_IMPLS (`cat_jax.models.attention`: "einsum", or
    "dot_product" for `jax.nn.dot_product_attention`, which has no attention dropout, so it needs
    dropout_rate 0); (`cat_jax.models.stack`) `remat_policy` is one of REMAT_POLICIES ("none", "full",
    "save_dot"), applied to each layer; `scan_layers` runs each stack as one `nn.scan` over
    parameters stacked on a leading "layers" axis (`encoder/layers/...` instead of
    `encoder/layers_{i}/...`).

    run_info.json: `to_dict` leaves `remat_policy` out. It changes neither the parameters nor any
    value, only what the backward pass keeps, so it is a setting of a training run (its
    operative_config.gin records it), not of the model: a checkpoint trained with remat restores as
    a teacher, for eval or for fine-tuning with any policy, resuming may change it, and run_infos
    written before the field existed read the same. `scan_layers` is recorded: it is the
    checkpoint's parameter layout (absent in older run_infos: False, their layout).
    """

    family: ClassVar[str] = "t5"

    vocab_size: int | None = None
    emb_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dtype: str = "float32"
    mlp_activation: str = "gated-gelu"
    logits_via_embedding: bool = False
    layer_norm_epsilon: float = 1e-6
    attention_impl: str = "einsum"
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        positive = (
            "emb_dim",
            "num_heads",
            "head_dim",
            "mlp_dim",
            "num_encoder_layers",
            "num_decoder_layers",
            "relative_attention_max_distance",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"T5Config.{name} must be a positive int, got {value!r}.")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 1):
            raise ConfigError(
                f"T5Config.vocab_size must be an int > 1 or None (filled in from "
                f"the task's vocabulary), got {self.vocab_size!r}."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        buckets = self.relative_attention_num_buckets
        if not isinstance(buckets, int) or buckets < 4:
            raise ConfigError(f"T5Config.relative_attention_num_buckets must be an int >= 4, got {buckets!r}.")
        if self.relative_attention_max_distance <= buckets // 2:
            raise ConfigError(
                f"T5Config.relative_attention_max_distance ({self.relative_attention_max_distance})"
                f" must exceed relative_attention_num_buckets // 2 ({buckets // 2})."
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ConfigError(f"T5Config.mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}.")
        if not isinstance(self.logits_via_embedding, bool):
            raise ConfigError(
                f"T5Config.logits_via_embedding must be True or False, got {self.logits_via_embedding!r}."
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and 0 < self.layer_norm_epsilon < 1):
            raise ConfigError(
                f"T5Config.layer_norm_epsilon must be a float in (0, 1), got {self.layer_norm_epsilon!r}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"T5Config.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}.")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"T5Config.scan_layers must be True or False, got {self.scan_layers!r}.")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"T5Config.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"T5Config.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}.")
        if self.attention_impl == "dot_product" and self.dropout_rate > 0:
            raise ConfigError(
                f"T5Config.attention_impl='dot_product' has no attention dropout, but dropout_rate is "
                f"{self.dropout_rate}: set T5Config.dropout_rate=0.0 or attention_impl='einsum'."
            )

    @property
    def gated_mlp(self) -> bool:
        """True for the gated MLPs (wi_0, wi_1, wo); False for relu (wi, wo)."""
        return self.mlp_activation.startswith("gated-")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The jnp dtype activations are computed in."""
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> T5Config:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field but `remat_policy` (run_info's model_config; see the class
        docstring)."""
        values = dataclasses.asdict(self)
        del values["remat_policy"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> T5Config:
        """Inverse of `to_dict`; unknown keys are an error, missing ones take their defaults (a
        run_info.json written before a field existed describes a model with the default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown T5Config fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)
