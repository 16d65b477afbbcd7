"""Times the start-up of a training run, stage by stage, without data files.

    PYTHONPATH=. python benchmarks/time_to_first_step.py --size vitl14 --batch 2

Stages: imports; "pretrained" params (random float32 numpy weights of the
model's shapes, standing in for a converted CLIP, without LoRA or head);
`create_train_state` given them; the train step's lower + compile; the first
step. One device, float32 towers; the persistent compilation cache is left
off, so the compile is cold. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs import vitl14  # noqa: E402
from hysac_jax.training import step as step_lib  # noqa: E402


def pretrained_clip(model, seed=0):
  """numpy float32 CLIP params of the model's shapes (no LoRA leaves)."""
  vision, text = model.clip.vision, model.clip.text
  pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, 3),
                                jnp.float32)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  abstract = jax.eval_shape(
      lambda p, i: model.init({"params": jax.random.key(0)}, p, i,
                              deterministic=True), pixels, ids)["params"]["clip"]
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in traverse_util.flatten_dict(abstract).items():
    if k[-1] in ("lora_A", "lora_B"):
      continue
    out[k] = rng.standard_normal(v.shape, np.float32) * np.float32(0.02)
  return traverse_util.unflatten_dict(out)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="vitl14")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--state_only", action="store_true",
                      help="stop after create_train_state")
  args = parser.parse_args()
  times = {"imports": time.perf_counter() - T0}

  def mark(stage, t):
    times[stage] = time.perf_counter() - t
    print(f"{stage}: {times[stage]:.1f} s", file=sys.stderr, flush=True)
    return time.perf_counter()

  t = time.perf_counter()
  config = vitl14.get_config()
  config.model.clip, config.model.size = "", args.size
  config.model.dtype = "float32"
  config.data.batch_size_per_device = args.batch
  mesh = step_lib.make_mesh(jax.devices()[:1])
  model = step_lib.model_from_config(config)
  params = pretrained_clip(model)
  t = mark("params", t)
  state = step_lib.create_train_state(config, jax.random.key(0), params,
                                       mesh=mesh, model=model)
  jax.block_until_ready(state)
  t = mark("create_train_state", t)
  if args.state_only:
    print(json.dumps({"size": args.size, "state_only": True,
                      "seconds": {k: round(v, 2) for k, v in times.items()}}),
          flush=True)
    return
  step = step_lib.make_train_step(config, mesh)
  rng = np.random.default_rng(0)
  size = model.clip.vision.image_size
  ids = rng.integers(1, 49000, size=(2, args.batch, 77)).astype(np.int32)
  ids[:, :, -1] = 49407
  batch = step_lib.shard_batch({
      "safe_image": rng.normal(size=(args.batch, size, size, 3)).astype(
          np.float32),
      "unsafe_image": rng.normal(size=(args.batch, size, size, 3)).astype(
          np.float32),
      "safe_ids": ids[0], "unsafe_ids": ids[1]}, mesh)
  key = jax.random.key(1)
  compiled = step.lower(state, batch, key).compile()
  t = mark("compile_step", t)
  state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  mark("first_step", t)
  times["total"] = time.perf_counter() - T0
  print(json.dumps({"size": args.size, "batch": args.batch,
                    "backend": jax.default_backend(),
                    "seconds": {k: round(v, 2) for k, v in times.items()}}),
        flush=True)


if __name__ == "__main__":
  main()
