"""Tests for cat_jax.metric_writers: JSON lines content and TensorBoard event records."""

from __future__ import annotations

import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from cat_jax.metric_writers import MetricWriter, read_jsonl


def _read_events(directory: Path) -> list[event_pb2.Event]:
    """Parse every TFRecord of every event file under `directory`, checking the CRCs."""
    events = []
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert length_crc == masked_crc32c(header)
            record = data[pos + 12 : pos + 12 + length]
            (record_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert record_crc == masked_crc32c(record)
            events.append(event_pb2.Event.FromString(record))
            pos += 16 + length
    return events


def _scalars(events: list[event_pb2.Event]) -> dict[tuple[str, int], float]:
    return {
        (value.tag, event.step): value.simple_value
        for event in events
        for value in event.summary.value
        if value.HasField("simple_value")
    }


def test_jsonl_and_tensorboard_hold_the_scalars(tmp_path: Path) -> None:
    writer = MetricWriter(str(tmp_path), name="train")
    writer.write_scalars(1, {"loss": jnp.float32(2.5), "accuracy": np.float64(0.25), "n": 3})
    writer.write_scalars(jnp.int32(2), {"loss": jnp.array([1.75]), "accuracy": 0.5, "n": 4})
    writer.write_text(2, "gin/operative_config", "train.steps = 10")
    writer.close()

    assert read_jsonl(str(tmp_path / "train_metrics.jsonl")) == [
        {"step": 1, "loss": 2.5, "accuracy": 0.25, "n": 3.0},
        {"step": 2, "loss": 1.75, "accuracy": 0.5, "n": 4.0},
    ]
    events = _read_events(tmp_path / "tensorboard" / "train")
    assert _scalars(events) == {
        ("loss", 1): 2.5,
        ("accuracy", 1): 0.25,
        ("n", 1): 3.0,
        ("loss", 2): 1.75,
        ("accuracy", 2): 0.5,
        ("n", 2): 4.0,
    }
    texts = [
        (v.tag, e.step, v.tensor.string_val[0].decode()) for e in events for v in e.summary.value if v.tensor.string_val
    ]
    assert ("gin/operative_config/text_summary", 2, "train.steps = 10") in texts


def test_reopening_appends(tmp_path: Path) -> None:
    first = MetricWriter(str(tmp_path), name="eval")
    first.write_scalars(10, {"bleu": 12.5})
    first.close()
    second = MetricWriter(str(tmp_path), name="eval")
    second.write_scalars(20, {"bleu": 13.0})
    second.flush()
    assert read_jsonl(str(tmp_path / "eval_metrics.jsonl")) == [
        {"step": 10, "bleu": 12.5},
        {"step": 20, "bleu": 13.0},
    ]
    assert _scalars(_read_events(tmp_path / "tensorboard" / "eval"))[("bleu", 20)] == 13.0
    second.close()


@pytest.mark.parametrize("resume_step", [0, 2])
def test_a_resumed_run_drops_the_steps_it_replays(tmp_path: Path, resume_step: int) -> None:
    """A run killed after logging steps 1..3 restarts after `resume_step` (0: it had no checkpoint)."""
    killed = MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        killed.write_scalars(step, {"loss": float(step)})
    killed.close()
    resumed = MetricWriter(str(tmp_path), resume_step=resume_step)
    for step in range(resume_step + 1, 5):
        resumed.write_scalars(step, {"loss": 10.0 + step})
    resumed.close()
    rows = read_jsonl(str(tmp_path / "train_metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, resume_step + 1)] + [
        10.0 + s for s in range(resume_step + 1, 5)
    ]


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    writer = MetricWriter(str(directory), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_text(1, "t", "x")
    writer.flush()
    writer.close()
    assert not directory.exists()


def test_non_scalar_metric_is_refused(tmp_path: Path) -> None:
    writer = MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"'loss' must be a scalar, got shape \(2,\)"):
        writer.write_scalars(1, {"loss": np.array([1.0, 2.0])})
    writer.close()
    assert read_jsonl(str(tmp_path / "train_metrics.jsonl")) == []


_KILLED_WRITER = """
import os, signal, sys
from cat_jax.metric_writers import MetricWriter
writer = MetricWriter(sys.argv[1])
for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": float(step)})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_every_written_scalar_on_disk(tmp_path: Path) -> None:
    """kill -9 right after the writes: TensorBoard's file holds them too, not only the JSON lines."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], cwd=REPO, timeout=120)
    assert proc.returncode == -9
    assert [r["step"] for r in read_jsonl(str(tmp_path / "train_metrics.jsonl"))] == [1, 2, 3]
    assert _scalars(_read_events(tmp_path / "tensorboard" / "train")) == {("loss", s): float(s) for s in (1, 2, 3)}


def test_a_torn_last_line_is_dropped_on_resume_and_logged(tmp_path: Path, caplog) -> None:
    path = tmp_path / "train_metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    with caplog.at_level("WARNING", logger="cat_jax"):
        writer = MetricWriter(str(tmp_path), resume_step=2)
    writer.write_scalars(3, {"loss": 30.0})
    writer.close()
    assert read_jsonl(str(path)) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    assert "dropped its torn last line" in caplog.text
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')  # damage elsewhere: named, not guessed
    from cat_jax.errors import ModelDirError

    with pytest.raises(ModelDirError, match="line 1 is not JSON"):
        MetricWriter(str(tmp_path), resume_step=2)
