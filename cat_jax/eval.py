"""Evaluate a checkpoint: `python -m cat_jax.eval --gin_file=gin_configs/runs/eval.gin
--gin.CHECKPOINT_DIR=/tmp/cat_jax/large`.

Greedy-decodes the split and prints (and writes to `<OUTPUT_DIR>/metrics_<split>_step<k>.json`)
every task's seqio metrics.
"""

from __future__ import annotations

import json

from cat_jax import gin_utils, runtime
from cat_jax.jobs.eval import run_eval


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    print(json.dumps(run_eval(), indent=2))
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
