"""The training job behind `python -m cat_jax.train`: restore or init, then the step loop.

Restore order, said in the log: this run's latest checkpoint in MODEL_DIR, else the parameters of
`train.initial_checkpoint_dir` (parameters only, fresh optimizer), else scratch. A MODEL_DIR whose
checkpoint already reached TRAIN_STEPS exits 0 at once; one written for a different model config is
refused with both configs' differences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import gin
import jax

from cat_jax import data as data_lib
from cat_jax import evaluation, gin_utils, model_dir as model_dir_lib, partitioning
from cat_jax.checkpoints import Checkpointer, restore_params
from cat_jax.errors import ConfigError
from cat_jax.models.encoder_decoder import EncoderDecoderModel, LossOptions
from cat_jax.metric_writers import MetricWriter
from cat_jax.models import T5Config, forward_flops
from cat_jax.optimizers import make_optimizer
from cat_jax.frozen_model import (FrozenModel, check_config, check_vocabulary, load_frozen_model,
                                  read_model_info)
from cat_jax.train_state import abstract_with_shardings, init_train_state, state_shardings
from cat_jax.trainer import (PreemptionWatcher, ProgressMeter, check_finite, compile_train_step,
                             format_duration, make_train_step, scalar_metrics, batch_shapes)

log = logging.getLogger("cat_jax")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which examples, at which lengths, in which batches (T5X's DatasetConfig, trimmed)."""
    mixture_or_task_name: str
    task_feature_lengths: dict
    batch_size: int
    split: str = "train"
    seed: int = 0
    max_examples: int | None = None


@dataclasses.dataclass
class TrainResult:
    final_step: int
    model_dir: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, Any]


