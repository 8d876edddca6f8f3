"""Train-step throughput of T5 v1.1 shapes: ours (JAX) against HuggingFace T5 (torch).

    python benchmarks/train_throughput.py --sizes=small,base,large --batch=32 --inputs=512 \
        --targets=128 [--dtype=bfloat16] [--steps=20] [--warmup=3] [--teachers=base,large] \
        [--peak-tflops=...] [--no-hf]

Prints one JSON line per measurement on stdout (progress goes to stderr):

* `peak_matmul`: the device's measured bf16 matmul peak (unless --peak-tflops is given), the
  denominator of every `mfu`.
* `train_throughput`, `step` = `ce`: our cross-entropy train step (forward, backward, AdamW with
  global-norm clipping) per size; `step` = `teacher_forward`: a frozen teacher's forward pass
  alone (bf16 parameters, as the CAT trainer holds them); `step` = `cat` (CAT-Xent) and, with
  `--cat-steps=cat,cat_distill`, `cat_distill` (the CAT mask with the distillation mix, alpha 0.5):
  the cascade-aware step of a student with each teacher larger than it, with the teacher's share
  of the step and whether CAT <= CE + 1.1 x teacher forward. Our step rows carry XLA's per-device
  memory of the compiled step (`memory_*_bytes`).
* with torch + transformers importable, `impl` = `hf` / `hf_compile`: HuggingFace
  `T5ForConditionalGeneration` with the same configuration, bf16 autocast, fused AdamW, gradient
  clipping at 1.0, eager and under `torch.compile`; then `train_ratio` rows: ours / theirs.

Each implementation runs in a child process of its own (`--impl ours|hf|hf_compile` runs one
directly), so JAX's and torch's allocators never share the device. Steps are timed one at a time
to completion (block_until_ready / cuda.synchronize), warmup excluded; `step_ms` is the median.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

BENCHMARK = "train_throughput"
CAT_TARGET = 1.1  # a CAT step should cost at most CE + 1.1 x the teacher's forward pass
HF_COMPILE_TARGET = 1.25  # ours / HF+torch.compile tokens/s on base
# The teacher-using steps (`LossOptions` fields): CAT-Xent, and the CAT mask with distillation
# (gin_configs/runs/train_small_cat.gin and train_small_cat_distill.gin).
CAT_STEPS = {"cat": {"mask": "small_or_large"}, "cat_distill": {"mask": "small_or_large", "alpha": 0.5}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        default="small,base,large",
        help="comma-separated model sizes (gin_configs/models/<size>.gin) or .gin paths",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=512, help="encoder input length")
    p.add_argument("--targets", type=int, default=128, help="decoder target length")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="compute dtype (parameters and optimizer state stay float32)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile: >= 3)")
    p.add_argument(
        "--teachers",
        default="base,large",
        help="CAT teachers; each is used for every student smaller than it ('' = no CAT)",
    )
    p.add_argument(
        "--teacher-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="the frozen teacher's parameter and compute dtype",
    )
    p.add_argument(
        "--cat-steps",
        default="cat",
        help=f"comma-separated teacher-using steps timed per teacher, of {list(CAT_STEPS)}",
    )
    p.add_argument("--vocab", type=int, default=common.T5_VOCAB)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak FLOP/s for MFU (TFLOP/s); default: measured with a bf16 matmul",
    )
    p.add_argument(
        "--peak-matmul-size",
        type=int,
        default=None,
        help="n of the n x n peak matmul (default 8192 on GPU/TPU, 1024 on CPU)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip HuggingFace even if importable")
    p.add_argument(
        "--impl",
        choices=("ours", "hf", "hf_compile"),
        default=None,
        help="run one implementation in this process (default: each in a child)",
    )
    a = p.parse_args(argv)
    a.size_list = common.csv_list(a.sizes)
    a.teacher_list = common.csv_list(a.teachers)
    a.cat_step_list = common.csv_list(a.cat_steps)
    unknown = sorted(set(a.cat_step_list) - set(CAT_STEPS))
    if unknown:
        p.error(f"--cat-steps: unknown {unknown}; choose from {list(CAT_STEPS)}")
    if a.steps < 1 or a.warmup < 0 or a.batch < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --batch >= 1")
    for size in a.size_list + a.teacher_list:
        common.gin_file_of(size)
    return a


def child_args(a: argparse.Namespace, peak_tflops: float | None) -> list[str]:
    args = [
        f"--sizes={a.sizes}",
        f"--batch={a.batch}",
        f"--inputs={a.inputs}",
        f"--targets={a.targets}",
        f"--dtype={a.dtype}",
        f"--steps={a.steps}",
        f"--warmup={a.warmup}",
        f"--teachers={a.teachers}",
        f"--teacher-dtype={a.teacher_dtype}",
        f"--cat-steps={a.cat_steps}",
        f"--vocab={a.vocab}",
    ]
    if peak_tflops:
        args.append(f"--peak-tflops={peak_tflops}")
    if a.peak_matmul_size:
        args.append(f"--peak-matmul-size={a.peak_matmul_size}")
    return args


def base_fields(a: argparse.Namespace, impl: str, size: str) -> dict:
    return {
        "benchmark": BENCHMARK,
        "impl": impl,
        "size": size,
        "batch": a.batch,
        "inputs": a.inputs,
        "targets": a.targets,
        "dtype": a.dtype,
    }


def throughput_fields(
    a, seconds_summary: dict, flops_per_step: float, peak_tflops: float | None, nominal: float | None
) -> dict:
    step_s = seconds_summary["step_ms"] / 1e3
    achieved = flops_per_step / step_s / 1e12
    return {
        **seconds_summary,
        "tokens_per_s": round(a.batch * (a.inputs + a.targets) / step_s, 1),
        "model_tflops_per_step": round(flops_per_step / 1e12, 9),
        "achieved_tflops": round(achieved, 6),
        "mfu": round(achieved / peak_tflops, 6) if peak_tflops else None,
        "peak_tflops": peak_tflops,
        "mfu_vs_nominal": round(achieved / nominal, 6) if nominal else None,
    }


def random_batch(a: argparse.Namespace) -> dict:
    """Fixed-shape random tokens (no padding: every position counts), the same for every impl."""
    import numpy as np

    rng = np.random.default_rng(0)
    targets = rng.integers(2, a.vocab, (a.batch, a.targets), dtype=np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, a.vocab, (a.batch, a.inputs), dtype=np.int32),
        "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((a.batch, a.targets), np.float32),
    }


# ----------------------------------------------------------------------------- ours (JAX)


def run_ours(a: argparse.Namespace) -> None:
    import time

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from cat_jax import models, partitioning
    from cat_jax.objectives.token_loss import LossOptions, token_loss
    from cat_jax.optimizers import make_optimizer
    from cat_jax.train_state import init_train_state, state_shardings
    from cat_jax.train_step import compile_train_step, make_train_step

    device = common.jax_device_name()
    nominal = common.nominal_peak_tflops(device)
    peak = a.peak_tflops
    if not peak:
        common.note(f"[ours] measuring peak bf16 matmul FLOP/s on {device}")
        measured = common.measure_peak_tflops(a.peak_matmul_size)
        peak = measured["peak_tflops"]
        common.emit(
            {
                "benchmark": "peak_matmul",
                "impl": "ours",
                "device": device,
                **measured,
                "nominal_bf16_tflops": nominal,
                **common.versions(),
            }
        )
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    b_sharding = partitioning.batch_sharding(mesh, rules)
    batch_np = random_batch(a)
    batch = {k: jax.device_put(v, b_sharding) for k, v in batch_np.items()}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
    li, lt = a.inputs, a.targets
    sync = jax.block_until_ready

    def count(tree) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))

    def make_teacher(size: str):
        config = common.model_config(size, a.teacher_dtype, a.vocab)
        model = models.build(config)
        _, specs = model.abstract_params()
        shardings = partitioning.tree_shardings(mesh, specs, rules)
        dtype = config.compute_dtype
        params = jax.jit(
            lambda k: jax.tree_util.tree_map(lambda x: x.astype(dtype), nn.meta.unbox(model.init_params(k))),
            out_shardings=shardings,
        )(jax.random.key(1))
        return config, model, params, shardings

    def train_step(config, loss, teacher=None) -> tuple[list[float], float, int, dict]:
        model = models.build(config)
        tx, schedule = make_optimizer(1000)
        abstract, shardings = state_shardings(model, tx, mesh, rules)
        t_abstract = t_shardings = t_params = t_fn = None
        if teacher is not None:
            _, t_model, t_params, t_shardings = teacher
            t_abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t_params)
            t_fn = t_model.logits
        step = make_train_step(token_loss(model, loss), tx, schedule, t_fn)
        compiled = compile_train_step(
            step, abstract, shardings, shapes, b_sharding, t_abstract, t_shardings, mesh, rules
        )
        if initial.get("config") != config:  # one fresh state per student, copied for each run
            initial.clear()
            initial.update(config=config, state=init_train_state(model, tx, 0, shardings))
        state = [jax.tree_util.tree_map(jnp.copy, initial["state"])]
        n_params = count(state[0].params)

        def run():
            state[0], metrics = compiled.fn(state[0], batch, t_params)
            return state[0], metrics

        times = common.time_steps(run, sync, a.steps, a.warmup)
        del state[0]
        return times, compiled.compile_seconds, n_params, common.memory_fields(compiled.memory)

    def teacher_forward(teacher) -> tuple[list[float], float]:
        _, t_model, t_params, t_shardings = teacher
        jitted = jax.jit(lambda p, b: t_model.logits(p, b), in_shardings=(t_shardings, b_sharding))
        start = time.perf_counter()
        compiled = jitted.lower(t_params, batch).compile()
        seconds = time.perf_counter() - start
        return common.time_steps(lambda: compiled(t_params, batch), sync, a.steps, a.warmup), seconds

    teacher_rows: dict[str, dict] = {}
    initial: dict = {}

    def ce_row(size: str, config) -> dict:
        common.note(f"[ours] {size}: CE step")
        times, compile_s, n_params, memory = train_step(config, LossOptions())
        row = {
            **base_fields(a, "ours", size),
            "step": "ce",
            "teacher": None,
            **throughput_fields(
                a, common.summarize(times), 3 * models.build(config).forward_flops(li, lt) * a.batch, peak, nominal
            ),
            "params": n_params,
            "compile_s": round(compile_s, 2),
            "device": device,
            **memory,
            **common.shape_fields(config),
        }
        common.emit(row)
        return row

    def cat_rows(size: str, config, ce: dict, t_size: str, t_config) -> None:
        """The teacher's forward (once per teacher), then each of --cat-steps with it."""
        t_flops = models.build(t_config).forward_flops(li, lt)
        teacher = make_teacher(t_size)
        if t_size not in teacher_rows:
            common.note(f"[ours] {t_size}: teacher forward")
            t_times, t_compile = teacher_forward(teacher)
            row = {
                **base_fields(a, "ours", t_size),
                "dtype": a.teacher_dtype,
                "step": "teacher_forward",
                "teacher": t_size,
                **throughput_fields(a, common.summarize(t_times), t_flops * a.batch, peak, nominal),
                "params": count(teacher[2]),
                "compile_s": round(t_compile, 2),
                "device": device,
                **common.shape_fields(t_config),
            }
            teacher_rows[t_size] = row
            common.emit(row)
        t_ms = teacher_rows[t_size]["step_ms"]
        for name in a.cat_step_list:
            with common.guarded({**base_fields(a, "ours", size), "step": name, "teacher": t_size, "device": device}):
                common.note(f"[ours] {size}: {name} step with teacher {t_size}")
                times, compile_s, n_params, memory = train_step(config, LossOptions(**CAT_STEPS[name]), teacher)
                fields = throughput_fields(
                    a,
                    common.summarize(times),
                    (3 * models.build(config).forward_flops(li, lt) + t_flops) * a.batch,
                    peak,
                    nominal,
                )
                cat_ms, ce_ms = fields["step_ms"], ce["step_ms"]
                common.emit(
                    {
                        **base_fields(a, "ours", size),
                        "step": name,
                        "teacher": t_size,
                        "teacher_dtype": a.teacher_dtype,
                        **fields,
                        "params": n_params,
                        "compile_s": round(compile_s, 2),
                        "device": device,
                        "ce_step_ms": ce_ms,
                        "teacher_forward_ms": t_ms,
                        "teacher_share": round(t_ms / cat_ms, 4),
                        "cat_minus_ce_ms": round(cat_ms - ce_ms, 3),
                        "cat_overhead_over_teacher_forward": round((cat_ms - ce_ms) / t_ms, 4),
                        "cat_budget_ms": round(ce_ms + CAT_TARGET * t_ms, 3),
                        "cat_within_target": cat_ms <= ce_ms + CAT_TARGET * t_ms,
                        **memory,
                        **common.shape_fields(config),
                    }
                )
        del teacher

    for size in a.size_list:
        config = common.model_config(size, a.dtype, a.vocab)
        ce = None
        with common.guarded({**base_fields(a, "ours", size), "step": "ce", "device": device}):
            ce = ce_row(size, config)
        for t_size in a.teacher_list:
            t_config = common.model_config(t_size, a.teacher_dtype, a.vocab)
            if models.build(t_config).forward_flops(li, lt) <= models.build(config).forward_flops(li, lt):
                common.note(f"[ours] {size}: no CAT with teacher {t_size} (not larger than the student)")
                continue
            if ce is None:
                continue
            with common.guarded(
                {**base_fields(a, "ours", size), "step": "teacher_forward", "teacher": t_size, "device": device}
            ):
                cat_rows(size, config, ce, t_size, t_config)
        initial.clear()


