"""The jobs: one module per entry point, each named after its binary (`cat_jax/<name>.py`, the
`python -m cat_jax.<name>` command), which parses flags, starts the runtime and calls it.

    train.py              train (gin): restore order, the objective's phases, the step loop
    eval.py  infer.py     run_eval / run_infer (gin): a restored model on a split
    cascade_eval.py       run_cascade_eval (gin): decode with every model, record, analyse
    cascade_analyse.py    re-analysis of cascade_eval's records (argparse)
    cascade_compare.py    summaries across seeds (argparse)
    speculative_eval.py   run_speculative_eval (gin): speculative cascades against the large model
    salt_score.py         salt_score (gin): SALT_DS's per-sequence scores, resumable
    salt_report.py        quality against steps of CE / SALT / SALT_DS runs (argparse)
    cache_teacher.py      cache_teacher (gin): a teacher's verdicts on a run's batches, stored once
    export_task.py        export_split (gin): a task's splits as files for TensorFlow-free hosts
    import_checkpoint.py  import_checkpoint (gin): Hugging Face / T5X checkpoints into a MODEL_DIR
    export_checkpoint.py  export_checkpoint (gin): a MODEL_DIR as a Hugging Face directory
    demo.py               `make demo`: the main job at CPU scale

A job imports library modules only (never another job, never a binary).
"""

BINARIES = (
    "train",
    "eval",
    "infer",
    "cascade_eval",
    "cascade_analyse",
    "cascade_compare",
    "speculative_eval",
    "salt_score",
    "salt_report",
    "cache_teacher",
    "export_task",
    "import_checkpoint",
    "export_checkpoint",
    "demo",
)
