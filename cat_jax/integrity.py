"""Checksums of finished checkpoint steps, their verification, and moving damaged steps aside.

Finishing a save records the size and SHA-256 of every file of the step in
`<directory>/checkpoint_integrity/<step>.json`, computed on the step's temporary directory just
before orbax renames it to `<directory>/<step>/` (`cat_jax.checkpoints`), so a step never exists
under its final name without its record. Before a step is restored its files are checked against
that record: a missing file (a removed `_METADATA`, manifest, `state/` or `metadata/`), one that
cannot be read, a truncated one or a single flipped bit is reported by name. A damaged step of a
training run is moved to `<directory>/damaged_checkpoints/<step>` (nothing is deleted) and the
previous step is tried; a step without a record cannot be verified and is treated the same way.

orbax's own bookkeeping at the top of a step (`_CHECKPOINT_METADATA`, rewritten with the commit
time as the step is finished, and `commit_success.txt`) is not recorded; every item's files are.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

INTEGRITY_DIR = "checkpoint_integrity"
DAMAGED_DIR = "damaged_checkpoints"
_CHUNK = 1 << 22
# orbax writes these at the top of a step while finishing it, after the record is taken.
_NOT_RECORDED = ("_CHECKPOINT_METADATA", "commit_success.txt")


def step_dir(directory: str, step: int) -> str:
    """orbax's directory of a step (its default naming: the step number)."""
    return os.path.join(directory, str(int(step)))


def record_path(directory: str, step: int) -> str:
    return os.path.join(directory, INTEGRITY_DIR, f"{int(step)}.json")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(path: str) -> dict[str, list]:
    """{relative path: [size in bytes, sha256]} of every file under `path` (but orbax's top-level
    bookkeeping, `_NOT_RECORDED`)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel not in _NOT_RECORDED:
                out[rel] = [os.path.getsize(full), _sha256(full)]
    return dict(sorted(out.items()))


def write_record(directory: str, step: int, source: str | None = None) -> float:
    """Record the checksums of step `step`'s files (atomically), read from `source` (the step's
    temporary directory, before it is renamed) or from the step's directory; returns the seconds
    it took."""
    started = time.perf_counter()
    record = {"step": int(step), "files": file_digests(source or step_dir(directory, step))}
    path = record_path(directory, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    return time.perf_counter() - started


def problems(directory: str, step: int) -> list[str] | None:
    """What is wrong with a step's files ([] if nothing), or None when it has no record."""
    path = record_path(directory, step)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"its checksum record {path} is unreadable ({e})"]
    base = step_dir(directory, step)
    found = []
    for rel, (size, digest) in recorded.items():
        full = os.path.join(base, rel)
        try:
            have = os.stat(full).st_size
            if have != size:
                found.append(f"{rel} has {have} bytes, {size} were written")
            elif _sha256(full) != digest:
                found.append(f"{rel} does not match its checksum (its contents changed after the save)")
        except FileNotFoundError:
            found.append(f"{rel} is missing")
        except OSError as e:
            found.append(f"{rel} cannot be read ({e.strerror or e})")
    return found


def remove_record(directory: str, step: int) -> None:
    try:
        os.remove(record_path(directory, step))
    except FileNotFoundError:
        pass


def quarantine(directory: str, step: int) -> str:
    """Move a damaged step (and its record) to `<directory>/damaged_checkpoints/`; returns where.

    A rename, never a copy: a step that cannot be renamed (no permission) raises OSError and stays
    whole where it is.
    """
    target_dir = os.path.join(directory, DAMAGED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{int(step)}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(step_dir(directory, step), target)
    record = record_path(directory, step)
    if os.path.exists(record):
        os.replace(record, os.path.join(target, "checksums.json"))
    return target


def quarantined(directory: str) -> list[str]:
    """The damaged steps moved aside so far (their directory names)."""
    path = os.path.join(directory, DAMAGED_DIR)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def step_checksum(directory: str, step: int) -> str | None:
    """One SHA-256 over a step's recorded file sizes and digests (what identifies its parameters:
    a teacher cache records it), or None when the step has no record."""
    path = record_path(directory, step)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        files = json.load(f)["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