@gin.configurable(denylist=["mesh"])
def train(*, model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          model_config: T5Config = gin.REQUIRED, train_dataset: DatasetConfig = gin.REQUIRED,
          loss_options: LossOptions = LossOptions(), teacher_model_dir: str | None = None,
          teacher_step: int | None = None, teacher_dtype: str = "bfloat16",
          teacher_model_config: T5Config | None = None,
          initial_checkpoint_dir: str | None = None, eval_split: str | None = "validation",
          eval_period: int = 0, eval_max_examples: int | None = 256, eval_batch_size: int = 64,
          checkpoint_period: int = 100, keep_checkpoints: int = 3, log_every_steps: int = 10,
          seed: int = 0, peak_flops_per_device: float | None = None,
          max_steps_per_run: int | None = None,
          mesh: Any = None) -> TrainResult:
    """Train `model_config` on `train_dataset` for `train_steps` steps into `model_dir`.

    `max_steps_per_run` stops this invocation after that many steps with a checkpoint (for jobs
    that run in fixed time slots); the same command continues the run.
    """
    lead = jax.process_index() == 0
    model_dir_lib.prepare(model_dir)
    lengths = dict(train_dataset.task_feature_lengths)
    vocab = data_lib.get_vocabulary_of(train_dataset.mixture_or_task_name)
    model_config = model_dir_lib.with_vocab_size(model_config, vocab)
    li, lt = lengths["inputs"], lengths["targets"]
    mesh = mesh or partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    log.info("Mesh: %s", partitioning.describe_mesh(mesh))
    teacher = None
    if teacher_model_dir:
        teacher = load_teacher(teacher_model_dir, teacher_step, teacher_dtype, teacher_model_config,
                               model_config, vocab, mesh, rules)
        log.info("Teacher: step %d of %s, %s parameters", teacher.step, teacher_model_dir, teacher_dtype)
    elif loss_options.needs_teacher:
        raise ConfigError(
            f"The loss {loss_options} needs a frozen large model, but no teacher is configured. "
            f"Set --gin.TEACHER_MODEL_DIR=<the large model's MODEL_DIR>.")
    if initial_checkpoint_dir:
        check_initial_checkpoint(initial_checkpoint_dir, model_config, vocab)
    run_info = model_dir_lib.run_info(model_config, vocab, loss_options, train_dataset, teacher)
    model_dir_lib.check_compatible(model_dir, run_info)
    if lead:
        run_info["vocabulary_files"] = model_dir_lib.write_vocabulary(model_dir, vocab)
        model_dir_lib.write_run_info(model_dir, run_info)
        gin_utils.write_config(model_dir)

    model = EncoderDecoderModel(model_config, loss_options)
    tx, schedule = make_optimizer(train_steps)
    abstract, shardings = state_shardings(model, tx, mesh, rules, li, lt)

    ckpt = Checkpointer(model_dir, save_interval_steps=checkpoint_period, max_to_keep=keep_checkpoints)
    state, start_step = _restore_or_init(ckpt, model, tx, seed, abstract, shardings,
                                         initial_checkpoint_dir, li, lt, model_dir)
    _log_state_bytes(state, teacher)
    if start_step >= train_steps:
        log.info("MODEL_DIR %s already holds step %d >= TRAIN_STEPS=%d: nothing to do. Raise "
                 "TRAIN_STEPS to train further, or use a new MODEL_DIR.", model_dir, start_step, train_steps)
        return TrainResult(start_step, model_dir, {}, {})

    arrays = data_lib.load_split(train_dataset.mixture_or_task_name, train_dataset.split, lengths,
                                 max_examples=train_dataset.max_examples)
    batches = data_lib.TrainBatches(arrays, train_dataset.batch_size, seed=train_dataset.seed,
                                    rates=data_lib.mixture_rates(train_dataset.mixture_or_task_name))
    eval_arrays = None
    if eval_split and eval_period:
        eval_arrays = data_lib.load_split(train_dataset.mixture_or_task_name, eval_split, lengths,
                                          max_examples=eval_max_examples)
    b_sharding = partitioning.batch_sharding(mesh, rules)
    rows = partitioning.process_batch_slice(b_sharding, train_dataset.batch_size)
    step_fn = make_train_step(model, tx, schedule, teacher.logits_fn if teacher else None)
    compiled = compile_train_step(
        step_fn, abstract, shardings, batch_shapes(arrays.features, train_dataset.batch_size),
        b_sharding, teacher.abstract_params if teacher else None,
        teacher.param_shardings if teacher else None, mesh)
    log.info("Compiled the train step in %.1fs; memory per device: %s", compiled.compile_seconds,
             {k: f"{v / 2**20:.1f} MiB" for k, v in compiled.memory.items()})
    teacher_params = teacher.params if teacher else None

    writer = MetricWriter(model_dir, enabled=lead)
    flops = 3 * train_dataset.batch_size * forward_flops(model_config, li, lt)
    if teacher:
        flops += train_dataset.batch_size * forward_flops(teacher.config, li, lt)
    peak = peak_flops_per_device * jax.device_count() if peak_flops_per_device else None
    meter = ProgressMeter(start_step, train_steps, train_dataset.batch_size * (li + lt), flops, peak)
    watcher = PreemptionWatcher()
    last_saved = ckpt.latest_step()
    metrics: dict[str, Any] = {}
    eval_metrics: dict[str, Any] = {}
    try:
        step = start_step
        while step < train_steps:
            local = batches.batch(step, *rows)
            batch = partitioning.global_batch(local, b_sharding, train_dataset.batch_size)
            state, metrics = compiled.fn(state, batch, teacher_params)
            step += 1
            at_end = step == train_steps
            preempted = watcher.should_stop()
            stop = preempted or (max_steps_per_run is not None and step - start_step >= max_steps_per_run)
            if step % log_every_steps == 0 or at_end or stop:
                check_finite(metrics, step, last_saved, model_dir)
                _log_progress(writer, step, train_steps, scalar_metrics(metrics), meter.update(step))
            if ckpt.should_save(step) or at_end or stop:
                check_finite(metrics, step, last_saved, model_dir)
                ckpt.save(step, state, run_info, force=True)
                last_saved = step
            if eval_arrays is not None and (step % eval_period == 0 or at_end):
                eval_metrics = evaluation.evaluate(model, state.params, eval_arrays, vocab,
                                                   eval_batch_size, mesh, rules, lt)
                writer.write_scalars(step, evaluation.flatten(eval_metrics, prefix="eval/"))
                log.info("eval @ %d: %s", step, json.dumps(evaluation.flatten(eval_metrics), sort_keys=True))
            if stop:
                log.info("%s: saved step %d in %s; the same command resumes.",
                         "Preemption signal" if preempted else "max_steps_per_run reached", step, model_dir)
                break
    finally:
        watcher.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    if lead:
        gin_utils.write_operative_config(model_dir)
    return TrainResult(step, model_dir, scalar_metrics(metrics) if metrics else {}, eval_metrics)


