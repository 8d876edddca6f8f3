"""Kill -9 a streamed training run at random moments, resume it, and compare with an uninterrupted run.

    python benchmarks/streaming_resume.py --examples=2000000 --steps=40 --kills=4 --processes=1,2 \
        [--stream_dir=/tmp/cat_jax_stream_bench] [--workdir=/tmp/cat_jax_resume_bench] [--seed=0]

Exports `synthetic_sums` train with `--examples` examples (generated on the fly) as ArrayRecord
shards into `--stream_dir` (an export already there is reused: complete shards are kept), then for
each process count P of `--processes` trains the tiny model for `--steps` steps on the stream (P
cooperating CPU processes, one device each, gloo collectives; a checkpoint every
`--checkpoint_period` steps): once uninterrupted, and once SIGKILLed `--kills` times, every process
at once, at a random step and a random moment within it (drawn from `--seed`), each time restarted
with the same command. Prints one JSON line per P: where it was killed, the step each restart resumed
from, and whether the per-step losses and the bytes of every leaf of the final train state equal the
uninterrupted run's. Exits 1 if either differs. CPU only (it forces JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK = "synthetic_sums"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(nprocs: int, args: list[str], log: Path) -> list[subprocess.Popen]:
    """`python -m cat_jax.train args` as `nprocs` processes meeting at a local coordinator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAT_JAX_")}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if nprocs > 1:
        env.update(
            CAT_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
            CAT_JAX_NUM_PROCESSES=str(nprocs),
            CAT_JAX_CPU_COLLECTIVES="gloo",
        )
    procs = []
    for i in range(nprocs):
        with open(f"{log}.{i}.stderr", "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cat_jax.train", *args],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=dict(env, CAT_JAX_PROCESS_ID=str(i)) if nprocs > 1 else env,
                )
            )
    return procs


def _wait(procs: list[subprocess.Popen], log: Path) -> None:
    for i, p in enumerate(procs):
        if p.wait() != 0:
            for q in procs:
                q.kill()
            raise SystemExit(
                f"process {i} exited {p.returncode}; see {log}.{i}.stderr:\n"
                + Path(f"{log}.{i}.stderr").read_text()[-3000:]
            )


def _logged_step(log: Path) -> int:
    """The last ' step k/N ' process 0 has logged (0 before the first)."""
    steps = re.findall(r" step (\d+)/\d+ ", Path(f"{log}.0.stderr").read_text())
    return int(steps[-1]) if steps else 0


def _resumed_from(log: Path) -> int:
    """The checkpoint step process 0 of a start resumed from (0: it started from scratch)."""
    found = re.search(r"resuming from this run's checkpoint at step (\d+)", Path(f"{log}.0.stderr").read_text())
    return int(found.group(1)) if found else 0


def _kill_at(procs: list[subprocess.Popen], log: Path, step: int, delay: float) -> bool:
    """SIGKILL every process `delay` seconds after process 0 logs `step`; False if it ended first."""
    while _logged_step(log) < step:
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.005)
    time.sleep(delay)
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    return True


def _losses(model_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (model_dir / "train_metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    if len(steps) != len(set(steps)):
        raise SystemExit(f"{model_dir}: a step is logged twice in train_metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _state_bytes(model_dir: Path) -> tuple[int, list[bytes]]:
    """(step, the bytes of every leaf of the newest saved train state), restored on the CPU."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from cat_jax.checkpoints import Checkpointer

    step = Checkpointer.latest_in(str(model_dir))
    path = str(model_dir / str(step) / "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh wrote it
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        metadata = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=device), metadata)
        tree = checkpointer.restore(path, restore_args=restore_args)
    return step, [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2_000_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint_period", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream_dir", default="/tmp/cat_jax_stream_bench")
    p.add_argument("--workdir", default="/tmp/cat_jax_resume_bench")
    a = p.parse_args()
    if not 0 < a.kills < a.steps:
        raise SystemExit("--kills must be between 1 and --steps - 1")
    sys.path.insert(0, str(ROOT))
    import gin

    import tasks  # noqa: F401  (registers synthetic_sums)
    from cat_jax.data import stream_export

    gin.parse_config(f"synthetic_sizes.train = {a.examples}")
    start = time.perf_counter()
    manifest = stream_export.export_streaming_one(TASK, "train", a.stream_dir)
    export_seconds = round(time.perf_counter() - start, 1)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(a.seed)
    failed = False
    for nprocs in (int(n) for n in a.processes.split(",")):

        def args(model_dir: Path) -> list[str]:
            return [
                "--gin_file=gin_configs/runs/train_small_ce.gin",
                "--gin_file=gin_configs/models/tiny.gin",
                f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.TRAIN_STEPS={a.steps}",
                f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
                f"--gin.synthetic_sizes.train={a.examples}",
                f"--gin.data_source.streaming_dir='{os.path.abspath(a.stream_dir)}'",
                "--gin.DatasetConfig.max_examples=None",
                f"--gin.BATCH_SIZE={a.batch}",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                "--gin.train.eval_period=0",
                "--gin.train.log_every_steps=1",
                f"--gin.train.checkpoint_period={a.checkpoint_period}",
                "--gin.train.keep_checkpoints=2",
            ]

        base = work / f"{nprocs}p"
        base.mkdir(parents=True)
        whole, killed = base / "whole", base / "killed"
        start = time.perf_counter()
        _wait(_start(nprocs, args(whole), base / "whole"), base / "whole")
        seconds = round(time.perf_counter() - start, 1)
        kill_steps = sorted(rng.sample(range(1, a.steps), a.kills))
        kills, resumed_from = [], []
        for k, step in enumerate(kill_steps):
            log = base / f"killed_{k}"
            delay = round(rng.uniform(0.0, 0.5), 3)
            procs = _start(nprocs, args(killed), log)
            if not _kill_at(procs, log, step, delay):
                _wait(procs, log)
                break
            kills.append({"after_step": step, "delay_s": delay})
            resumed_from.append(_resumed_from(log))
        log = base / "killed_final"
        _wait(_start(nprocs, args(killed), log), log)
        resumed_from.append(_resumed_from(log))
        reference = _losses(whole)
        losses_equal = _losses(killed) == reference and len(reference) == a.steps
        state_equal = _state_bytes(whole) == _state_bytes(killed)
        failed |= not (losses_equal and state_equal)
        print(
            json.dumps(
                {
                    "processes": nprocs,
                    "examples": manifest["num_examples"],
                    "export_s": export_seconds,
                    "steps": a.steps,
                    "batch": a.batch,
                    "checkpoint_period": a.checkpoint_period,
                    "uninterrupted_s": seconds,
                    "kills": kills,
                    "resumed_from": resumed_from,
                    "losses_equal": losses_equal,
                    "state_equal": state_equal,
                }
            ),
            flush=True,
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
