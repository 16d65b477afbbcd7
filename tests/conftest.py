"""Test-wide setup, done before JAX is imported.

- four simulated CPU devices, so data-parallel code runs as on a pod;
- offline Hugging Face;
- a persistent XLA compilation cache shared by every test and every
  subprocess a test starts: the same programs (train step, eval step) are
  compiled by many tests, and a cache hit skips the compile.
"""

import os
import tempfile

# Four simulated CPU devices, kept when the caller sets other XLA_FLAGS
# (e.g. --xla_cpu_multi_thread_eigen=false): the tests assume four devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (
      os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=4")))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"hysac-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
