"""Every shipped gin file parses and builds its objects (config errors surface before compute)."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
from conftest import REPO

from cat_jax import gin_utils

GIN_DIR = REPO / "gin_configs"
RUN_FILES = sorted(p for p in (GIN_DIR / "runs").glob("*.gin") if not p.stem.endswith("_common"))
MODEL_FILES = sorted((GIN_DIR / "models").glob("*.gin"))
REQUIRED = {
    "MODEL_DIR": "'/tmp/x'",
    "TRAIN_STEPS": "10",
    "TEACHER_MODEL_DIR": "'/tmp/t'",
    "CHECKPOINT_DIR": "'/tmp/c'",
    "OUTPUT_FILE": "'/tmp/o.jsonl'",
    "OUTPUT_DIR": "'/tmp/o'",
    "LARGE_MODEL_DIR": "'/tmp/l'",
    "SMALL_MODEL_DIRS": "{'ce': '/tmp/s'}",
    "EXPORT_DIR": "'/tmp/e'",
    "SOURCE": "'/tmp/src'",
    "INITIAL_CHECKPOINT_DIR": "'/tmp/i'",
    "KD_STEPS": "4",
    "SMALL_MODEL_DIR": "'/tmp/s'",
    "SCORES_DIR": "'/tmp/scores'",
    "CACHE_DIR": "'/tmp/cache'",
    "TEACHER_CACHE_DIR": "'/tmp/cache'",
}


def _with_includes(path: Path) -> str:
    """A gin file's text with the files it includes spliced in where they are included."""
    import re

    return re.sub(r"^include '([^']+)'$", lambda m: _with_includes(GIN_DIR / m.group(1)), path.read_text(), flags=re.M)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_run_file_parses_and_builds(path: Path):
    text = path.read_text()
    fn = {
        "eval": "run_eval",
        "infer": "run_infer",
        "cascade_eval": "run_cascade_eval",
        "speculative_eval": "run_speculative_eval",
        "salt_score": "salt_score",
        "cache_teacher": "cache_teacher",
    }.get(path.stem, "train")
    files = [str(path)]
    if fn == "train" and "include 'models/" not in text:  # a run file that takes the model file after it
        files.append(str(GIN_DIR / "models" / "flan_t5_small.gin"))
    gin_utils.parse_gin(files, [], finalize=False)
    used = gin_utils.used_macros()
    gin.clear_config()
    bindings = [f"{k} = {v}" for k, v in REQUIRED.items() if k in used]
    gin_utils.parse_gin(files, bindings)
    built = {}
    for name in ("dataset", "train_dataset", "model_config", "objective"):
        try:
            value = gin.query_parameter(f"{fn}.{name}")
        except ValueError:
            continue
        built[name] = value.scoped_configurable_fn()
    # SALT's objective carries its KD schedule (and SALT_DS's selection); the others, their loss options
    salt = fn == "train" and "salt" in path.stem
    train_expected = {
        "train_dataset": "DatasetConfig",
        "model_config": "T5Config",
        "objective": "Salt" if salt else "CachedTeacher" if "cached" in path.stem else "TokenLoss",
    }
    if salt:
        salt = built["objective"]
        assert type(salt.schedule).__name__ == "KDSchedule"
        assert (type(salt.selection).__name__ if salt.selection else None) == (
            "DataSelection" if path.stem.endswith("_ds") else None
        )
    expected = {
        "train": train_expected,
        "run_eval": {"dataset": "DatasetConfig"},
        "run_infer": {"dataset": "DatasetConfig"},
        "run_cascade_eval": {"dataset": "DatasetConfig"},
        "cache_teacher": {"train_dataset": "DatasetConfig"},
    }.get(fn, {})
    if path.stem.startswith(("train", "finetune", "eval", "infer", "cascade_eval", "cache_teacher")):
        assert {k: type(v).__name__ for k, v in built.items()} == expected
    # the loss the file (or the last it includes) sets
    if type(built.get("objective")).__name__ in ("TokenLoss", "CachedTeacher"):
        import re

        full = _with_includes(path)
        mask = re.findall(r"LossOptions.mask = '(\w+)'", full)[-1]
        alpha = float(re.findall(r"LossOptions.alpha = ([\d.]+)", full)[-1])
        assert (built["objective"].options.mask, built["objective"].options.alpha) == (mask, alpha)
    if type(built.get("objective")).__name__ == "Salt":
        assert (built["objective"].schedule.kd_steps, built["objective"].schedule.weight) == (4, 0.5)
    if "train_dataset" in built:
        assert built["train_dataset"].mixture_or_task_name == "offline_mix" and built["train_dataset"].batch_size == 64
    assert text.startswith("#"), f"{path.name} needs a header comment with its command"
    assert "REQUIRED macros" in text


