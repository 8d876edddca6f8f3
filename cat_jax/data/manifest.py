"""Export manifests: the one writer of both exports' JSON, and the function names they store.

A manifest describes one exported (name, split): the .npz export writes `<name>.<split>.json`
(`cat_jax.jobs.export_task`), the streaming export `<name>.<split>/manifest.json`
(`cat_jax.data.stream_export`). Both hold, written by `write_manifest`:

    format                 "cat_jax.exported_split/2" or "cat_jax.streaming_split/1"
    name, split, kind      the task or mixture, the split, "task" or "mixture"
    max_examples           the cap per task (a uniform sample, `sample_seed`), or null
    num_examples           in all, and per task (`num_examples_per_task`)
    vocabulary             `cat_jax.vocabularies.describe` (with a SentencePiece model or Hugging Face
                           tokenizer's files copied beside the export)
    rates                  {task: rate} of a mixture, or null
    task_order, tasks      the leaf tasks, each with its postprocess_fn, metric fns and cascade quality
                           functions as importable names (`module:qualname`, see `task_info`)

plus the fields of their format (the .npz export: lengths, truncation counts, the arrays' file and
the command that wrote it; the streaming one: shards and EOS ids per task).
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from cat_jax import metrics, vocabularies
from cat_jax.data.arrays import SAMPLE_SEED
from cat_jax.data.source import DataSource


def export_command(
    name: str,
    split: str,
    directory: str,
    lengths: Mapping[str, int] | str | None = None,
    max_examples: int | None = None,
    streaming: bool = False,
) -> str:
    """The `python -m cat_jax.export_task` command that writes (name, split) into `directory`
    (`lengths` a mapping or a placeholder; a streaming export is untrimmed and takes none)."""
    cmd = (
        f"python -m cat_jax.export_task --gin_file=gin_configs/runs/export_task.gin "
        f"--gin.MIXTURE_OR_TASK_NAME={name} --gin.SPLIT={split} "
    )
    if streaming:
        cmd += "--gin.export_split.format='array_record' "
    elif lengths is not None:
        shown = lengths if isinstance(lengths, str) else f'"{dict(lengths)}"'
        cmd += f"--gin.TASK_FEATURE_LENGTHS={shown} "
    cmd += f"--gin.EXPORT_DIR={directory}"
    if max_examples is not None:
        cmd += f" --gin.MAX_EXAMPLES={max_examples}"
    return cmd


# ---------------------------------------------------------------------------------------------
# Importable names of functions.


def qualified_name(fn: Any) -> str | None:
    """`module:qualname` of a module-level function that imports back as itself, else None."""
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qual or "<" in qual or module == "__main__":
        return None
    name = f"{module}:{qual}"
    try:
        return name if resolve_name(name) is fn else None
    except Exception:  # pylint: disable=broad-except
        return None


def resolve_name(name: str) -> Any:
    """The object a `module:qualname` names (imports the module; ImportError where it cannot)."""
    module, _, attr = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def describe_fn(fn: Any) -> str:
    """A readable name for a function (for messages), importable or not."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__name__)}"
    return name if inner is fn else f"partial({name})"


# ---------------------------------------------------------------------------------------------
# Writing.


def json_default(value: Any) -> Any:
    """JSON for numpy values, bytes and tuples / sets (json.dump's `default`)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written atomically (a temporary file renamed)."""
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def postprocessed_target(task: Any, target: str, example: Mapping[str, Any]) -> str:
    """The target after the task's postprocess_fn, as JSON ("null" where it is not JSON: readers
    then whitespace-normalise the text instead)."""
    post = getattr(task, "postprocess_fn", None)
    value = post(target, example=dict(example), is_target=True) if post is not None else target
    try:
        return json.dumps(value, default=json_default)
    except (TypeError, ValueError):
        return "null"


def task_info(task: Any) -> dict[str, Any]:
    """A task's entry of `tasks`: its splits, postprocess_fn, metric fns and cascade quality."""
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
        info["quality"] = {
            "per_example": qualified_name(quality.per_example),
            "corpus": qualified_name(quality.corpus) if quality.corpus else None,
        }
    return info


def write_manifest(
    path: str,
    source: DataSource,
    name: str,
    split: str,
    *,
    file_format: str,
    max_examples: int | None,
    counts: Mapping[str, int],
    export_dir: str,
    **fields: Any,
) -> dict[str, Any]:
    """Writes the manifest of (name, split) of `source` to `path` and returns it: the fields both
    exports share (see the module docstring; `file_format` is its "format"), `counts` {task:
    examples}, and the format's own `fields`."""
    rates = source.mixture_rates(name)
    leaf = source.leaf_tasks(name)
    manifest = {
        "format": file_format,
        "name": name,
        "split": split,
        "kind": "mixture" if rates is not None else "task",
        "max_examples": max_examples,
        "sample_seed": SAMPLE_SEED,
        "num_examples": int(sum(counts.values())),
        "num_examples_per_task": {t: int(n) for t, n in counts.items()},
        "vocabulary": vocabularies.describe(source.vocabulary(name), export_dir),
        "rates": rates,
        "task_order": [t.name for t in leaf],
        "tasks": {t.name: task_info(t) for t in leaf},
        **fields,
    }
    write_json(path, manifest)
    return manifest
