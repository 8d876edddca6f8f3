"""SALT: the small model helps train the large one (Rawat et al., "A Little Help Goes a Long Way").

- `schedule`: the distillation weight over steps (SALT's two phases, step or linear switch).
- `selection`: SALT_DS's per-sequence score and the score band a run trains on during distillation.
- `scoring`: the batched, resumable job that scores a train split with the small model.
- `report`: validation quality against steps of CE / SALT / SALT_DS runs (plot, table, steps to
  reach the CE baseline).
"""
