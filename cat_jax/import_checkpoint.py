"""Import a pretrained checkpoint: `python -m cat_jax.import_checkpoint
--gin_file=gin_configs/runs/import_checkpoint.gin --gin.SOURCE=/data/flan-t5-small
--gin.MODEL_DIR=/tmp/cat_jax/flan_t5_small`.

SOURCE: a Hugging Face T5 / Flan-T5 / mT5 / ByT5 directory, or a T5X checkpoint (legacy or Orbax
format). MODEL_DIR must not exist or be empty; it becomes an ordinary cat_jax MODEL_DIR (step 0).
See `cat_jax.jobs.import_checkpoint`.
"""

from __future__ import annotations

import json

from cat_jax import gin_utils, runtime
from cat_jax.jobs.import_checkpoint import import_checkpoint


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.setup_logging()
    info = import_checkpoint()
    print(
        json.dumps(
            {
                "model_config": info["model_config"],
                "vocabulary": info["vocabulary"],
                "imported_from": info["imported_from"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
