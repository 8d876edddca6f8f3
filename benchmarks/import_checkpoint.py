"""Time and peak host memory of `cat_jax.import_checkpoint` on a random Hub-style checkpoint.

    python benchmarks/import_checkpoint.py --model=flan_t5_base [--workdir=/tmp/cat_jax_import_bench]

Writes a random Hugging Face directory of the gin_configs/models/<model>.gin shape (float32
safetensors, config.json, the test fixtures' SentencePiece model), imports it, and prints one JSON
line: the checkpoint's size, the import's seconds, and the peak anonymous resident memory
(RssAnon, sampled every 5 ms; memory-mapped file pages the kernel can drop are not counted) above
the process's own after JAX start-up. Needs about three times the model's size in free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
from common import MODELS_DIR, REPO, peak_anon_mib


def write_random_hub_dir(model: str, directory: str) -> int:
    """A random Hub-style checkpoint of `model`'s shape in `directory`; returns its byte size."""
    import gin
    from safetensors.numpy import save_file

    from cat_jax import gin_utils, models
    from cat_jax.models.convert import hub, tree
    from cat_jax.models.t5.convert import hf  # the T5 family's Hub layout: what this benchmark imports

    gin_utils.parse_gin([str(MODELS_DIR / f"{model}.gin")], [])
    config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
    abstract, _ = models.build(config).abstract_params()
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in tree.flatten(abstract).items()}
    os.makedirs(directory)
    save_file(hf.tensors_for_export(config, flat), os.path.join(directory, hub.SINGLE))
    with open(os.path.join(directory, hub.CONFIG), "w") as f:
        json.dump(hf.config_to_hf(config), f)
    shutil.copy(REPO / "tests" / "fixtures" / "hf_t5" / "spiece.model", os.path.join(directory, "spiece.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(hf.tokenizer_config("sentencepiece", 4), f)
    return os.path.getsize(os.path.join(directory, hub.SINGLE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flan_t5_base")
    parser.add_argument("--workdir", default="/tmp/cat_jax_import_bench")
    args = parser.parse_args()
    import jax

    from cat_jax.jobs import import_checkpoint as importer

    shutil.rmtree(args.workdir, ignore_errors=True)
    hub, out = os.path.join(args.workdir, "hub"), os.path.join(args.workdir, "model_dir")
    size = write_random_hub_dir(args.model, hub)
    jax.numpy.zeros(1).block_until_ready()
    with peak_anon_mib() as memory:
        start = time.perf_counter()
        importer.import_checkpoint(source=hub, model_dir=out)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "model": args.model,
                "checkpoint_mib": round(size / 2**20, 1),
                "import_seconds": round(seconds, 2),
                "peak_anon_mib_above_baseline": round(memory["peak_above_baseline"], 1),
            }
        )
    )
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
