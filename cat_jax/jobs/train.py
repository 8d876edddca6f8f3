"""The training job behind `python -m cat_jax.train`: check, restore or init, then the step loop.

Start-up, in order, each said in the log:
  1. every run-defining number is checked (a ConfigError names it), then MODEL_DIR is created if
     needed and locked for this trainer (`model_dir.lock`: a second trainer is refused by name).
  2. every check that needs no compute: the vocabulary and the model (its config from gin, or from
     the initial checkpoint's run_info when gin names none), the objective, the teacher, the
     initial checkpoint, and (when MODEL_DIR holds a checkpoint) that this command continues the run
     the directory holds (`model_dir.check_resume`). A failed start leaves no empty MODEL_DIR behind.
  3. a run whose newest checkpoint reached TRAIN_STEPS exits 0, writing nothing.
  4. the data (training and evaluation splits) is loaded: a bad input fails here, before any file
     of MODEL_DIR is written.
  5. run_info.json and config.gin are written; the restore order: this run's newest checkpoint
     that verifies (damaged ones are moved aside, the previous one used), else the parameters of
     `train.initial_checkpoint_dir` (fresh optimizer), else scratch.
  6. compilation of the step of the objective's current phase (`cat_jax.objectives`; recompiled
     when the phase changes), then the loop: a step's loss and updated state are checked finite
     before the state is logged as good or saved; SIGTERM saves the current step and stops.

The model is any family of the model contract (`cat_jax.models`); the objective any
`cat_jax.objectives.Objective`. This module names neither a family nor a method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import data as data_lib
from cat_jax import evaluation, gin_utils, models, optimizers, partitioning, runtime, vocabulary_store
from cat_jax import model_dir as model_dir_lib
from cat_jax.checkpoints import Checkpointer, restore_params
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import CheckpointError, ConfigError, ModelDirError, TeacherMismatchError, check_int
from cat_jax.frozen_model import FrozenModel, check_config, check_vocabulary, load_frozen_model, read_model_info
from cat_jax.metric_writers import MetricWriter
from cat_jax.models.convert import tree
from cat_jax.objectives import Objective
from cat_jax.train_state import abstract_with_shardings, init_train_state, state_shardings
from cat_jax.train_step import (
    PreemptionWatcher,
    ProgressMeter,
    check_finite,
    check_microbatches,
    compile_train_step,
    format_duration,
    make_train_step,
    scalar_metrics,
)

log = logging.getLogger("cat_jax")


@dataclasses.dataclass
class TrainResult:
    final_step: int
    model_dir: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, Any]
    step_flops: dict[str, float | None] = dataclasses.field(default_factory=dict)  # per compiled phase


@dataclasses.dataclass
class Run:
    """Everything resolved before anything is written."""

    model_dir: str
    model: models.Model
    objective: Objective
    vocab: Any
    teacher: FrozenModel | None
    info: dict[str, Any]
    latest: int | None
    mesh: Any
    rules: Any


@gin.configurable(denylist=["mesh"])
def train(
    *,
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    model_config: Any = gin.REQUIRED,
    train_dataset: DatasetConfig = gin.REQUIRED,
    objective: Objective = gin.REQUIRED,
    compute_dtype: str | None = None,
    teacher_model_dir: str | None = None,
    teacher_step: int | None = None,
    teacher_dtype: str = "bfloat16",
    teacher_model_config: Any = None,
    initial_checkpoint_dir: str | None = None,
    eval_split: str | None = "validation",
    eval_period: int = 0,
    eval_max_examples: int | None = 256,
    eval_batch_size: int = 64,
    checkpoint_period: int = 100,
    keep_checkpoints: int = 3,
    log_every_steps: int = 10,
    seed: int = 0,
    peak_flops_per_device: float | None = None,
    max_steps_per_run: int | None = None,
    allow_config_change: bool = False,
    num_microbatches: int | None = None,
    async_checkpoints: bool = False,
    mesh: Any = None,
) -> TrainResult:
    """Train the model of `model_config` (any family's config; None: the architecture of
    `initial_checkpoint_dir`, logged) on `train_dataset` for `train_steps` steps into `model_dir`,
    minimising `objective` (e.g. `@TokenLoss()`: CE, distillation or CAT; `@Salt()`).

    `compute_dtype` replaces the model config's (e.g. 'bfloat16' to fine-tune an imported model).
    `max_steps_per_run` stops this invocation after that many steps with a checkpoint (for jobs
    that run in fixed time slots); the same command continues the run. `allow_config_change`
    lets a resume change the data, seed, loss, optimizer or teacher (logged, recorded in
    run_info.json's history); without it such a resume is refused with the differences.
    `num_microbatches` = N accumulates each step's gradient over N microbatches of BATCH_SIZE / N
    rows (`train_step.microbatched_grads`: the same update, one microbatch's activations in memory).
    `async_checkpoints` writes checkpoints in the background while training goes on
    (`checkpoints.Checkpointer`: the same guarantees; the final or preempted save is awaited).
    """
    train_dataset = train_dataset.require_task()
    _check_numbers(
        train_steps=train_steps,
        checkpoint_period=checkpoint_period,
        keep_checkpoints=keep_checkpoints,
        log_every_steps=log_every_steps,
        eval_period=eval_period,
        eval_batch_size=eval_batch_size,
        eval_max_examples=eval_max_examples,
        seed=seed,
        max_steps_per_run=max_steps_per_run,
        teacher_step=teacher_step,
    )
    check_microbatches(num_microbatches, train_dataset.batch_size)
    with _claim(model_dir) as model_dir:
        with runtime.phase("checking the configuration"):
            run = _prepare(
                model_dir,
                train_steps,
                model_config,
                compute_dtype,
                train_dataset,
                objective,
                seed,
                teacher_model_dir,
                teacher_step,
                teacher_dtype,
                teacher_model_config,
                initial_checkpoint_dir,
                allow_config_change,
                mesh,
            )
        if run.latest is not None and run.latest >= train_steps:
            log.info(
                "MODEL_DIR %s already holds step %d >= TRAIN_STEPS=%d: nothing to do (nothing was "
                "written). Raise TRAIN_STEPS to train further, or use a new MODEL_DIR.",
                model_dir,
                run.latest,
                train_steps,
            )
            return TrainResult(run.latest, model_dir, {}, {})
        runtime.set_on_disk(_on_disk(model_dir, run.latest))
        with runtime.phase("loading the data"):
            data = _train_data(train_dataset, run)
            eval_arrays = None
            if eval_split and eval_period:
                eval_arrays = data_lib.load_split(
                    train_dataset.mixture_or_task_name,
                    eval_split,
                    dict(train_dataset.task_feature_lengths),
                    max_examples=eval_max_examples,
                )
        if runtime.is_lead():
            run.info["vocabulary_files"] = vocabulary_store.write_vocabulary(model_dir, run.vocab)
            model_dir_lib.write_run_info(model_dir, run.info)
            gin_utils.write_config(model_dir)
        runtime.sync("cat_jax_run_info_written")

        tx, schedule = optimizers.make_optimizer(train_steps)
        abstract, shardings = state_shardings(run.model, tx, run.mesh, run.rules)
        ckpt = Checkpointer(
            model_dir,
            save_interval_steps=checkpoint_period,
            max_to_keep=keep_checkpoints,
            data_iterator=data.iterator,
            async_save=async_checkpoints,
        )
        with runtime.phase("restoring the checkpoint"):
            state, start_step = _restore_or_init(
                ckpt, run.model, tx, seed, abstract, shardings, initial_checkpoint_dir, model_dir
            )
        runtime.set_on_disk(_on_disk(model_dir, start_step or ckpt.latest_step()))
        try:
            with runtime.phase("compiling the train step"):
                _log_state_bytes(state, run.teacher)
                loop = _Loop(
                    run,
                    tx,
                    schedule,
                    train_dataset,
                    train_steps,
                    state,
                    start_step,
                    ckpt,
                    data,
                    eval_arrays,
                    eval_batch_size,
                    abstract,
                    shardings,
                    peak_flops_per_device,
                    num_microbatches,
                )
            with runtime.phase("training"):
                step, metrics, eval_metrics = loop.run(log_every_steps, eval_period, max_steps_per_run)
        finally:
            ckpt.close()
        if runtime.is_lead():
            gin_utils.write_operative_config(model_dir)
        return TrainResult(step, model_dir, scalar_metrics(metrics) if metrics else {}, eval_metrics, loop.step_flops)


def _check_numbers(
    *,
    train_steps,
    checkpoint_period,
    keep_checkpoints,
    log_every_steps,
    eval_period,
    eval_batch_size,
    eval_max_examples,
    seed,
    max_steps_per_run,
    teacher_step,
) -> None:
    """ConfigError naming the first run-defining number out of its range, before anything is
    written (the dataset's are checked as DatasetConfig is built, the model's as its config is, the
    objective's by its `check`, the optimizer's as it is built here)."""
    check_int("TRAIN_STEPS (train.train_steps)", train_steps, 1)
    check_int("train.checkpoint_period", checkpoint_period, 1)
    check_int("train.keep_checkpoints", keep_checkpoints, 1, allow_none=True)
    check_int("train.log_every_steps", log_every_steps, 1)
    check_int("train.eval_period", eval_period, 0)
    check_int("train.eval_batch_size", eval_batch_size, 1)
    check_int("train.eval_max_examples", eval_max_examples, 1, allow_none=True)
    check_int("SEED (train.seed)", seed, 0)
    check_int("train.max_steps_per_run", max_steps_per_run, 1, allow_none=True)
    check_int("TEACHER_STEP (train.teacher_step)", teacher_step, 0, allow_none=True)
    optimizers.make_optimizer(train_steps)


@contextlib.contextmanager
def _claim(model_dir: str) -> Iterator[str]:
    """MODEL_DIR (its absolute path) created if needed and locked for this trainer within the
    block; a MODEL_DIR created here that the block leaves empty (a failed start) is removed."""
    created = model_dir_lib.prepare(model_dir)
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    runtime.set_output_dir(model_dir)
    held = None
    try:
        held = _lock(model_dir)
        yield model_dir
    finally:
        if held is not None:
            held.release()
        if created:
            model_dir_lib.remove_if_empty(model_dir)


def _lock(model_dir: str) -> model_dir_lib.ModelDirLock | None:
    """The trainer lock of MODEL_DIR, taken by process 0 only; every process learns whether it was
    taken, so with several processes all of them stop on a held lock, none waits for the others."""
    held, error = None, None
    if runtime.is_lead():
        try:
            held = model_dir_lib.lock(model_dir)
        except Exception as e:  # pylint: disable=broad-except  # told to the other processes first
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not taken and error is None:
            error = ModelDirError(
                f"MODEL_DIR {model_dir} could not be locked by process 0 (its log says why: "
                "another trainer holds it, or the lock file could not be written)."
            )
    if error is not None:
        raise error
    return held


def _on_disk(model_dir: str, step: int | None) -> str:
    return (
        f"The latest checkpoint in {model_dir} is step {step}; the same command resumes."
        if step
        else f"No checkpoint of this run is in {model_dir} yet; the same command starts it."
    )


def _train_data(dataset: DatasetConfig, run: Run) -> Any:
    """The run's training batches (of examples) from the configured source (in memory, or
    streamed), logged; the objective's own where it chooses them (SALT_DS's selection)."""
    source = data_lib.data_source()
    rows = partitioning.process_batch_slice(partitioning.batch_sharding(run.mesh, run.rules), dataset.batch_size)
    log.info(
        "Data: %s/%s from %s (%s).",
        dataset.mixture_or_task_name,
        dataset.split,
        source.describe(),
        ("streamed by grain from ArrayRecord shards" if source.kind == "streaming" else "held in memory")
        + (", packed several examples to a row" if dataset.pack else ""),
    )
    chosen = run.objective.train_batches(source, dataset.record(), rows)
    if chosen is None:
        chosen = source.train_batches(
            dataset.mixture_or_task_name,
            dataset.split,
            dict(dataset.task_feature_lengths),
            dataset.batch_size,
            dataset.seed,
            dataset.max_examples,
            rows,
            run.model.packing_input_overhead(run.vocab) if dataset.pack else None,
        )
    if dataset.pack and not chosen.packed:
        raise ConfigError(
            f"DatasetConfig.pack = True, but the objective ({type(run.objective).__name__}) chooses its own "
            "training batches (SALT_DS's selection), which are not packed: drop the setting, or train without "
            "the selection."
        )
    return chosen


def _prepare(
    model_dir,
    train_steps,
    model_config,
    compute_dtype,
    train_dataset,
    objective,
    seed,
    teacher_model_dir,
    teacher_step,
    teacher_dtype,
    teacher_model_config,
    initial_checkpoint_dir,
    allow_config_change,
    mesh,
) -> Run:
    if not isinstance(objective, Objective):
        raise ConfigError(f"train.objective must be an objective such as @TokenLoss() or @Salt(); got {objective!r}.")
    vocab = data_lib.get_vocabulary_of(train_dataset.mixture_or_task_name)
    model = models.build(
        model_dir_lib.with_vocab_size(_model_config(model_config, compute_dtype, initial_checkpoint_dir), vocab)
    )
    mesh = mesh or partitioning.make_mesh()
    rules = model.fit_rules(mesh.shape, partitioning.logical_axis_rules())
    log.info("Mesh: %s", partitioning.describe_mesh(mesh))
    teacher = None
    if teacher_model_dir:
        teacher = load_teacher(
            teacher_model_dir,
            teacher_step,
            teacher_dtype,
            teacher_model_config,
            model,
            vocab,
            mesh,
            partitioning.logical_axis_rules(),
        )
        log.info("Teacher: step %d of %s, %s parameters", teacher.step, teacher_model_dir, teacher_dtype)
    source = data_lib.data_source()
    objective.check(
        has_teacher=teacher is not None, streaming=source.kind == "streaming", dataset=train_dataset.record()
    )
    objective.check_run(
        model=model,
        vocab=vocab,
        teacher=teacher,
        dataset=train_dataset.record(),
        data_order=source.data_order,
        train_steps=train_steps,
    )
    if initial_checkpoint_dir:
        check_initial_checkpoint(initial_checkpoint_dir, model.config, vocab)
    info = model_dir_lib.run_info(
        model,
        vocab,
        objective.info(),
        train_dataset,
        teacher,
        seed=seed,
        optimizer=optimizers.settings(),
        train_steps=train_steps,
        data_source=source.describe(),
        data_order=source.data_order,
    )
    latest = Checkpointer.latest_in(model_dir)
    if latest is not None:
        info = model_dir_lib.check_resume(model_dir, info, allow_change=allow_config_change)
    return Run(model_dir, model, objective, vocab, teacher, info, latest, mesh, rules)


def _model_config(model_config: Any, compute_dtype: str | None, initial_checkpoint_dir: str | None) -> Any:
    """The configured model config, or (None) the initial checkpoint's, with `compute_dtype`."""
    if model_config is None:
        if not initial_checkpoint_dir:
            raise ConfigError(
                "No model is configured (train.model_config is None) and there is no initial "
                "checkpoint to take one from: give a model file, e.g. "
                "--gin_file=gin_configs/models/small.gin, or --gin.INITIAL_CHECKPOINT_DIR."
            )
        model_config = models.config_from_run_info(read_model_info(initial_checkpoint_dir))
        log.info(
            "Model: the architecture of the initial checkpoint %s (%s).",
            initial_checkpoint_dir,
            type(model_config).__name__,
        )
    return model_config.replace(dtype=compute_dtype) if compute_dtype else model_config


