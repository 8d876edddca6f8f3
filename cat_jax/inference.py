"""A restored model and the split it runs on: what eval, infer, cascade_eval and speculative_eval
start from (the jobs are `cat_jax.jobs.eval`, `.infer`, `.cascade_eval`, `.speculative_eval`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cat_jax import data as data_lib
from cat_jax import partitioning
from cat_jax.data.config import DatasetConfig
from cat_jax.errors import ConfigError
from cat_jax.frozen_model import FrozenModel, check_vocabulary, load_frozen_model, read_model_info

log = logging.getLogger("cat_jax")


@dataclasses.dataclass
class InferenceSetup:
    model: FrozenModel
    arrays: data_lib.ExampleArrays
    vocab: Any
    mesh: Any
    rules: Any


def with_run_defaults(dataset: DatasetConfig, model_dir: str, info: dict[str, Any]) -> DatasetConfig:
    """`dataset` with the task, lengths (and, for the live seqio tasks and an INPUT_FILE, the
    vocabulary) the model in `model_dir` was trained with wherever the configuration leaves them
    unset; logged. With an INPUT_FILE, the task is the file's."""
    trained = info.get("dataset") or {}
    changes = {}
    source = data_lib.data_source()
    if source.task_name is not None:  # an INPUT_FILE: its one task
        if dataset.mixture_or_task_name not in (None, source.task_name):
            log.info("INPUT_FILE is set: its examples are read, not %s's.", dataset.mixture_or_task_name)
        dataset = dataclasses.replace(dataset, mixture_or_task_name=source.task_name)
    for field, key in (
        ("mixture_or_task_name", "mixture_or_task_name"),
        ("task_feature_lengths", "task_feature_lengths"),
    ):
        if getattr(dataset, field) is None:
            if trained.get(key) is None:
                raise ConfigError(
                    f"{model_dir} records no training task (an imported model): give the task and "
                    f"lengths, e.g. --gin.MIXTURE_OR_TASK_NAME=cmudict_g2p "
                    "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 32, 'targets': 64}\"."
                )
            changes[field] = trained[key]
    if changes:
        log.info(
            "From %s's run_info.json: %s (override with --gin.MIXTURE_OR_TASK_NAME / --gin.TASK_FEATURE_LENGTHS).",
            model_dir,
            changes,
        )
        dataset = dataclasses.replace(dataset, **changes)
    source.default_vocabulary_from(model_dir)
    return dataset


def cascade_dataset(dataset: DatasetConfig, large_model_dir: str, job: str) -> DatasetConfig:
    """`with_run_defaults` for a job of several models (cascade_eval, speculative_eval): the large
    model's run_info completes `dataset` and, with an INPUT_FILE, its vocabulary reads the file. A
    cascade is scored against targets, so an INPUT_FILE without them is a ConfigError."""
    dataset = with_run_defaults(dataset, large_model_dir, read_model_info(large_model_dir))
    source = data_lib.data_source()
    if not source.has_targets:
        raise ConfigError(
            f"{job} scores each model against the targets, and INPUT_FILE={source.describe()} has none: "
            "give every line a 'targets' field, or use cat_jax.infer for predictions alone."
        )
    return dataset


def setup(
    checkpoint_dir: str, step: int | None, dataset: DatasetConfig, dtype: str | None = None
) -> tuple[InferenceSetup, DatasetConfig]:
    """Restore the checkpoint (its run_info completes `dataset`), check its vocabulary against the
    task's, and load the split: (setup, the dataset used)."""
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    dataset = with_run_defaults(dataset, checkpoint_dir, read_model_info(checkpoint_dir))
    frozen = load_frozen_model(checkpoint_dir, mesh=mesh, rules=rules, step=step, dtype=dtype)
    vocab = data_lib.get_vocabulary_of(dataset.mixture_or_task_name)
    check_vocabulary(checkpoint_dir, frozen.info, frozen.config, vocab, role="checkpoint")
    log.info("Restored step %d of %s; %s", frozen.step, checkpoint_dir, partitioning.describe_mesh(mesh))
    arrays = data_lib.load_split(
        dataset.mixture_or_task_name,
        dataset.split,
        dict(dataset.task_feature_lengths),
        max_examples=dataset.max_examples,
    )
    return InferenceSetup(frozen, arrays, vocab, mesh, frozen.rules), dataset
