"""Export a split for hosts without TensorFlow: `python -m cat_jax.export_task
--gin_file=gin_configs/runs/export_task.gin --gin.MIXTURE_OR_TASK_NAME=offline_mix
--gin.SPLIT="['train', 'validation']" --gin.TASK_FEATURE_LENGTHS="{'inputs': 32, 'targets': 128}"
--gin.EXPORT_DIR=/tmp/cat_jax/exported`.

Writes `<EXPORT_DIR>/<name>.<split>.npz` (the examples as `load_split` builds them) and
`<name>.<split>.json` (lengths, vocabulary, mixture rates, metrics). Then train, evaluate or infer
anywhere, TensorFlow or not, with `--gin.data_source.exported_dir=<EXPORT_DIR>` and the same
name, split(s) and lengths. See `cat_jax.data.exported`.

With `--gin.export_split.format='array_record'` the split(s) are streamed instead into sharded
ArrayRecord files under `<EXPORT_DIR>/<name>.<split>/` (never whole in memory, progress with rate
and ETA, resumable by re-running the same command), for `--gin.data_source.streaming_dir=<EXPORT_DIR>`:
training then streams them through grain. See `cat_jax.data.streaming`.
"""

from __future__ import annotations

import json

from cat_jax import gin_utils, runtime
from cat_jax.data.stream_export import manifest_summary
from cat_jax.data.streaming import FORMAT as STREAMING_FORMAT
from cat_jax.jobs.export_task import export_split


def main(rest: list[str]) -> int:
    gin_utils.parse_args(rest)
    runtime.setup_logging()
    for manifest in export_split():
        if manifest["format"] == STREAMING_FORMAT:
            print(json.dumps(manifest_summary(manifest)))
        else:
            print(
                json.dumps(
                    {
                        k: manifest[k]
                        for k in (
                            "name",
                            "split",
                            "num_examples",
                            "task_feature_lengths",
                            "max_examples",
                            "arrays",
                            "export_command",
                        )
                    }
                )
            )
    return 0


if __name__ == "__main__":
    gin_utils.run(main, description=__doc__)
