"""Helpers shared by the tests that train, save or serve `configs/tiny.py`
models: configs, run directories, converted directories."""

import math
import os
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from configs import tiny
from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import config as config_lib
from hysac_jax import convert
from hysac_jax import pretrained
from hysac_jax import safety
from hysac_jax.data import pipeline
from hysac_jax.training import restore as restore_lib
from hysac_jax.training import step as step_lib

ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per epoch: 4 steps of 4 devices x 8 quadruples
# per epoch, a checkpoint every 2 steps.
MICRO_OVERRIDES = {
    "data.synthetic_sizes": (128, 64, 64),
    "data.batch_size_per_device": 8,
    "data.eval_batch_size_per_device": 16,
    "data.num_workers": 0,
    "train.epochs": 2,
    "train.log_every": 2,
    "train.checkpoint_every": 2,
}


def run_env():
  """The environment of a train.py / eval.py subprocess: this checkout on
  the path; conftest's XLA cache and device count come along."""
  return dict(os.environ, PYTHONPATH=str(ROOT))


def tiny_config(data_dir, overrides):
  """configs/tiny.py with dotted-path overrides ({"train.epochs": 2})."""
  c = tiny.get_config()
  c.data.data_dir = str(data_dir)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_cli_flags(data_dir, overrides):
  """The same config as `tiny_config`, as train.py command-line flags."""
  flags = [f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--config.data.data_dir={data_dir}"]
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ")"
    flags.append(f"--config.{key}={value}")
  return flags


def hook_train_batches(monkeypatch, on_next):
  """Makes `pipeline.make_dataset("train")` call `on_next(count, next_fn)`.

  `count` is 1 for the first batch drawn; `next_fn()` draws the real batch.
  Other splits are left alone.
  """
  real = pipeline.make_dataset

  def make_dataset(data_config, split, image_size, **kwargs):
    it = real(data_config, split, image_size, **kwargs)
    if split != "train":
      return it
    original_next = type(it).__next__

    class Hooked(type(it)):
      count = 0

      def __next__(self):
        Hooked.count += 1
        return on_next(Hooked.count, lambda: original_next(self))

    it.__class__ = Hooked
    return it

  monkeypatch.setattr(pipeline, "make_dataset", make_dataset)


def random_inputs(n, context_length=32):
  """n token-id rows (end of text at varied positions) and n NHWC 32x32
  images, the tiny towers' inputs (seed 0). 32 tokens, configs/tiny.py's
  `model.context_length`, fit the 77-position towers as well."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 49406, size=(n, context_length)).astype(np.int32)
  ids[np.arange(n), rng.integers(3, min(40, context_length), size=n)] = 49407
  pixels = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  return ids, pixels


def with_trained_lora(params, lora_b_scale, head):
  """A HySAC params tree as after training: LoRA B drawn from
  N(0, lora_b_scale²) (seed 1) and the head's stored logs set from `head`
  ({"log_curv": ..., ...}). Float32 NumPy leaves."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  rng = np.random.default_rng(1)
  for path, value in flat.items():
    if path[-1] == "lora_B":
      flat[path] = lora_b_scale * rng.normal(size=value.shape)
  for name, value in head.items():
    flat[(name,)] = value
  return traverse_util.unflatten_dict(
      {p: np.asarray(v, np.float32) for p, v in flat.items()})


def save_converted(path, seed, lora_b_scale, curv, alpha, rank=4):
  """A converted tiny HySAC directory (LoRA rank `rank` with non-zero B,
  curvature `curv`, both feature scales `alpha`), without bounds."""
  c = tiny.get_config()
  c.model.lora.rank = rank
  module = pretrained.model_from_config(c)
  params = with_trained_lora(
      step_lib.init_model_params(module, jax.random.key(seed)), lora_b_scale,
      {"log_curv": math.log(curv), "log_alpha_image": math.log(alpha),
       "log_alpha_text": math.log(alpha)})
  convert.save_pretrained(path, module.clip, params, lora=module.lora)
  return path


def save_run(workdir, config, transform=None, step=4, bounds=None):
  """A run directory as train.py leaves it: config.json, a best_recall
  checkpoint of the trainable params (`transform`ed, e.g. with
  `with_trained_lora`) and, when given, bounds.json. Returns the state."""
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = step_lib.create_train_state(config, init_key)
  if transform is not None:
    state = state.replace(params=transform(state.params))
  config_lib.save_config(config, workdir)
  checkpoints = ckpt_lib.RunCheckpoints(workdir)
  checkpoints.save(step, restore_lib.state_tree(state, step_key), {},
                   {"step": step}, kind=ckpt_lib.BEST_RECALL)
  checkpoints.close()
  if bounds is not None:
    safety.save_bounds(bounds, Path(workdir) / "bounds.json")
  return state
