"""The teacher-cache job behind `python -m cat_jax.cache_teacher`: one pass of a frozen teacher
over a run's training batches, stored for students that then train without it
(`cat_jax.objectives.teacher_cache`, read by `cat_jax.objectives.CachedTeacher`).

The batches are the data layer's (`DataSource.train_batches`: in memory, or streamed), exactly
those a training run with the same DatasetConfig sees at each step; the teacher is restored and
sharded as the trainer's (`frozen_model.load_frozen_model`, its own fitted rules on the run's mesh)
in the same dtype (TEACHER_DTYPE). The pass writes shards of `steps_per_shard` steps; run again,
the same command checks the manifest, skips the finished shards and redoes the one a kill cut
short, so the cache ends byte for byte as an uninterrupted pass writes it.

On several processes (`jax.distributed`, as the trainer runs; in-memory data only, whose batches do
not depend on the process count: a streamed pass runs on one process) each process feeds its block
of rows of every batch (`partitioning.process_batch_slice`, as the students' processes will), the
teacher runs sharded over all devices, the entries are gathered to every process and process 0
writes the manifest and the shards (CACHE_DIR on a file system every process sees, as MODEL_DIR is).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cat_jax import data as data_lib
from cat_jax import models, partitioning, runtime, vocabularies
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import ConfigError, check_int, check_number
from cat_jax.frozen_model import check_vocabulary, load_frozen_model, read_model_info
from cat_jax.objectives import teacher_cache
from cat_jax.objectives.cached_teacher import target_length, teacher_identity

log = logging.getLogger("cat_jax")


@gin.configurable(denylist=["mesh"])
def cache_teacher(
    *,
    cache_dir: str = gin.REQUIRED,
    teacher_model_dir: str = gin.REQUIRED,
    train_dataset: DatasetConfig = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    teacher_step: int | None = None,
    teacher_dtype: str = "bfloat16",
    top_k: int = 0,
    temperature: float = 1.0,
    steps_per_shard: int = 100,
    mesh: Any = None,
) -> dict[str, Any]:
    """Cache what the teacher in `teacher_model_dir` says of steps [0, train_steps) of the batches
    of `train_dataset` in `cache_dir`: per target token its correctness and, with `top_k` = k > 0,
    its k best tokens' log-probabilities at `temperature` (the students' LossOptions.temperature).
    Returns the cache's summary (steps, bytes, tokens)."""
    dataset = train_dataset.require_task()
    check_int("TRAIN_STEPS (cache_teacher.train_steps)", train_steps, 1)
    check_int("cache_teacher.top_k", top_k, 0)
    check_int("cache_teacher.steps_per_shard", steps_per_shard, 1)
    check_number("cache_teacher.temperature", temperature, minimum=0)
    if temperature == 0:
        raise ConfigError("cache_teacher.temperature must be > 0; got 0.")
    check_int("TEACHER_STEP (cache_teacher.teacher_step)", teacher_step, 0, allow_none=True)
    source = data_lib.data_source()
    if source.kind == "streaming" and jax.process_count() > 1:
        raise ConfigError(
            "A streamed cache pass runs on one process (the students that read it train on one process from "
            "a stream: CachedTeacher); start it without jax.distributed, or cache the exported (in-memory) data, "
            "whose batches are the same on any number of processes."
        )
    vocab = source.vocabulary(dataset.mixture_or_task_name)
    info = read_model_info(teacher_model_dir)
    model = models.from_run_info(info, dtype=teacher_dtype)
    check_vocabulary(teacher_model_dir, info, model.config, vocab)
    if top_k > model.config.vocab_size:
        raise ConfigError(f"cache_teacher.top_k={top_k} exceeds the vocabulary ({model.config.vocab_size}).")
    mesh = mesh or partitioning.make_mesh()
    with runtime.phase("restoring the teacher"):
        teacher = load_frozen_model(
            teacher_model_dir,
            mesh=mesh,
            rules=partitioning.logical_axis_rules(),
            step=teacher_step,
            dtype=teacher_dtype,
        )
    manifest = {
        "format": teacher_cache.FORMAT,
        "dataset": dataset.record(),
        "data_order": source.data_order,
        "data_source": source.describe(),
        "vocabulary": vocabularies.identity(vocab),
        "teacher": teacher_identity(teacher.model_dir, teacher.step, teacher_dtype),
        "teacher_model_config": teacher.config.to_dict(),
        "target_length": target_length(model, dataset.task_feature_lengths),
        "top_k": top_k,
        "temperature": float(temperature),
        "steps": train_steps,
        "steps_per_shard": steps_per_shard,
    }
    manifest = _claim(cache_dir, manifest)
    sharding = partitioning.batch_sharding(mesh, teacher.rules)
    data = source.train_batches(
        dataset.mixture_or_task_name,
        dataset.split,
        dict(dataset.task_feature_lengths),
        dataset.batch_size,
        dataset.seed,
        dataset.max_examples,
        partitioning.process_batch_slice(sharding, dataset.batch_size),
        # packed as the students' rows are (same family and tokenizer: the cache's checks compare them)
        model.packing_input_overhead(vocab) if dataset.pack else None,
    )
    entries_fn = jax.jit(
        lambda params, batch: teacher_entries(teacher.logits_fn(params, batch), batch, top_k, temperature)
    )
    done = set(teacher_cache.finished_shards(cache_dir, manifest))
    streamed = data.iterator is not None  # a stream is read in order: finished shards' batches are skipped over
    started, computed = time.perf_counter(), 0
    with runtime.phase("caching the teacher"):
        for index in range(teacher_cache.num_shards(manifest)):
            steps = teacher_cache.shard_steps(manifest, index)
            if index in done:
                if streamed:
                    for step in steps:
                        data.batch(step)
                continue
            rows = []
            for step in steps:
                batch = partitioning.global_batch(
                    model.make_batch(data.batch(step), vocab), sharding, dataset.batch_size
                )
                rows.append(multihost_utils.process_allgather(entries_fn(teacher.params, batch), tiled=True))
            if runtime.is_lead():
                teacher_cache.write_shard(
                    cache_dir, index, {name: np.stack([r[name] for r in rows]) for name in rows[0]}
                )
            computed += len(steps)
            rate = computed / max(time.perf_counter() - started, 1e-9)
            log.info(
                "Teacher cache: shard %d/%d written (steps %d-%d), %.2f steps/s",
                index + 1,
                teacher_cache.num_shards(manifest),
                steps[0],
                steps[-1],
                rate,
            )
    runtime.sync("teacher cache written")
    return summary(cache_dir, manifest)


