"""Train a model: `python -m cat_jax.train --gin_file=gin_configs/runs/train_large.gin
--gin.MODEL_DIR=/tmp/cat_jax/large --gin.TRAIN_STEPS=2000`.

See `cat_jax.jobs.train.train` for the restore order and every gin parameter.
"""

from __future__ import annotations

import json

from cat_jax import evaluation, gin_utils, runtime
from cat_jax.jobs.train import train


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    result = train()
    if runtime.is_lead():
        print(
            json.dumps(
                {
                    "final_step": result.final_step,
                    "model_dir": result.model_dir,
                    "train": result.train_metrics,
                    "eval": evaluation.flatten(result.eval_metrics),
                    "step_flops": result.step_flops,
                },
                default=float,
            )
        )
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__, sigterm_exit_code=0)
