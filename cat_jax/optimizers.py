"""Optimizer and learning-rate schedule from gin, built from optax pieces."""

from __future__ import annotations

import inspect

import gin
import optax

from cat_jax.errors import ConfigError, check_int, check_number

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor")


@gin.configurable
def learning_rate_schedule(
    total_steps: int, *, peak_value: float = 1e-3, warmup_steps: int = 0, decay: str = "cosine", end_value: float = 0.0
) -> optax.Schedule:
    """Linear warmup to `peak_value`, then `decay` over the remaining steps; a setting that is not
    a number of the right range is a ConfigError naming it."""
    if decay not in SCHEDULES:
        raise ConfigError(f"Unknown learning-rate decay {decay!r}; choose one of {SCHEDULES}.")
    check_number("LEARNING_RATE (learning_rate_schedule.peak_value)", peak_value, minimum=0)
    check_number("learning_rate_schedule.end_value", end_value, minimum=0)
    check_int("learning_rate_schedule.warmup_steps", warmup_steps, 0)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if decay == "constant":
        after = optax.constant_schedule(peak_value)
    elif decay == "linear":
        after = optax.linear_schedule(peak_value, end_value, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(
            peak_value, decay_steps, alpha=end_value / peak_value if peak_value else 0.0
        )
    else:
        offset = max(warmup_steps, 1)
        after = lambda count: peak_value * (offset / (count + offset)) ** 0.5  # noqa: E731
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


@gin.configurable
def make_optimizer(
    total_steps: int,
    *,
    name: str = "adamw",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.98,
    clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer (with global-norm gradient clipping) and its schedule."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
    check_number("make_optimizer.weight_decay", weight_decay, minimum=0)
    check_number("make_optimizer.b1", b1, minimum=0, below=1)
    check_number("make_optimizer.b2", b2, minimum=0, below=1)
    check_number("make_optimizer.clip_norm", clip_norm, minimum=0, allow_none=True)
    schedule = learning_rate_schedule(total_steps)
    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*chain, opt), schedule


def _effective(fn, exclude: tuple[str, ...]) -> dict:
    """A gin-configurable function's keyword defaults with this configuration's bindings applied."""
    params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    values = {
        name: p.default
        for name, p in params.items()
        if p.default is not inspect.Parameter.empty and name not in exclude
    }
    values.update({k: v for k, v in gin.get_bindings(fn).items() if k not in exclude})
    return dict(sorted(values.items()))


def settings() -> dict:
    """The optimizer and schedule settings in force (run_info.json records them; a resume that
    changes them is refused unless allowed). TRAIN_STEPS is not part of them."""
    return {
        "optimizer": _effective(make_optimizer, ("total_steps",)),
        "schedule": _effective(learning_rate_schedule, ("total_steps",)),
    }
