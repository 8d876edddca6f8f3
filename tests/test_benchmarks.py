"""Smoke test of the throughput benchmarks: both scripts run end to end on CPU at toy scale
and print JSON lines with the documented fields (the numbers themselves mean nothing here).

The two scripts run concurrently, on 1+1-layer model files written for the test (compiling a
train step dominates the run time, and it grows with the layer count), with XLA's backend
optimisation off: the whole test takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, SUBPROCESS_ENV

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow

MODEL_GIN = """import cat_jax.models
MODEL_CONFIG = @T5Config()
T5Config.emb_dim = {emb}
T5Config.num_heads = 2
T5Config.head_dim = 8
T5Config.mlp_dim = {mlp}
T5Config.num_encoder_layers = 1
T5Config.num_decoder_layers = 1
T5Config.dropout_rate = 0.0
"""

TRAIN_FIELDS = {
    "benchmark",
    "impl",
    "size",
    "batch",
    "inputs",
    "targets",
    "dtype",
    "step",
    "teacher",
    "step_ms",
    "tokens_per_s",
    "mfu",
    "peak_tflops",
    "device",
    "params",
    "model_tflops_per_step",
    "compile_s",
}
CAT_FIELDS = {
    "ce_step_ms",
    "teacher_forward_ms",
    "teacher_share",
    "cat_budget_ms",
    "cat_within_target",
    "cat_overhead_over_teacher_forward",
}
DECODE_FIELDS = {
    "benchmark",
    "impl",
    "size",
    "batch",
    "inputs",
    "max_decode_length",
    "dtype",
    "decode_ms",
    "tokens_per_s",
    "generated_tokens",
    "device",
    "compile_s",
}


def _start(script: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, **SUBPROCESS_ENV, XLA_FLAGS="--xla_backend_optimization_level=0")
    return subprocess.Popen(
        [sys.executable, f"benchmarks/{script}", *args, "--no-hf"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(proc: subprocess.Popen, timeout: float) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rows, f"no JSON lines\nstderr:\n{err[-3000:]}"
    return rows


def test_train_and_decode_throughput_smoke(tmp_path):
    student, teacher = tmp_path / "student.gin", tmp_path / "teacher.gin"
    student.write_text(MODEL_GIN.format(emb=16, mlp=32))
    teacher.write_text(MODEL_GIN.format(emb=32, mlp=64))
    start = time.perf_counter()
    train = _start(
        "train_throughput.py",
        [
            f"--sizes={student}",
            f"--teachers={teacher},{student}",
            "--batch=2",
            "--inputs=8",
            "--targets=4",
            "--steps=2",
            "--warmup=1",
            "--vocab=64",
            "--peak-matmul-size=128",
        ],
    )
    decode = _start(
        "decode_throughput.py",
        [
            f"--sizes={student}",
            "--batches=1,2",
            "--inputs=8",
            "--max-decode-length=3",
            "--repeats=2",
            "--warmup=1",
            "--vocab=64",
        ],
    )
    train_rows, decode_rows = _rows(train, 170), _rows(decode, 170)
    elapsed = time.perf_counter() - start

    peak = [r for r in train_rows if r["benchmark"] == "peak_matmul"]
    assert len(peak) == 1 and peak[0]["peak_tflops"] > 0 and peak[0]["matmul_size"] == 128
    steps = {r["step"]: r for r in train_rows if r["benchmark"] == "train_throughput"}
    # CE, the teacher's forward and CAT; the student is no teacher of itself.
    assert set(steps) == {"ce", "teacher_forward", "cat"}, train_rows
    assert len([r for r in train_rows if r.get("step") == "cat"]) == 1
    for row in steps.values():
        assert TRAIN_FIELDS <= set(row), TRAIN_FIELDS - set(row)
        assert row["impl"] == "ours" and row["device"].startswith("cpu")
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] >= 0
        assert row["timed_steps"] == 2 and row["peak_tflops"] == peak[0]["peak_tflops"]
    ce, cat, fwd = steps["ce"], steps["cat"], steps["teacher_forward"]
    assert ce["batch"] == 2 and ce["inputs"] == 8 and ce["targets"] == 4 and ce["dtype"] == "bfloat16"
    assert ce["tokens_per_s"] == round(2 * 12 / (ce["step_ms"] / 1e3), 1)
    assert CAT_FIELDS <= set(cat), CAT_FIELDS - set(cat)
    assert cat["teacher"] == str(teacher) and cat["ce_step_ms"] == ce["step_ms"]
    assert cat["teacher_forward_ms"] == fwd["step_ms"] and fwd["params"] > ce["params"]
    assert cat["teacher_share"] == round(fwd["step_ms"] / cat["step_ms"], 4)
    assert cat["cat_within_target"] == (cat["step_ms"] <= ce["step_ms"] + 1.1 * fwd["step_ms"])
    # The CAT step's model FLOPs add the teacher's forward to 3x the student's forward.
    assert cat["model_tflops_per_step"] > ce["model_tflops_per_step"]

    decoded = {r["batch"]: r for r in decode_rows if r["benchmark"] == "decode_throughput"}
    assert set(decoded) == {1, 2}, decode_rows
    for batch, row in decoded.items():
        assert DECODE_FIELDS <= set(row), DECODE_FIELDS - set(row)
        assert row["impl"] == "ours" and row["max_decode_length"] == 3
        assert row["generated_tokens"] == 3 * batch  # EOS disabled: fixed-length decoding
        assert row["tokens_per_s"] > 0 and row["decode_ms"] > 0
    print(f"benchmarks smoke test: {elapsed:.1f}s")


def test_speculative_benchmark_smoke(tmp_path):
    """benchmarks/speculative.py in random mode: the large model's greedy decoding, two rules
    through one compiled speculative loop, and the cache-write comparison."""
    model = tmp_path / "model.gin"
    model.write_text(MODEL_GIN.format(emb=16, mlp=32))
    env = dict(os.environ, **SUBPROCESS_ENV, XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.Popen(
        [
            sys.executable,
            "benchmarks/speculative.py",
            f"--large={model}",
            f"--small={model}",
            "--batches=2",
            "--gammas=2",
            "--rules=lossless,chow",
            "--inputs=8",
            "--max-decode-length=3",
            "--vocab=64",
            "--repeats=1",
            "--warmup=0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows = _rows(proc, 170)
    by_impl = {}
    for row in rows:
        assert "error" not in row, row
        by_impl.setdefault(row["impl"], []).append(row)
    assert [r["batch"] for r in by_impl["large_greedy"]] == [2]
    assert [r["rule"] for r in by_impl["speculative"]] == ["lossless", "chow"]  # one compilation for both
    for row in by_impl["speculative"]:
        assert row["generated_tokens"] == 3 * row["batch"]  # EOS disabled: fixed-length decoding
        assert row["tokens_per_s"] > 0 and row["speedup_over_large_greedy"] > 0
        assert 0 <= row["acceptance_rate"] <= 1 and row["tokens_per_large_call"] >= 1
    assert all(r["per_row_positions_ms"] > 0 and r["shared_position_ms"] > 0 for r in by_impl["cache_block_write"])


@pytest.mark.slow
def test_scale_memory_smoke(tmp_path):
    """benchmarks/scale_memory.py on a 1+1-layer pair over 2 forced devices: a memory row (the
    numbers mean nothing at this size and optimisation level) and a compile row per layout. Three
    CAT/CE steps compiled: about a minute on two idle cores, several on busy ones (slow tier)."""
    student, teacher = tmp_path / "student.gin", tmp_path / "teacher.gin"
    student.write_text(MODEL_GIN.format(emb=16, mlp=32))
    teacher.write_text(MODEL_GIN.format(emb=32, mlp=64))
    env = dict(
        os.environ,
        **SUBPROCESS_ENV,
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2",
    )
    args = [f"--student={student}", f"--teacher={teacher}", "--remat=full", "--batch=4", "--inputs=8"]
    args += ["--targets=4", f"--compile_model={student}", "--compile_layers=1", "--compile_lengths=8,4"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale_memory.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    memory = [r for r in rows if r["kind"] == "memory"]
    assert [r["remat"] for r in memory] == ["full"]
    for row in memory:
        assert row["mesh"] == {"data": 1, "fsdp": 2, "model": 1} and row["batch"] == 4
        assert row["peak_bytes"] == (
            row["argument_size_in_bytes"]
            + row["output_size_in_bytes"]
            + row["temp_size_in_bytes"]
            - row["alias_size_in_bytes"]
        )
        assert row["peak_bytes"] > 0 and row["scan_student"] is True
    compiled = [(r["layers"], r["scan_layers"]) for r in rows if r["kind"] == "compile"]
    assert compiled == [(1, True), (1, False)]
    assert all(r["compile_seconds"] > 0 for r in rows if r["kind"] == "compile")