def teacher_entries(
    logits: jax.Array, batch: dict[str, jax.Array], top_k: int, temperature: float = 1.0
) -> dict[str, jax.Array]:
    """A batch's cache entries from the teacher's logits [b, length, vocab]: c_L exactly as
    `losses.cascade_aware_loss` computes it from the same logits, and the top k of the float32
    log-softmax at `temperature` (ties: the lower id first, as `jax.lax.top_k`)."""
    out = {teacher_cache.TEACHER_CORRECT: jnp.argmax(logits, axis=-1) == batch[models.TARGETS]}
    if top_k:
        logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1), top_k)
        out[teacher_cache.TOP_K_IDS] = ids.astype(jnp.int32)
        out[teacher_cache.TOP_K_LOGPROBS] = logprobs
    return out


def _claim(cache_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest of `cache_dir`: written (by process 0) when new; an existing one must be this
    pass's (a resumed pass), else refused by name on every process."""
    existing = teacher_cache.read_manifest(cache_dir)
    runtime.sync("teacher cache manifest read")  # before process 0 may write one
    if existing is None:
        if runtime.is_lead():
            teacher_cache.write_manifest(cache_dir, manifest)
        log.info("Teacher cache: new in %s, %d steps, top_k=%d.", cache_dir, manifest["steps"], manifest["top_k"])
        return manifest
    teacher_cache.compare(existing, manifest, cache_dir)
    for key in ("steps", "steps_per_shard", "top_k", "temperature"):
        if existing.get(key) != manifest[key]:
            raise ConfigError(
                f"The teacher cache {cache_dir} was started with {key}={existing.get(key)!r}, not {manifest[key]!r}: "
                "resume it with its settings, or use a new directory."
            )
    log.info(
        "Teacher cache: resuming %s (%d of %d shards finished).",
        cache_dir,
        len(teacher_cache.finished_shards(cache_dir, existing)),
        teacher_cache.num_shards(existing),
    )
    return existing


def summary(cache_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Steps, target positions, bytes on disk and bytes per million target positions."""
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(cache_dir) for name in names)
    tokens = manifest["steps"] * manifest["dataset"]["batch_size"] * manifest["target_length"]
    return {
        "cache_dir": cache_dir,
        "steps": manifest["steps"],
        "top_k": manifest["top_k"],
        "target_positions": tokens,
        "bytes": size,
        "bytes_per_million_positions": size / tokens * 1e6,
    }
