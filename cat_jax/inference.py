"""The eval and infer jobs: a restored model run over a split of a task or mixture."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import gin

from cat_jax import data as data_lib
from cat_jax import evaluation, partitioning, runtime
from cat_jax.errors import ConfigError
from cat_jax.frozen_model import FrozenModel, check_vocabulary, load_frozen_model, read_model_info

log = logging.getLogger("cat_jax")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """A split of a task or mixture to run a restored model on. The task (or mixture) and the
    lengths default (None) to what the checkpoint's run_info.json recorded (`with_run_defaults`)."""
    mixture_or_task_name: str | None = None
    task_feature_lengths: dict | None = None
    split: str = "test"
    batch_size: int = 64
    max_examples: int | None = None


@dataclasses.dataclass
class InferenceSetup:
    model: FrozenModel
    arrays: data_lib.ExampleArrays
    vocab: Any
    mesh: Any
    rules: Any


def with_run_defaults(dataset: InferenceConfig, model_dir: str, info: dict[str, Any]) -> InferenceConfig:
    """`dataset` with the task, lengths (and, for the live seqio tasks, the vocabulary) the model in
    `model_dir` was trained with wherever the configuration leaves them unset; logged."""
    trained = info.get("dataset") or {}
    changes = {}
    for field, key in (("mixture_or_task_name", "mixture_or_task_name"),
                       ("task_feature_lengths", "task_feature_lengths")):
        if getattr(dataset, field) is None:
            if trained.get(key) is None:
                raise ConfigError(
                    f"{model_dir} records no training task (an imported model): give the task and "
                    f"lengths, e.g. --gin.MIXTURE_OR_TASK_NAME=cmudict_g2p "
                    "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 32, 'targets': 64}\".")
            changes[field] = trained[key]
    if changes:
        log.info("From %s's run_info.json: %s (override with --gin.MIXTURE_OR_TASK_NAME / "
                 "--gin.TASK_FEATURE_LENGTHS).", model_dir, changes)
        dataset = dataclasses.replace(dataset, **changes)
    data_lib.data_source().default_vocabulary_from(model_dir)
    return dataset


def setup(checkpoint_dir: str, step: int | None, dataset: InferenceConfig,
          dtype: str | None = None) -> tuple[InferenceSetup, InferenceConfig]:
    """Restore the checkpoint (its run_info completes `dataset`), check its vocabulary against the
    task's, and load the split: (setup, the dataset used)."""
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    dataset = with_run_defaults(dataset, checkpoint_dir, read_model_info(checkpoint_dir))
    frozen = load_frozen_model(checkpoint_dir, mesh=mesh, rules=rules, step=step, dtype=dtype)
    vocab = data_lib.get_vocabulary_of(dataset.mixture_or_task_name)
    check_vocabulary(checkpoint_dir, frozen.info, frozen.config, vocab, role="checkpoint")
    log.info("Restored step %d of %s; %s", frozen.step, checkpoint_dir, partitioning.describe_mesh(mesh))
    arrays = data_lib.load_split(dataset.mixture_or_task_name, dataset.split,
                                 dict(dataset.task_feature_lengths), max_examples=dataset.max_examples)
    return InferenceSetup(frozen, arrays, vocab, mesh, frozen.rules), dataset


@gin.configurable
def run_eval(*, checkpoint_dir: str = gin.REQUIRED, dataset: InferenceConfig = gin.REQUIRED,
             step: int | None = None, output_dir: str | None = None) -> dict:
    """{task: {metric: value}} of the checkpoint on the split; written as JSON too."""
    s, dataset = setup(checkpoint_dir, step, dataset)
    metrics = evaluation.evaluate(s.model.model, s.model.params, s.arrays, s.vocab, dataset.batch_size,
                                  s.mesh, s.rules, dataset.task_feature_lengths["targets"])
    output_dir = output_dir or os.path.join(checkpoint_dir, "eval")
    os.makedirs(output_dir, exist_ok=True)
    result = {"checkpoint_dir": checkpoint_dir, "step": s.model.step, "split": dataset.split,
              "num_examples": len(s.arrays), "metrics": metrics}
    with open(os.path.join(output_dir, f"metrics_{dataset.split}_step{s.model.step}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


@gin.configurable
def run_infer(*, checkpoint_dir: str = gin.REQUIRED, dataset: InferenceConfig = gin.REQUIRED,
              output_file: str = gin.REQUIRED, step: int | None = None) -> tuple[int, str]:
    """Write predictions of every example of the split to `output_file`: (count, path)."""
    s, dataset = setup(checkpoint_dir, step, dataset)
    preds = evaluation.predict(s.model.model, s.model.params, s.arrays, s.vocab, dataset.batch_size,
                               s.mesh, s.rules, dataset.task_feature_lengths["targets"])
    if not runtime.is_lead():
        return len(s.arrays), output_file
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as f:
        for i in range(len(s.arrays)):
            n = int(preds.lengths[i])
            f.write(json.dumps({
                "id": s.arrays.ids[i], "task": s.arrays.task_names[i],
                "input": s.arrays.inputs_text[i], "target": s.arrays.targets_text[i],
                "prediction": preds.texts[i],
                "token_logprobs": [round(float(x), 6) for x in preds.logprobs[i, :n]],
                "token_entropies": [round(float(x), 6) for x in preds.entropies[i, :n]],
            }) + "\n")
    return len(s.arrays), output_file