class _Loop:
    """The data, the compiled step of the objective's current phase and the metric writer of one
    invocation, and its step loop."""

    def __init__(
        self,
        run: Run,
        tx,
        schedule,
        dataset: DatasetConfig,
        train_steps: int,
        state,
        start_step: int,
        ckpt: Checkpointer,
        data,
        eval_arrays,
        eval_batch_size: int,
        abstract,
        shardings,
        peak_flops_per_device,
        num_microbatches: int | None = None,
    ):
        self.num_microbatches = num_microbatches
        self.run_, self.model, self.dataset, self.train_steps = run, run.model, dataset, train_steps
        self.state, self.start_step, self.ckpt, self.data = state, start_step, ckpt, data
        self.eval_batch_size, self.eval_arrays = eval_batch_size, eval_arrays
        lengths = dict(dataset.task_feature_lengths)
        self.b_sharding = partitioning.batch_sharding(run.mesh, run.rules)
        self.rows = partitioning.process_batch_slice(self.b_sharding, dataset.batch_size)
        shapes = {
            **run.model.batch_shapes(lengths, dataset.batch_size, packed=data.packed),
            **run.objective.feature_shapes(dataset.batch_size),
        }
        self._compile_args = (tx, schedule, abstract, shardings, shapes)
        self.step_flops: dict[str, float | None] = {}
        self.phase = run.objective.phase_at(start_step)
        if run.teacher is not None and not self.teacher_runs:
            log.info(
                "Resuming at step %d in %s: the teacher is not run.",
                start_step,
                run.objective.describe_phase(self.phase),
            )
            run.teacher.params = None
        self.compiled = self._compile()
        li, lt = lengths["inputs"], lengths["targets"]
        peak = peak_flops_per_device * jax.device_count() if peak_flops_per_device else None
        self.meter = ProgressMeter(start_step, train_steps, dataset.batch_size * (li + lt), self._model_flops(), peak)

    @property
    def teacher_runs(self) -> bool:
        return self.run_.teacher is not None and self.run_.objective.teacher_runs(self.phase)

    def _compile(self):
        """The train step of the current phase: with the teacher (CAT, distillation, SALT's first
        phase) or without it (plain CE, SALT after the switch)."""
        run, (tx, schedule, abstract, shardings, shapes) = self.run_, self._compile_args
        teacher = run.teacher if self.teacher_runs else None
        teacher_logits = None
        if teacher is not None:
            teacher_logits = teacher.logits_fn
            if teacher.model.vocab_size != run.model.vocab_size:
                teacher_logits = fit_vocab(teacher_logits, run.model.vocab_size)
        step_fn = make_train_step(
            run.objective.loss_fn(run.model, self.phase),
            tx,
            schedule,
            teacher_logits,
            num_microbatches=self.num_microbatches,
        )
        compiled = compile_train_step(
            step_fn,
            abstract,
            shardings,
            shapes,
            self.b_sharding,
            teacher.abstract_params if teacher else None,
            teacher.param_shardings if teacher else None,
            run.mesh,
            run.rules,
        )
        phase = "with the teacher" if teacher else "without a teacher"
        self.step_flops[phase] = compiled.flops
        log.info(
            "Compiled the train step (%s, %s%s) in %.1fs; XLA counts %.4g FLOPs per step; memory per device: %s",
            run.objective.describe_phase(self.phase),
            phase,
            f", {self.num_microbatches} microbatches" if self.num_microbatches else "",
            compiled.compile_seconds,
            compiled.flops or float("nan"),
            {k: f"{v / 2**20:.1f} MiB" for k, v in compiled.memory.items()},
        )
        return compiled

    def _model_flops(self) -> float:
        """The analytic FLOPs of a step: 3 forward passes of the student, 1 of a running teacher."""
        li, lt = self.dataset.task_feature_lengths["inputs"], self.dataset.task_feature_lengths["targets"]
        flops = 3 * self.dataset.batch_size * self.model.forward_flops(li, lt)
        if self.teacher_runs:
            flops += self.dataset.batch_size * self.run_.teacher.model.forward_flops(li, lt)
        return flops

    def _enter_phase(self, step: int, phase: str) -> None:
        """The objective's next phase from `step` on: its step compiled, the teacher's parameters
        released when it no longer runs."""
        objective = self.run_.objective
        log.info(
            "Step %d starts %s (was %s).", step, objective.describe_phase(phase), objective.describe_phase(self.phase)
        )
        ran = self.teacher_runs
        self.phase = phase
        if ran and not self.teacher_runs:
            log.info("The teacher is no longer run; its parameters are released.")
            self.run_.teacher.params = None
        self.compiled = self._compile()
        self.meter.flops_per_step = self._model_flops()

    def run(
        self, log_every: int, eval_period: int, max_steps_per_run: int | None
    ) -> tuple[int, dict[str, Any], dict[str, Any]]:
        run, ckpt, dataset = self.run_, self.ckpt, self.dataset
        # Always the step it starts after: a start from scratch (0) in a MODEL_DIR whose run was
        # killed before its first checkpoint replays steps that run had logged.
        writer = MetricWriter(run.model_dir, enabled=runtime.is_lead(), resume_step=self.start_step)
        watcher = PreemptionWatcher()
        last_saved = ckpt.latest_step()
        metrics: dict[str, Any] = {}
        eval_metrics: dict[str, Any] = {}
        step, state = self.start_step, self.state
        try:
            while step < self.train_steps:
                phase = run.objective.phase_at(step)
                if phase != self.phase:
                    self._enter_phase(step, phase)
                local = {
                    **self.model.make_batch(self.data.batch(step), run.vocab),
                    **run.objective.batch_features(step, self.rows),
                }
                batch = partitioning.global_batch(local, self.b_sharding, dataset.batch_size)
                state, metrics = self.compiled.fn(state, batch, run.teacher.params if self.teacher_runs else None)
                step += 1
                at_end = step == self.train_steps
                preempted = watcher.should_stop()
                stop = preempted or (max_steps_per_run is not None and step - self.start_step >= max_steps_per_run)
                if step % log_every == 0 or at_end or stop:
                    check_finite(metrics, step, last_saved, run.model_dir, checked_every=log_every)
                    _log_progress(writer, step, self.train_steps, scalar_metrics(metrics), self.meter.update(step))
                if ckpt.should_save(step) or at_end or stop:
                    check_finite(metrics, step, last_saved, run.model_dir)
                    if ckpt.save(step, state, run.info, force=True, wait=at_end or stop):
                        last_saved = step
                        runtime.set_on_disk(_on_disk(run.model_dir, step))
                    elif at_end:
                        raise CheckpointError(
                            f"The final step {step} could not be saved: {run.model_dir} holds a damaged step "
                            f"{step} that could not be moved aside (logged above). Move it away and run the same "
                            "command again; it resumes from the latest checkpoint."
                        )
                if self.eval_arrays is not None and (step % eval_period == 0 or at_end):
                    eval_metrics = evaluation.evaluate(
                        self.model,
                        state.params,
                        self.eval_arrays,
                        run.vocab,
                        self.eval_batch_size,
                        run.mesh,
                        run.rules,
                        dataset.task_feature_lengths["targets"],
                    )
                    writer.write_scalars(step, evaluation.flatten(eval_metrics, prefix="eval/"))
                    log.info("eval @ %d: %s", step, json.dumps(evaluation.flatten(eval_metrics), sort_keys=True))
                if stop:
                    log.info(
                        "%s: saved step %d in %s; the same command resumes.",
                        "Preemption signal" if preempted else "max_steps_per_run reached",
                        step,
                        run.model_dir,
                    )
                    break
        finally:
            watcher.close()
            writer.close()
        return step, metrics, eval_metrics


