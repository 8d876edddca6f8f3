"""Metrics to JSON lines and TensorBoard event files.

`MetricWriter(directory, name)` writes each call of `write_scalars` as one line of
`<directory>/<name>_metrics.jsonl` (`{"step": k, "<metric>": v, ...}`, appended across
restarts) and as scalars in TensorBoard event files under `<directory>/tensorboard/<name>`.
Both files are flushed at every write, so a run killed with `kill -9` loses no logged step in
either (TensorBoard's event file would otherwise stay empty until the writer closes).
Only one process writes: by default (`enabled=None`) the writer is enabled on process 0 and
is a no-op on the others, so a multi-host job writes each step once; pass `enabled` to override.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

from cat_jax.errors import ModelDirError

log = logging.getLogger("cat_jax")


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python, numpy or jax scalar (a one-element array is accepted)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
    return float(array.reshape(()))


class MetricWriter:
    """Scalars to `<directory>/<name>_metrics.jsonl` and `<directory>/tensorboard/<name>`."""

    def __init__(
        self, directory: str, name: str = "train", enabled: bool | None = None, resume_step: int | None = None
    ):
        """`resume_step`: the run continues after that step (restored from its checkpoint), so the
        metrics logged after it by the interrupted run are dropped from the JSON lines (they are
        replayed) and TensorBoard is told to purge them (a SessionLog START at the next step).
        0 is a run that starts from scratch: every step an earlier, checkpoint-less try logged goes."""
        if enabled is None:
            from cat_jax import runtime  # pylint: disable=import-outside-toplevel

            enabled = runtime.is_lead()
        self.enabled = bool(enabled)
        self.jsonl_path = os.path.join(directory, f"{name}_metrics.jsonl")
        self.tensorboard_dir = os.path.join(directory, "tensorboard", name)
        if not enabled:
            return
        os.makedirs(self.tensorboard_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.jsonl_path):
            _drop_after(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        # The synchronous events writer (SummaryWriter queues events in a thread, so its
        # flush() does not guarantee they are on disk). The unique suffix matters: files are
        # named by the second, and a writer reopened within the same second would otherwise
        # overwrite the earlier file.
        self._events = EventsWriter(os.path.join(self.tensorboard_dir, "events"), f".{uuid.uuid4().hex[:12]}")
        if resume_step is not None:
            self._events.write_event(
                event_pb2.Event(
                    wall_time=time.time(),
                    step=int(resume_step) + 1,
                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                )
            )

    def _write_event(self, step: int, event_summary: Any) -> None:
        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=event_summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write `scalars` at `step`: one JSON line and one TensorBoard scalar per metric."""
        if not self.enabled:
            return
        step = int(step)
        values = {name: _to_float(name, value) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._write_event(step, summary.scalar(name, value))
        self._events.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Write `text` under `tag` to TensorBoard's text tab (e.g. the operative gin config)."""
        if self.enabled:
            self._write_event(int(step), summary.text(tag, text))
            self._events.flush()

    def flush(self) -> None:
        """Push written TensorBoard events to disk (every write already does)."""
        if self.enabled:
            self._events.flush()

    def close(self) -> None:
        """Flush and close both files."""
        if self.enabled:
            self._events.close()
            self._jsonl.close()


def _drop_after(path: str, step: int) -> None:
    """Rewrite a metrics JSON lines file without the lines of steps after `step` (atomically).

    A last line that is not JSON (a crash or a full disk cut it short) is dropped and logged; an
    unreadable line elsewhere is an error naming the file and the line.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if i < last:
                raise ModelDirError(
                    f"{path} line {i + 1} is not JSON ({e}); only a torn last line is "
                    "repaired on resume. Fix or remove that line."
                ) from e
            log.warning(
                "%s: dropped its torn last line (%d bytes, not JSON: cut short by a crash or a full disk).",
                path,
                len(line),
            )
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    """All objects of a JSON lines file, in order (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
