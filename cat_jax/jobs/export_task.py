"""Writing exports: a task's or mixture's splits through the live seqio pipeline into the files
`cat_jax.data.exported` (.npz) or `cat_jax.data.streaming` (ArrayRecord shards, written by
`cat_jax.data.stream_export`) reads: the job of `python -m cat_jax.export_task`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np

from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.exported import FORMAT, POSTPROCESSED_TARGETS, manifest_path, npz_path
from cat_jax.data.loading import live_source
from cat_jax.data.manifest import export_command, postprocessed_target, write_manifest
from cat_jax.data.source import load_split_from
from cat_jax.data.stream_export import export_streaming_one
from cat_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _postprocessed_targets(arrays: ExampleArrays, tasks: Mapping[str, Any]) -> np.ndarray:
    return np.array(
        [
            postprocessed_target(tasks[name], str(arrays.targets_text[i]), arrays.example(i))
            for i, name in enumerate(arrays.task_names.tolist())
        ],
        dtype=str,
    )


def export_one(
    name: str, split: str, task_feature_lengths: Mapping[str, int], export_dir: str, max_examples: int | None = None
) -> dict[str, Any]:
    """Export one split of a task or mixture through the live seqio pipeline; returns the manifest."""
    lengths = {k: int(v) for k, v in dict(task_feature_lengths).items()}
    export_dir = os.path.abspath(os.path.expanduser(export_dir))
    source = live_source()
    tasks = {t.name: t for t in source.leaf_tasks(name)}
    arrays = load_split_from(source, name, split, lengths, max_examples)
    os.makedirs(export_dir, exist_ok=True)
    path = npz_path(export_dir, name, split)
    arrays.save(path, extra={POSTPROCESSED_TARGETS: _postprocessed_targets(arrays, tasks)})
    manifest = write_manifest(
        manifest_path(export_dir, name, split),
        source,
        name,
        split,
        file_format=FORMAT,
        max_examples=max_examples,
        counts={t: int(np.sum(arrays.task_names == t)) for t in arrays.task_order()},
        export_dir=export_dir,
        task_feature_lengths=lengths,
        truncated={"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets},
        arrays=os.path.basename(path),
        export_command=export_command(name, split, export_dir, lengths, max_examples),
    )
    log.info("Exported %s/%s: %d examples to %s", name, split, len(arrays), path)
    return manifest


def export_splits(
    mixture_or_task_name: str,
    split: str | Sequence[str],
    task_feature_lengths: Mapping[str, int],
    export_dir: str,
    max_examples: int | None = None,
) -> list[dict[str, Any]]:
    """Each split (one name or a list) of the task or mixture into `export_dir`: the manifests."""
    splits = [split] if isinstance(split, str) else list(split)
    return [export_one(mixture_or_task_name, s, task_feature_lengths, export_dir, max_examples) for s in splits]


FORMATS = ("npz", "array_record")


@gin.configurable
def export_split(
    mixture_or_task_name: str = gin.REQUIRED,
    split: Any = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    export_dir: str = gin.REQUIRED,
    max_examples: int | None = None,
    format: str = "npz",  # pylint: disable=redefined-builtin
    examples_per_shard: int = 100_000,
) -> list[dict[str, Any]]:
    """The job of `python -m cat_jax.export_task`: each split (a name or a list) of the task or
    mixture, through the live seqio pipeline, into `export_dir`.

    `format='npz'` (default) writes the in-memory export `cat_jax.data.exported` reads, trimmed to
    `task_feature_lengths`; `format='array_record'` streams the split into sharded ArrayRecord
    files (`cat_jax.data.stream_export`, `examples_per_shard` records per shard, resumable) for
    `--gin.data_source.streaming_dir`, untrimmed (the lengths are chosen when reading, so
    `task_feature_lengths` is not used). `max_examples` keeps a uniform sample of that many
    examples per task (as MAX_EXAMPLES does in every run).
    """
    splits = [split] if isinstance(split, str) else list(split)
    if format == "npz":
        return export_splits(mixture_or_task_name, splits, task_feature_lengths, export_dir, max_examples)
    if format == "array_record":
        return [
            export_streaming_one(mixture_or_task_name, s, export_dir, max_examples, examples_per_shard) for s in splits
        ]
    raise ConfigError(f"export_split.format={format!r}: choose one of {FORMATS}.")
