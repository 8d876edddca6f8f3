"""Writing exports: a task's or mixture's splits through the live seqio pipeline into the files
`cat_jax.data.exported` reads (the job of `python -m cat_jax.export_task`)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np

from cat_jax import metrics, vocabularies
from cat_jax.data.arrays import ExampleArrays
from cat_jax.data.arrays import SAMPLE_SEED
from cat_jax.data.loading import load_split_from
from cat_jax.data.exported import (FORMAT, POSTPROCESSED_TARGETS, export_command, manifest_path,
                                   describe_fn, npz_path, qualified_name)
from cat_jax.data.source import live_source
from cat_jax.errors import ConfigError

log = logging.getLogger(__name__)


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def task_info(task: Any) -> dict[str, Any]:
    post = getattr(task, "postprocess_fn", None)
    if hasattr(task, "_postprocess_fn"):  # seqio.Task: `postprocess_fn` is a method around this one
        post = task._postprocess_fn  # pylint: disable=protected-access
    fns = list(getattr(task, "predict_metric_fns", None) or getattr(task, "metric_fns", []))
    info: dict[str, Any] = {
        "splits": list(task.splits),
        "postprocess_fn": qualified_name(post) if post is not None else None,
        "has_postprocess_fn": post is not None,
        "postprocess_fn_repr": describe_fn(post),
        "metric_fns": [qualified_name(fn) for fn in fns],
        "metric_fn_reprs": [describe_fn(fn) for fn in fns],
        "quality": None,
    }
    try:
        quality = metrics.get_quality(task.name)
    except ValueError:
        quality = None
    if quality is not None:
        info["quality"] = {"per_example": qualified_name(quality.per_example),
                           "corpus": qualified_name(quality.corpus) if quality.corpus else None}
    return info


def _postprocessed_targets(arrays: ExampleArrays, tasks: Mapping[str, Any]) -> np.ndarray:
    out = []
    for i, name in enumerate(arrays.task_names.tolist()):
        post = getattr(tasks[name], "postprocess_fn", None)
        target = str(arrays.targets_text[i])
        value = post(target, example=arrays.example(i), is_target=True) if post is not None else target
        try:
            out.append(json.dumps(value, default=json_default))
        except (TypeError, ValueError):
            out.append("null")  # read back as "not stored": normalised text is used instead
    return np.array(out, dtype=str)


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def export_one(name: str, split: str, task_feature_lengths: Mapping[str, int], export_dir: str,
               max_examples: int | None = None) -> dict[str, Any]:
    """Export one split of a task or mixture through the live seqio pipeline; returns the manifest."""
    lengths = {k: int(v) for k, v in dict(task_feature_lengths).items()}
    export_dir = os.path.abspath(os.path.expanduser(export_dir))
    source = live_source()
    provider = source.provider(name)
    leaf = source.leaf_tasks(name)
    tasks = {t.name: t for t in leaf}
    arrays = load_split_from(source, name, split, lengths, max_examples=max_examples)
    vocab = source.vocabulary(name)
    os.makedirs(export_dir, exist_ok=True)
    rates = ({t.name: float(provider.get_rate(t)) for t in provider.tasks}
             if hasattr(provider, "tasks") else None)
    order = list(dict.fromkeys(arrays.task_names.tolist()))
    manifest = {
        "format": FORMAT,
        "name": name,
        "split": split,
        "kind": "mixture" if rates is not None else "task",
        "task_feature_lengths": lengths,
        "max_examples": max_examples,
        "sample_seed": SAMPLE_SEED,
        "num_examples": len(arrays),
        "num_examples_per_task": {t: int(np.sum(arrays.task_names == t)) for t in order},
        "truncated": {"inputs": arrays.num_truncated_inputs, "targets": arrays.num_truncated_targets},
        "vocabulary": vocabularies.describe(vocab, export_dir),
        "rates": rates,
        "task_order": [t.name for t in leaf],
        "tasks": {t.name: task_info(t) for t in leaf},
        "arrays": os.path.basename(npz_path(export_dir, name, split)),
        "export_command": export_command(name, split, lengths, export_dir, max_examples),
    }
    arrays.save(npz_path(export_dir, name, split),
                extra={POSTPROCESSED_TARGETS: _postprocessed_targets(arrays, tasks)})
    write_json(manifest_path(export_dir, name, split), manifest)
    log.info("Exported %s/%s: %d examples to %s", name, split, len(arrays), npz_path(export_dir, name, split))
    return manifest


def export_splits(mixture_or_task_name: str, split: str | Sequence[str],
                  task_feature_lengths: Mapping[str, int], export_dir: str,
                  max_examples: int | None = None) -> list[dict[str, Any]]:
    """Each split (one name or a list) of the task or mixture into `export_dir`: the manifests."""
    splits = [split] if isinstance(split, str) else list(split)
    return [export_one(mixture_or_task_name, s, task_feature_lengths, export_dir, max_examples)
            for s in splits]


FORMATS = ("npz", "array_record")


@gin.configurable
def export_split(mixture_or_task_name: str = gin.REQUIRED, split: Any = gin.REQUIRED,
                 task_feature_lengths: Mapping[str, int] = gin.REQUIRED, export_dir: str = gin.REQUIRED,
                 max_examples: int | None = None, format: str = "npz",  # pylint: disable=redefined-builtin
                 examples_per_shard: int = 100_000) -> list[dict[str, Any]]:
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
        from cat_jax.data.stream_export import export_streaming_one  # pylint: disable=import-outside-toplevel
        return [export_streaming_one(mixture_or_task_name, s, export_dir, max_examples, examples_per_shard)
                for s in splits]
    raise ConfigError(f"export_split.format={format!r}: choose one of {FORMATS}.")
