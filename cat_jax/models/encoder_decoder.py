"""The trainer's model contract (T5X's BaseModel, kept small): a network plus its loss.

`EncoderDecoderModel.loss_fn(params, batch, rng, teacher_logits) -> (loss, metrics)` is the only
thing the train step calls. Plain cross-entropy, distillation and cascade-aware training are the
same loss (`cat_jax.losses.cascade_aware_loss`) under different `LossOptions`; the teacher's logits
arrive as constants computed outside the differentiated function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import linen as nn

from cat_jax.losses import cascade_aware_loss
from cat_jax.models.config import T5Config
from cat_jax.models.t5 import Transformer

Batch = dict[str, jax.Array]

MASKS_NEEDING_TEACHER = ("small_or_large", "large")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossOptions:
    """How tokens are weighted and mixed: see `cascade_aware_loss` (defaults: plain CE).
    mask_start_step: the mask applies from this training step on; before it every token counts."""
    alpha: float = 1.0
    temperature: float = 1.0
    mask: str = "none"
    normalizer: str = "weights"
    mask_start_step: int = 0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha < 1.0 or self.mask in MASKS_NEEDING_TEACHER


class EncoderDecoderModel:
    """A T5 encoder-decoder with its training loss, initialisation and logits."""

    def __init__(self, config: T5Config, loss_options: LossOptions = LossOptions()):
        if config.vocab_size is None:
            raise ValueError("T5Config.vocab_size is unset; the trainer sets it from the task's vocabulary.")
        self.config = config
        self.loss_options = loss_options
        self.module = Transformer(config)

    def init_params(self, rng: jax.Array, input_length: int, target_length: int) -> Any:
        """Parameters, boxed with their logical axis names (`nn.get_partition_spec` reads them)."""
        enc = jnp.ones((1, input_length), jnp.int32)
        dec = jnp.ones((1, target_length), jnp.int32)
        return self.module.init({"params": rng}, enc, dec)["params"]

    def logits(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [batch, target_length, vocab]; dropout only when rng is given."""
        rngs = {"dropout": rng} if rng is not None else None
        return self.module.apply({"params": params}, batch["encoder_input_tokens"],
                                 batch["decoder_input_tokens"], enable_dropout=rng is not None,
                                 rngs=rngs)

    def loss_fn(self, params: Any, batch: Batch, rng: jax.Array | None,
                teacher_logits: jax.Array | None = None, alpha: jax.Array | None = None,
                temperature: float | None = None,
                step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of one batch; `teacher_logits` [batch, length, vocab] or None. `alpha`
        and `temperature`, when given, replace the loss options' (a scheduled weight: SALT).
        `step`: the training step of the batch (needed by LossOptions.mask_start_step > 0)."""
        logits = self.logits(params, batch, rng)
        o = self.loss_options
        return cascade_aware_loss(logits, teacher_logits, batch["decoder_target_tokens"],
                                  batch["decoder_loss_weights"], alpha=o.alpha if alpha is None else alpha,
                                  temperature=o.temperature if temperature is None else temperature,
                                  mask=o.mask, normalizer=o.normalizer,
                                  mask_start_step=o.mask_start_step, step=step)


def unboxed_abstract_params(model: EncoderDecoderModel, input_length: int, target_length: int) -> tuple[Any, Any]:
    """(abstract unboxed params, their logical PartitionSpecs) without allocating anything."""
    boxed = jax.eval_shape(lambda r: model.init_params(r, input_length, target_length),
                           jax.random.key(0))
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)
