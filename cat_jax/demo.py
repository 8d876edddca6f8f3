"""`make demo`: the main job at CPU scale, through the same command lines a user would type.

Stages (each skipped when its output already exists, so a re-run reuses finished work):
  1. train a large model with cross-entropy,
  2. train a small model with cross-entropy, and one with cascade-aware training against (1),
  3. evaluate every model on the test split,
  4. evaluate the cascades (large behind each small model) under every deferral rule: curves of
     quality against relative FLOPs, summary tables and PNG plots in `runs/demo/cascade/`.
Everything lands under `runs/demo/` (override with CAT_JAX_DEMO_DIR); the commands are printed
before they run and written to `runs/demo/commands.sh`. CAT_JAX_DEMO_STEPS (default 300) sets the
training steps of every model; CAT_JAX_DEMO_TASK the task.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

DEMO_DIR = os.environ.get("CAT_JAX_DEMO_DIR", os.path.join("runs", "demo"))
TASK = os.environ.get("CAT_JAX_DEMO_TASK", "cmudict_g2p")
LENGTHS = "{'inputs': 32, 'targets': 64}"
STEPS = int(os.environ.get("CAT_JAX_DEMO_STEPS", 300))
EVAL_EXAMPLES = 512
CACHE = os.path.join(DEMO_DIR, "data_cache")

COMMON = [f"--gin.MIXTURE_OR_TASK_NAME={TASK}", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
          "--gin.BATCH_SIZE=32"]


def _quote(arg: str) -> str:
    """Shell quoting that keeps gin's single-quoted literals readable."""
    if arg == shlex.quote(arg) or any(c in arg for c in '"$`\\'):
        return shlex.quote(arg)
    return f'"{arg}"'


def _run(stage: str, args: list[str], log: list[str]) -> None:
    cmd = [sys.executable, "-m"] + args
    printable = " ".join(_quote(a) for a in ["python", "-m"] + args)
    log.append(printable)
    print(f"\n=== {stage} ===\n$ {printable}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"=== {stage}: done in {time.time() - start:.0f}s ===", flush=True)


def _train(name: str, run_file: str, log: list[str], extra: list[str] = ()) -> str:
    model_dir = os.path.join(DEMO_DIR, name)
    _run(f"train {name}", ["cat_jax.train", f"--gin_file=gin_configs/runs/{run_file}",
                           f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={STEPS}",
                           "--gin.train.eval_period=0", f"--gin.load_split.cache_dir={CACHE}", *COMMON, *extra], log)
    return model_dir


def _evaluate(model_dir: str, log: list[str]) -> dict:
    out = os.path.join(model_dir, "eval")
    _run(f"evaluate {os.path.basename(model_dir)}",
         ["cat_jax.eval", "--gin_file=gin_configs/runs/eval.gin", f"--gin.CHECKPOINT_DIR={model_dir}",
          "--gin.SPLIT=test", f"--gin.MAX_EXAMPLES={EVAL_EXAMPLES}", f"--gin.OUTPUT_DIR={out}",
          *COMMON], log)
    newest = max((os.path.join(out, f) for f in os.listdir(out) if f.startswith("metrics_test")),
                 key=os.path.getmtime)
    with open(newest) as f:
        return json.load(f)


def _cascade(large: str, smalls: dict[str, str], log: list[str]) -> str:
    out = os.path.join(DEMO_DIR, "cascade")
    _run("cascade evaluation", ["cat_jax.cascade_eval", "--gin_file=gin_configs/runs/cascade_eval.gin",
                                f"--gin.LARGE_MODEL_DIR={large}", f"--gin.SMALL_MODEL_DIRS={smalls!r}",
                                f"--gin.OUTPUT_DIR={out}", f"--gin.MAX_EXAMPLES={EVAL_EXAMPLES}",
                                f"--gin.load_split.cache_dir={CACHE}", *COMMON], log)
    return out


def main() -> None:
    os.makedirs(DEMO_DIR, exist_ok=True)
    log: list[str] = []
    large = _train("large", "train_large.gin", log)
    small_ce = _train("small_ce", "train_small_ce.gin", log)
    small_cat = _train("small_cat", "train_small_cat.gin", log, [f"--gin.TEACHER_MODEL_DIR={large}"])
    results = {name: _evaluate(d, log) for name, d in
               (("large", large), ("small_ce", small_ce), ("small_cat", small_cat))}
    cascade = _cascade(large, {"ce": small_ce, "cat": small_cat}, log)
    with open(os.path.join(DEMO_DIR, "commands.sh"), "w") as f:
        f.write("#!/usr/bin/env bash\nset -e\n" + "\n".join(log) + "\n")
    with open(os.path.join(DEMO_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nTest-split metrics ({TASK}, {EVAL_EXAMPLES} examples):")
    for name, r in results.items():
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in r["metrics"][TASK].items())
        print(f"  {name:10s} step {r['step']:5d}  {metrics}")
    print(f"\nCheckpoints and TensorBoard/JSONL metrics: {os.path.abspath(DEMO_DIR)}/<model>/")
    print(f"Results: {os.path.abspath(os.path.join(DEMO_DIR, 'results.json'))}")
    print(f"Cascade curves, summary and plots: {os.path.abspath(cascade)}/ (summary.md, *.png)")
    print(f"Commands: {os.path.abspath(os.path.join(DEMO_DIR, 'commands.sh'))}")


if __name__ == "__main__":
    main()
