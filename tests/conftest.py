"""Shared helpers: tiny, fast command lines for the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY_TASK = "cmudict_syllables"
DATA_CACHE = tempfile.mkdtemp(prefix="cat_jax_test_data_")
# Subprocesses of one test session share compiled executables (the same tiny shapes recur).
COMPILE_CACHE = tempfile.mkdtemp(prefix="cat_jax_test_xla_")
SUBPROCESS_ENV = {
    "PYTHONUNBUFFERED": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
TINY_ARGS = [
    f"--gin.load_split.cache_dir='{DATA_CACHE}'",
    "--gin_file=gin_configs/models/tiny.gin",
    f"--gin.MIXTURE_OR_TASK_NAME='{TINY_TASK}'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
    "--gin.BATCH_SIZE=8",
    "--gin.DatasetConfig.max_examples=256",
    "--gin.train.eval_period=0",  # no evaluation unless a test asks for it (--gin.train.eval_period=N)
    "--gin.train.eval_max_examples=16",
    "--gin.train.eval_batch_size=8",
    "--gin.train.log_every_steps=1",
    "--gin.learning_rate_schedule.warmup_steps=2",
]


def train_args(run_file: str, model_dir: Path | str, steps: int, *extra: str) -> list[str]:
    return [
        f"--gin_file=gin_configs/runs/{run_file}",
        *TINY_ARGS,
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        *extra,
    ]


def run_module(
    module: str, args: list[str], *, devices: int | None = None, check: bool = True, timeout: int = 600, **popen
) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repo root; optionally on N forced CPU devices."""
    env = dict(os.environ, **SUBPROCESS_ENV)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


@pytest.fixture
def repo() -> Path:
    return REPO
