"""Predict with a checkpoint: `python -m cat_jax.infer --gin_file=gin_configs/runs/infer.gin
--gin.CHECKPOINT_DIR=/tmp/cat_jax/large --gin.OUTPUT_FILE=/tmp/cat_jax/large_test.jsonl`.

Writes one JSON line per example: id, task, input, target, prediction, and the per-token
log-probabilities and entropies of the generated tokens.
"""

from __future__ import annotations

from cat_jax import gin_utils, runtime
from cat_jax.jobs.infer import run_infer


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    count, path = run_infer()
    print(f"wrote {count} predictions to {path}")
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
