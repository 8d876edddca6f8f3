"""The stages of benchmarks/gpu.sh, in order, each under its own time cap and all within one budget.

    python benchmarks/gpu_run.py [--smoke] [--stages=train,cat_step,decode,speculative,experiment] \
        [--cap-scale=X] [--budget-s=S] --bundle DIR --work DIR OUT_DIR

Each stage is one of the benchmark scripts beside this file (train_throughput.py, decode_throughput.py,
speculative.py, gpu_experiment.py) run as a child process group; every JSON line it prints is
appended at once to OUT_DIR/results.jsonl with the stage's name in front (`"stage": ...`), its
stderr goes to OUT_DIR/gpu.log and to this process's stderr, and OUT_DIR/summary.md is rewritten
after every stage, so a run killed at any point leaves every finished measurement and a summary
of them. A stage still running at its cap is stopped (SIGTERM, then SIGKILL) and recorded as
`timeout`; the next one starts. The budget is the sum of the caps of the stages asked for (520 s for
all five, x --cap-scale); each stage's cap is cut only so that the stages after it keep theirs, and
the `experiment` stage, last, runs on with all that remains (skipped below its minimum).

`--smoke` runs the same stages on CPU with tiny shapes (1+1-layer models written into --work, a
few steps, XLA's backend optimisation off): the rehearsal of the GPU command. It takes about 3
minutes of CPU time, about as long on 2 idle cores (4 to 6 minutes measured on 2 cores shared with
other work at load averages of 8 to 15); its caps (480 s in all) leave room for a busy machine.
Rows that need torch are skipped with a `note` row where torch is not importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, gpu_summary  # noqa: E402

BENCH = common.REPO / "benchmarks"
STAGES = ("train", "cat_step", "decode", "speculative", "experiment")
KILL_GRACE_S = 5
VERSIONS = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "torch",
    "transformers",
    "gin-config",
    "tensorboardX",
)


@dataclasses.dataclass
class Context:
    smoke: bool
    bundle: Path
    work: Path
    out: Path
    rows: list[dict]

    def peak_args(self) -> list[str]:
        """--peak-tflops from the train stage's measured peak, so every MFU shares one denominator."""
        peak = gpu_summary.last(self.rows, benchmark="peak_matmul")
        return [f"--peak-tflops={peak['peak_tflops']}"] if peak else []

    def model(self, role: str) -> str:
        """Smoke: a 1+1-layer model file in --work (student: width 16, teacher: 32)."""
        return str(common.one_layer_model(self.work / "models" / f"smoke_{role}.gin", 32 if role == "teacher" else 16))


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cap_s: float  # its time cap; its share of the default budget
    argv: Callable[[Context], list[str]]
    min_s: float = 30  # skipped when less than this is left for it
    takes_rest: bool = False  # runs on with whatever the budget has left (the experiment)


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / name), *args]


TRAIN = ("--batch=32", "--inputs=512", "--targets=128", "--dtype=bfloat16", "--steps=10", "--warmup=2")
DECODE = ("--inputs=512", "--max-decode-length=128", "--dtype=bfloat16", "--repeats=3", "--warmup=1")

FULL = (
    Stage("train", 190, lambda c: _script("train_throughput.py", "--sizes=base,small", "--teachers=", *TRAIN)),
    Stage(
        "cat_step",
        120,
        lambda c: _script(
            "train_throughput.py",
            "--sizes=small",
            "--teachers=base",
            "--cat-steps=cat,cat_distill",
            "--no-hf",
            *TRAIN,
            *c.peak_args(),
        ),
    ),
    Stage("decode", 60, lambda c: _script("decode_throughput.py", "--sizes=small", "--batches=32,1,256", *DECODE)),
    Stage(
        "speculative",
        80,
        lambda c: _script(
            "speculative.py",
            "--large=base",
            "--small=small",
            "--batches=1,8,32",
            "--gammas=1,3,5",
            "--rules=lossless",
            *DECODE,
        ),
    ),
    Stage(
        "experiment",
        70,
        lambda c: _script(
            "gpu_experiment.py",
            "run",
            f"--data={c.bundle / 'data'}",
            f"--work={c.work / 'experiment'}",
            f"--out={c.out}",
        ),
        min_s=120,
        takes_rest=True,
    ),
)

