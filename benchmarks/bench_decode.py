"""Decode + preprocess throughput per core, with and without JPEG draft mode.

  .venv/bin/python benchmarks/bench_decode.py --num 24 --repeats 5

What one grain worker does per image, timed in this single process on one
core: JPEG bytes -> PIL decode -> shorter-side bicubic resize -> centre crop
to 224 px (uint8, `preprocess.resize_crop`), then the CLIP normalisation
(`preprocess.normalise`, done in the main process by the pipeline). Sources,
generated here as photo-like JPEGs (smooth colour fields, random shapes,
sensor-like noise, quality 90):
  coco       640x480, the size of most COCO train2017 images (the V images);
  unsafe512  512x512, Stable Diffusion 1.x/2.x output (the G images);
  unsafe1024 1024x1024, SDXL-sized output, for comparison.
Each source is timed with a full decode (the baseline, the pipeline's
default) and with `jpeg_draft=True` (libjpeg decodes at 1/2-1/8 scale), the
two interleaved in each of `--repeats` rounds; the figure is the median
round. Both wall time and this process's CPU time are reported: on a shared
machine CPU time is the better per-core estimate. Tokenizing the two
captions of a quadruple is timed too.

The deviation columns compare pixels in [0, 1] units (x 255, i.e. in uint8
levels) against transformers' slow CLIPImageProcessor on the first 8 images
of each source: the full decode is the pipeline's parity path (within 1
level), draft mode is the opt-in fast path.
"""

import argparse
import io
import os
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw

# This checkout's package first (not an installed copy), then `timing`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax.data import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from hysac_jax.data import tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

SOURCES = {"coco": (480, 640), "unsafe512": (512, 512),
           "unsafe1024": (1024, 1024)}
NOISE = 18  # noise sigma: ~150 KiB per 640x480 JPEG (COCO train2017: 18 GiB / 118k)
CORES = 16  # the GPU machine's cores
GOAL_QUADRUPLES = 400  # per second: 2 images (V, G) each


