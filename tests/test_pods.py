"""Multi-process training: hysac_jax/distributed.py and the trainer on a "pod".

The pod is two `train.py` processes on 127.0.0.1, each with 2 simulated CPU
devices, coordinated by `jax.distributed.initialize` on a free port: one
4-device mesh, as on two hosts of a TPU slice. Its results are compared with
a single-process run that sees the same global batches.

Every subprocess runs under a timeout and is killed if the test fails.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hysac_jax import distributed
from hysac_jax import pretrained
from hysac_jax.data import pipeline
from hysac_jax.training import loop as loop_lib

import tiny_runs

ROOT = tiny_runs.ROOT
POD_PROCESSES, POD_LOCAL_DEVICES = 2, 2
# 4 steps of 4 devices x 8 quadruples in one epoch, a checkpoint every 2;
# 40 validation examples in one global batch of 64: 24 padding rows.
OVERRIDES = {
    **tiny_runs.MICRO_OVERRIDES,
    "data.synthetic_sizes": (128, 40, 16),
    "train.epochs": 1,
    # LoRA and head only, as the paper trains. A full fine-tune would also
    # train weights whose gradient is exactly zero up to rounding (the key
    # biases: softmax ignores them), and Adam turns that rounding noise into
    # full-size steps that differ between device layouts.
    "model.train_base": False,
}
TIMEOUT_S = 420  # per subprocess: a hang fails the test, never the suite


def pod_config(data_dir, **extra):
  return tiny_runs.tiny_config(data_dir, {**OVERRIDES, **extra})


def cli_flags(data_dir, **extra):
  return tiny_runs.tiny_cli_flags(data_dir, {**OVERRIDES, **extra})


def env_with_devices(n):
  """This environment with n simulated devices; other XLA flags (e.g.
  --xla_cpu_multi_thread_eigen=false) and the XLA cache dir set by
  conftest.py come along."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
              PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """Started subprocesses, killed on exit unless they finished."""

  def __init__(self):
    self.procs = []

  def start(self, cmd, log_path, env):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    self.procs.append(proc)
    return proc

  def wait_all(self, timeout_s):
    deadline = time.monotonic() + timeout_s
    for proc in self.procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return [p.returncode for p in self.procs]

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- helpers ---


def checkpoint_state(workdir, step=None, kind="checkpoints"):
  """(step, state item) of a run's checkpoint as numpy (latest by default)."""
  root = Path(workdir) / kind
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
  step = steps[-1] if step is None else step
  path = root / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  # As numpy: the pod's devices do not exist in this process.
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          tree)
  return step, checkpointer.restore(path, restore_args=as_numpy)


def assert_trees_close(a, b, atol):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def metrics_lines(workdir):
  return [json.loads(l) for l in
          (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------- fixtures ---


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def pod_and_reference(data_dir, tmp_path_factory):
  """The 2 x 2 pod run (train.py) and the 1 x 4 run on its global batches.

  The reference trains in this process while the pod runs.

  Returns:
    dict of pod workdir, reference workdir, the process logs and summaries.
  """
  pod = tmp_path_factory.mktemp("pod")
  ref = tmp_path_factory.mktemp("reference")
  logs = tmp_path_factory.mktemp("logs")
  # Build the dataset first: the reference and the pod share data_dir.
  config = pod_config(data_dir)
  image_size = pretrained.model_from_config(config).clip.vision.image_size
  pipeline.open_builder(config.data, image_size)
  address = f"127.0.0.1:{free_port()}"
  cmd = ([sys.executable, str(ROOT / "train.py"), f"--workdir={pod}",
          f"--coordinator_address={address}",
          f"--num_processes={POD_PROCESSES}"] + cli_flags(data_dir))
  with Processes() as procs:
    for p in range(POD_PROCESSES):
      procs.start(cmd + [f"--process_id={p}"], logs / f"process_{p}.log",
                  env_with_devices(POD_LOCAL_DEVICES))
    # Each process takes a contiguous block of every global batch, so one
    # process on 4 devices sees the same global batches as the pod.
    ref_summary = loop_lib.train_and_evaluate(config, ref)
    try:
      codes = procs.wait_all(TIMEOUT_S)
    except subprocess.TimeoutExpired:
      codes = None
    outputs = [(logs / f"process_{p}.log").read_text()
               for p in range(POD_PROCESSES)]
    if codes != [0] * POD_PROCESSES:
      pytest.fail(f"pod run failed or hung (exit codes {codes}):\n" + "\n".join(
          f"--- process {p} ---\n{out[-3000:]}" for p, out in
          enumerate(outputs)))
  return {"pod": pod, "ref": ref, "outputs": outputs,
          "ref_summary": ref_summary, "config": config}


# ------------------------------------------------------------ pod training ---


@pytest.mark.slow
def test_pod_params_equal_a_single_process_run_on_the_same_global_batches(
    pod_and_reference):
  r = pod_and_reference
  for step in (2, 4):
    step_pod, pod_state = checkpoint_state(r["pod"], step)
    _, ref_state = checkpoint_state(r["ref"], step)
    assert int(pod_state["step"]) == step
    assert_trees_close(pod_state, ref_state, atol=1e-5)
  # Training moved the params: equality is not just "both at init".
  _, first = checkpoint_state(r["pod"], 2)
  _, last = checkpoint_state(r["pod"], 4)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(first["trainable"]),
                              jax.tree.leaves(last["trainable"])))
  assert moved > 1e-4


