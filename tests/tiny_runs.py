"""Helpers shared by the tests that run the trainer on `configs/tiny.py`."""

from pathlib import Path

from configs import tiny
from hysac_jax.data import pipeline

ROOT = Path(__file__).resolve().parents[1]


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
