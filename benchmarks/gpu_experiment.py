"""The `experiment` stage of benchmarks/gpu.sh: the CAT experiment on exported data, sized to fit
what is left of the GPU command's time.

    python benchmarks/gpu_experiment.py export DIR [--smoke]       # where seqio/TensorFlow are installed
    python benchmarks/gpu_experiment.py run --data DIR --work DIR --out DIR [--smoke]

`export` writes the task's train / validation / test splits with `python -m cat_jax.export_task`
and recompresses the .npz files (np.load reads both; padding and text columns shrink ~50x), so the
data travels to the GPU host inside the working tree's 64 MiB. `run` follows
launch/experiments/offline_cascade.sh on that data (`--gin.data_source.exported_dir`, the path that
needs neither TensorFlow nor seqio): a large model trained with cross-entropy, four students (CE,
distillation, CAT, CAT-distill), then `python -m cat_jax.cascade_eval` of every student behind the
large model. The large model and the CE student train side by side, then the three students that
need the large model, side by side (one GPU holds them all: XLA_PYTHON_CLIENT_PREALLOCATE=false).
Checkpoints stay under --work; the cascade's curves and summary, each model's metrics and every
log go to OUT/experiment.tar.gz. One JSON line per trained model and per (task, student) of the
cascade's plot rule on stdout.

GPU scale: offline_mix (lengths 32/128, at most 20000 examples per task and split), `demo_large`
for 2000 steps and `demo_small` students for 1000 steps, batch 64, 500 test examples per task.
Smoke scale: cmudict_syllables (64 examples per split), 1+1-layer models, a few steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

STUDENTS = ("ce", "distill", "cat", "cat_distill")  # gin_configs/runs/train_small_<name>.gin
PLOT_RULE = "chow_average"
TARBALL = "experiment.tar.gz"


@dataclasses.dataclass(frozen=True)
class Scale:
    task: str
    lengths: dict
    export_cap: int  # examples per task and split in the export
    large_model: str  # gin_configs/models/<name>.gin, or a .gin path
    small_model: str
    large_steps: int
    small_steps: int
    batch: int
    eval_examples: int  # test (and validation) examples per task in the cascade evaluation
    eval_batch: int
    dtype: str


GPU = Scale(
    task="offline_mix",
    lengths={"inputs": 32, "targets": 128},
    export_cap=20000,
    large_model="demo_large",
    small_model="demo_small",
    large_steps=2000,
    small_steps=1000,
    batch=64,
    eval_examples=500,
    eval_batch=512,
    dtype="float32",
)
SMOKE = Scale(
    task="cmudict_syllables",
    lengths={"inputs": 32, "targets": 4},
    export_cap=64,
    large_model="smoke_large.gin",
    small_model="smoke_small.gin",
    large_steps=4,
    small_steps=2,
    batch=8,
    eval_examples=16,
    eval_batch=16,
    dtype="float32",
)


def model_gin(name: str, work: Path) -> str:
    """A model file argument: a shipped size, or a 1+1-layer smoke model written into `work`."""
    if not name.endswith(".gin"):
        return f"--gin_file=gin_configs/models/{name}.gin"
    return f"--gin_file={common.one_layer_model(work / name, 32 if 'large' in name else 16)}"


# ----------------------------------------------------------------------------- export


def export(directory: Path, scale: Scale) -> None:
    """The task's three splits into `directory` (needs seqio and TensorFlow), recompressed."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "cat_jax.export_task",
        "--gin_file=gin_configs/runs/export_task.gin",
        f"--gin.MIXTURE_OR_TASK_NAME={scale.task}",
        "--gin.SPLIT=['train', 'validation', 'test']",
        f"--gin.TASK_FEATURE_LENGTHS={scale.lengths!r}",
        f"--gin.EXPORT_DIR={directory}",
        f"--gin.MAX_EXAMPLES={scale.export_cap}",
    ]
    common.note("exporting: " + " ".join(cmd))
    subprocess.run(cmd, cwd=common.REPO, check=True, stdout=sys.stderr)
    for npz in sorted(directory.glob("*.npz")):
        with np.load(npz, allow_pickle=False) as stored:
            arrays = dict(stored)
        tmp = npz.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        before, after = npz.stat().st_size, tmp.stat().st_size
        os.replace(tmp, npz)
        common.note(f"{npz.name}: {before / 2**10:.0f} KiB -> {after / 2**10:.0f} KiB compressed")


