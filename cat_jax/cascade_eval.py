"""Evaluate cascades: `python -m cat_jax.cascade_eval --gin_file=gin_configs/runs/cascade_eval.gin
--gin.LARGE_MODEL_DIR=/tmp/cat_jax/large --gin.SMALL_MODEL_DIRS="{'ce': '/tmp/cat_jax/small_ce',
'cat': '/tmp/cat_jax/small_cat'}" --gin.OUTPUT_DIR=/tmp/cat_jax/cascade`.

Decodes the split with every model and writes the records (examples.jsonl, validation_examples.jsonl,
cascade_config.json), curves.csv/json, summary.json/md (k-tier cascades and budgets included) and PNG
plots of quality against relative FLOPs into OUTPUT_DIR; `python -m cat_jax.cascade_analyse
OUTPUT_DIR` redoes the analysis from the records.
"""

from __future__ import annotations

from cat_jax import gin_utils, runtime
from cat_jax.jobs.cascade_eval import run_cascade_eval


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    result = run_cascade_eval()
    print(f"wrote {len(result.files)} files to {result.output_dir}")
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
