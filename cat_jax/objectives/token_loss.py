"""Cross-entropy, distillation and cascade-aware training (CAT) as one objective: the token loss
`cat_jax.losses.cascade_aware_loss` under `LossOptions`, in one phase.

    CE            LossOptions()                                     (mask none, alpha 1)
    distillation  LossOptions(alpha < 1, temperature)
    CAT-Xent      LossOptions(mask='small_or_large')                (mask rules: MASKS)
    CAT-distill   LossOptions(mask='small_or_large', alpha < 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gin
import jax

from cat_jax.errors import ConfigError, check_number
from cat_jax.losses import cascade_aware_loss
from cat_jax.models import LOSS_WEIGHTS, TARGETS, Model
from cat_jax.objectives.base import LOSS_DENOMINATOR, LossFn, Objective

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


def loss_options_info(options: LossOptions) -> dict[str, Any]:
    """run_info.json's record of the options; mask_start_step only when set (runs recorded before
    the option existed resume unchanged)."""
    info = dataclasses.asdict(options)
    if not info["mask_start_step"]:
        del info["mask_start_step"]
    return info


def token_loss(model: Model, options: LossOptions, alpha: Any = None, temperature: float | None = None) -> LossFn:
    """The loss function of `options` for `model`; `alpha` / `temperature` replace the options'
    (a scheduled weight: SALT)."""

    def loss_fn(params, batch, rng, teacher_logits, step):
        logits = model.logits(params, batch, rng)
        loss, metrics = cascade_aware_loss(
            logits,
            teacher_logits,
            batch[TARGETS],
            batch[LOSS_WEIGHTS],
            alpha=options.alpha if alpha is None else alpha,
            temperature=options.temperature if temperature is None else temperature,
            mask=options.mask,
            normalizer=options.normalizer,
            mask_start_step=options.mask_start_step,
            step=step,
        )
        return loss, dict(metrics, **{LOSS_DENOMINATOR: loss_denominator(options, metrics)})

    return loss_fn


def loss_denominator(options: LossOptions, metrics: Mapping[str, jax.Array]) -> jax.Array:
    """What `cascade_aware_loss` divided its token sum by: the loss weights, or the mask's."""
    if options.normalizer == "mask":
        return metrics["num_tokens"] * metrics["mask_fraction"]
    return metrics["num_tokens"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenLoss(Objective):
    """CE, distillation or CAT, by its `options` (gin: `TokenLoss.options = @LossOptions()`)."""

    options: LossOptions = LossOptions()

    def info(self) -> dict[str, Any]:
        return {"loss_options": loss_options_info(self.options), "salt": None}

    def check(self, *, has_teacher: bool, streaming: bool, dataset: Mapping[str, Any]) -> None:
        check_number("LossOptions.alpha", self.options.alpha, minimum=0, maximum=1)
        check_number("LossOptions.temperature", self.options.temperature, minimum=0)
        if self.options.temperature == 0:
            raise ConfigError("LossOptions.temperature must be > 0; got 0.")
        if self.options.needs_teacher and not has_teacher:
            raise ConfigError(
                f"The loss {self.options} needs a frozen large model, but no teacher is configured. "
                f"Set --gin.TEACHER_MODEL_DIR=<the large model's MODEL_DIR>."
            )

    def teacher_runs(self, phase: str) -> bool:
        """A configured teacher always runs (its accuracy is reported even where the loss does not
        need it)."""
        return True

    def loss_fn(self, model: Model, phase: str) -> LossFn:
        return token_loss(model, self.options)