# ----------------------------------------------------------------------------- HuggingFace (torch)


def run_hf(a: argparse.Namespace, compiled: bool) -> None:
    import time

    import torch
    import transformers

    from cat_jax import models

    impl = "hf_compile" if compiled else "hf"
    device, device_name = common.torch_device()
    nominal = common.nominal_peak_tflops(device_name)
    sync = common.torch_sync(device)
    batch_np = random_batch(a)
    batch = {k: torch.from_numpy(v).to(device) for k, v in batch_np.items()}
    input_ids = batch["encoder_input_tokens"].long()
    attention_mask = (input_ids > 0).long()
    decoder_input_ids = batch["decoder_input_tokens"].long()
    labels = batch["decoder_target_tokens"].long()
    autocast = a.dtype == "bfloat16"
    warmup = max(a.warmup, 3) if compiled else a.warmup
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    def measure(size: str) -> None:
        config = common.model_config(size, a.dtype, a.vocab)
        torch.manual_seed(0)
        if compiled:
            torch._dynamo.reset()  # a fresh compile cache per model
        model = transformers.T5ForConditionalGeneration(common.hf_t5_config(config))
        common.untie_lm_head(model)
        model = model.to(device)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        try:
            opt = torch.optim.AdamW(
                model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, fused=True
            )
            fused = True
        except (RuntimeError, TypeError, ValueError) as e:
            common.note(f"[{impl}] fused AdamW unavailable on {device} ({e}); using foreach")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
            fused = False
        forward = torch.compile(model) if compiled else model

        def step():
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                out = forward(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids,
                    labels=labels,
                    use_cache=False,
                )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss

        common.note(f"[{impl}] {size}: CE step")
        start = time.perf_counter()
        sync(step())
        first_s = time.perf_counter() - start
        times = common.time_steps(step, sync, a.steps, max(warmup - 1, 0))
        common.emit(
            {
                **base_fields(a, impl, size),
                "step": "ce",
                "teacher": None,
                **throughput_fields(
                    a,
                    common.summarize(times),
                    3 * models.build(config).forward_flops(a.inputs, a.targets) * a.batch,
                    a.peak_tflops,
                    nominal,
                ),
                "params": n_params,
                "compile_s": round(first_s, 2),
                "device": device_name,
                "fused_adamw": fused,
                "torch_compile": compiled,
                "autocast_bf16": autocast,
                **common.shape_fields(config),
                **common.versions(),
            }
        )

    for size in a.size_list:
        with common.guarded({**base_fields(a, impl, size), "step": "ce", "device": device_name}):
            measure(size)
        if device == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- orchestration


