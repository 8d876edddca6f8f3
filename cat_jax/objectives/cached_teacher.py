"""CAT and distillation from a teacher cache (`cat_jax.objectives.teacher_cache`): the loss of
`TokenLoss` with the teacher's stored correctness and top-k in place of its logits, so the teacher
is not run (nor loaded) during training.

    CAT-Xent      the stored bit is exactly c_L of the online teacher run with the same dtype: the
                  same mask and loss
    CAT-distill   the KL term over the stored top k and the rest of the teacher's mass as one more
    and KD        outcome (`losses.top_k_kl_divergence`; the cache is taken at the run's
                  temperature): exact when the k tokens hold the teacher's mass, otherwise a lower
                  bound; tests/test_teacher_cache.py states the tolerance against the full KL

Bind it with `train.objective = @CachedTeacher()` and `CachedTeacher.cache_dir` (the run file
`gin_configs/runs/train_small_cat_cached.gin`). The cache must have been built for this run's
batches (task, split, lengths, batch size, seed, sample, order), its tokenizer and, when the run
names a teacher or the cache's teacher checkpoint is still on disk, that very checkpoint
(`check_run`): anything else is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import gin
import jax

from cat_jax import integrity, vocabularies
from cat_jax.errors import ConfigError
from cat_jax.losses import cascade_aware_loss
from cat_jax.models import LOSS_WEIGHTS, TARGETS, Model
from cat_jax.objectives import teacher_cache
from cat_jax.objectives.base import LOSS_DENOMINATOR, LossFn, Objective
from cat_jax.objectives.token_loss import LossOptions, TokenLoss, loss_denominator, loss_options_info


def teacher_identity(model_dir: str, step: int, dtype: str | None) -> dict[str, Any]:
    """What a cache records of its teacher: the checkpoint's directory, step and checksum
    (`integrity.step_checksum`), and the compute dtype its logits were taken in."""
    return {
        "model_dir": os.path.abspath(model_dir),
        "step": int(step),
        "checksum": integrity.step_checksum(model_dir, step),
        "dtype": dtype,
    }


def target_length(model: Model, lengths: Mapping[str, int]) -> int:
    """The length of the model's batch targets (what the cache holds per row) at these lengths."""
    return int(model.batch_shapes(dict(lengths), 1)[TARGETS].shape[1])


def cached_loss(model: Model, options: LossOptions) -> LossFn:
    """`token_loss` with the cache's batch features in place of the teacher's logits."""

    def loss_fn(params, batch, rng, teacher_logits, step):
        logits = model.logits(params, batch, rng)
        top_k = None
        if options.alpha < 1.0:
            top_k = (batch[teacher_cache.TOP_K_IDS], batch[teacher_cache.TOP_K_LOGPROBS])
        loss, metrics = cascade_aware_loss(
            logits,
            None,
            batch[TARGETS],
            batch[LOSS_WEIGHTS],
            alpha=options.alpha,
            temperature=options.temperature,
            mask=options.mask,
            normalizer=options.normalizer,
            mask_start_step=options.mask_start_step,
            step=step,
            teacher_correct=batch[teacher_cache.TEACHER_CORRECT],
            teacher_top_k=top_k,
        )
        return loss, dict(metrics, **{LOSS_DENOMINATOR: loss_denominator(options, metrics)})

    return loss_fn


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CachedTeacher(Objective):
    """CE, distillation or CAT (its `options`, as `TokenLoss`) from the cache in `cache_dir`."""

    cache_dir: str | None = None
    options: LossOptions = LossOptions()

    @functools.cached_property
    def cache(self) -> teacher_cache.TeacherCache:
        if not self.cache_dir:
            raise ConfigError("CachedTeacher.cache_dir is not set: give the teacher cache's directory.")
        return teacher_cache.TeacherCache(self.cache_dir)

    def info(self) -> dict[str, Any]:
        manifest = self.cache.manifest
        return {
            "loss_options": loss_options_info(self.options),
            "salt": None,
            "teacher_cache": {
                "cache_dir": self.cache.directory,
                "teacher": manifest["teacher"],
                "top_k": manifest["top_k"],
            },
        }

    def check(self, *, has_teacher: bool, streaming: bool, dataset: Mapping[str, Any]) -> None:
        TokenLoss(self.options).check(has_teacher=True, streaming=streaming, dataset=dataset)
        if streaming and jax.process_count() > 1:
            raise ConfigError(
                "A teacher cache holds the global batches of one stream (a streamed cache pass runs on one process); a "
                "streamed run on several processes reads other rows per process. Train on one process, or from "
                "the exported (in-memory) data, whose global batches are the cache's on any number of processes."
            )
        if self.options.alpha < 1.0 and not self.cache.top_k:
            raise ConfigError(
                f"LossOptions.alpha={self.options.alpha} distils from the teacher's top-k, but the cache "
                f"{self.cache.directory} holds none (built with top_k=0). Build it with --gin.cache_teacher.top_k=K."
            )
        if self.options.alpha < 1.0 and self.options.temperature != self.cache.manifest["temperature"]:
            raise ConfigError(
                f"LossOptions.temperature={self.options.temperature}, but the teacher cache {self.cache.directory} "
                f"holds the teacher's top-k at temperature {self.cache.manifest['temperature']}. Build a cache with "
                f"--gin.cache_teacher.temperature={self.options.temperature}, or train at its temperature."
            )

    def check_run(
        self, *, model: Model, vocab: Any, teacher: Any, dataset: Mapping[str, Any], data_order: str, train_steps: int
    ) -> None:
        """The cache against this run's batches, tokenizer and teacher (see the module docstring)."""
        manifest = self.cache.manifest
        recorded = manifest["teacher"]
        if teacher is not None:
            now = teacher_identity(teacher.model_dir, teacher.step, recorded["dtype"])
        else:
            # The cache's own teacher, still on disk: its checkpoint must be unchanged.
            gone = integrity.step_checksum(recorded["model_dir"], recorded["step"]) is None
            now = recorded if gone else teacher_identity(recorded["model_dir"], recorded["step"], recorded["dtype"])
        want = {
            **manifest,
            "vocabulary": vocabularies.identity(vocab),
            "teacher": now,
            "dataset": dict(dataset),
            "data_order": data_order,
            "target_length": target_length(model, dataset["task_feature_lengths"]),
        }
        teacher_cache.compare(manifest, want, self.cache.directory)
        if train_steps > self.cache.steps:
            raise ConfigError(
                f"TRAIN_STEPS={train_steps}, but the teacher cache {self.cache.directory} holds "
                f"{self.cache.steps} steps. Build one with --gin.TRAIN_STEPS={train_steps} into a new directory, "
                f"or train at most {self.cache.steps} steps."
            )

    def teacher_runs(self, phase: str) -> bool:
        return False

    def loss_fn(self, model: Model, phase: str) -> LossFn:
        return cached_loss(model, self.options)

    def batch_features(self, step: int, rows: tuple[int, int]) -> dict[str, Any]:
        return self.cache.entries(step, rows)

    def feature_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in self.cache.shapes(batch_size).items()}
