"""SALT as a training objective (`train.objective = @Salt()`): distillation from the frozen (small)
teacher with the schedule's weight for its first `kd_steps` steps, then plain cross-entropy without
running the teacher; with a `selection` (SALT_DS), the distillation phase trains on the band of
sequences the small model's scores select.

    loss = (1 - w(step)) * CE + w(step) * T^2 * KL(teacher^T || student^T)   in phase "distill"
         = CE                                                                in phase "ce"
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gin

from cat_jax.errors import ConfigError
from cat_jax.models import Model
from cat_jax.objectives import LossFn, LossOptions, Objective
from cat_jax.objectives.token_loss import loss_options_info, token_loss
from cat_jax.salt import selection as selection_lib
from cat_jax.salt.schedule import KDSchedule
from cat_jax.salt.selection import DataSelection

DISTILL, CE = "distill", "ce"
PLAIN_CE = LossOptions()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Salt(Objective):
    """SALT (`schedule`) or SALT_DS (`schedule` and `selection`)."""

    schedule: KDSchedule = gin.REQUIRED
    selection: DataSelection | None = None

    def info(self) -> dict[str, Any]:
        return {
            "loss_options": loss_options_info(PLAIN_CE),
            "salt": {
                "kd_schedule": dataclasses.asdict(self.schedule),
                "kd_selection": dataclasses.asdict(self.selection) if self.selection else None,
            },
        }

    def check(self, *, has_teacher: bool, streaming: bool, dataset: Mapping[str, Any]) -> None:
        if not has_teacher:
            raise ConfigError(
                f"Salt.schedule {self.schedule} distils from a frozen teacher, but none is "
                "configured. Set --gin.TEACHER_MODEL_DIR=<the small model's MODEL_DIR>."
            )
        if self.selection is not None:
            if streaming:
                raise ConfigError(
                    "Salt.selection (SALT_DS) needs the in-memory data path: its selected rows "
                    "are taken from the loaded split. Unset data_source.streaming_dir."
                )
            selection_lib.check_scores_match(self.selection, dict(dataset))

    def phase_at(self, step: int) -> str:
        return DISTILL if self.schedule.distills(step) else CE

    def teacher_runs(self, phase: str) -> bool:
        return phase == DISTILL

    def describe_phase(self, phase: str) -> str:
        return (
            "SALT's distillation phase (KDSchedule.kd_steps)"
            if phase == DISTILL
            else "plain cross-entropy after SALT's distillation phase"
        )

    def loss_fn(self, model: Model, phase: str) -> LossFn:
        if phase == CE:
            return token_loss(model, PLAIN_CE)
        schedule = self.schedule

        def loss_fn(params, batch, rng, teacher_logits, step):
            alpha = 1.0 - schedule.weight_at(step)
            loss, metrics = token_loss(model, PLAIN_CE, alpha=alpha, temperature=schedule.temperature)(
                params, batch, rng, teacher_logits, step
            )
            return loss, dict(metrics, kd_weight=1.0 - alpha)

        return loss_fn

    def train_batches(self, source: Any, dataset: Mapping[str, Any], rows: Any) -> Any | None:
        if self.selection is None:
            return None
        return selection_lib.phased_batches(source, dict(dataset), rows, self.selection, self.schedule.kd_steps)
