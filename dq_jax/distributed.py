"""Multi-host start-up: `jax.distributed.initialize()` when running on several processes."""
from __future__ import annotations

import os

from absl import logging

# Environment variables that mean "this is one process of a multi-process job".
_MULTI_PROCESS_ENV = ("DQ_JAX_COORDINATOR", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                      "OMPI_COMM_WORLD_SIZE")


def maybe_initialize() -> bool:
    """Initialises the JAX multi-host runtime if the environment asks for it.

    Explicit (GPU clusters, tests): DQ_JAX_COORDINATOR=host:port,
    DQ_JAX_NUM_PROCESSES, DQ_JAX_PROCESS_ID. DQ_JAX_DISTRIBUTED=auto (set by
    launch/tpu_vm.sh on pod slices), TPU_WORKER_HOSTNAMES with several hosts,
    SLURM or MPI: JAX's own auto-detection. A single-process run does nothing.
    """
    import jax
    if os.environ.get("DQ_JAX_COORDINATOR"):
        missing = [k for k in ("DQ_JAX_NUM_PROCESSES", "DQ_JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"DQ_JAX_COORDINATOR is set but {', '.join(missing)} is not; set all "
                             "three (see launch/multi_gpu.sh).")
        jax.distributed.initialize(
            coordinator_address=os.environ["DQ_JAX_COORDINATOR"],
            num_processes=int(os.environ["DQ_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["DQ_JAX_PROCESS_ID"]))
    elif os.environ.get("DQ_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    elif any(os.environ.get(k) for k in _MULTI_PROCESS_ENV[1:]):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "," not in hosts and not os.environ.get("SLURM_NTASKS") and \
                not os.environ.get("OMPI_COMM_WORLD_SIZE"):
            return False  # a single TPU VM host: nothing to coordinate
        jax.distributed.initialize()
    else:
        return False
    logging.info("jax.distributed initialised: process %d of %d.", jax.process_index(),
                 jax.process_count())
    return True
