"""The knowledge-distillation weight of SALT's two phases, as a pure function of the step.

During the first `kd_steps` steps the loss is (1 - w) * CE + w * T^2 * KL(teacher^T || student^T);
from step `kd_steps` on it is plain cross-entropy and the teacher is not run. The weight is

    w(step) = weight                                    step <  kd_steps - transition_steps
            = weight * (kd_steps - step) / transition_steps   in between (a linear ramp)
            = 0                                         step >= kd_steps

so `transition_steps = 0` is SALT's step switch, and with a ramp w(kd_steps - transition_steps) =
weight and w(kd_steps) = 0: the switch step is `kd_steps` either way.
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

from cat_jax.errors import ConfigError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KDSchedule:
    """SALT's distillation phase: `weight` (w in the module docstring) for `kd_steps` steps, reached
    down to 0 by a linear ramp over the last `transition_steps` of them (0: a step switch), at
    distillation temperature `temperature`."""

    kd_steps: int
    weight: float = 0.5
    transition_steps: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if self.kd_steps < 0:
            raise ConfigError(f"KDSchedule.kd_steps must be >= 0; got {self.kd_steps}.")
        if not 0.0 < self.weight <= 1.0:
            raise ConfigError(f"KDSchedule.weight must be in (0, 1]; got {self.weight}.")
        if not 0 <= self.transition_steps <= self.kd_steps:
            raise ConfigError(
                f"KDSchedule.transition_steps must be in [0, kd_steps={self.kd_steps}]; got {self.transition_steps}."
            )
        if not self.temperature > 0.0:
            raise ConfigError(f"KDSchedule.temperature must be > 0; got {self.temperature}.")

    def weight_at(self, step):
        """w(step) for a Python int (a float) or an integer jax array (a float32 array)."""
        if isinstance(step, int):
            if step >= self.kd_steps:
                return 0.0
            if step < self.kd_steps - self.transition_steps:
                return float(self.weight)
            return self.weight * (self.kd_steps - step) / self.transition_steps
        step = jnp.asarray(step, jnp.float32)
        ramp = max(self.transition_steps, 1)
        return jnp.float32(self.weight) * jnp.clip((self.kd_steps - step) / ramp, 0.0, 1.0)

    def distills(self, step: int) -> bool:
        """Whether step `step` runs the teacher (is in the distillation phase)."""
        return step < self.kd_steps