SMOKE_TRAIN = ("--batch=2", "--inputs=16", "--targets=8", "--dtype=bfloat16", "--steps=2", "--warmup=1", "--vocab=64")
SMOKE_DECODE = ("--inputs=16", "--max-decode-length=4", "--vocab=64", "--warmup=1")

SMOKE = (
    Stage(
        "train",
        75,
        lambda c: _script(
            "train_throughput.py",
            f"--sizes={c.model('student')}",
            "--teachers=",
            "--peak-matmul-size=128",
            *SMOKE_TRAIN,
        ),
    ),
    Stage(
        "cat_step",
        90,
        lambda c: _script(
            "train_throughput.py",
            f"--sizes={c.model('student')}",
            f"--teachers={c.model('teacher')}",
            "--cat-steps=cat,cat_distill",
            "--no-hf",
            "--peak-matmul-size=128",
            *SMOKE_TRAIN,
            *c.peak_args(),
        ),
    ),
    Stage(
        "decode",
        60,
        lambda c: _script(
            "decode_throughput.py", f"--sizes={c.model('student')}", "--batches=32,1", "--repeats=2", *SMOKE_DECODE
        ),
    ),
    Stage(
        "speculative",
        75,
        lambda c: _script(
            "speculative.py",
            f"--large={c.model('teacher')}",
            f"--small={c.model('student')}",
            "--batches=2",
            "--gammas=2",
            "--repeats=1",
            *SMOKE_DECODE,
        ),
    ),
    Stage(
        "experiment",
        180,
        lambda c: _script(
            "gpu_experiment.py",
            "run",
            "--smoke",
            "--export-missing",
            f"--data={c.work / 'smoke_data'}",
            f"--work={c.work / 'experiment'}",
            f"--out={c.out}",
        ),
        min_s=30,
        takes_rest=True,
    ),
)


# ----------------------------------------------------------------------------- environment


def environment_row(smoke: bool) -> dict:
    """What ran where: the date, the GPU (nvidia-smi), Python and library versions, the commit."""
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        gpu = query.stdout.strip() or None
    commit = None
    if shutil.which("git"):  # the device tool's copy of the tree may have no .git
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO, capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    return {
        "stage": "env",
        "benchmark": "env",
        "mode": "smoke" if smoke else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "commit": commit,
        "versions": versions,
        "argv": sys.argv[1:],
    }


def child_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Stages compile some programs twice (the small CE step in train and cat_step), and a rerun
    # of a stage on the same machine compiles all of them again: keep XLA's results.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ctx.work / "jax_cache"))
    if ctx.smoke:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
        env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return env


# ----------------------------------------------------------------------------- running a stage


