"""Input pipeline throughput: quadruples/s for 224-px ViSU-style JPEGs.

  .venv/bin/python benchmarks/bench_input.py --num 256 --repeats 3

Builds a fake ViSU tree (COCO-style JPEGs of 240-400 px per side, unsafe
PNG-free JPEGs, release-shaped JSON) into a temporary TFDS `visu` dataset,
then times, in the same run:
  baseline  a plain single-threaded loop: read record, PIL decode + CLIP
            preprocess both images, tokenize both captions;
  pipeline  `pipeline.make_iterator` (train mode, batch 32) with reader
            threads only, and with grain worker processes.
Pipeline numbers are steady state over 3 epochs: the clock starts once each
worker has delivered a batch (start-up is reported separately). Prints a Markdown table.
"""

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# This checkout's package first (not an installed copy), then `timing`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

from hysac_jax.data import build
from hysac_jax.data import pipeline
from hysac_jax.data import preprocess
from hysac_jax.data import schema
from hysac_jax.data import tokenizer


def _photo_like(rng, h, w):
  """Smooth colour gradients plus mild noise: compresses like a photo."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([np.sin(x / rng.uniform(20, 60) + rng.uniform(0, 6)),
                   np.cos(y / rng.uniform(20, 60) + rng.uniform(0, 6)),
                   np.sin((x + y) / rng.uniform(30, 90))], -1)
  img = 127 + 90 * base + rng.normal(0, 8, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
      buf, "JPEG", quality=90)
  return buf.getvalue()


def make_tree(root, num, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "coco", "train2017"))
  os.makedirs(os.path.join(root, "generated"))
  recs = {}
  for i in range(num):
    coco_id = 1000 + i
    h, w = rng.integers(240, 400, size=2)
    with open(os.path.join(root, "coco", "train2017",
                           f"{coco_id:012d}.jpg"), "wb") as f:
      f.write(_photo_like(rng, h, w))
    with open(os.path.join(root, "generated", f"{i}.jpg"), "wb") as f:
      f.write(_photo_like(rng, 256, 256))
    recs[str(i)] = {"coco_id": coco_id,
                    "safe": f"a person riding a bike down street {i}",
                    "nsfw": f"a bloody person riding a bike, street {i}",
                    "nsfw_im_path": f"generated/{i}.jpg", "tag": "violence"}
  with open(os.path.join(root, "train.json"), "w") as f:
    json.dump({"info": {}, "data": recs}, f)


def baseline(source, image_size):
  tok = tokenizer.load_tokenizer()
  start = time.perf_counter()
  for i in range(len(source)):
    r = source[i]
    for key in schema.IMAGE_KEYS:
      preprocess.clip_preprocess(r[key], image_size)
    tokenizer.tokenize([r["safe_caption"].decode(),
                        r["unsafe_caption"].decode()], tokenizer=tok)
  return len(source) / (time.perf_counter() - start)


def run_pipeline(source, image_size, batch, workers, threads):
  start = time.perf_counter()
  it = pipeline.make_iterator(
      source, batch_size=batch, image_size=image_size, train=True,
      num_epochs=3, process_index=0, process_count=1, num_workers=workers,
      num_threads=threads, prefetch=4)
  for _ in range(max(workers, 1)):  # one batch from each worker
    next(it)
  first = time.perf_counter()
  n = 0
  for _ in it:
    n += batch
  end = time.perf_counter()
  it.close()
  return n / (end - first), first - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    make_tree(os.path.join(tmp, "manual"), args.num)
    progress(f"fake ViSU tree written ({args.num} quadruples)")
    builder = build.build_dataset(
        "visu", os.path.join(tmp, "tfds"), manual_dir=os.path.join(
            tmp, "manual"), split_files={"train": "train.json"})
    source = builder.as_data_source(split="train",
                                    decoders=schema.skip_image_decoding())
    tokenizer.load_tokenizer()
    progress("TFDS dataset built, tokenizer loaded")
    configs = [("baseline: single-threaded PIL loop", None),
               ("pipeline, 2 reader threads, no workers", (0, 2)),
               (f"pipeline, {args.workers} grain workers", (args.workers, 1))]
    results = {}
    for i in range(args.repeats):  # interleaved, so load drifts hit all
      for name, cfg in configs:
        if cfg is None:
          rate, startup = baseline(source, args.image_size), 0.0
        else:
          rate, startup = run_pipeline(source, args.image_size, args.batch,
                                       *cfg)
        results.setdefault(name, []).append((rate, startup))
        progress(f"run {i + 1}/{args.repeats}: {name}: {rate:.1f} "
                 f"quadruples/s (start-up {startup:.2f} s)")

  base = statistics.median(r for r, _ in results[configs[0][0]])
  print(f"\nMachine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (shared), Python {platform.python_version()}")
  print("Command: .venv/bin/python benchmarks/bench_input.py "
        f"--num {args.num} --image_size {args.image_size} "
        f"--batch {args.batch} --repeats {args.repeats} "
        f"--workers {args.workers}\n")
  print("| input path | quadruples/s (median of "
        f"{args.repeats}) | vs baseline | start-up s |")
  print("| --- | ---: | ---: | ---: |")
  for name, _ in configs:
    rate = statistics.median(r for r, _ in results[name])
    startup = statistics.median(s for _, s in results[name])
    print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {startup:.2f} |")


if __name__ == "__main__":
  main()