def load_teacher(model_dir: str, step: int | None, dtype: str, expected_config: T5Config | None,
                 student_config: T5Config, vocab, mesh, rules) -> FrozenModel:
    """The frozen large model, checked against the student's vocabulary and the configured model
    before its parameters are restored."""
    info = read_model_info(model_dir)
    if expected_config is not None:
        check_config(model_dir, info, expected_config)
    check_vocabulary(model_dir, info, student_config, vocab)
    return load_frozen_model(model_dir, mesh=mesh, rules=rules, step=step, dtype=dtype)


def check_initial_checkpoint(directory: str, model_config: T5Config, vocab) -> None:
    """Refuse an init-from checkpoint of another architecture or vocabulary, before any compute.

    The compute dtype and dropout rate may differ (fine-tuning often changes them).
    """
    info = read_model_info(directory)
    written = T5Config.from_dict(info["model_config"])
    check_config(directory, info, model_config.replace(dropout_rate=written.dropout_rate),
                 role="initial checkpoint (train.initial_checkpoint_dir)")
    check_vocabulary(directory, info, model_config, vocab, role="initial checkpoint")


def _restore_or_init(ckpt: Checkpointer, model, tx, seed, abstract, shardings,
                     initial_checkpoint_dir, li, lt, model_dir):
    latest = ckpt.latest_step()
    if latest is not None:
        state, _ = ckpt.restore(abstract_with_shardings(abstract, shardings), step=latest)
        log.info("Restore: resuming from this run's checkpoint at step %d in %s.", latest, model_dir)
        return state, latest
    if initial_checkpoint_dir:
        template = abstract_with_shardings(abstract.params, shardings.params)
        params, meta = restore_params(initial_checkpoint_dir, template)
        log.info("Restore: parameters from %s (step %s), fresh optimizer state, step 0.",
                 initial_checkpoint_dir, meta.get("step"))
        return init_train_state(model, tx, seed, shardings, li, lt, params=params), 0
    log.info("Restore: no checkpoint in %s and no initial checkpoint; starting from scratch.", model_dir)
    return init_train_state(model, tx, seed, shardings, li, lt), 0


def _log_state_bytes(state, teacher: FrozenModel | None) -> None:
    sizes = {"params": partitioning.per_device_bytes(state.params),
             "optimizer": partitioning.per_device_bytes(state.opt_state)}
    if teacher is not None:
        sizes["teacher"] = teacher.bytes_per_device()
    log.info("Per-device bytes: %s", {k: f"{v / 2**20:.2f} MiB" for k, v in sizes.items()})


def _log_progress(writer: MetricWriter, step: int, total: int, metrics: dict[str, float],
                  speed: dict[str, float]) -> None:
    writer.write_scalars(step, {**{f"train/{k}": v for k, v in metrics.items()}, **speed})
    extra = "".join(f" {k}={metrics[k]:.3f}" for k in ("mask_fraction", "student_accuracy") if k in metrics)
    mfu = f" mfu={speed['mfu']:.1%}" if "mfu" in speed else ""
    log.info("step %d/%d loss=%.4f%s %.2f steps/s %.0f tokens/s%s ETA %s", step, total,
             metrics["loss"], extra, speed["steps_per_sec"], speed["tokens_per_sec"], mfu,
             format_duration(speed["eta_seconds"]))
