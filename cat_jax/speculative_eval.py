"""Evaluate speculative cascades: `python -m cat_jax.speculative_eval
--gin_file=gin_configs/runs/speculative_eval.gin --gin.LARGE_MODEL_DIR=/tmp/cat_jax/large
--gin.SMALL_MODEL_DIRS="{'ce': '/tmp/cat_jax/small_ce', 'cat': '/tmp/cat_jax/small_cat'}"
--gin.OUTPUT_DIR=/tmp/cat_jax/speculative`.

Decodes the split with the large model alone, each drafter alone and every (drafter, gamma, rule,
alpha) speculative cascade; writes curves.csv/json, summary.json/md and PNG plots of quality
against relative latency and relative FLOPs into OUTPUT_DIR.
"""

from __future__ import annotations

from cat_jax import gin_utils, runtime
from cat_jax.jobs.speculative_eval import run_speculative_eval


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    result = run_speculative_eval()
    print(f"wrote {len(result.files)} files to {result.output_dir}")
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
