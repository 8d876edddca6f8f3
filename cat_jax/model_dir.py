"""MODEL_DIR bookkeeping: writability, the trainer's lock, the run's identity (`run_info.json`)
and its checks.

One trainer at a time: `lock` creates `MODEL_DIR/trainer.lock` (its holder's host, pid and
process start time) and refreshes it every `LOCK_HEARTBEAT_S` seconds until released. A second
trainer is refused by name; a lock whose holder is dead (same host, pid gone or reused) or whose
holder on another host stopped refreshing it `LOCK_STALE_S` seconds ago is taken over, logged.
Readers of a MODEL_DIR (eval, infer, a teacher, cascades) take no lock.

`run_info.json` records what defines a run's trajectory: the model config and vocabulary (which a
checkpoint cannot change), the data (task or mixture, lengths, batch size, split, data seed, cap,
packing), the data order (in memory or streamed), the run's seed, the loss and its options, the
optimizer and schedule, the teacher's identity (directory, step, config, dtype) and SALT's
distillation schedule and data selection. Resuming with a different model or vocabulary is refused,
but for the model config's EXECUTION_FIELDS (how, not what, the model computes: `attention_impl`),
whose change is logged, recorded as the run's value and appended to run_info's `history`. Resuming
with any other difference is refused with the list of differences and the fix, unless
`train.allow_config_change=True`, which is logged and appended to `history`. A teacher or an
evaluated model is rebuilt from its own MODEL_DIR's `run_info.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from cat_jax import models, vocabularies
from cat_jax.errors import ModelDirError
from cat_jax.vocabulary_store import RUN_INFO, read_run_info

log = logging.getLogger("cat_jax")

# run_info fields that decide a run's future besides the model and vocabulary.
TRAJECTORY = ("dataset", "data_order", "seed", "loss_options", "optimizer", "teacher", "salt")
# model config fields that change how the model computes, not its parameters or its maths
# (`remat_policy` is one too, but not recorded at all: see the configs' docstrings).
EXECUTION_FIELDS = ("attention_impl",)
VOCAB_MULTIPLE = 128
LOCK_FILE = "trainer.lock"
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 600.0


def prepare(model_dir: str) -> bool:
    """Create MODEL_DIR and prove it is writable, or raise ModelDirError naming it; returns whether
    it was created now (so a start-up that fails can remove it again: `remove_if_empty`)."""
    created = not os.path.exists(model_dir)
    if "://" in model_dir:
        raise ModelDirError(
            f"MODEL_DIR {model_dir!r} is a URL; cat_jax writes its run files with POSIX I/O. Mount the "
            f"bucket (e.g. gcsfuse) or use a shared file system, and pass its local path."
        )
    probe = os.path.join(model_dir, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(model_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ModelDirError(
            f"MODEL_DIR {model_dir!r} cannot be written ({e.strerror or e}). Choose a directory you "
            f"can write, e.g. --gin.MODEL_DIR=/tmp/cat_jax/run1."
        ) from e
    return created


def remove_if_empty(model_dir: str) -> None:
    """Remove a MODEL_DIR this process created when nothing was written into it."""
    try:
        os.rmdir(model_dir)
    except OSError:
        pass


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux): [0] the state, [19] the
    start time; None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started, to tell a reused pid from the lock's holder (None: unknown)."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock of this host names still runs (and is the same process; a
    killed process its parent has not reaped yet is not)."""
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True  # another user's process, or a lock we cannot read: assume it is held
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


class ModelDirLock:
    """`MODEL_DIR/trainer.lock`, held by this process until `release()` (a heartbeat thread keeps
    its modification time fresh, so a lock of another host can be told stale)."""

    def __init__(self, path: str, holder: dict[str, Any]):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cat_jax-model-dir-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed by hand, or the disk is gone: the run itself will say so

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's."""
        self._stop.set()
        self._thread.join()
        if _read_lock(self.path) == self.holder:
            os.remove(self.path)


