"""Cache a frozen teacher's verdicts on a run's training batches: `python -m cat_jax.cache_teacher
--gin_file=gin_configs/runs/cache_teacher.gin --gin.CACHE_DIR=/tmp/cat_jax/teacher_cache
--gin.TEACHER_MODEL_DIR=/tmp/cat_jax/large --gin.TRAIN_STEPS=2000 [--gin.cache_teacher.top_k=8]`.

With the data settings of the student runs that will read it (MIXTURE_OR_TASK_NAME,
TASK_FEATURE_LENGTHS, BATCH_SIZE, SEED, the data source). Resumable: after a kill, the same
command continues. Students then train with gin_configs/runs/train_small_cat_cached.gin. See
`cat_jax.jobs.cache_teacher` and `cat_jax.objectives.teacher_cache`.
"""

from __future__ import annotations

import json

from cat_jax import gin_utils, runtime
from cat_jax.jobs.cache_teacher import cache_teacher


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.initialize()
    result = cache_teacher()
    if runtime.is_lead():
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