def photo_like(rng, h, w, quality=90):
  """A JPEG that compresses like a photo: colour fields, shapes, noise."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([np.sin(x / rng.uniform(30, 90) + rng.uniform(0, 6)),
                   np.cos(y / rng.uniform(30, 90) + rng.uniform(0, 6)),
                   np.sin((x + y) / rng.uniform(40, 120))], -1)
  img = Image.fromarray(np.clip(127 + 80 * base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(10, 30))):
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    dx, dy = rng.uniform(10, w / 3), rng.uniform(10, h / 3)
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    box = [x0, y0, x0 + dx, y0 + dy]
    if rng.uniform() < 0.5:
      draw.ellipse(box, fill=fill)
    else:
      draw.rectangle(box, fill=fill)
  pixels = np.asarray(img, np.float32) + rng.normal(0, NOISE, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      buf, "JPEG", quality=quality)
  return buf.getvalue()


def time_pass(images, size, draft):
  """(wall s, CPU s) per image for decode + resize/crop + normalise."""
  wall, cpu = time.perf_counter(), time.process_time()
  for data in images:
    preprocess.normalise(preprocess.resize_crop(data, size, jpeg_draft=draft))
  n = len(images)
  return ((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n)


def deviation(images, size, processor):
  """Max and mean |ours - HF| in uint8 levels, full decode and draft."""
  out = {}
  for draft in (False, True):
    diffs = []
    for data in images:
      ref = processor(images=Image.open(io.BytesIO(data)),
                      return_tensors="np")["pixel_values"][0]
      ref = preprocess.denormalise(ref.transpose(1, 2, 0))
      ours = preprocess.resize_crop(data, size, jpeg_draft=draft) / 255
      diffs.append(np.abs(ours - ref) * 255)
    d = np.stack(diffs)
    out[draft] = (float(d.max()), float(d.mean()))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=24,
                      help="images per source")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-parity", action="store_true",
                      help="skip the comparison with CLIPImageProcessor")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  data = {}
  for name, (h, w) in SOURCES.items():
    data[name] = [photo_like(rng, h, w) for _ in range(args.num)]
    kib = statistics.mean(len(d) for d in data[name]) / 1024
    progress(f"{name}: {args.num} JPEGs of {w}x{h} generated "
             f"(mean {kib:.0f} KiB)")

  tok = tokenizer.load_tokenizer()
  captions = ["a person riding a bike down a busy street at night",
              "a bloody person riding a bike down a busy street at night"]
  tokenizer.tokenize(captions, tokenizer=tok)
  t = time.perf_counter()
  for _ in range(200):
    tokenizer.tokenize(captions, tokenizer=tok)
  tok_s = (time.perf_counter() - t) / 200
  progress(f"tokenize 2 captions: {1e3 * tok_s:.2f} ms per quadruple")

  results = {}  # (source, draft) -> list of (wall, cpu)
  for name in SOURCES:  # warm-up (page cache, PIL's first calls)
    time_pass(data[name][:2], args.size, False)
    time_pass(data[name][:2], args.size, True)
  for r in range(args.repeats):
    for name in SOURCES:
      for draft in (False, True):
        wall, cpu = time_pass(data[name], args.size, draft)
        results.setdefault((name, draft), []).append((wall, cpu))
        progress(f"round {r + 1}/{args.repeats}: {name} "
                 f"{'draft' if draft else 'full '}: {1e3 * wall:.2f} ms wall,"
                 f" {1e3 * cpu:.2f} ms CPU per image")

  parity = {}
  if not args.no_parity:
    from transformers.models.clip import image_processing_pil_clip  # pylint: disable=g-import-not-at-top
    processor = image_processing_pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": args.size},
        crop_size={"height": args.size, "width": args.size})
    for name in SOURCES:
      parity[name] = deviation(data[name][:8], args.size, processor)
      progress(f"{name}: deviation from CLIPImageProcessor computed")

  load = os.getloadavg()
  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs (shared; "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the "
        f"end), python {platform.python_version()}, Pillow "
        f"{Image.__version__}")
  print(f"command: `python benchmarks/bench_decode.py --num {args.num} "
        f"--size {args.size} --repeats {args.repeats}`\n")
  print(f"| source | decode | ms/image wall (median of {args.repeats}) | "
        "ms/image CPU | images/s per core (CPU) | vs full decode | "
        "max / mean dev. from HF (levels) |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  per_image = {}
  for name in SOURCES:
    base = statistics.median(c for _, c in results[(name, False)])
    for draft in (False, True):
      wall = statistics.median(w for w, _ in results[(name, draft)])
      cpu = statistics.median(c for _, c in results[(name, draft)])
      per_image[(name, draft)] = cpu
      dev = parity.get(name, {}).get(draft)
      dev_s = f"{dev[0]:.0f} / {dev[1]:.2f}" if dev else "-"
      print(f"| {name} {SOURCES[name][1]}x{SOURCES[name][0]} | "
            f"{'draft' if draft else 'full'} | {1e3 * wall:.2f} | "
            f"{1e3 * cpu:.2f} | {1 / cpu:.0f} | {base / cpu:.2f}x | {dev_s} |")
  print(f"\ntokenizing a quadruple's 2 captions: {1e3 * tok_s:.2f} ms\n")
  print(f"| quadruple = V + G + 2 captions | ms CPU per quadruple | "
        f"quadruples/s per core | x {CORES} cores | goal {GOAL_QUADRUPLES} |")
  print("| --- | ---: | ---: | ---: | --- |")
  for unsafe in ("unsafe512", "unsafe1024"):
    for draft in (False, True):
      ms = (per_image[("coco", draft)] + per_image[(unsafe, draft)] + tok_s)
      rate = 1 / ms
      ok = "met" if rate * CORES >= GOAL_QUADRUPLES else "missed"
      print(f"| coco + {unsafe}, {'draft' if draft else 'full decode'} | "
            f"{1e3 * ms:.2f} | {rate:.1f} | {rate * CORES:.0f} | {ok} |")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