def _read_lock(path: str) -> dict[str, Any] | None:
    """The holder a lock file names; {} when it is unreadable or half-written; None when absent."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(path: str, holder: dict[str, Any]) -> str | None:
    """Why the lock at `path` can be taken over, or None when its holder may still run."""
    host = socket.gethostname()
    if holder.get("host") == host and not _alive(holder):
        return f"its holder, {_describe(holder)}, is no longer running"
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "it was just released"
    if holder.get("host") != host and age > LOCK_STALE_S:
        return f"its holder, {_describe(holder)}, last refreshed it {age:.0f} s ago (> {LOCK_STALE_S:.0f} s)"
    return None


def lock(model_dir: str) -> ModelDirLock:
    """Take MODEL_DIR's trainer lock, or raise ModelDirError naming the trainer that holds it.

    Created with O_EXCL, so of two trainers starting together one wins; a stale lock (see the
    module docstring) is moved aside with one atomic rename and taken over, logged.
    """
    path = os.path.join(model_dir, LOCK_FILE)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current = _read_lock(path)
            if current is None:
                continue  # released in between: try again
            why = _stale(path, current)
            if why is None:
                raise ModelDirError(
                    f"MODEL_DIR {model_dir} is in use by another trainer: {_describe(current)} holds {path}. "
                    "Two trainers on one MODEL_DIR would delete each other's checkpoints; nothing was written. "
                    "Wait for it to finish, stop it, or use another MODEL_DIR. If no trainer runs there any "
                    "more, delete the lock file."
                )
            aside = f"{path}.stale.{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another trainer took it over first; the next try meets its lock
            if _read_lock(aside) != current:  # replaced by a live holder in between: put it back
                os.rename(aside, path)
                continue
            os.remove(aside)
            log.warning("Took over the stale lock of MODEL_DIR %s: %s.", model_dir, why)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
            f.flush()
            os.fsync(f.fileno())
        return ModelDirLock(path, holder)
    raise ModelDirError(
        f"Could not take the lock {path}: other trainers are starting on MODEL_DIR {model_dir} "
        "at the same moment. Start one trainer per MODEL_DIR."
    )


def vocab_info(vocab) -> dict[str, Any]:
    """What identifies a vocabulary: its class, size and (SentencePiece) the SHA-256 of its model,
    or (a Hugging Face tokenizer) its class and the SHA-256 of its normalised files and settings.

    The same for seqio's vocabulary of a live run and the TensorFlow-free one rebuilt from an
    export (`cat_jax.vocabularies`), so a checkpoint trained either way serves the other. The
    SentencePiece model is identified by content, not path: the export holds a copy.
    """
    return vocabularies.identity(vocab)


def with_vocab_size(config: Any, vocab) -> Any:
    """The model config with vocab_size set from the vocabulary (rounded up to a multiple of 128)."""
    padded = int(math.ceil(vocab.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if config.vocab_size is not None and config.vocab_size < vocab.vocab_size:
        raise ModelDirError(
            f"{type(config).__name__}.vocab_size={config.vocab_size} is smaller than the task vocabulary "
            f"({vocab.vocab_size} ids); leave it unset so the trainer sets it."
        )
    return config if config.vocab_size is not None else config.replace(vocab_size=padded)


def run_info(
    model: models.Model,
    vocab,
    objective: dict[str, Any],
    dataset,
    teacher,
    *,
    seed: int,
    optimizer: dict[str, Any],
    train_steps: int,
    data_source: str,
    data_order: str,
) -> dict[str, Any]:
    """The run's identity (see the module docstring); JSON-normalised. `objective` is the training
    objective's own entries (`loss_options`, `salt`); `data_source` the source's provenance
    (`cat_jax.data.DataSource.describe()`: recorded, not compared on resume) and `data_order` its
    `DataSource.data_order` (compared)."""
    info = {
        **model.describe(),
        "vocabulary": vocab_info(vocab),
        **objective,
        "dataset": dataset.record(),
        "seed": int(seed),
        "optimizer": optimizer,
        "teacher": teacher.describe() if teacher is not None else None,
        "train_steps": int(train_steps),
        "data_source": data_source,
        "data_order": data_order,  # DataSource.data_order: in memory or streamed, two different orders
    }
    return json.loads(json.dumps(info, default=str))


def write_run_info(model_dir: str, info: dict[str, Any]) -> None:
    """Written atomically: other processes may be reading it in `check_compatible`."""
    path = os.path.join(model_dir, RUN_INFO)
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """ "key: old (in MODEL_DIR) vs new (now)" for every key whose values differ (nested dicts
    compared key by key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} (in MODEL_DIR) vs {b!r} (now)")
    return out


