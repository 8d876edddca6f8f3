"""SALT: the small model helps train the large one (Rawat et al., "A Little Help Goes a Long Way").

- `objective`: SALT as a training objective (`train.objective = @Salt()`): its two phases.
- `schedule`: the distillation weight over steps (a step or a linear switch).
- `selection`: SALT_DS's per-sequence score and the score band a run trains on during distillation.
- `report`: an alias of `python -m cat_jax.salt_report`, kept for one release.

The jobs are `cat_jax.jobs.salt_score` (score a train split with the small model, resumable) and
`cat_jax.jobs.salt_report` (validation quality against steps of CE / SALT / SALT_DS runs).
"""