def load_teacher(
    model_dir: str, step: int | None, dtype: str, expected_config: Any, student: models.Model, vocab, mesh, rules
) -> FrozenModel:
    """The frozen teacher (larger or smaller than the student), checked against the student's
    family and vocabulary and the configured model before its parameters are restored. Student and
    teacher read one batch, so they are of one family."""
    info = read_model_info(model_dir)
    family = models.family_of_run_info(info)
    if family != student.family:
        raise TeacherMismatchError(
            f"The teacher in {model_dir} is a {family!r} model and the student a {student.family!r} one: a train "
            f"step feeds both one batch, so they must be of one family (and share one vocabulary)."
        )
    if expected_config is not None:
        check_config(model_dir, info, expected_config)
    check_vocabulary(model_dir, info, student.config, vocab, same_size=False)
    if info["model_config"]["vocab_size"] != student.vocab_size:
        log.info(
            "Teacher vocab_size %d, student %d (one tokenizer of %d ids): the teacher's logits are cut to, or padded "
            "with impossible ids up to, the student's.",
            info["model_config"]["vocab_size"],
            student.vocab_size,
            vocab.vocab_size,
        )
    return load_frozen_model(model_dir, mesh=mesh, rules=rules, step=step, dtype=dtype)


def fit_vocab(logits_fn: Any, size: int) -> Any:
    """`logits_fn` with its logits' last axis made `size` long: the teacher's rows past the
    student's vocab_size dropped (ids no tokenizer of theirs produces: the distillation target is
    renormalised over the student's ids), or rows of -1e9 appended (ids the teacher never predicts:
    probability 0, so they add nothing to KL(teacher || student) and never win its argmax)."""

    def fitted(params: Any, batch: Any) -> jax.Array:
        logits = logits_fn(params, batch)
        extra = size - logits.shape[-1]
        if extra <= 0:
            return logits[..., :size]
        pad = jnp.full((*logits.shape[:-1], extra), -1e9, logits.dtype)
        return jnp.concatenate([logits, pad], axis=-1)

    return fitted


