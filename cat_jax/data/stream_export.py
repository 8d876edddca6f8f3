"""Writing streaming exports: a task's or mixture's split, streamed from the live seqio pipeline
into sharded ArrayRecord files (`cat_jax.data.streaming` reads them), never whole in memory.

Each leaf task is written to `<dir>/<name>.<split>/<task>/shard-NNNNN.array_record`, one record per
example (`streaming.encode_record`): the untrimmed token ids, so any TASK_FEATURE_LENGTHS can be
chosen when reading. A shard is written under a temporary name and renamed when complete;
`progress.json` beside the shards lists the complete ones and the examples they hold. An
interrupted export therefore resumes where the last complete shard ended (the same command; the
task's pipeline is re-run and its first examples skipped, which costs their preprocessing but not
their writing). The manifest is written last: a split without one is not readable.

Progress is logged every `_LOG_SECONDS` with the count, the rate and, when the task's source
knows its size (`num_input_examples`), the percentage and the ETA.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from cat_jax.data.loading import live_source
from cat_jax.data.manifest import postprocessed_target, write_json, write_manifest
from cat_jax.data.seqio_source import examples_with_metadata
from cat_jax.data.streaming import FORMAT, MANIFEST, SHARD, encode_record, split_dir
from cat_jax.errors import ConfigError

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
_LOG_SECONDS = 10.0


def _num_input_examples(task: Any, split: str) -> int | None:
    try:
        n = task.num_input_examples(split)
    except Exception:  # pylint: disable=broad-except  # sources that cannot say
        return None
    return int(n) if n is not None else None


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Logs `done` of `total` (when known) every few seconds: the count, rate and ETA."""

    def __init__(self, what: str, total: int | None, done: int = 0):
        self.what, self.total, self.start_done = what, total, done
        self.done = done
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= _LOG_SECONDS:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        text = f"{self.what}: {self.done:,} examples, {rate:,.0f}/s"
        if self.total:
            left = max(self.total - self.done, 0)
            text += (
                f" ({100 * self.done / self.total:.1f}% of {self.total:,}, ETA "
                f"{_hms(left / rate) if rate > 0 else '?'})"
            )
        return text


def _read_progress(task_dir: str) -> dict[str, Any]:
    path = os.path.join(task_dir, PROGRESS)
    if not os.path.exists(path):
        return {"shards": [], "counts": [], "done": False}
    with open(path) as f:
        return json.load(f)


def export_task_stream(
    task: Any, split: str, task_dir: str, examples_per_shard: int, max_examples: int | None
) -> tuple[list[str], int]:
    """Stream one task's split into shards under `task_dir` (resuming a partial export there);
    returns (the shard file names, the number of examples)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    os.makedirs(task_dir, exist_ok=True)
    progress = _read_progress(task_dir)
    done = int(sum(progress["counts"]))
    if progress["done"]:
        log.info("%s/%s: already exported (%d examples in %d shards).", task.name, split, done, len(progress["shards"]))
        return progress["shards"], done
    for stale in glob.glob(os.path.join(glob.escape(task_dir), "*.tmp")):
        os.remove(stale)  # a shard an interrupted export did not finish
    if done:
        log.info(
            "%s/%s: resuming the export after %d examples in %d complete shards.",
            task.name,
            split,
            done,
            len(progress["shards"]),
        )
    total = max_examples if max_examples is not None else _num_input_examples(task, split)
    meter = Progress(f"Exporting {task.name}/{split}", total, done)
    writer, count, name = None, 0, ""

    def close_shard() -> None:
        nonlocal writer, count
        writer.close()
        os.replace(os.path.join(task_dir, name + ".tmp"), os.path.join(task_dir, name))
        progress["shards"].append(name)
        progress["counts"].append(count)
        write_json(os.path.join(task_dir, PROGRESS), progress)
        writer, count = None, 0

    for example in examples_with_metadata(task, split, max_examples, skip=done):
        if writer is None:
            name = SHARD.format(len(progress["shards"]))
            writer = ArrayRecordWriter(os.path.join(task_dir, name + ".tmp"), "group_size:1")
        meta = {
            "id": example["id"],
            "inputs_pretokenized": example["inputs_text"],
            "targets_pretokenized": example["targets_text"],
            **json.loads(example["extras"]),
        }
        writer.write(encode_record({**example, "post": postprocessed_target(task, example["targets_text"], meta)}))
        count += 1
        meter.update()
        if count == examples_per_shard:
            close_shard()
    if writer is not None:
        close_shard()
    progress["done"] = True
    write_json(os.path.join(task_dir, PROGRESS), progress)
    log.info("%s", meter.line())
    return progress["shards"], int(sum(progress["counts"]))


def export_streaming_one(
    name: str, split: str, export_dir: str, max_examples: int | None = None, examples_per_shard: int = 100_000
) -> dict[str, Any]:
    """Export one split of a task or mixture as ArrayRecord shards; returns the manifest."""
    if examples_per_shard < 1:
        raise ConfigError(f"export_split.examples_per_shard must be >= 1, not {examples_per_shard}.")
    export_dir = os.path.abspath(os.path.expanduser(export_dir))
    source = live_source()
    leaf = source.leaf_tasks(name)
    base = split_dir(export_dir, name, split)
    shards, counts = {}, {}
    for task in leaf:
        if split not in task.splits:
            raise ConfigError(f"Task {task.name!r} has no split {split!r}; it has {list(task.splits)}.")
        shards[task.name], counts[task.name] = export_task_stream(
            task, split, os.path.join(base, task.name), examples_per_shard, max_examples
        )
    eos = {
        t.name: {
            k: (t.output_features[k].vocabulary.eos_id if t.output_features[k].add_eos else None)
            for k in ("inputs", "targets")
        }
        for t in leaf
    }
    manifest = write_manifest(
        os.path.join(base, MANIFEST),
        source,
        name,
        split,
        file_format=FORMAT,
        max_examples=max_examples,
        counts=counts,
        export_dir=export_dir,
        shards=shards,
        eos=eos,
    )
    log.info(
        "Exported %s/%s for streaming: %d examples in %d shards under %s",
        name,
        split,
        manifest["num_examples"],
        sum(len(s) for s in shards.values()),
        base,
    )
    return manifest


def manifest_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What `export_task` prints of a streaming manifest."""
    return {
        "name": manifest["name"],
        "split": manifest["split"],
        "num_examples": manifest["num_examples"],
        "format": "array_record",
        "shards": {t: len(s) for t, s in manifest["shards"].items()},
        "max_examples": manifest["max_examples"],
    }
