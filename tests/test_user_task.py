"""A task registered exactly as the README says, trained and evaluated through the binaries."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import REPO, run_module

# Trains, compiles or decodes whole models (minutes on 2 CPU cores): `make test` runs it, the fast
# tier (`pytest -m "not slow"`) leaves it out.
pytestmark = pytest.mark.slow


def test_readme_task_trains_and_evaluates_on_its_own_task(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Registering your own task") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_tasks.py").write_text(snippet)
    (tmp_path / "my_tasks.gin").write_text("import my_tasks\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    model_dir = tmp_path / "sums_model"
    common = [f"--gin_file={tmp_path / 'my_tasks.gin'}"]
    run_module(
        "cat_jax.train",
        [
            "--gin_file=gin_configs/runs/train_small_ce.gin",
            *common,
            "--gin_file=gin_configs/models/tiny.gin",
            f"--gin.MODEL_DIR={model_dir}",
            "--gin.TRAIN_STEPS=2",
            "--gin.MIXTURE_OR_TASK_NAME='sums'",
            "--gin.BATCH_SIZE=2",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 4}",
            "--gin.train.eval_period=0",
        ],
    )
    proc = run_module(
        "cat_jax.eval",
        [
            "--gin_file=gin_configs/runs/eval.gin",
            *common,
            f"--gin.CHECKPOINT_DIR={model_dir}",
            "--gin.SPLIT=test",
            "--gin.BATCH_SIZE=2",
        ],
    )
    result = json.loads(proc.stdout)
    assert list(result["metrics"]) == ["sums"] and result["num_examples"] == 2  # not offline_mix
    missing = run_module(
        "cat_jax.eval",
        ["--gin_file=gin_configs/runs/eval.gin", *common, f"--gin.CHECKPOINT_DIR={model_dir}", "--gin.SPLIT=dev"],
        check=False,
    )
    assert missing.returncode == 2 and "Task 'sums' has no split 'dev'" in missing.stderr
    assert "Traceback" not in missing.stderr