def check_initial_checkpoint(directory: str, model_config: Any, vocab) -> None:
    """Refuse an init-from checkpoint of another architecture or vocabulary, before any compute.

    The compute dtype and dropout rate may differ (fine-tuning often changes them), and the layer
    layout (`scan_layers`).
    """
    info = read_model_info(directory)
    written = models.config_from_run_info(info)
    # The layer layout may differ too: `initial_params` restacks the parameters.
    same = {
        name: getattr(written, name)
        for name in ("dropout_rate", "scan_layers")
        if hasattr(written, name) and hasattr(model_config, name)
    }
    check_config(
        directory, info, model_config.replace(**same), role="initial checkpoint (train.initial_checkpoint_dir)"
    )
    check_vocabulary(directory, info, model_config, vocab, role="initial checkpoint")


def initial_params(directory: str, model, abstract: Any, shardings: Any) -> tuple[Any, dict]:
    """(parameters, metadata) of an initial checkpoint in `model`'s layout and `shardings`: restored
    in place when its layer layout (run_info's `scan_layers`) is the model's; otherwise restored
    on the host in its own layout, stacked or unstacked (`models.convert.tree`), then placed (an
    imported checkpoint, always per layer, fine-tunes scanned this way)."""
    written = models.config_from_run_info(read_model_info(directory))
    scanned = bool(getattr(model.config, "scan_layers", False))
    if bool(getattr(written, "scan_layers", False)) == scanned:
        return restore_params(directory, abstract_with_shardings(abstract, shardings))
    theirs, _ = models.build(written).abstract_params()
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), theirs)
    params, meta = restore_params(directory, template)
    params = jax.tree_util.tree_map(np.asarray, params)
    params = tree.stack_layers(params) if scanned else tree.unstack_layers(params)
    log.info("Restore: %s holds the %s layout; converted.", directory, "per-layer" if scanned else "scanned")
    return jax.device_put(params, shardings), meta


