"""Export a MODEL_DIR as a Hugging Face directory: `python -m cat_jax.export_checkpoint
--gin_file=gin_configs/runs/export_checkpoint.gin --gin.MODEL_DIR=/tmp/cat_jax/small_cat
--gin.OUTPUT_DIR=/tmp/cat_jax/small_cat_hf`.

The result loads with `transformers.T5ForConditionalGeneration.from_pretrained(OUTPUT_DIR)`.
See `cat_jax.jobs.export_checkpoint`.
"""

from __future__ import annotations

from cat_jax import gin_utils, runtime
from cat_jax.jobs.export_checkpoint import export_checkpoint


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.setup_logging()
    print(f"wrote {export_checkpoint()}")
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
