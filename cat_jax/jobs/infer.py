"""The infer job (`python -m cat_jax.infer`): a restored model's predictions on a split, one JSON
line per example."""

from __future__ import annotations

import json
import os

import gin

from cat_jax import evaluation, runtime
from cat_jax.data.config import DatasetConfig
from cat_jax.inference import setup


@gin.configurable
def run_infer(
    *,
    checkpoint_dir: str = gin.REQUIRED,
    dataset: DatasetConfig = gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    step: int | None = None,
) -> tuple[int, str]:
    """Write predictions of every example of the split to `output_file`: (count, path). Each line
    holds id, task, input, target, prediction, prediction_ids (the generated tokens, EOS
    included) and the per-token log-probabilities and entropies of the generated tokens."""
    s, dataset = setup(checkpoint_dir, step, dataset)
    preds = evaluation.predict(
        s.model.model,
        s.model.params,
        s.arrays,
        s.vocab,
        dataset.batch_size,
        s.mesh,
        s.rules,
        dataset.task_feature_lengths["targets"],
    )
    if not runtime.is_lead():
        return len(s.arrays), output_file
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as f:
        for i in range(len(s.arrays)):
            n = int(preds.lengths[i])
            f.write(
                json.dumps(
                    {
                        "id": s.arrays.ids[i],
                        "task": s.arrays.task_names[i],
                        "input": s.arrays.inputs_text[i],
                        "target": s.arrays.targets_text[i],
                        "prediction": preds.texts[i],
                        "prediction_ids": [int(t) for t in preds.tokens[i, :n]],
                        "token_logprobs": [round(float(x), 6) for x in preds.logprobs[i, :n]],
                        "token_entropies": [round(float(x), 6) for x in preds.entropies[i, :n]],
                    }
                )
                + "\n"
            )
    return len(s.arrays), output_file
