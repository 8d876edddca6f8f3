"""The jitted train step, its compilation and what the loop checks and shows of it.

The step is pure, `(state, batch, teacher_params) -> (state, metrics)`, with its RNG from
`fold_in(key, step)`, the state donated and every input/output sharding explicit. It minimises an
objective's loss function (`cat_jax.objectives`: it knows no method), the frozen teacher's logits
entering as constants. It is compiled ahead of time; compile seconds and memory are logged. Also
here: the finite check of a step, SIGTERM as a request to stop, and the progress meter. The loop
itself is the train job's (`cat_jax.jobs.train`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from cat_jax import partitioning
from cat_jax.errors import ConfigError, NonFiniteLossError, check_int
from cat_jax.objectives import LOSS_DENOMINATOR, LossFn
from cat_jax.train_state import TrainState

log = logging.getLogger("cat_jax")

TeacherFn = Callable[[Any, dict[str, jax.Array]], jax.Array]


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    teacher_logits_fn: TeacherFn | None = None,
    num_microbatches: int | None = None,
):
    """The pure step function minimising `loss_fn` (an objective's, `cat_jax.objectives`); the
    teacher (if any) runs outside the differentiated function. With `num_microbatches` = N the
    batch's gradient is accumulated over N microbatches (`microbatched_grads`); None: one pass."""

    def step_fn(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if num_microbatches is None:
            teacher_logits = None
            if teacher_logits_fn is not None:
                teacher_logits = jax.lax.stop_gradient(teacher_logits_fn(teacher_params, batch))
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, rng, teacher_logits, state.step
            )
            metrics = {k: v for k, v in metrics.items() if k != LOSS_DENOMINATOR}
        else:
            loss, metrics, grads = microbatched_grads(
                loss_fn, teacher_logits_fn, num_microbatches, state.params, batch, rng, teacher_params, state.step
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=optax.tree_utils.tree_norm(grads),
            learning_rate=schedule(state.step),
            state_finite=all_finite((params, opt_state, loss)),
        )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


def check_microbatches(num_microbatches: int | None, batch_size: int) -> None:
    """ConfigError unless `num_microbatches` is None or a positive divisor of the batch size."""
    check_int("train.num_microbatches", num_microbatches, 1, allow_none=True)
    if num_microbatches is not None and batch_size % num_microbatches:
        raise ConfigError(
            f"train.num_microbatches={num_microbatches} does not divide BATCH_SIZE={batch_size}: each "
            f"microbatch must hold the same number of rows. Choose a divisor of {batch_size} (or None for one pass)."
        )


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int) -> dict[str, jax.Array]:
    """[b, ...] -> [N, b / N, ...]; microbatch i holds rows i, i + N, i + 2N, ... so that, with the
    rows sharded in contiguous blocks and N dividing each block, every device keeps its own rows."""

    def split(x):
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {k: split(v) for k, v in batch.items()}


def microbatched_grads(
    loss_fn: LossFn,
    teacher_logits_fn: TeacherFn | None,
    num_microbatches: int,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    teacher_params: Any,
    step: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """The loss, metrics and gradient of the whole batch, accumulated over `num_microbatches`
    microbatches by `jax.lax.scan` (the teacher's logits computed per microbatch), so that only one
    microbatch's activations are live at a time.

    Each microbatch's loss is its token sum over its denominator d_i (`LOSS_DENOMINATOR`: its loss
    weights, or its CAT mask); the batch's is sum_i d_i loss_i / sum_i d_i and its gradient
    sum_i grad(d_i loss_i) / sum_i d_i (d_i a constant), which is the full batch's (the same sums in
    another order). `num_tokens` is summed, every other metric (a mean over tokens) weighted by the
    microbatch's tokens. Dropout draws microbatch i's noise from fold_in(rng, i). Follows T5X's
    `trainer.accumulate_grads_microbatched` (there a fori_loop of mean losses), written anew.
    """
    micro = split_microbatches(batch, num_microbatches)

    def weighted(p, mb, mb_rng, teacher_logits):
        loss, metrics = loss_fn(p, mb, mb_rng, teacher_logits, step)
        if LOSS_DENOMINATOR not in metrics or "num_tokens" not in metrics:
            raise ConfigError(
                f"train.num_microbatches needs the objective's metrics {LOSS_DENOMINATOR!r} and 'num_tokens' "
                "(cat_jax.objectives.base); this objective's loss gives neither: set train.num_microbatches=None."
            )
        denominator = jax.lax.stop_gradient(metrics[LOSS_DENOMINATOR])
        return loss * denominator, metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def one(index, mb):
        teacher_logits = None
        if teacher_logits_fn is not None:
            teacher_logits = jax.lax.stop_gradient(teacher_logits_fn(teacher_params, mb))
        (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index), teacher_logits)
        return grads, metrics

    def body(carry, xs):
        grads, metrics = one(*xs)
        grad_sum, sums = carry
        tokens, denominator = metrics["num_tokens"], metrics[LOSS_DENOMINATOR]
        scaled = {
            k: v if k in ("num_tokens", LOSS_DENOMINATOR) else v * (denominator if k == "loss" else tokens)
            for k, v in metrics.items()
        }
        grad_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (grad_sum, {k: sums[k] + v for k, v in scaled.items()}), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    _, shapes = jax.eval_shape(one, jnp.int32(0), first)
    start = (
        jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params),  # accumulated in float32
        {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()},
    )
    (grad_sum, sums), _ = jax.lax.scan(body, start, (jnp.arange(num_microbatches, dtype=jnp.int32), micro))
    denominator, tokens = sums.pop(LOSS_DENOMINATOR), sums["num_tokens"]
    grads = jax.tree_util.tree_map(lambda g, p: _safe_divide(g, denominator).astype(p.dtype), grad_sum, params)
    metrics = {
        k: v if k == "num_tokens" else _safe_divide(v, denominator if k == "loss" else tokens) for k, v in sums.items()
    }
    return metrics["loss"], metrics, grads


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, or 0 where the denominator is 0 (a batch without tokens)."""
    return numerator / jnp.where(denominator > 0, denominator, 1.0)


def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or an infinity: one fused reduction."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


@dataclasses.dataclass
class CompiledStep:
    fn: Callable
    compile_seconds: float
    memory: dict[str, int]
    flops: float | None  # XLA's cost analysis of the compiled step (None where the backend gives none)


def compile_train_step(
    step_fn,
    abstract_state: TrainState,
    state_shardings: TrainState,
    batch_shapes: dict[str, jax.ShapeDtypeStruct],
    batch_sharding: NamedSharding,
    teacher_abstract: Any,
    teacher_shardings: Any,
    mesh: Mesh,
    rules,
) -> CompiledStep:
    """Compile the step ahead of time for these shapes and shardings, its activations (the
    student's and the teacher's) constrained by `rules`; report seconds and memory."""
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, teacher_shardings),
        out_shardings=(state_shardings, partitioning.replicated(mesh)),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    with partitioning.activation_sharding(mesh, rules):
        compiled = jitted.lower(abstract_state, batch_shapes, teacher_abstract).compile()
    seconds = time.perf_counter() - start
    memory = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            memory[name] = int(getattr(analysis, name, 0) or 0)
    return CompiledStep(compiled, seconds, memory, _cost_flops(compiled))


def _cost_flops(compiled) -> float | None:
    """The FLOPs XLA's cost analysis counts in a compiled function (a dict, or a list of one dict
    per program in older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


