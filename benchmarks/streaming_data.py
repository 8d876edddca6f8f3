"""Host memory and speed of the streaming data path on a split of any size.

    python benchmarks/streaming_data.py --examples=3000000 --batches=2000 [--workdir=/tmp/cat_jax_stream_bench] [--keep]

Exports `synthetic_sums` train with `--examples` examples (generated on the fly) as ArrayRecord
shards, then reads `--batches` training batches of `--batch` rows through grain. Prints one JSON
line per phase: seconds, examples/s and the peak anonymous resident memory (RssAnon) above the
process's own at the phase's start. For comparison it also prints what the in-memory path would
hold for the same split (its four int32/float32 model features at these lengths, without the
texts and ids it also keeps). `--keep` leaves the export in `--workdir` (for
`benchmarks/streaming_resume.py --stream_dir`); by default it is deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from common import peak_anon_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3_000_000)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/cat_jax_stream_bench")
    parser.add_argument("--keep", action="store_true", help="keep the export in --workdir")
    args = parser.parse_args()
    import gin

    import tasks  # noqa: F401  (registers synthetic_sums)
    from cat_jax.data import stream_export, streaming

    gin.parse_config(f"synthetic_sizes.train = {args.examples}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    with peak_anon_mib() as memory:
        start = time.perf_counter()
        manifest = stream_export.export_streaming_one("synthetic_sums", "train", args.workdir)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "phase": "export",
                "examples": manifest["num_examples"],
                "seconds": round(seconds, 1),
                "examples_per_s": round(manifest["num_examples"] / seconds),
                "peak_anon_mib_above_baseline": round(memory["peak_above_baseline"], 1),
            }
        ),
        flush=True,
    )
    lengths = {"inputs": args.inputs, "targets": args.targets}
    source = streaming.StreamingSource(args.workdir)
    batches = source.train_batches("synthetic_sums", "train", lengths, args.batch, 0, None, (0, 1))
    with peak_anon_mib() as memory:
        start = time.perf_counter()
        for step in range(args.batches):
            batches.batch(step)
        seconds = time.perf_counter() - start
    rows = args.batches * args.batch
    in_memory = manifest["num_examples"] * (args.inputs + 3 * args.targets) * 4
    print(
        json.dumps(
            {
                "phase": "stream",
                "batches": args.batches,
                "batch": args.batch,
                "seconds": round(seconds, 1),
                "examples_per_s": round(rows / seconds),
                "peak_anon_mib_above_baseline": round(memory["peak_above_baseline"], 1),
                "in_memory_features_mib": round(in_memory / 2**20, 1),
            }
        ),
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