# ----------------------------------------------------------------------------- run


def train_command(
    name: str, run_file: str, scale: Scale, data: Path, work: Path, steps: int, model: str, extra: list[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cat_jax.train",
        f"--gin_file=gin_configs/runs/{run_file}",
        model_gin(model, work),
        f"--gin.MODEL_DIR={work / name}",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.BATCH_SIZE={scale.batch}",
        f"--gin.MIXTURE_OR_TASK_NAME={scale.task}",
        f"--gin.TASK_FEATURE_LENGTHS={scale.lengths!r}",
        f"--gin.T5Config.dtype='{scale.dtype}'",
        f"--gin.data_source.exported_dir={data}",
        f"--gin.DatasetConfig.max_examples={scale.export_cap}",
        "--gin.train.eval_period=0",
        f"--gin.train.checkpoint_period={steps}",
        *extra,
    ]


def run_parallel(jobs: dict[str, list[str]], logs: Path, benchmark: str) -> dict[str, dict | None]:
    """Runs the commands side by side, each logging to logs/<name>.log; {name: its last stdout
    JSON line ({} without one) and `seconds`, or None when it failed (the log's tail goes to stderr)}."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    procs, start = {}, time.perf_counter()
    for name, cmd in jobs.items():
        common.note(f"[experiment] {name}: {' '.join(cmd)}")
        log = open(logs / f"{name}.log", "w")
        procs[name] = (
            subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True),
            log,
        )
    results = {}
    for name, (proc, log) in procs.items():
        out, _ = proc.communicate()
        log.close()
        seconds = round(time.perf_counter() - start, 1)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            tail = (logs / f"{name}.log").read_text()[-3000:]
            common.note(f"[experiment] {name} failed (exit {proc.returncode}):\n{tail}")
            common.emit(
                {
                    "benchmark": benchmark,
                    "model": name,
                    "seconds": seconds,
                    "error": f"exit {proc.returncode}; see {name}.log in {TARBALL}",
                }
            )
            results[name] = None
            continue
        results[name] = {**(json.loads(lines[-1]) if lines else {}), "seconds": seconds}
    return results


def emit_trained(results: dict[str, dict | None], scale: Scale, sizes: dict[str, str]) -> None:
    for name, r in results.items():
        if r is not None:
            common.emit(
                {
                    "benchmark": "experiment_train",
                    "model": name,
                    "size": sizes[name],
                    "task": scale.task,
                    "batch": scale.batch,
                    "final_step": r["final_step"],
                    "loss": r["train"].get("loss"),
                    "seconds_with_start_up": r["seconds"],
                    "step_flops": r.get("step_flops"),
                }
            )


def emit_cascade(cascade: Path) -> None:
    """One line per (task, student) of the plot rule, from the cascade's summary.json."""
    for r in json.loads((cascade / "summary.json").read_text()):
        if r["rule"] == PLOT_RULE:
            common.emit(
                {
                    "benchmark": "experiment_cascade",
                    **{
                        k: r.get(k)
                        for k in (
                            "task",
                            "small_model",
                            "rule",
                            "small_only",
                            "large_only",
                            "auc",
                            "auc_df_random",
                            "auc_df_gain",
                            "auc_df_gain_pct",
                            "relative_flops_to_match_large",
                            "best_quality",
                            "best_relative_flops",
                        )
                    },
                }
            )


def pack(work: Path, out: Path) -> None:
    """The cascade's outputs, each model's metrics and config, and the logs into OUT/experiment.tar.gz."""
    with tarfile.open(out / TARBALL, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            keep = rel.parts[0] in ("cascade", "logs") or path.name in (
                "train_metrics.jsonl",
                "run_info.json",
                "operative_config.gin",
            )
            if path.is_file() and keep:
                tar.add(path, arcname=str(Path("experiment") / rel))
    common.note(f"[experiment] wrote {out / TARBALL} ({(out / TARBALL).stat().st_size / 2**20:.1f} MiB)")


def run(data: Path, work: Path, out: Path, scale: Scale) -> int:
    if not any(data.glob(f"{scale.task}.*.npz")):
        raise SystemExit(
            f"No exported {scale.task} in {data}: run benchmarks/gpu_prepare.sh (or "
            f"python benchmarks/gpu_experiment.py export {data}) where seqio is installed."
        )
    shutil.rmtree(work, ignore_errors=True)  # a fresh experiment: stale checkpoints would be resumed
    logs = work / "logs"
    logs.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    large = work / "large"
    sizes = {"large": scale.large_model, **{f"small_{s}": scale.small_model for s in STUDENTS}}

    def student(name: str) -> list[str]:
        teacher = [] if name == "ce" else [f"--gin.TEACHER_MODEL_DIR={large}"]
        return train_command(
            f"small_{name}", f"train_small_{name}.gin", scale, data, work, scale.small_steps, scale.small_model, teacher
        )

    first = run_parallel(
        {
            "large": train_command(
                "large", "train_large.gin", scale, data, work, scale.large_steps, scale.large_model, []
            ),
            "small_ce": student("ce"),
        },
        logs,
        "experiment_train",
    )
    emit_trained(first, scale, sizes)
    if first["large"] is None:
        pack(work, out)
        return 1
    rest = run_parallel({f"small_{s}": student(s) for s in STUDENTS[1:]}, logs, "experiment_train")
    emit_trained(rest, scale, sizes)
    smalls = {s: str(work / f"small_{s}") for s in STUDENTS if {**first, **rest}[f"small_{s}"] is not None}
    if smalls:
        cascade = work / "cascade"
        evaluated = run_parallel(
            {
                "cascade_eval": [
                    sys.executable,
                    "-m",
                    "cat_jax.cascade_eval",
                    "--gin_file=gin_configs/runs/cascade_eval.gin",
                    f"--gin.LARGE_MODEL_DIR={large}",
                    f"--gin.SMALL_MODEL_DIRS={smalls!r}",
                    f"--gin.OUTPUT_DIR={cascade}",
                    f"--gin.MAX_EXAMPLES={scale.eval_examples}",
                    f"--gin.BATCH_SIZE={scale.eval_batch}",
                    f"--gin.MIXTURE_OR_TASK_NAME={scale.task}",
                    f"--gin.TASK_FEATURE_LENGTHS={scale.lengths!r}",
                    f"--gin.data_source.exported_dir={data}",
                ]
            },
            logs,
            "experiment_cascade_eval",
        )
        if evaluated["cascade_eval"] is not None:
            common.emit(
                {
                    "benchmark": "experiment_cascade_eval",
                    "model": "cascade_eval",
                    "task": scale.task,
                    "examples_per_task": scale.eval_examples,
                    "small_models": list(smalls),
                    "seconds_with_start_up": evaluated["cascade_eval"]["seconds"],
                }
            )
            emit_cascade(cascade)
    pack(work, out)
    return 0 if len(smalls) == len(STUDENTS) and (work / "cascade" / "summary.json").exists() else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export the task's splits (needs seqio and TensorFlow)")
    e.add_argument("directory", type=Path)
    r = sub.add_parser("run", help="train the models on the exported splits, evaluate the cascades")
    r.add_argument("--data", type=Path, required=True, help="the directory `export` wrote")
    r.add_argument("--work", type=Path, required=True, help="checkpoints and logs (emptied first)")
    r.add_argument("--out", type=Path, required=True, help=f"where {TARBALL} goes")
    r.add_argument(
        "--export-missing", action="store_true", help="export into --data first when it holds no export (needs seqio)"
    )
    for q in (e, r):
        q.add_argument("--smoke", action="store_true", help="the smoke scale (CPU, seconds)")
    a = p.parse_args(argv)
    scale = SMOKE if a.smoke else GPU
    if a.command == "export":
        export(a.directory.resolve(), scale)
        return 0
    data = a.data.resolve()
    if a.export_missing and not any(data.glob(f"{scale.task}.*.npz")):
        export(data, scale)
    return run(data, a.work.resolve(), a.out.resolve(), scale)


if __name__ == "__main__":
    sys.exit(main())
