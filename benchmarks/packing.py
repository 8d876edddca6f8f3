"""Packing's gain: the share of real tokens per step and real tokens/s, packed against unpacked.

    python benchmarks/packing.py [--task=offline_mix] [--split=train] [--inputs=32] [--targets=128]
        [--packed-inputs=N] [--packed-targets=N] [--max-examples=2000] [--batch=16] [--size=tiny]
        [--steps=10] [--warmup=2] [--mock-tfds=0]

For one task or mixture (its in-memory split, at the run files' TASK_FEATURE_LENGTHS by default) it
builds the training batches of `--steps` steps three ways: unpacked (`TrainBatches`), packed in
memory (`PackedTrainBatches`: first fit, 64 rows open), and packed as a stream is
(`cat_jax.data.streaming.packed_batches`: grain's first fit, one batch's rows at a time, over the same
example order), and times a jitted cross-entropy train step (forward, backward, SGD) of the `--size`
T5 model on each. `--packed-inputs` / `--packed-targets` pack at other lengths than the unpacked rows
(packing makes long rows cheap: compare a run file's unpacked lengths with packing at longer ones).
Real tokens are the non-padding input and target tokens of the examples a batch holds; the share is
real tokens / (batch x (inputs + targets)). Real tokens/s = real tokens per step / the median step time
(the variants' steps alternate, so that all see the same load); `with_host` adds the median time the
host spends building the batch (packing included), which the train loop does between steps.
`--mock-tfds=N` loads a TFDS-backed task (e.g. flan_boolq_t0) from `tfds.testing.mock_data` (N
examples, no download).

Prints one JSON line per (task, variant) on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BENCHMARK = "packing"


def real_tokens(batch: dict) -> int:
    """Non-padding input and target tokens of a batch, packed (segment ids) or not (loss weights and
    the inputs' lengths up to their last non-zero token)."""
    import numpy as np

    if "encoder_segment_ids" in batch:
        return int(np.count_nonzero(batch["encoder_segment_ids"]) + np.count_nonzero(batch["decoder_segment_ids"]))
    inputs = batch["encoder_input_tokens"] > 0
    lengths = np.where(inputs.any(1), inputs.shape[1] - np.argmax(inputs[:, ::-1], axis=1), 0)
    return int(lengths.sum() + np.count_nonzero(batch["decoder_loss_weights"]))


def measure(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    import tasks  # noqa: F401  (registers the tasks)
    from cat_jax import data, losses, models
    from cat_jax.data.batches import PackedTrainBatches, TrainBatches

    lengths = {"inputs": args.inputs, "targets": args.targets}
    packed_lengths = {"inputs": args.packed_inputs or args.inputs, "targets": args.packed_targets or args.targets}
    mocked = contextlib.nullcontext()
    if args.mock_tfds:
        import tensorflow_datasets as tfds

        mocked = tfds.testing.mock_data(num_examples=args.mock_tfds)
    with mocked:
        arrays = {
            name: data.load_split(args.task, args.split, at, max_examples=args.max_examples)
            for name, at in (("unpacked", lengths), ("packed", packed_lengths))
        }
    common.note(f"{args.task}/{args.split}: {len(arrays['unpacked'])} examples")
    vocab_size = max(
        int(a.features[k].max()) + 1 for a in arrays.values() for k in ("encoder_input_tokens", "decoder_target_tokens")
    )
    model = models.build(common.model_config(args.size, "float32", max(vocab_size, 384)))
    params = nn.meta.unbox(model.init_params(jax.random.key(0)))

    @jax.jit
    def step(params, batch):
        def loss_fn(p):
            logits = model.logits(p, batch)
            loss, _ = losses.cascade_aware_loss(
                logits, None, batch["decoder_target_tokens"], batch["decoder_loss_weights"], mask="none"
            )
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-3 * g, params, grads), loss

    total = args.warmup + args.steps
    sources = {
        "unpacked": (lengths, TrainBatches(arrays["unpacked"], args.batch, seed=0, rates=None).batch),
        "packed": (packed_lengths, PackedTrainBatches(arrays["packed"], args.batch, seed=0, rates=None).batch),
        "packed_streamed": (packed_lengths, streamed_batches(arrays["packed"], args.batch)),
    }
    prepared = {}
    for variant, (_, make) in sources.items():
        host, batches = [], []
        for k in range(total):
            begin = time.perf_counter()
            batches.append(model.make_batch(make(k)))
            host.append(time.perf_counter() - begin)
        device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        state = params
        for b in device_batches[: args.warmup]:  # compiles
            state, loss = step(state, b)
        jax.block_until_ready(loss)
        prepared[variant] = (batches[args.warmup :], device_batches[args.warmup :], host[args.warmup :], state)
    # The variants' steps alternate, so that all see the same load on a shared machine.
    times = {variant: [] for variant in prepared}
    states = {variant: prepared[variant][3] for variant in prepared}
    for i in range(args.steps):
        for variant in prepared:
            begin = time.perf_counter()
            states[variant], loss = step(states[variant], prepared[variant][1][i])
            jax.block_until_ready(loss)
            times[variant].append(time.perf_counter() - begin)
    for variant, (batches, _, host, _) in prepared.items():
        at = sources[variant][0]
        packed = variant != "unpacked"
        reals = [real_tokens(b) for b in batches]
        examples = [int(b["decoder_segment_ids"].max(axis=1).sum()) for b in batches] if packed else [args.batch]
        step_s, host_s, real = statistics.median(times[variant]), statistics.median(host), statistics.mean(reals)
        row = {
            "benchmark": BENCHMARK,
            "task": args.task + (" (tfds mock data)" if args.mock_tfds else ""),
            "variant": variant,
            "packed": packed,
            "size": args.size,
            "batch": args.batch,
            "lengths": at,
            "examples_per_step": statistics.mean(examples),
            "real_tokens_per_step": real,
            "real_token_share": round(real / (args.batch * (at["inputs"] + at["targets"])), 4),
            "step_ms": round(1e3 * step_s, 2),
            "host_batch_ms": round(1e3 * host_s, 2),
            "real_tokens_per_s": round(real / step_s, 1),
            "real_tokens_per_s_with_host": round(real / (step_s + host_s), 1),
            "device": common.jax_device_name(),
        }
        common.emit(row)
        common.note(f"{variant}: {row['real_token_share']:.1%} real tokens, {row['real_tokens_per_s']} tokens/s")


def streamed_batches(arrays, batch: int):
    """batch(step), for step = 0, 1, ... in turn, of the examples in `TrainBatches`' order for seed 0,
    packed as a stream packs them (`cat_jax.data.streaming.packed_batches`)."""
    import grain
    import numpy as np

    from cat_jax.data.batches import TrainBatches
    from cat_jax.data.packing import example_lengths
    from cat_jax.data.streaming import packed_batches

    order = TrainBatches(arrays, batch, seed=0).epoch_rows(0)
    n_in, n_t = example_lengths(arrays)
    examples = [
        {
            "inputs": arrays.features["encoder_input_tokens"][i, : n_in[i]],
            "targets": arrays.features["decoder_target_tokens"][i, : n_t[i]],
            "room": np.zeros(n_in[i], np.int32),
        }
        for i in order
    ]
    lengths = {"inputs": arrays.features["encoder_input_tokens"].shape[1]}
    lengths["targets"] = arrays.features["decoder_target_tokens"].shape[1]
    unread = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # in memory: the host time is the packer's
    stream = iter(packed_batches(grain.MapDataset.source(examples).repeat().to_iter_dataset(unread), lengths, batch))
    return lambda step: next(stream)  # the steps are asked for in order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="offline_mix")
    parser.add_argument("--split", default="train")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--targets", type=int, default=128)
    parser.add_argument("--packed-inputs", type=int, default=0, help="the packed rows' input length (0: --inputs)")
    parser.add_argument("--packed-targets", type=int, default=0, help="the packed rows' target length (0: --targets)")
    parser.add_argument("--max-examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mock-tfds", type=int, default=0)
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
