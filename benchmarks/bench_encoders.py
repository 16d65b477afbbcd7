"""CLIP tower forward speed: jitted Flax vs the Hugging Face PyTorch CLIP.

Both sides run the same random weights (the PyTorch model is converted with
`hysac_jax.convert`), in the same process, one after the other, so the ratio
is meaningful on a shared machine. Reports images/s and texts/s (median of
`--repeats` timed runs after one warm-up) and checks that both sides agree.

  python benchmarks/bench_encoders.py --sizes vitb16,vitl14 --batch 8
  python benchmarks/bench_encoders.py --sizes vitl14 --dtype bfloat16 --no-torch  # GPU
"""

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's package first (not an installed copy).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax.convert import params_from_state_dict
from hysac_jax.models.clip import CLIPModel
from hysac_jax.models.sizes import get_clip_config


def hf_model(config):
  """A random HF CLIPModel with the dims of `config`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from hysac_jax import export  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return transformers.CLIPModel(transformers.CLIPConfig.from_dict(
      export.hf_config(config, logit_scale=1 / 0.07))).eval()


def random_params(config):
  """Random params in the CLIPModel layout (no torch), N(0, 0.02²)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from hysac_jax.convert import clip_template  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  flat = {k: (0.02 * rng.standard_normal(v.shape, np.float32))
          for k, v in clip_template(config).items()}
  return traverse_util.unflatten_dict(flat)


def bench_size(name, batch, repeats, dtype, with_torch):
  """Returns rows (size, tower, batch, jax/s, torch/s or None, max diff)."""
  config = get_clip_config(name)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 49406, size=(batch, 77)).astype(np.int32)
  ids[:, 20] = 49407
  v = config.vision
  pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3),
                               np.float32)
  progress(f"{name}: inputs ready (batch {batch})")
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    model = hf_model(config)
    progress(f"{name}: PyTorch model built")
    state = {k: p.detach().numpy() for k, p in model.state_dict().items()}
    params = params_from_state_dict(state, config, source=f"{name} (random)")
    del state
  else:
    params = random_params(config)
  params = jax.device_put(params)
  progress(f"{name}: JAX params ready")
  clip = CLIPModel(config, dtype=dtype)
  image_fn = jax.jit(lambda p, x: clip.apply({"params": p}, x,
                                             method="encode_image"))
  text_fn = jax.jit(lambda p, t: clip.apply({"params": p}, t,
                                            method="encode_text"))
  px, tk = jax.device_put(pixels), jax.device_put(ids)
  rows = []
  for tower, fn, x in (("image", image_fn, px), ("text", text_fn, tk)):
    secs = median_seconds(lambda: fn(params, x).block_until_ready(), repeats,
                          label=f"{name} {tower} JAX (warm-up compiles)")
    ours = np.asarray(fn(params, x))
    torch_rate, diff = None, None
    if with_torch:
      with torch.inference_mode():
        if tower == "image":
          inp = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
          run = lambda: model.visual_projection(
              model.vision_model(pixel_values=inp).pooler_output)
        else:
          inp = torch.from_numpy(ids.astype(np.int64))
          run = lambda: model.text_projection(
              model.text_model(input_ids=inp).pooler_output)
        torch_secs = median_seconds(run, repeats,
                                    label=f"{name} {tower} PyTorch")
        diff = float(np.abs(ours - run().numpy()).max())
      torch_rate = batch / torch_secs
    rows.append((name, tower, batch, batch / secs, torch_rate, diff))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="vitb16,vitl14")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--no-torch", action="store_true",
                      help="skip the PyTorch baseline (e.g. on GPU)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  with_torch = not args.no_torch
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  else:
    torch_note = "no PyTorch baseline"
  rows = [row for name in args.sizes.split(",")
          for row in bench_size(name, args.batch, args.repeats, dtype,
                                with_torch)]
  print(f"\nmachine: {platform.machine()}, {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), jax {jax.__version__}, {torch_note}")
  print(f"command: python benchmarks/bench_encoders.py --sizes {args.sizes} "
        f"--batch {args.batch} --repeats {args.repeats} --dtype {args.dtype}"
        f"{' --no-torch' if args.no_torch else ''}")
  print(f"median of {args.repeats} runs after a warm-up; JAX {args.dtype}, "
        "PyTorch float32 (HF CLIPModel, inference_mode)\n")
  print("| size | tower | batch | JAX items/s | PyTorch items/s | JAX / PyTorch "
        "| max abs diff |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for size, tower, batch, ours, theirs, diff in rows:
    ratio = f"{ours / theirs:.2f}x" if theirs else "-"
    theirs_s = f"{theirs:.2f}" if theirs else "-"
    diff_s = f"{diff:.1e}" if diff is not None else "-"
    print(f"| {size} | {tower} | {batch} | {ours:.2f} | {theirs_s} | "
          f"{ratio} | {diff_s} |", flush=True)


if __name__ == "__main__":
  main()