def _parameter_counts(config) -> tuple[int, int]:
    """(all parameters, those outside the vocabulary tables) of a config with a vocab_size."""
    import numpy as np

    from cat_jax import models
    from cat_jax.models.convert.tree import flatten

    abstract, _ = models.build(config).abstract_params()
    sizes = {k: int(np.prod(v.shape)) for k, v in flatten(abstract).items()}
    vocab = sizes.get("token_embedder/embedding", 0) + sizes.get("decoder/logits_dense/kernel", 0)
    return sum(sizes.values()), sum(sizes.values()) - vocab


def _stated(number: str, unit: str) -> tuple[float, float]:
    """A header's count and the rounding it was written with."""
    value = float(number.replace(",", ""))
    scale = {"": 1, "M": 1e6, "B": 1e9}[unit]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return value * scale, 0.5 * scale * 10**-decimals


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_file_builds_the_config_its_header_describes(path: Path):
    """Every model file parses, and the parameter count its header states is the model's."""
    import re

    from cat_jax.models.t5 import T5Config

    gin_utils.parse_gin([str(path)], [])
    config = T5Config()
    text = path.read_text()
    match = re.search(r"Parameters: ([\d,.]+)(M|B)?(,| without the vocabulary tables)", text)
    if config.vocab_size is None:  # sized from the task's vocabulary: the byte vocabulary's 259 -> 384
        config = config.replace(vocab_size=384)
        assert "vocab_size is not set here" in text or "byte vocabulary" in text
    if match is None:
        assert "demo" in path.name  # the demo files state an approximate size in words
        return
    total, without_vocab = _parameter_counts(config)
    stated, rounding = _stated(match.group(1), match.group(2) or "")
    got = without_vocab if "without" in match.group(3) else total
    assert abs(got - stated) <= rounding, (got, stated)


def test_override_values_are_quoted_when_not_literals():
    files, bindings, rest = gin_utils.split_gin_args(
        ["--gin_file=a.gin", "--gin.MODEL_DIR=/tmp/run", "--gin.STEPS=3", "--gin.X='q'", "--gin.R=@f()", "-v"]
    )
    assert files == ["a.gin"] and rest == ["-v"]
    assert bindings == ["MODEL_DIR = '/tmp/run'", "STEPS = 3", "X = 'q'", "R = @f()"]


def test_includes_resolve_with_a_runs_folder_in_the_working_directory(tmp_path, monkeypatch):
    """A `runs/` folder in the cwd (a namespace package to Python) must not break `include`, and
    a same-named file there must not shadow the repository's: the shipped model file is the one
    included (the decoy's emb_dim would otherwise win)."""
    import re

    from cat_jax.models.t5 import T5Config

    (tmp_path / "runs").mkdir()
    (tmp_path / "models").mkdir()
    shipped_text = (GIN_DIR / "models" / "demo_large.gin").read_text()
    (tmp_path / "models" / "demo_large.gin").write_text(
        re.sub(r"(?m)^T5Config.emb_dim = \d+$", "T5Config.emb_dim = 7", shipped_text)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    gin_utils.parse_gin(
        [str(GIN_DIR / "runs" / "train_large.gin")], [f"{k} = {REQUIRED[k]}" for k in ("MODEL_DIR", "TRAIN_STEPS")]
    )
    shipped = int(re.search(r"(?m)^T5Config.emb_dim = (\d+)$", shipped_text).group(1))
    assert T5Config(vocab_size=384).emb_dim == shipped != 7
