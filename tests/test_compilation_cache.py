"""hysac_jax/compilation_cache.py: where the persistent XLA cache goes."""

import json
import os

import jax

from configs import vitl14
from hysac_jax import compilation_cache
from hysac_jax import config as config_lib


def test_environment_variable_wins_then_config_then_off(monkeypatch,
                                                        tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert compilation_cache.cache_dir("~/elsewhere") == str(tmp_path / "env")
  assert compilation_cache.cache_dir("") == str(tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compilation_cache.cache_dir() == str(
      tmp_path / ".cache" / "hysac_jax" / "xla")
  assert compilation_cache.cache_dir("") is None
  assert compilation_cache.enable("") is None


def test_the_config_field_defaults_also_for_runs_saved_before_it(tmp_path):
  config = vitl14.get_config()
  assert (config.train.compilation_cache_dir
          == compilation_cache.DEFAULT_DIR == "~/.cache/hysac_jax/xla")
  # A run's config.json from before the field existed reads back with it.
  (tmp_path / "config.json").write_text(json.dumps({"train": {"epochs": 1}}))
  old = config_lib.load_run_config(tmp_path)
  assert old.train.epochs == 1
  assert old.train.compilation_cache_dir == compilation_cache.DEFAULT_DIR


def test_enable_points_jax_at_the_directory(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  before = jax.config.jax_compilation_cache_dir
  try:
    path = compilation_cache.enable(str(tmp_path / "xla"))
    assert path == str(tmp_path / "xla")
    assert jax.config.jax_compilation_cache_dir == path
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  assert os.path.isabs(path)
