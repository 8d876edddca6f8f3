"""Greedy-decoding throughput of T5 v1.1 shapes: ours (JAX) against HuggingFace `generate`.

    python benchmarks/decode_throughput.py --sizes=small,large --batches=1,32,256 --inputs=512 \
        --max-decode-length=128 [--dtype=bfloat16] [--repeats=5] [--warmup=1] [--no-hf]

Ours is `cat_jax.decoding.greedy_decode` (encoder once, key/value cache, one token per step in a
`lax.while_loop`, with the per-token scores the cascade needs) compiled with `jax.jit`; theirs is
`T5ForConditionalGeneration.generate` (greedy: num_beams=1, do_sample=False, KV cache) with the
same configuration. Both use random parameters in `--dtype` (bfloat16 by default: parameters and
compute) and random encoder inputs of `--inputs` tokens without padding. Decoding has a fixed length:
EOS is disabled on both sides, so every row generates exactly `--max-decode-length` tokens
(random weights would otherwise stop at arbitrary points). Each call is timed to completion,
warmup (and compilation) excluded; `decode_ms` is the median over `--repeats` calls and
`tokens_per_s` = generated tokens / that median.

One JSON line per (impl, size, batch) on stdout, then `decode_ratio` rows (ours / theirs).
Each implementation runs in a child process of its own (`--impl ours|hf` runs one directly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BENCHMARK = "decode_throughput"
HF_TARGET = 2.0  # ours / HF generate tokens/s at batch 32
HF_TARGET_BATCH = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        default="small,large",
        help="comma-separated model sizes (gin_configs/models/<size>.gin) or .gin paths",
    )
    p.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes")
    p.add_argument("--inputs", type=int, default=512, help="encoder input length")
    p.add_argument("--max-decode-length", type=int, default=128, help="tokens generated per row")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="parameter and compute dtype of both implementations",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (after compiling)")
    p.add_argument("--vocab", type=int, default=common.T5_VOCAB)
    p.add_argument("--no-hf", action="store_true", help="skip HuggingFace even if importable")
    p.add_argument(
        "--impl",
        choices=("ours", "hf"),
        default=None,
        help="run one implementation in this process (default: each in a child)",
    )
    a = p.parse_args(argv)
    a.size_list = common.csv_list(a.sizes)
    a.batch_list = common.csv_ints(a.batches)
    if a.repeats < 1 or a.warmup < 0 or a.max_decode_length < 1 or min(a.batch_list, default=0) < 1:
        p.error("--repeats and --max-decode-length must be >= 1, --warmup >= 0, batches >= 1")
    for size in a.size_list:
        common.gin_file_of(size)
    return a


def child_args(a: argparse.Namespace) -> list[str]:
    return [
        f"--sizes={a.sizes}",
        f"--batches={a.batches}",
        f"--inputs={a.inputs}",
        f"--max-decode-length={a.max_decode_length}",
        f"--dtype={a.dtype}",
        f"--repeats={a.repeats}",
        f"--warmup={a.warmup}",
        f"--vocab={a.vocab}",
    ]


def random_inputs(a: argparse.Namespace, batch: int):
    import numpy as np

    return np.random.default_rng(batch).integers(2, a.vocab, (batch, a.inputs), dtype=np.int32)


def row(
    a,
    impl: str,
    size: str,
    batch: int,
    times: list[float],
    generated: int,
    compile_s: float,
    device: str,
    config,
    extra: dict | None = None,
) -> dict:
    import statistics

    median = statistics.median(times)
    return {
        "benchmark": BENCHMARK,
        "impl": impl,
        "size": size,
        "batch": batch,
        "inputs": a.inputs,
        "max_decode_length": a.max_decode_length,
        "dtype": a.dtype,
        "decode_ms": round(1e3 * median, 3),
        "decode_ms_min": round(1e3 * min(times), 3),
        "decode_ms_max": round(1e3 * max(times), 3),
        "timed_calls": len(times),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / median, 1),
        "ms_per_decode_step": round(1e3 * median / a.max_decode_length, 4),
        "compile_s": round(compile_s, 2),
        "device": device,
        **common.shape_fields(config),
        **(extra or {}),
    }


def error_fields(a, impl: str, size: str, batch: int, device: str) -> dict:
    return {
        "benchmark": BENCHMARK,
        "impl": impl,
        "size": size,
        "batch": batch,
        "inputs": a.inputs,
        "max_decode_length": a.max_decode_length,
        "dtype": a.dtype,
        "device": device,
    }


# ----------------------------------------------------------------------------- ours (JAX)


def run_ours(a: argparse.Namespace) -> None:
    import functools
    import time

    import jax
    from flax import linen as nn

    from cat_jax import models, partitioning
    from cat_jax.decoding import greedy_decode

    device = common.jax_device_name()
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    sharding = partitioning.batch_sharding(mesh, rules)
    for size in a.size_list:
        config = common.model_config(size, a.dtype, a.vocab)
        model = models.build(config)
        _, specs = model.abstract_params()
        dtype = config.compute_dtype
        params = jax.jit(
            lambda k: jax.tree_util.tree_map(lambda x: x.astype(dtype), nn.meta.unbox(model.init_params(k))),
            out_shardings=partitioning.tree_shardings(mesh, specs, rules),
        )(jax.random.key(0))
        # eos_id=-1 never matches a token: every row decodes max_decode_length steps.
        decode = jax.jit(functools.partial(greedy_decode, model, max_decode_length=a.max_decode_length, eos_id=-1))

        def measure(batch: int) -> None:
            common.note(f"[ours] {size}: batch {batch}")
            enc = {"encoder_input_tokens": jax.device_put(random_inputs(a, batch), sharding)}
            start = time.perf_counter()
            compiled = decode.lower(params, enc).compile()
            compile_s = time.perf_counter() - start
            generated = int(jax.device_get(compiled(params, enc).lengths).sum())
            times = common.time_steps(lambda: compiled(params, enc), jax.block_until_ready, a.repeats, a.warmup)
            common.emit(row(a, "ours", size, batch, times, generated, compile_s, device, config, common.versions()))

        for batch in a.batch_list:
            with common.guarded(error_fields(a, "ours", size, batch, device)):
                measure(batch)
        params = None  # freed before the next size


# ----------------------------------------------------------------------------- HuggingFace (torch)


def run_hf(a: argparse.Namespace) -> None:
    import time

    import torch
    import transformers

    device, device_name = common.torch_device()
    sync = common.torch_sync(device)
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    for size in a.size_list:
        config = common.model_config(size, a.dtype, a.vocab)
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration(common.hf_t5_config(config))
        common.untie_lm_head(model)
        model = model.to(device=device, dtype=dtype).eval()
        # No EOS: generation runs exactly max_new_tokens steps, as ours does with eos_id=-1.
        model.generation_config.eos_token_id = None
        kwargs = dict(
            max_new_tokens=a.max_decode_length,
            min_new_tokens=a.max_decode_length,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=0,
            decoder_start_token_id=0,
        )

        def measure(batch: int) -> None:
            common.note(f"[hf] {size}: batch {batch}")
            ids = torch.from_numpy(random_inputs(a, batch)).long().to(device)
            mask = (ids > 0).long()

            def generate():
                with torch.inference_mode():
                    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)

            start = time.perf_counter()
            out = generate()
            sync(out)
            first_s = time.perf_counter() - start
            if out.shape[1] - 1 != a.max_decode_length:
                raise RuntimeError(
                    f"generate returned {out.shape[1] - 1} tokens per row, expected "
                    f"{a.max_decode_length}: EOS was not disabled"
                )
            generated = int(batch * (out.shape[1] - 1))  # minus the decoder start token
            times = common.time_steps(generate, sync, a.repeats, max(a.warmup - 1, 0))
            common.emit(row(a, "hf", size, batch, times, generated, first_s, device_name, config, common.versions()))

        for batch in a.batch_list:
            with common.guarded(error_fields(a, "hf", size, batch, device_name)):
                measure(batch)
            if device == "cuda":
                torch.cuda.empty_cache()
        model = None  # freed before the next size
        if device == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- orchestration


def orchestrate(a: argparse.Namespace) -> None:
    script = Path(__file__).resolve()
    rows = common.run_child(script, child_args(a), "ours")
    if a.no_hf:
        return
    if not common.hf_available():
        common.note("torch / transformers not importable: HuggingFace comparison skipped")
        return
    rows += common.run_child(script, child_args(a), "hf")
    by = common.index_rows(rows, BENCHMARK, ("impl", "size", "batch"))
    for size in a.size_list:
        for batch in a.batch_list:
            mine, theirs = by.get(("ours", size, batch)), by.get(("hf", size, batch))
            if not mine or not theirs:
                continue
            r = common.ratio(mine["tokens_per_s"], theirs["tokens_per_s"])
            out = {
                "benchmark": "decode_ratio",
                "impl": "ours/hf",
                "size": size,
                "batch": batch,
                "inputs": a.inputs,
                "max_decode_length": a.max_decode_length,
                "dtype": a.dtype,
                "ours_tokens_per_s": mine["tokens_per_s"],
                "theirs_tokens_per_s": theirs["tokens_per_s"],
                "ours_over_theirs": r,
                "device": mine.get("device"),
            }
            if batch == HF_TARGET_BATCH:
                out["target"] = HF_TARGET
                out["meets_target"] = r is not None and r >= HF_TARGET
            common.emit(out)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.impl is None:
        orchestrate(a)
    elif a.impl == "ours":
        run_ours(a)
    else:
        run_hf(a)


if __name__ == "__main__":
    main()
