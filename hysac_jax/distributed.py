"""Starting JAX's multi-process runtime for pods and clusters."""

import os

import jax

# Environment variables that mean "this process is one of many".
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_NUM_SLICES")


def _auto_cluster():
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_s=300):
  """Calls `jax.distributed.initialize` when the run is multi-process.

  Explicit arguments win; otherwise Slurm, Open MPI and TPU pod slices are
  detected from their environment. A single process does nothing.

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: total processes.
    process_id: this process's index.
    timeout_s: how long to wait for the coordinator before failing.
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes,
                                         process_id))
  if explicit:
    missing = [name for name, v in (("--coordinator_address",
                                     coordinator_address),
                                    ("--num_processes", num_processes),
                                    ("--process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"multi-process run needs {', '.join(missing)} too")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_s)
  elif _auto_cluster():
    jax.distributed.initialize(initialization_timeout=timeout_s)
