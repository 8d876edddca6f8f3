"""Train-step time with the teacher run online against read from a teacher cache, and the cache's
disk per million target positions.

    python benchmarks/teacher_cache.py --student=demo_small --teacher=demo_large --batch=32 \
        --inputs=32 --targets=128 [--dtype=float32] [--steps=5] [--rounds=4] [--warmup=2] [--top-k=8]

One JSON line per step kind on stdout: `ce` (no teacher), `cat_online` (CAT-Xent, the teacher's
forward pass inside the step, as `cat_jax.train` runs it), `cat_cached` (CAT-Xent from the cache's
bit: `objectives.CachedTeacher`), `cat_distill_online` / `cat_distill_cached` (alpha 0.5, the cached
one from the top k); each with `step_ms` (median, steps timed to completion, warmup excluded) and
its ratio to the CE step (target: cat_cached <= 1.1 x ce); the kinds are timed in turn, `--steps`
steps each per round, so that a drifting load (a shared machine) hits them alike. Then one `disk` line per top_k in
{0, --top-k}: the bytes a shard of 100 steps of these batches takes on disk as `cache_teacher` writes it
(`teacher_cache.write_shard`), per million target positions. Random weights and tokens: the cost
does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import model_config  # noqa: E402
from cat_jax import models  # noqa: E402
from cat_jax.objectives import teacher_cache  # noqa: E402
from cat_jax.objectives.cached_teacher import cached_loss  # noqa: E402
from cat_jax.objectives.token_loss import LossOptions, token_loss  # noqa: E402
from cat_jax.optimizers import make_optimizer  # noqa: E402
from cat_jax.train_state import TrainState  # noqa: E402
from cat_jax.train_step import make_train_step  # noqa: E402

VOCAB = 384  # the byte vocabulary padded (offline_mix's)


def _batch(model, batch: int, li: int, lt: int, top_k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = model.batch_shapes({"inputs": li, "targets": lt}, batch)
    out = {k: rng.integers(2, VOCAB - 1, s.shape).astype(s.dtype) for k, s in shapes.items()}
    out[models.LOSS_WEIGHTS] = np.ones(shapes[models.LOSS_WEIGHTS].shape, np.float32)
    length = shapes[models.TARGETS].shape[1]
    out[teacher_cache.TEACHER_CORRECT] = rng.random((batch, length)) < 0.5
    if top_k:
        out[teacher_cache.TOP_K_IDS] = np.argsort(rng.random((batch, length, VOCAB)), -1)[..., :top_k].astype(np.int32)
        logprobs = np.sort(np.log(rng.dirichlet(np.ones(VOCAB), (batch, length))), -1)[..., ::-1][..., :top_k]
        out[teacher_cache.TOP_K_LOGPROBS] = np.ascontiguousarray(logprobs, np.float32)
    return out


def _compiled(fn, state, batch, teacher_params):
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, batch, teacher_params).compile()
    return compiled, time.perf_counter() - start


def _run(compiled, state, batch, teacher_params, steps: int) -> tuple[Any, list[float]]:
    """`steps` steps, each timed to completion; the state carried on (donated)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, teacher_params)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="demo_small")
    p.add_argument("--teacher", default="demo_large")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=32)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--teacher-dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=5, help="steps of each kind per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--top-k", type=int, default=8)
    a = p.parse_args()
    student = models.build(model_config(a.student, a.dtype, VOCAB))
    teacher = models.build(model_config(a.teacher, a.teacher_dtype, VOCAB))
    tx, schedule = make_optimizer(1000)
    params = nn.meta.unbox(student.init_params(jax.random.key(0)))
    t_params = jax.tree_util.tree_map(
        lambda x: x.astype(a.teacher_dtype), nn.meta.unbox(teacher.init_params(jax.random.key(1)))
    )
    batch = _batch(student, a.batch, a.inputs, a.targets, a.top_k, np.random.default_rng(0))
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    cat, distill = LossOptions(mask="small_or_large"), LossOptions(mask="small_or_large", alpha=0.5)
    kinds = {
        "ce": (token_loss(student, LossOptions()), None, plain),
        "cat_online": (token_loss(student, cat), teacher.logits, plain),
        "cat_cached": (cached_loss(student, cat), None, batch),
        "cat_distill_online": (token_loss(student, distill), teacher.logits, plain),
        "cat_distill_cached": (cached_loss(student, distill), None, batch),
    }
    common = {
        "benchmark": "teacher_cache",
        "student": a.student,
        "teacher": a.teacher,
        "batch": a.batch,
        "inputs": a.inputs,
        "targets": a.targets,
        "dtype": a.dtype,
        "teacher_dtype": a.teacher_dtype,
        "top_k": a.top_k,
        "device": jax.devices()[0].device_kind,
    }
    runs = {}
    for name, (loss, teacher_fn, feed) in kinds.items():
        state = TrainState(
            step=jnp.int32(0),
            params=jax.tree_util.tree_map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(2)),
        )
        t = t_params if teacher_fn else None
        compiled, compile_s = _compiled(make_train_step(loss, tx, schedule, teacher_fn), state, feed, t)
        state, _ = _run(compiled, state, feed, t, a.warmup)
        runs[name] = {
            "compiled": compiled,
            "state": state,
            "feed": feed,
            "teacher": t,
            "times": [],
            "compile_s": compile_s,
        }
    # Rounds of `steps` steps of every kind in turn: a load that drifts (a shared machine) hits all alike.
    for _ in range(a.rounds):
        for run in runs.values():
            run["state"], times = _run(run["compiled"], run["state"], run["feed"], run["teacher"], a.steps)
            run["times"] += times
    ce_ms = 1000 * statistics.median(runs["ce"]["times"])
    for name, run in runs.items():
        ms = 1000 * statistics.median(run["times"])
        row = {**common, "step": name, "step_ms": round(ms, 2), "ratio_to_ce": round(ms / ce_ms, 3)}
        print(
            json.dumps({**row, "steps_timed": len(run["times"]), "compile_s": round(run["compile_s"], 1)}), flush=True
        )
    shard_steps = 100  # cache_teacher's default steps_per_shard
    positions = shard_steps * a.batch * batch[models.TARGETS].shape[1]
    for k in sorted({0, a.top_k}):
        entries = {
            n: np.repeat(batch[n][None], shard_steps, 0)
            for n in (teacher_cache.TEACHER_CORRECT,)
            + ((teacher_cache.TOP_K_IDS, teacher_cache.TOP_K_LOGPROBS) if k else ())
        }
        with tempfile.TemporaryDirectory() as tmp:
            teacher_cache.write_shard(tmp, 0, entries)
            folder = teacher_cache.shard_dir(tmp, 0)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(
            json.dumps(
                {**common, "step": "disk", "top_k": k, "bytes_per_million_positions": round(size / positions * 1e6)}
            )
        )


if __name__ == "__main__":
    main()
