"""A teacher cache: what a frozen teacher says about every target token of a run's training
batches, stored once (`python -m cat_jax.cache_teacher`) and read by any number of students
(`cat_jax.objectives.cached_teacher`) instead of running the teacher at every step.

Per step s of the run's batches (the data layer's: `batch(s)`, in memory or streamed) and per
target position of the model's batch (`models.TARGETS`), the cache holds whether the teacher's
argmax is the target (`correct`, one bit per token) and, with top_k = k > 0, the teacher's k most
probable tokens and their log-probabilities at the manifest's temperature (`top_k_ids` int32,
`top_k_logprobs` float32). Layout:

    CACHE_DIR/manifest.json            what the cache was built for (MANIFEST_KEYS): refused otherwise
    CACHE_DIR/shard_00000/correct.npy  uint8 [steps, batch, ceil(length / 8)]: np.packbits of the bits
    CACHE_DIR/shard_00000/top_k_ids.npy top_k_logprobs.npy   [steps, batch, length, k] (top_k > 0)
    CACHE_DIR/shard_00001/ ...         `steps_per_shard` steps each (the last may hold fewer)

A shard is written into `shard_<i>.tmp/` and renamed when complete, so a killed pass leaves whole
shards and one temporary directory: the same command removes it and continues with that shard;
the files are `np.save`'s (no timestamps), so a resumed cache is byte for byte an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from cat_jax.errors import ConfigError, TeacherMismatchError

FORMAT = "cat_jax.teacher_cache/1"
MANIFEST = "manifest.json"
# The batch features a cache adds (the names the loss reads).
TEACHER_CORRECT = "teacher_correct"
TOP_K_IDS = "teacher_top_k_ids"
TOP_K_LOGPROBS = "teacher_top_k_logprobs"
# What is compared with the run that reads the cache (a difference is refused by name).
DATA_KEYS = ("dataset", "data_order")
_FILES = {TEACHER_CORRECT: "correct.npy", TOP_K_IDS: "top_k_ids.npy", TOP_K_LOGPROBS: "top_k_logprobs.npy"}


def shard_dir(directory: str, index: int) -> str:
    return os.path.join(directory, f"shard_{index:05d}")


def read_manifest(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    """Written atomically (a kill leaves the old manifest or the new one)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST)
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def num_shards(manifest: Mapping[str, Any]) -> int:
    return -(-manifest["steps"] // manifest["steps_per_shard"])


def shard_steps(manifest: Mapping[str, Any], index: int) -> range:
    per = manifest["steps_per_shard"]
    return range(index * per, min((index + 1) * per, manifest["steps"]))


def finished_shards(directory: str, manifest: Mapping[str, Any]) -> list[int]:
    return [i for i in range(num_shards(manifest)) if os.path.isdir(shard_dir(directory, i))]


def write_shard(directory: str, index: int, entries: Mapping[str, np.ndarray]) -> None:
    """Write shard `index` (its arrays stacked over its steps) into a temporary directory, then
    rename it: a shard exists under its name only when complete."""
    final = shard_dir(directory, index)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, array in entries.items():
        if name == TEACHER_CORRECT:
            array = np.packbits(np.asarray(array, bool), axis=-1)
        np.save(os.path.join(tmp, _FILES[name]), np.ascontiguousarray(array))
    os.rename(tmp, final)


def compare(manifest: Mapping[str, Any], want: Mapping[str, Any], directory: str) -> None:
    """Refuse a cache built for other data (ConfigError), another teacher or another tokenizer
    (TeacherMismatchError) than `want` (a manifest of the run that reads or extends it); the
    message names every difference."""

    def differences(keys) -> list[str]:
        return [
            f"{k}: {manifest.get(k)!r} (the cache) vs {want.get(k)!r} (now)"
            for k in keys
            if manifest.get(k) != want.get(k)
        ]

    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{directory} holds a teacher cache of format {manifest.get('format')!r}, not {FORMAT!r}.")
    rebuild = "Build a cache for this run (python -m cat_jax.cache_teacher with its settings) in another directory."
    found = differences(("vocabulary",))
    if found:
        raise TeacherMismatchError(
            f"The teacher cache {directory} was built with another tokenizer: {found[0]}. {rebuild}"
        )
    found = differences(("teacher",))
    if found:
        raise TeacherMismatchError(
            f"The teacher cache {directory} was built from another teacher: {found[0]}. {rebuild}"
        )
    found = differences(DATA_KEYS + ("target_length",))
    if found:
        raise ConfigError(
            f"The teacher cache {directory} was built for other training batches:\n  "
            + "\n  ".join(found)
            + f"\n{rebuild}"
        )


class TeacherCache:
    """A finished cache, read by step: `entries(step, rows)` are the cached features of this
    process's block of rows of global batch `step` (one shard memory-mapped at a time)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ConfigError(
                f"{self.directory} holds no teacher cache ({MANIFEST} is missing). Write one first: "
                "python -m cat_jax.cache_teacher --gin_file=gin_configs/runs/cache_teacher.gin "
                f"--gin.CACHE_DIR={self.directory} (with the run's data settings and its TEACHER_MODEL_DIR)."
            )
        self.manifest = manifest
        missing = sorted(set(range(num_shards(manifest))) - set(finished_shards(self.directory, manifest)))
        if missing:
            raise ConfigError(
                f"The teacher cache {self.directory} is incomplete: {len(missing)} shards (first {missing[0]}) "
                "are missing (the pass was interrupted). Run the same cache_teacher command again."
            )
        self._index: int | None = None
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def names(self) -> tuple[str, ...]:
        return (TEACHER_CORRECT, TOP_K_IDS, TOP_K_LOGPROBS) if self.top_k else (TEACHER_CORRECT,)

    def shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{feature: (shape, dtype)} of the entries of a batch of `batch_size` rows."""
        length, k = int(self.manifest["target_length"]), self.top_k
        out = {TEACHER_CORRECT: ((batch_size, length), np.dtype(bool))}
        if k:
            out[TOP_K_IDS] = ((batch_size, length, k), np.dtype(np.int32))
            out[TOP_K_LOGPROBS] = ((batch_size, length, k), np.dtype(np.float32))
        return out

    def entries(self, step: int, rows: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        if not 0 <= step < self.steps:
            raise ConfigError(
                f"The teacher cache {self.directory} holds steps [0, {self.steps}); step {step} was asked for. "
                f"Build the cache for at least TRAIN_STEPS steps (cache_teacher's TRAIN_STEPS)."
            )
        index, offset = divmod(step, int(self.manifest["steps_per_shard"]))
        if index != self._index:
            folder = shard_dir(self.directory, index)
            self._arrays = {name: np.load(os.path.join(folder, _FILES[name]), mmap_mode="r") for name in self.names}
            self._index = index
        block, count = rows
        out = {}
        for name in self.names:
            array = self._arrays[name][offset]
            per = array.shape[0] // count
            array = np.asarray(array[block * per : (block + 1) * per])
            if name == TEACHER_CORRECT:
                array = np.unpackbits(array, axis=-1, count=int(self.manifest["target_length"])).astype(bool)
            out[name] = array
        return out
