"""What every training objective provides to the training loop.

An objective owns its phases (`phase_at(step)`: a name, the same for every step of a phase), and
per phase whether the frozen teacher runs and the loss function the step differentiates. The loop
compiles one step per phase and recompiles when the phase changes (SALT ends its distillation phase
so, and then no longer runs the teacher). The objective checks its settings before anything is
written (`check`), says what run_info.json records of it (`info`: compared on resume), and may
supply the training batches (`train_batches`: SALT_DS trains its first phase on a selection).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import jax

from cat_jax.models import Model

# loss_fn(params, batch, rng, teacher_logits or None, step) -> (loss, metrics)
# The metrics are scalars: "num_tokens" (the batch's loss weight), means over those tokens, and
# LOSS_DENOMINATOR (what the loss was divided by: microbatched steps weight each microbatch's loss
# and gradient by it, `cat_jax.train_step`; the step removes it from what it reports).
LOSS_DENOMINATOR = "loss_denominator"
LossFn = Callable[
    [Any, Mapping[str, jax.Array], jax.Array | None, jax.Array | None, jax.Array],
    tuple[jax.Array, dict[str, jax.Array]],
]


class Objective(abc.ABC):
    """A training objective (see the module docstring)."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """run_info.json's entries for the objective: {"loss_options": ..., "salt": ...}."""

    @abc.abstractmethod
    def check(self, *, has_teacher: bool, streaming: bool, dataset: Mapping[str, Any]) -> None:
        """Raise ConfigError for settings that cannot work (a missing teacher, a data path the
        objective cannot use), before anything is written."""

    def phase_at(self, step: int) -> str:
        """The phase step `step` belongs to."""
        return "train"

    @abc.abstractmethod
    def teacher_runs(self, phase: str) -> bool:
        """Whether the frozen teacher's logits enter the loss in `phase`."""

    @abc.abstractmethod
    def loss_fn(self, model: Model, phase: str) -> LossFn:
        """The loss of `phase` (teacher_logits are None when the teacher does not run)."""

    def check_run(
        self, *, model: Model, vocab: Any, teacher: Any, dataset: Mapping[str, Any], data_order: str, train_steps: int
    ) -> None:
        """Checks that need the run's model, vocabulary, teacher (a FrozenModel or None) and data
        (a teacher cache's: `cached_teacher`); raise a named error, before anything is written."""

    def batch_features(self, step: int, rows: tuple[int, int]) -> dict[str, Any]:
        """Features the objective adds to this process's rows of batch `step` (a teacher cache's
        entries); they travel with the batch (sharded, split into microbatches) to its loss."""
        return {}

    def feature_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of `batch_features` for a global batch of `batch_size` rows."""
        return {}

    def train_batches(self, source: Any, dataset: Mapping[str, Any], rows: Any) -> Any | None:
        """The training batches when the objective chooses them (None: the dataset's own)."""
        return None

    def describe_phase(self, phase: str) -> str:
        """How the log names a phase."""
        return phase