class Results:
    """OUT_DIR/results.jsonl (appended, flushed per row), gpu.log, and the rows read so far."""

    def __init__(self, out: Path):
        self.path, self.log_path = out / "results.jsonl", out / "gpu.log"
        self.rows = gpu_summary.read_rows([self.path]) if self.path.exists() else []
        self.log = open(self.log_path, "a", buffering=1)
        self.lock = threading.Lock()

    def add(self, row: dict) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            self.rows.append(row)

    def text(self, line: str) -> None:
        with self.lock:
            self.log.write(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    def summarize(self) -> None:
        (self.path.parent / "summary.md").write_text(gpu_summary.render(self.rows))


def _pump_rows(stream, stage: str, results: Results) -> None:
    for line in stream:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            results.text(f"[{stage} stdout] {line}")
            continue
        results.add({"stage": stage, **row} if isinstance(row, dict) else {"stage": stage, "value": row})


def _pump_text(stream, results: Results) -> None:
    for line in stream:
        results.text(line)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL it after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


RUNNING: list[subprocess.Popen] = []


def run_stage(stage: str, argv: list[str], cap: float, env: dict, results: Results) -> tuple[str, int | None]:
    """(status, return code) of one stage run under `cap` seconds."""
    results.text(f"\n=== {stage} (cap {cap:.0f}s): {' '.join(argv)}\n")
    proc = subprocess.Popen(
        argv, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    RUNNING.append(proc)
    pumps = [
        threading.Thread(target=_pump_rows, args=(proc.stdout, stage, results), daemon=True),
        threading.Thread(target=_pump_text, args=(proc.stderr, results), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        code = proc.wait(timeout=cap)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop(proc)
        code, status = proc.returncode, "timeout"
    for t in pumps:
        t.join(timeout=10)
    RUNNING.remove(proc)
    return status, code


def _terminate(signum, frame) -> None:
    """This process is being stopped: stop the running stage's group too, then exit."""
    for proc in list(RUNNING):
        _stop(proc)
    sys.exit(128 + signum)


def stage_cap(stage: Stage, later: Sequence[Stage], left: float, scale: float) -> float:
    """Seconds a stage may run: its cap x scale (or all that is left, for one that takes the
    rest), cut so that the stages after it keep theirs within the `left` seconds of the budget."""
    reserved = scale * sum(s.cap_s for s in later)
    return min(left if stage.takes_rest else scale * stage.cap_s, left - reserved)


def default_budget(stages: Sequence[Stage], scale: float) -> float:
    """The stages' caps x scale: for every stage, 520 s (the 9 minutes less gpu.sh's start)."""
    return scale * sum(s.cap_s for s in stages)


def run(ctx: Context, names: list[str], scale: float, budget_s: float | None) -> int:
    stages = [s for s in (SMOKE if ctx.smoke else FULL) if s.name in names]
    budget_s = budget_s or default_budget(stages, scale)
    start = time.perf_counter()
    deadline = start + budget_s
    results = Results(ctx.out)
    ctx.rows = results.rows
    results.add(environment_row(ctx.smoke))
    env = child_env(ctx)
    failed = []
    for i, stage in enumerate(stages):
        left = deadline - time.perf_counter()
        reserved = scale * sum(s.cap_s for s in stages[i + 1 :])
        cap = stage_cap(stage, stages[i + 1 :], left, scale)
        if stage.name in ("train", "decode") and not common.hf_available():
            results.add(
                {
                    "stage": stage.name,
                    "benchmark": "note",
                    "hf_available": False,
                    "message": "torch / transformers not importable: the HuggingFace rows are skipped",
                }
            )
        if cap < stage.min_s:
            results.add(
                {
                    "stage": stage.name,
                    "benchmark": "stage",
                    "status": "skipped",
                    "seconds": 0,
                    "cap_s": round(max(cap, 0)),
                    "note": f"{left:.0f}s of the budget left, {reserved:.0f}s "
                    f"kept for later stages; needs {stage.min_s:.0f}s",
                }
            )
            if not stage.takes_rest:
                failed.append(stage.name)
            results.summarize()
            continue
        began = time.perf_counter()
        status, code = run_stage(stage.name, stage.argv(ctx), cap, env, results)
        seconds = time.perf_counter() - began
        results.add(
            {
                "stage": stage.name,
                "benchmark": "stage",
                "status": status,
                "seconds": round(seconds, 1),
                "cap_s": round(cap),
                "returncode": code,
                "note": "",
            }
        )
        if status != "ok":
            failed.append(stage.name)
        results.summarize()
        results.text(
            f"=== {stage.name}: {status} in {seconds:.0f}s "
            f"({time.perf_counter() - start:.0f}s of {budget_s:.0f}s used)\n"
        )
    summary = results.path.parent / "summary.md"
    results.text(
        f"\n{summary.read_text()}\nwrote {results.path}, {summary}, {results.log_path}"
        + (f"; not ok: {', '.join(failed)}" if failed else "")
        + "\n"
    )
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="results.jsonl, summary.md, gpu.log (and the experiment's tarball)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--stages", default=",".join(STAGES), help=f"a comma-separated subset of {STAGES}")
    p.add_argument(
        "--cap-scale",
        type=float,
        default=1.0,
        help="multiplies every stage's cap and so the default budget (e.g. 3 on a busy machine)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for all the stages asked for (default: the sum of their caps x --cap-scale: 520 for all of them)",
    )
    p.add_argument("--bundle", type=Path, required=True, help="what gpu_prepare.sh wrote (data/ is read)")
    p.add_argument("--work", type=Path, required=True, help="checkpoints, caches, smoke models")
    a = p.parse_args(argv)
    names = common.csv_list(a.stages)
    if not names or set(names) - set(STAGES):
        p.error(f"--stages: {a.stages!r} is not a comma-separated subset of {', '.join(STAGES)}")
    for path in (a.out, a.work):
        path.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _terminate)
    ctx = Context(a.smoke, a.bundle.resolve(), a.work.resolve(), a.out.resolve(), [])
    return run(ctx, names, a.cap_scale, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
