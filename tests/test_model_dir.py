"""MODEL_DIR's trainer lock: one holder, named when refused; stale locks taken over, logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cat_jax import model_dir as model_dir_lib
from cat_jax.errors import ModelDirError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, **holder) -> str:
    path = os.path.join(directory, model_dir_lib.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def test_a_second_taker_is_refused_with_the_holder_and_release_frees_it(tmp_path):
    held = model_dir_lib.lock(str(tmp_path))
    path = tmp_path / model_dir_lib.LOCK_FILE
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(
        ModelDirError,
        match=rf"in use by another trainer: pid {os.getpid()} on host "
        rf"{socket.gethostname()}",
    ):
        model_dir_lib.lock(str(tmp_path))
    held.release()
    assert not path.exists()
    model_dir_lib.lock(str(tmp_path)).release()


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over_and_logged(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=pid, since="earlier")
    with caplog.at_level("WARNING", logger="cat_jax"):
        held = model_dir_lib.lock(str(tmp_path))
    assert f"Took over the stale lock of MODEL_DIR {tmp_path}" in caplog.text
    assert f"pid {pid} on host {socket.gethostname()}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / model_dir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert [p.name for p in tmp_path.iterdir()] == [model_dir_lib.LOCK_FILE]  # nothing else left
    held.release()


LINUX_PROC = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc/<pid>/stat (Linux)")


@LINUX_PROC
def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The lock names a live pid whose process started at another time: its holder is gone."""
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start="1")
    model_dir_lib.lock(str(tmp_path)).release()


def test_another_hosts_lock_is_kept_while_refreshed_and_taken_over_once_stale(tmp_path, caplog):
    path = _write_lock(tmp_path, host="other-host", pid=1)
    with pytest.raises(ModelDirError, match="pid 1 on host other-host"):
        model_dir_lib.lock(str(tmp_path))
    old = time.time() - model_dir_lib.LOCK_STALE_S - 5
    os.utime(path, (old, old))
    with caplog.at_level("WARNING", logger="cat_jax"):
        model_dir_lib.lock(str(tmp_path)).release()
    assert "last refreshed it" in caplog.text


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(model_dir_lib, "LOCK_HEARTBEAT_S", 0.05)
    held = model_dir_lib.lock(str(tmp_path))
    path = tmp_path / model_dir_lib.LOCK_FILE
    os.utime(path, (1, 1))
    deadline = time.time() + 10
    while path.stat().st_mtime < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > time.time() - 60
    held.release()


@LINUX_PROC
def test_a_killed_process_not_yet_reaped_does_not_keep_a_lock(tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(
            tmp_path, host=socket.gethostname(), pid=proc.pid, process_start=model_dir_lib._process_start(proc.pid)
        )  # pylint: disable=protected-access
        with pytest.raises(ModelDirError, match=f"pid {proc.pid}"):
            model_dir_lib.lock(str(tmp_path))
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.time() + 30
        state = model_dir_lib._proc_stat  # pylint: disable=protected-access
        while state(proc.pid)[0] != "Z" and time.time() < deadline:
            time.sleep(0.01)
        model_dir_lib.lock(str(tmp_path)).release()  # a zombie: its pid still answers, it holds nothing
    finally:
        proc.kill()
        proc.wait()
