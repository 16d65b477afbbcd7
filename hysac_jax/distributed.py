"""Starting JAX's multi-process runtime on pods and clusters.

  distributed.initialize()                                # TPU pod, Slurm, MPI
  distributed.initialize("10.0.0.1:1234", num_processes=4, process_id=2)

Every process of a multi-process run calls this once, before any other JAX
call. Process 0 hosts the coordinator; the others connect to it. After it,
`jax.devices()` lists the devices of all processes and one jitted program runs
over all of them (`hysac_jax.training.step.make_mesh`).

JAX aborts a process that cannot register with the coordinator within
`initialization_timeout` from C++ (SIGABRT, "DEADLINE_EXCEEDED ...
RegisterTask"), with no Python exception. So a non-coordinator process first
checks that the coordinator's port answers, and raises a `ConnectionError`
naming the address when it does not within the timeout.
"""

import math
import os
import socket
import sys
import time

import jax

# Environment variables that say "this process is one of many".
_SLURM, _OPENMPI, _TPU = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                          "TPU_WORKER_HOSTNAMES")


def detected_cluster(environ=None):
  """The cluster JAX can configure itself on, or None for a single process.

  Args:
    environ: the environment to read (default `os.environ`, which also
      checks for a Cloud TPU VM).

  Returns:
    "slurm", "openmpi" or "tpu" when the environment describes more than one
    process of that kind (or this is a Cloud TPU VM), else None.
  """
  env = os.environ if environ is None else environ
  if int(env.get(_SLURM, "1") or 1) > 1:
    return "slurm"
  if int(env.get(_OPENMPI, "1") or 1) > 1:
    return "openmpi"
  hosts = [h for h in env.get(_TPU, "").split(",") if h.strip()]
  if len(hosts) > 1:
    return "tpu"
  if environ is None and _on_cloud_tpu_vm():
    # GCE TPU VMs describe the slice in instance metadata, not in the
    # environment; JAX reads it and recommends initializing on any TPU VM.
    return "tpu"
  return None


def _on_cloud_tpu_vm():
  try:  # JAX's own check (libtpu and TPU device files); private, so guarded.
    # A private JAX module: imported under the guard, for this check only.
    from jax._src import cloud_tpu_init
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return False


def parse_address(address):
  """"host:port" (or "[v6]:port") -> (host, port); ValueError when malformed."""
  host, sep, port = str(address).rpartition(":")
  host = host.strip("[]")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={address!r}: expected HOST:PORT, "
                     "e.g. 10.0.0.1:1234 (the address of process 0)")
  return host, int(port)


def wait_for_coordinator(address, timeout_s, process_id=None):
  """Returns once a TCP connection to `address` succeeds.

  Args:
    address: "host:port" of the coordinator (process 0).
    timeout_s: seconds to keep retrying (process 0 may start later).
    process_id: this process, for the message.

  Raises:
    ConnectionError: nothing answered within `timeout_s`; names the address.
  """
  host, port = parse_address(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    left = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(min(left, 5), 0.1)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      break
    time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
  who = "" if process_id is None else f"process {process_id}: "
  raise ConnectionError(
      f"{who}cannot reach the coordinator at {host}:{port} within "
      f"{timeout_s:g} s ({last}). Is process 0 running with the same "
      "--coordinator_address, and is that port open between the hosts?")


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_s=300):
  """Calls `jax.distributed.initialize` when the run is multi-process.

  Explicit arguments win; otherwise Slurm, Open MPI and TPU pod slices are
  detected from their environment (`detected_cluster`). A single process
  does nothing.

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: total processes.
    process_id: this process's index in [0, num_processes).
    timeout_s: how long to wait for the coordinator (and, on process 0, for
      the other processes) before failing.

  Returns:
    True when the distributed runtime was started.

  Raises:
    ValueError: incomplete or inconsistent arguments.
    ConnectionError: a non-coordinator process cannot reach the coordinator
      within `timeout_s`.
  """
  given = {"--coordinator_address": coordinator_address,
           "--num_processes": num_processes, "--process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [name for name, v in given.items() if v is None]
    if missing:
      raise ValueError(f"a multi-process run needs {', '.join(missing)} too "
                       f"(got {', '.join(k for k in given if k not in missing)})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is outside [0, "
                       f"--num_processes={num_processes})")
    parse_address(coordinator_address)
    if num_processes == 1:
      return False
    if process_id == 0:
      print(f"process 0/{num_processes}: coordinator on {coordinator_address}"
            f", waiting up to {timeout_s:g} s for the others", file=sys.stderr)
    else:
      wait_for_coordinator(coordinator_address, timeout_s, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=math.ceil(timeout_s))
    return True
  if detected_cluster() is not None:
    jax.distributed.initialize(initialization_timeout=math.ceil(timeout_s))
    return True
  return False