def _restore_or_init(ckpt: Checkpointer, model, tx, seed, abstract, shardings, initial_checkpoint_dir, model_dir):
    restored = ckpt.restore_latest_good(abstract_with_shardings(abstract, shardings))
    if restored is not None:
        state, _, step = restored
        log.info("Restore: resuming from this run's checkpoint at step %d in %s.", step, model_dir)
        return state, step
    if initial_checkpoint_dir:
        params, meta = initial_params(initial_checkpoint_dir, model, abstract.params, shardings.params)
        log.info(
            "Restore: parameters from %s (step %s), fresh optimizer state, step 0.",
            initial_checkpoint_dir,
            meta.get("step"),
        )
        return init_train_state(model, tx, seed, shardings, params=params), 0
    log.info("Restore: no checkpoint in %s and no initial checkpoint; starting from scratch.", model_dir)
    return init_train_state(model, tx, seed, shardings), 0


def _log_state_bytes(state, teacher: FrozenModel | None) -> None:
    sizes = {
        "params": partitioning.per_device_bytes(state.params),
        "optimizer": partitioning.per_device_bytes(state.opt_state),
    }
    if teacher is not None:
        sizes["teacher"] = teacher.bytes_per_device()
    log.info("Per-device bytes: %s", {k: f"{v / 2**20:.2f} MiB" for k, v in sizes.items()})


def _log_progress(
    writer: MetricWriter, step: int, total: int, metrics: dict[str, float], speed: dict[str, float]
) -> None:
    writer.write_scalars(step, {**{f"train/{k}": v for k, v in metrics.items()}, **speed})
    extra = "".join(f" {k}={metrics[k]:.3f}" for k in ("mask_fraction", "student_accuracy") if k in metrics)
    mfu = f" mfu={speed['mfu']:.1%}" if "mfu" in speed else ""
    log.info(
        "step %d/%d loss=%.4f%s %.2f steps/s %.0f tokens/s%s ETA %s",
        step,
        total,
        metrics["loss"],
        extra,
        speed["steps_per_sec"],
        speed["tokens_per_sec"],
        mfu,
        format_duration(speed["eta_seconds"]),
    )
