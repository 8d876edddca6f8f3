"""Every shipped gin file parses and builds its objects (config errors surface before compute)."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from cat_jax import gin_utils
from conftest import REPO

GIN_DIR = REPO / "gin_configs"
RUN_FILES = sorted(p for p in (GIN_DIR / "runs").glob("*.gin") if not p.stem.endswith("_common"))
MODEL_FILES = sorted((GIN_DIR / "models").glob("*.gin"))
REQUIRED = {"MODEL_DIR": "'/tmp/x'", "TRAIN_STEPS": "10", "TEACHER_MODEL_DIR": "'/tmp/t'",
            "CHECKPOINT_DIR": "'/tmp/c'", "OUTPUT_FILE": "'/tmp/o.jsonl'", "OUTPUT_DIR": "'/tmp/o'",
            "LARGE_MODEL_DIR": "'/tmp/l'", "SMALL_MODEL_DIRS": "{'ce': '/tmp/s'}",
            "EXPORT_DIR": "'/tmp/e'"}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_file_parses_and_builds(path: Path):
    text = path.read_text()
    gin_utils.parse_gin([str(path)], [], finalize=False)
    used = gin_utils.used_macros()
    gin.clear_config()
    bindings = [f"{k} = {v}" for k, v in REQUIRED.items() if k in used]
    gin_utils.parse_gin([str(path)], bindings)
    fn = {"eval": "run_eval", "infer": "run_infer", "cascade_eval": "run_cascade_eval"}.get(path.stem, "train")
    for name in ("dataset", "train_dataset", "model_config", "loss_options"):
        try:
            value = gin.query_parameter(f"{fn}.{name}")
        except ValueError:
            continue
        assert value is not None
        built = value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") else value
        assert built is not None
    assert text.startswith("#"), f"{path.name} needs a header comment with its command"
    assert "REQUIRED macros" in text


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_builds_a_config(path: Path):
    from cat_jax.models import T5Config
    gin_utils.parse_gin([str(path)], [])
    config = T5Config()
    assert config.emb_dim > 0 and config.num_heads > 0 and config.vocab_size is None


def test_override_values_are_quoted_when_not_literals():
    files, bindings, rest = gin_utils.split_gin_args(
        ["--gin_file=a.gin", "--gin.MODEL_DIR=/tmp/run", "--gin.STEPS=3", "--gin.X='q'", "--gin.R=@f()", "-v"])
    assert files == ["a.gin"] and rest == ["-v"]
    assert bindings == ["MODEL_DIR = '/tmp/run'", "STEPS = 3", "X = 'q'", "R = @f()"]


def test_includes_resolve_with_a_runs_folder_in_the_working_directory(tmp_path, monkeypatch):
    """A `runs/` folder in the cwd (a namespace package to Python) must not break `include`."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    gin_utils.parse_gin([str(GIN_DIR / "runs" / "train_large.gin")],
                        [f"{k} = {REQUIRED[k]}" for k in ("MODEL_DIR", "TRAIN_STEPS")])
    assert gin.query_parameter("train.train_steps") is not None
