"""Process start-up shared by the entry points: logging and the multi-controller runtime.

`initialize()` calls `jax.distributed.initialize` when the job spans several processes: on a TPU
VM slice JAX finds its peers itself (gin `initialize.auto = True` is set by the TPU launcher); on GPU
hosts or SLURM the coordinator address, process count and id come from gin or from the
environment variables `CAT_JAX_COORDINATOR`, `CAT_JAX_NUM_PROCESSES`, `CAT_JAX_PROCESS_ID`.
"""

from __future__ import annotations

import logging
import os
import sys

import gin
import jax


def setup_logging() -> None:
    """INFO logs on stderr for process 0; warnings only on the other processes."""
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logger = logging.getLogger("cat_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@gin.configurable
def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               cpu_collectives: str | None = None) -> None:
    """Join the multi-process runtime when configured, then set up logging."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("CAT_JAX_COORDINATOR")
    if num_processes is None and "CAT_JAX_NUM_PROCESSES" in env:
        num_processes = int(env["CAT_JAX_NUM_PROCESSES"])
    if process_id is None and "CAT_JAX_PROCESS_ID" in env:
        process_id = int(env["CAT_JAX_PROCESS_ID"])
    if cpu_collectives or env.get("CAT_JAX_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation",
                          cpu_collectives or env["CAT_JAX_CPU_COLLECTIVES"])
    if auto:
        jax.distributed.initialize()
    elif coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    setup_logging()
