"""JAX's persistent compilation cache, on by default for train.py and eval.py.

A cache hit skips XLA's compile of a program already compiled with the same
shapes, flags and JAX version (the train step, the eval step): a restarted
or preempted run, or a second run of the same config, starts in seconds
instead of minutes.

Where: `$JAX_COMPILATION_CACHE_DIR` when it is set (it takes precedence),
else `config.train.compilation_cache_dir` (default `~/.cache/hysac_jax/xla`;
`''` turns the cache off). On a multi-host run a directory every host sees
lets them share entries; a host-local one works too.
"""

import os

import jax

DEFAULT_DIR = "~/.cache/hysac_jax/xla"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"


def cache_dir(configured=DEFAULT_DIR):
  """The directory to use: the environment's, else `configured` expanded;
  None when both are empty (cache off)."""
  path = os.environ.get(ENV_VAR) or configured
  if not path:
    return None
  return os.path.abspath(os.path.expanduser(path))


def enable(configured=DEFAULT_DIR):
  """Turns the persistent cache on (before the first compile); returns its
  directory, or None when it stays off."""
  path = cache_dir(configured)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
  return path
