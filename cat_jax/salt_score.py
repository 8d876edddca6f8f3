"""Score a train split for SALT_DS: `python -m cat_jax.salt_score
--gin_file=gin_configs/runs/salt_score.gin --gin.SMALL_MODEL_DIR=/tmp/cat_jax/small_ce
--gin.SCORES_DIR=/tmp/cat_jax/salt_scores`.

Writes scores.npz / scores.json into SCORES_DIR (resumable: the same command continues); a
training run picks its band with `--gin.DataSelection.scores_dir=SCORES_DIR`. See
`cat_jax.jobs.salt_score`.
"""

from __future__ import annotations

import json

from cat_jax import gin_utils, runtime
from cat_jax.jobs.salt_score import salt_score


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    meta = salt_score()
    if runtime.is_lead():
        print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
