"""Helpers shared by several test files: a run's saved state, bitwise tree equality, kill -9 of a
trainer at a chosen moment, a tiny Hub-style decoder checkpoint built without torch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from conftest import REPO, SUBPROCESS_ENV

TOKENIZER = REPO / "tests" / "fixtures" / "hf_tokenizers" / "llama3"


def final_state(model_dir) -> tuple[int, dict]:
    """(step, the whole saved train state: params, optimizer state, step, rng) of the newest
    checkpoint, as numpy, read without a template."""
    import orbax.checkpoint as ocp

    from cat_jax.checkpoints import Checkpointer

    step = Checkpointer.latest_in(str(model_dir))
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.join(model_dir, str(step), "state"))
    return step, jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_equal(a, b) -> None:
    """Bitwise: same structure, dtypes and bytes."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), path


def kill_when(args: list[str], condition: Callable[[list[str]], bool], module: str = "cat_jax.train") -> None:
    """Start `python -m module args`, SIGKILL it as soon as `condition(stderr lines so far)` holds
    (polled every millisecond, stderr read in a thread), and wait for it."""
    env = dict(os.environ, **SUBPROCESS_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    while proc.poll() is None and not condition(lines):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def make_hub_checkpoint(
    directory, seed: int, shape: dict, tokenizer=TOKENIZER, vocab_size: int = 512
) -> dict[str, np.ndarray]:
    """A Hub-style Llama directory (config.json, model.safetensors, the tokenizer files of
    `tokenizer`, by default the llama3 fixture's) of a randomly initialised cat_jax model; returns
    its parameters {path: float32 array}."""
    from flax import linen as nn

    from cat_jax import models
    from cat_jax.models.convert.tree import flatten
    from cat_jax.models.decoder import convert
    from cat_jax.models.decoder.config import DecoderConfig

    config = DecoderConfig(
        model_type="llama", vocab_size=vocab_size, max_position_embeddings=256, dtype="float32", **shape
    )
    params = {
        k: np.asarray(v)
        for k, v in flatten(nn.meta.unbox(models.build(config).init_params(jax.random.key(seed)))).items()
    }
    expected = json.loads((REPO / "tests" / "fixtures" / "hf_tokenizers" / "expected.json").read_text())["llama3"]
    ids = {"bos_token_id": expected["bos_token_id"], "eos_token_id": expected["eos_token_id"]}
    convert.export_hf(config, params, str(directory), "float32", ids)
    for name in os.listdir(tokenizer):
        shutil.copy(tokenizer / name, directory / name)
    return params