def check_resume(model_dir: str, info: dict[str, Any], *, allow_change: bool) -> dict[str, Any]:
    """The run_info to write when resuming MODEL_DIR with `info`; refuses what cannot or must not
    change silently (see the module docstring). Call only when MODEL_DIR holds a checkpoint."""
    old = read_run_info(model_dir)
    if old is None:
        return info
    if old.get("imported_from") and old.get("dataset") is None:
        raise ModelDirError(
            f"MODEL_DIR {model_dir} holds a model imported from {old['imported_from'].get('source')}, not a "
            f"training run. Fine-tune it into a new MODEL_DIR with --gin.train.initial_checkpoint_dir={model_dir}."
        )
    configs = [
        {"model_family": models.family_of_run_info(old), **models.config_from_run_info(old).to_dict()},
        {"model_family": models.family_of_run_info(info), **info["model_config"]},
    ]
    execution = [{k: c.pop(k, None) for k in EXECUTION_FIELDS} for c in configs]
    switched = [f"model_config.{d}" for d in config_differences(*execution)]
    fixed = config_differences(*configs)
    fixed += [f"vocabulary: {d}" for d in config_differences(old["vocabulary"], info["vocabulary"])]
    if fixed:
        raise ModelDirError(
            f"MODEL_DIR {model_dir} holds a run of a different model:\n  "
            + "\n  ".join(fixed)
            + "\nUse a new MODEL_DIR for this configuration, or restore the old one's settings."
        )
    changes = []
    for key in TRAJECTORY:
        if key in old and old[key] != info[key]:
            a, b = old[key], info[key]
            changes += (
                config_differences(a, b, f"{key}.")
                if isinstance(a, dict) and isinstance(b, dict)
                else [f"{key}: {a!r} (in MODEL_DIR) vs {b!r} (now)"]
            )
    if changes and not allow_change:
        raise ModelDirError(
            f"MODEL_DIR {model_dir} holds a run trained with other settings; resuming it with these "
            f"would silently change its data stream, loss or optimizer:\n  "
            + "\n  ".join(changes)
            + f"\nResume with the recorded settings ({os.path.join(model_dir, 'config.gin')} holds the "
            "command's configuration), use a new MODEL_DIR, or pass --gin.train.allow_config_change=True "
            "to continue with the new settings (recorded in run_info.json's history)."
        )
    history = list(old.get("history", []))
    if switched:
        log.info("Resuming %s with a changed execution setting:\n  %s", model_dir, "\n  ".join(switched))
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "execution_changes": switched})
    if old.get("train_steps") not in (None, info["train_steps"]):
        log.info(
            "TRAIN_STEPS is %d (the run was started with %s): the learning-rate schedule now spans the new count.",
            info["train_steps"],
            old["train_steps"],
        )
        history.append(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "train_steps": [old["train_steps"], info["train_steps"]]}
        )
    if changes:
        log.warning(
            "train.allow_config_change=True: resuming %s with changed settings:\n  %s", model_dir, "\n  ".join(changes)
        )
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "allowed_changes": changes})
    return {**info, "history": history} if history else info
