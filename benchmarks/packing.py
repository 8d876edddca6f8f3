"""Packing's gain: the share of real tokens per step and real tokens/s, packed against unpacked.

    python benchmarks/packing.py [--task=offline_mix] [--split=train] [--inputs=32] [--targets=128]
        [--max-examples=2000] [--batch=16] [--size=tiny] [--steps=10] [--warmup=2] [--mock-tfds=0]

For one task or mixture (its in-memory split, at the run files' TASK_FEATURE_LENGTHS by default) it
builds the training batches of `--steps` steps unpacked (`TrainBatches`) and packed
(`PackedTrainBatches`, first-fit) and times a jitted cross-entropy train step (forward, backward, SGD)
of the `--size` T5 model on both. Real tokens are the non-padding input and target tokens of the
examples a batch holds; the share is real tokens / (batch x (inputs + targets)). Real tokens/s =
real tokens per step / the median step time (the packed and unpacked steps alternate, so that both
see the same load); `with_host` adds the median time the host spends
building the batch (packing included), which the train loop does between steps. `--mock-tfds=N`
loads a TFDS-backed task (e.g. flan_boolq_t0) from `tfds.testing.mock_data` (N examples, no download).

Prints one JSON line per (task, packed) on stdout; progress goes to stderr.
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
    mocked = contextlib.nullcontext()
    if args.mock_tfds:
        import tensorflow_datasets as tfds

        mocked = tfds.testing.mock_data(num_examples=args.mock_tfds)
    with mocked:
        arrays = data.load_split(args.task, args.split, lengths, max_examples=args.max_examples)
    common.note(f"{args.task}/{args.split}: {len(arrays)} examples")
    vocab_size = int(max(arrays.features[k].max() for k in ("encoder_input_tokens", "decoder_target_tokens"))) + 1
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

    capacity = args.batch * (args.inputs + args.targets)
    sources = {
        False: TrainBatches(arrays, args.batch, seed=0, rates=None),
        True: PackedTrainBatches(arrays, args.batch, seed=0, rates=None),
    }
    prepared = {}
    for packed, source in sources.items():
        host, batches = [], []
        for k in range(args.warmup + args.steps):
            begin = time.perf_counter()
            batches.append(model.make_batch(source.batch(k)))
            host.append(time.perf_counter() - begin)
        device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        state = params
        for b in device_batches[: args.warmup]:  # compiles
            state, loss = step(state, b)
        jax.block_until_ready(loss)
        prepared[packed] = (batches[args.warmup :], device_batches[args.warmup :], host[args.warmup :], state)
    # Steps of the two alternate, so that both see the same load on a shared machine.
    times = {False: [], True: []}
    states = {packed: prepared[packed][3] for packed in prepared}
    for i in range(args.steps):
        for packed in (False, True):
            begin = time.perf_counter()
            states[packed], loss = step(states[packed], prepared[packed][1][i])
            jax.block_until_ready(loss)
            times[packed].append(time.perf_counter() - begin)
    for packed, (batches, _, host, _) in prepared.items():
        reals = [real_tokens(b) for b in batches]
        examples = [int(b["decoder_segment_ids"].max(axis=1).sum()) for b in batches] if packed else [args.batch]
        step_s, host_s, real = statistics.median(times[packed]), statistics.median(host), statistics.mean(reals)
        row = {
            "benchmark": BENCHMARK,
            "task": args.task + (" (tfds mock data)" if args.mock_tfds else ""),
            "packed": packed,
            "size": args.size,
            "batch": args.batch,
            "lengths": lengths,
            "examples_per_step": statistics.mean(examples),
            "real_tokens_per_step": real,
            "real_token_share": round(real / capacity, 4),
            "step_ms": round(1e3 * step_s, 2),
            "host_batch_ms": round(1e3 * host_s, 2),
            "real_tokens_per_s": round(real / step_s, 1),
            "real_tokens_per_s_with_host": round(real / (step_s + host_s), 1),
            "device": common.jax_device_name(),
        }
        common.emit(row)
        common.note(f"packed={packed}: {row['real_token_share']:.1%} real tokens, {row['real_tokens_per_s']} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="offline_mix")
    parser.add_argument("--split", default="train")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--targets", type=int, default=128)
    parser.add_argument("--max-examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mock-tfds", type=int, default=0)
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