@pytest.mark.slow
def test_pod_metrics_are_global_and_logged_once_by_process_zero(
    pod_and_reference):
  r = pod_and_reference
  pod, ref = metrics_lines(r["pod"]), metrics_lines(r["ref"])
  # One start-up record, one line per logged step (2, 4) and one
  # validation: not one per process.
  assert [(l["step"], l["kind"]) for l in pod] == [
      (0, "startup"), (2, "train"), (4, "train"), (4, "val")]
  assert [(l["step"], l["kind"]) for l in ref] == [
      (l["step"], l["kind"]) for l in pod]
  for a, b in zip(pod, ref):
    for key in ("loss", "contrastive_safe", "entail_unsafe", "grad_norm", "curv",
                "recall_sum", "dist0_U"):
      if key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5), (a["kind"], key)
  # The progress bar, epoch lines and the summary come from process 0 only.
  out0, out1 = r["outputs"]
  assert out0.count("epoch 1: val loss") == 1
  assert '"steps": 4' in out0
  assert out0.count("startup: compile ") == 1
  for text in ("epoch 1: val loss", '"steps"', "train:", "validation:",
               "startup:"):
    assert text not in out1, text


@pytest.mark.slow
def test_pod_validation_counts_every_example_once(pod_and_reference):
  # 40 validation examples padded to a global batch of 64 across two
  # processes: the recall sum and bounds see each example exactly once,
  # as in the single-process run.
  r = pod_and_reference
  val_pod = [l for l in metrics_lines(r["pod"]) if l["kind"] == "val"][0]
  val_ref = [l for l in metrics_lines(r["ref"]) if l["kind"] == "val"][0]
  assert val_pod["recall_sum"] == pytest.approx(val_ref["recall_sum"],
                                                abs=1e-9)
  bounds_pod = json.loads((r["pod"] / "bounds.json").read_text())
  bounds_ref = json.loads((r["ref"] / "bounds.json").read_text())
  assert bounds_pod.keys() == bounds_ref.keys()
  for group in bounds_pod:
    for stat, value in bounds_pod[group].items():
      if isinstance(value, (int, float)):
        assert value == pytest.approx(bounds_ref[group][stat], abs=1e-4), (
            group, stat)


# -------------------------------------------------- resume on fewer hosts ---


def _mid_run_copy(pod, dest):
  """A copy of the pod workdir holding only its step-2 checkpoint."""
  shutil.copytree(pod, dest)
  shutil.rmtree(dest / "checkpoints" / "4")
  return dest


@pytest.mark.slow
def test_pod_checkpoint_resumes_on_one_process_with_four_devices(
    pod_and_reference, tmp_path):
  r = pod_and_reference
  workdir = _mid_run_copy(r["pod"], tmp_path / "resumed")
  summary = loop_lib.train_and_evaluate(r["config"], workdir, resume=True)
  assert summary["steps"] == 4
  _, pod_final = checkpoint_state(r["pod"], 4)
  _, resumed_final = checkpoint_state(workdir, 4)
  assert_trees_close(resumed_final, pod_final, atol=1e-5)