def orchestrate(a: argparse.Namespace) -> None:
    script = Path(__file__).resolve()
    rows = common.run_child(script, child_args(a, a.peak_tflops), "ours")
    peak = a.peak_tflops or next((r["peak_tflops"] for r in rows if r.get("benchmark") == "peak_matmul"), None)
    if a.no_hf:
        return
    if not common.hf_available():
        common.note("torch / transformers not importable: HuggingFace comparison skipped")
        return
    for impl in ("hf", "hf_compile"):
        rows += common.run_child(script, child_args(a, peak), impl)
    ours = common.index_rows([r for r in rows if r.get("step") == "ce"], BENCHMARK, ("impl", "size"))
    for size in a.size_list:
        mine = ours.get(("ours", size))
        for impl in ("hf", "hf_compile"):
            theirs = ours.get((impl, size))
            if not mine or not theirs:
                continue
            r = common.ratio(mine["tokens_per_s"], theirs["tokens_per_s"])
            row = {
                "benchmark": "train_ratio",
                "impl": f"ours/{impl}",
                "size": size,
                "batch": a.batch,
                "inputs": a.inputs,
                "targets": a.targets,
                "dtype": a.dtype,
                "ours_tokens_per_s": mine["tokens_per_s"],
                "theirs_tokens_per_s": theirs["tokens_per_s"],
                "ours_over_theirs": r,
                "ours_params": mine.get("params"),
                "theirs_params": theirs.get("params"),
                "device": mine.get("device"),
            }
            if impl == "hf_compile":
                row["target"] = HF_COMPILE_TARGET
                row["meets_target"] = r is not None and r >= HF_COMPILE_TARGET
            common.emit(row)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.impl is None:
        orchestrate(a)
    elif a.impl == "ours":
        run_ours(a)
    else:
        run_hf(a, compiled=a.impl == "hf_compile")


if __name__ == "__main__":
    main()