@gin.configurable
class PreemptionWatcher:
    """Turns SIGTERM into a request to save and stop at the next step boundary.

    With several processes every host must stop at the same step (a host that stopped alone would
    hang the others in the next collective), so the flags are combined across processes (any host
    that got the signal stops them all). That exchange is a blocking collective, so it runs only on
    every `check_every_steps`-th call of `should_stop` (gin `PreemptionWatcher.check_every_steps`):
    all processes call it once per step, so they exchange at the same steps and agree. The calls
    in between answer False. With one process every call looks at the flag (no cost).
    """

    def __init__(self, check_every_steps: int = 10):
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps must be >= 1; got {check_every_steps}.")
        self.check_every_steps = check_every_steps
        self._calls = 0
        self._requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._requested = True

    @property
    def requested(self) -> bool:
        """Whether this process got the signal (not yet agreed with the other processes)."""
        return self._requested

    def should_stop(self, force_sync: bool = False) -> bool:
        """True when the run must stop after this step; the same answer on every process.

        `force_sync=True` exchanges the flags now whatever the call count (every process must
        pass it at the same call).
        """
        self._calls += 1
        if jax.process_count() == 1:
            return self._requested
        if not force_sync and self._calls % self.check_every_steps:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._requested, dtype=np.int32))
        return bool(np.any(flags))

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


def check_finite(
    metrics: dict[str, Any], step: int, last_good_checkpoint: int | None, model_dir: str, checked_every: int = 1
) -> None:
    """Raise NonFiniteLossError when the loss or the updated state (parameters, optimizer state)
    of step `step` is NaN or infinite, naming the step and the checkpoint a restart would use.

    The state check is the step's own fused reduction (`state_finite`), so it covers an update
    that overflows the parameters although the loss it was computed from was finite.
    """
    loss = float(metrics["loss"])
    if bool(metrics["state_finite"]) and np.isfinite(loss) and np.isfinite(float(metrics["grad_norm"])):
        return
    keep = (
        f"the last good checkpoint is step {last_good_checkpoint} in {model_dir}"
        if last_good_checkpoint is not None
        else "no checkpoint was written"
    )
    what = "loss" if not np.isfinite(loss) else "update (parameters or optimizer state)"
    when = (
        f"at step {step}"
        if checked_every == 1
        else (f"at step {step} (or up to {checked_every - 1} steps before: checked every {checked_every})")
    )
    raise NonFiniteLossError(
        f"Non-finite {what} {when} (loss {loss}); stopped without saving this state, {keep}. "
        f"Lower the learning rate, enable gradient clipping (make_optimizer.clip_norm), or use "
        f"float32 compute (the model config's dtype = 'float32'), then restart with the same command."
    )


class ProgressMeter:
    """Steps/s, tokens/s, ETA and (given a peak) model FLOPs utilisation between log lines."""

    def __init__(
        self, start_step: int, total_steps: int, tokens_per_step: int, flops_per_step: float, peak_flops: float | None
    ):
        self.total = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak_flops
        self._step, self._time = start_step, time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        out = {
            "steps_per_sec": rate,
            "tokens_per_sec": rate * self.tokens_per_step,
            "eta_seconds": (self.total - step) / rate if rate > 0 else float("inf"),
        }
        if self.peak:
            out["mfu"] = rate * self.flops_per_step / self.peak
        return out


def format_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