@pytest.mark.slow
def test_pod_checkpoint_resumes_on_one_process_with_one_device(
    pod_and_reference, tmp_path):
  # One device keeps the global batch of 32 with 32 rows per device.
  r = pod_and_reference
  workdir = _mid_run_copy(r["pod"], tmp_path / "resumed")
  cmd = ([sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}"]
         + cli_flags(r["config"].data.data_dir,
                     **{"data.batch_size_per_device": 32,
                        "data.eval_batch_size_per_device": 64}))
  with Processes() as procs:
    proc = procs.start(cmd, tmp_path / "one_device.log", env_with_devices(1))
    proc.wait(timeout=TIMEOUT_S)
  out = (tmp_path / "one_device.log").read_text()
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from step 2" in out
  assert '"steps": 4' in out
  _, pod_final = checkpoint_state(r["pod"], 4)
  _, resumed_final = checkpoint_state(workdir, 4)
  assert_trees_close(resumed_final, pod_final, atol=1e-5)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_every_process_at_the_same_step(
    data_dir, tmp_path):
  # SIGTERM reaches process 1 only. The distributed runtime's preemption
  # service (no per-step collective of ours) makes both save the same step.
  pod = tmp_path / "pod"
  config = pod_config(data_dir)
  image_size = pretrained.model_from_config(config).clip.vision.image_size
  pipeline.open_builder(config.data, image_size)
  address = f"127.0.0.1:{free_port()}"
  total = 4 * 40
  cmd = ([sys.executable, str(ROOT / "train.py"), f"--workdir={pod}",
          f"--coordinator_address={address}",
          f"--num_processes={POD_PROCESSES}"]
         + cli_flags(data_dir, **{"train.epochs": 40, "train.patience": 100,
                                  "train.checkpoint_every": 0}))
  with Processes() as procs:
    for p in range(POD_PROCESSES):
      procs.start(cmd + [f"--process_id={p}"], tmp_path / f"process_{p}.log",
                  env_with_devices(POD_LOCAL_DEVICES))
    deadline = time.monotonic() + TIMEOUT_S
    metrics = pod / "metrics.jsonl"
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
      assert time.monotonic() < deadline, "the pod logged no train step"
      assert all(p.poll() is None for p in procs.procs), "a process ended"
      time.sleep(0.2)
    procs.procs[1].send_signal(signal.SIGTERM)
    codes = procs.wait_all(TIMEOUT_S)
  outputs = [(tmp_path / f"process_{p}.log").read_text()
             for p in range(POD_PROCESSES)]
  assert codes == [75, 75], "\n".join(out[-2000:] for out in outputs)
  step, _ = checkpoint_state(pod)
  assert 0 < step < total
  assert f"saved step {step} in" in outputs[0]
  assert "preemption service" in outputs[0]


# ------------------------------------------------------ failing to start ---


def _initialize_cmd(address, process_id, timeout_s):
  code = ("import sys; from hysac_jax import distributed; "
          f"distributed.initialize({address!r}, num_processes=2, "
          f"process_id={process_id}, timeout_s={timeout_s})")
  return [sys.executable, "-c", code]


@pytest.mark.slow
def test_unreachable_coordinator_fails_in_bounded_time_with_a_clear_message(
    tmp_path):
  address = f"127.0.0.1:{free_port()}"  # nobody listens there
  with Processes() as procs:
    worker = procs.start(_initialize_cmd(address, 1, 2), tmp_path / "w.log",
                         env_with_devices(2))
    # Process 0 alone: JAX gives up waiting for process 1 (it aborts).
    alone = procs.start(_initialize_cmd(f"127.0.0.1:{free_port()}", 0, 2),
                        tmp_path / "c.log", env_with_devices(2))
    try:
      procs.wait_all(120)
    except subprocess.TimeoutExpired:
      pytest.fail("distributed.initialize hung past its timeout")
  out = (tmp_path / "w.log").read_text()
  assert worker.returncode != 0
  assert "ConnectionError: process 1: cannot reach the coordinator at " \
      f"{address} within 2 s" in out, out[-2000:]
  assert alone.returncode != 0
  assert "DEADLINE_EXCEEDED" in (tmp_path / "c.log").read_text()


@pytest.mark.parametrize("args,match", [
    (("127.0.0.1:1234", None, 0), "--num_processes"),
    ((None, 2, None), "--coordinator_address, --process_id"),
    (("127.0.0.1:1234", 2, 2), "--process_id=2 is outside"),
    (("127.0.0.1", 2, 1), "expected HOST:PORT"),
    (("127.0.0.1:http", 2, 1), "expected HOST:PORT"),
])
def test_incomplete_or_bad_arguments_name_the_flag(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*args)


def test_single_process_and_plain_environments_start_nothing(monkeypatch):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False


@pytest.mark.parametrize("environ,cluster", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "8"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
])
def test_clusters_are_detected_from_their_environment(environ, cluster):
  assert distributed.detected_cluster(environ) == cluster


def test_parse_address_accepts_ipv6_brackets():
  assert distributed.parse_address("[::1]:8476") == ("::1", 8476)
  assert distributed.parse_address("node-0.cluster:1234") == (
      "node-0.cluster", 1234)
