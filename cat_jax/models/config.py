"""`T5Config`: the architecture of a T5 v1.1-style encoder-decoder, bound from gin model files."""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


@gin.configurable("T5Config")
@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Shapes of a T5 v1.1 encoder-decoder.

    `vocab_size` is left to the trainer, which fills it from the task's vocabulary
    (`config.replace(vocab_size=...)`); model gin files never set it. `dtype` is the compute
    dtype; parameters are always float32.
    """

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

    def __post_init__(self) -> None:
        positive = ("emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                    "num_decoder_layers", "relative_attention_max_distance")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}.")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int)
                                            or self.vocab_size <= 1):
            raise ValueError(f"T5Config.vocab_size must be an int > 1 or None (filled in from "
                             f"the task's vocabulary), got {self.vocab_size!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
        buckets = self.relative_attention_num_buckets
        if not isinstance(buckets, int) or buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets must be an int >= 4, "
                             f"got {buckets!r}.")
        if self.relative_attention_max_distance <= buckets // 2:
            raise ValueError(
                f"T5Config.relative_attention_max_distance ({self.relative_attention_max_distance})"
                f" must exceed relative_attention_num_buckets // 2 ({buckets // 2}).")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"T5Config.dtype must be one of {COMPUTE_DTYPES}, got "
                             f"{self.dtype!r}.")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The jnp dtype activations are computed in."""
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> T5Config:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> T5Config:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown T5Config fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)
