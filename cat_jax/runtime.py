"""Process start-up shared by the entry points: logging and the multi-controller runtime.

`initialize()` calls `jax.distributed.initialize` when the job spans several processes: on a TPU
VM slice JAX finds its peers itself (gin `initialize.auto = True` is set by the TPU launcher); on GPU
hosts or SLURM the coordinator address, process count and id come from gin or from the
environment variables `CAT_JAX_COORDINATOR`, `CAT_JAX_NUM_PROCESSES`, `CAT_JAX_PROCESS_ID`.
`CAT_JAX_CPU_COLLECTIVES=gloo` (or gin `initialize.cpu_collectives`) lets several CPU-only processes
run collectives (the multi-process tests).

Every process runs the same program; only process 0 writes the model directory's metadata and
metric files and logs at INFO level. The other processes log warnings and errors, each line
tagged with its process (`[p3/8]`), so that a failure on one host can be told apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

import gin
import jax

from cat_jax.errors import ConfigError, Terminated

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def is_lead() -> bool:
    """True on process 0, the one process that writes shared files (metrics, run_info, configs)."""
    return jax.process_index() == 0


def setup_logging() -> None:
    """INFO logs on stderr for process 0; warnings only on the other processes.

    With several processes the non-lead processes tag every line with `[p<index>/<count>]`;
    process 0's lines keep the single-process format (`HH:MM:SS LEVEL message`).
    """
    index, count = jax.process_index(), jax.process_count()
    level = logging.INFO if index == 0 else logging.WARNING
    fmt = _FORMAT if index == 0 else f"%(asctime)s [p{index}/{count}] %(levelname)s %(message)s"
    logger = logging.getLogger("cat_jax")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    logger.setLevel(level)
    logger.propagate = False
    if index != 0:
        # orbax and absl log every checkpoint step at INFO/WARNING on every host; one copy is enough.
        logging.getLogger("absl").setLevel(logging.ERROR)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r} must be an integer.") from None


@gin.configurable
def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    cpu_collectives: str | None = None,
) -> None:
    """Join the multi-process runtime when configured, then set up logging.

    Gin parameters win over the `CAT_JAX_*` environment variables. A second call (e.g. a binary
    that calls another's main) does not initialize again.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("CAT_JAX_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("CAT_JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("CAT_JAX_PROCESS_ID")
    cpu_collectives = cpu_collectives or env.get("CAT_JAX_CPU_COLLECTIVES") or None
    if not jax.distributed.is_initialized():
        if cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        if auto:
            jax.distributed.initialize()
        elif coordinator_address:
            if num_processes is None or process_id is None:
                raise ConfigError(
                    f"Coordinator {coordinator_address} given without the process count and id; set "
                    f"CAT_JAX_NUM_PROCESSES and CAT_JAX_PROCESS_ID (or gin initialize.num_processes "
                    f"and initialize.process_id) on every process."
                )
            if not 0 <= process_id < num_processes:
                raise ConfigError(f"Process id {process_id} is outside [0, {num_processes}).")
            jax.distributed.initialize(
                coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
            )
    setup_logging()
    if jax.process_count() > 1:
        logging.getLogger("cat_jax").info(
            "Runtime: %d processes, %d devices (%d local to each process).",
            jax.process_count(),
            jax.device_count(),
            jax.local_device_count(),
        )


def sync(name: str) -> None:
    """Wait until every process has reached the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# What the process is doing, what is safely on disk and where it writes, for the messages SIGTERM
# and a full disk print.
_STATUS = {"doing": "during start-up", "on_disk": "Nothing was written.", "output_dir": None}


def _raise_terminated(signum, frame) -> None:  # pylint: disable=unused-argument
    raise Terminated()


def install_sigterm_handler() -> None:
    """SIGTERM raises `Terminated` (caught by `gin_utils.run`, which reports `termination_report`).

    Phases that must finish what they do first (the training loop: save, then stop) install their
    own handler for their duration (`trainer.PreemptionWatcher`).
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def phase(doing: str, on_disk: str | None = None) -> Iterator[None]:
    """Within the block, a SIGTERM report says "while <doing>" (and `on_disk`, when given); an
    exception leaves the block's status in place, for the report of the error that ends the job."""
    previous = dict(_STATUS)
    _STATUS["doing"] = f"while {doing}"
    if on_disk is not None:
        _STATUS["on_disk"] = on_disk
    yield
    _STATUS.update(previous)


def set_on_disk(text: str) -> None:
    """What a SIGTERM report says is saved from now on (e.g. "The latest checkpoint is step 200")."""
    _STATUS["on_disk"] = text


def set_output_dir(path: str) -> None:
    """The directory this job writes (named when a write fails without naming its file)."""
    _STATUS["output_dir"] = path


def output_dir() -> str | None:
    return _STATUS["output_dir"]


def termination_report() -> str:
    """ "while <phase>. <what is on disk>" for the message printed after SIGTERM."""
    return f"{_STATUS['doing']}. {_STATUS['on_disk']}"
