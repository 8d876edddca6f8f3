"""The eval job (`python -m cat_jax.eval`): a restored model's task metrics on a split."""

from __future__ import annotations

import json
import logging
import os

import gin

from cat_jax import evaluation
from cat_jax.data.config import DatasetConfig
from cat_jax.inference import setup

log = logging.getLogger("cat_jax")


@gin.configurable
def run_eval(
    *,
    checkpoint_dir: str = gin.REQUIRED,
    dataset: DatasetConfig = gin.REQUIRED,
    step: int | None = None,
    output_dir: str | None = None,
) -> dict:
    """{task: {metric: value}} of the checkpoint on the split; written as JSON too. A task without
    metrics (an INPUT_FILE without targets) is listed under "no_metrics", and the log says so."""
    s, dataset = setup(checkpoint_dir, step, dataset)
    metrics = evaluation.evaluate(
        s.model.model,
        s.model.params,
        s.arrays,
        s.vocab,
        dataset.batch_size,
        s.mesh,
        s.rules,
        dataset.task_feature_lengths["targets"],
    )
    output_dir = output_dir or os.path.join(checkpoint_dir, "eval")
    os.makedirs(output_dir, exist_ok=True)
    result = {
        "checkpoint_dir": checkpoint_dir,
        "step": s.model.step,
        "split": dataset.split,
        "num_examples": len(s.arrays),
        # examples cut to TASK_FEATURE_LENGTHS (also logged when the split is loaded)
        "num_truncated": {"inputs": s.arrays.num_truncated_inputs, "targets": s.arrays.num_truncated_targets},
        "metrics": metrics,
    }
    unscored = sorted(task for task, values in metrics.items() if not values)
    if unscored:
        result["no_metrics"] = unscored
        log.warning(
            "No metrics for %s: its examples have no targets (predictions only; python -m cat_jax.infer writes them).",
            ", ".join(unscored),
        )
    with open(os.path.join(output_dir, f"metrics_{dataset.split}_step{s.model.step}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
