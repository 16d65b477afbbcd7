"""Compile time of the train step, scanned against unrolled tower layers.

  python benchmarks/bench_compile.py                       # vitl14, both layouts
  python benchmarks/bench_compile.py --depths 6,12,24      # + a scanned vision-depth sweep
  python benchmarks/bench_compile.py --config tiny --repeats 1   # a dry run

Each measurement runs in a fresh process with the persistent compilation
cache off, so every compile is cold: the process builds the model
(`config.model.scan_layers` on or off, the vision tower at the given depth),
a train state on random pretrained-shaped weights, lowers the jitted train
step for a batch of 2 quadruples on one device, and times `lower` and
`compile` separately. Every stage prints a flushed line; each process has its
own timeout. The summary gives the median of `--repeats` runs and the
scanned / unrolled ratio, both measured in this run on this machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("tiny", "vitb16", "vitl14")


def progress(message):
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measure_one(config_name, scan, depth, batch=2):
  """Lowers and compiles one train step; returns its timings (seconds)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  from hysac_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.model.clip = ""  # random pretrained-shaped towers: nothing to read
  config.model.scan_layers = scan
  model = step_lib.model_from_config(config)
  if depth:
    vision = dataclasses.replace(model.clip.vision, num_hidden_layers=depth)
    model = model.clone(clip=dataclasses.replace(model.clip, vision=vision))
  mesh = step_lib.make_mesh(jax.devices()[:1])
  t = time.perf_counter()
  state = step_lib.create_train_state(
      config, jax.random.key(0), step_lib.random_clip_params(model),
      mesh=mesh, total_steps=100, model=model)
  out = {"create_state_s": time.perf_counter() - t}
  v, txt = model.clip.vision, model.clip.text
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(batch, v.image_size, v.image_size,
                            v.num_channels)).astype(np.float32)
  ids = rng.integers(1, 1000, size=(batch, txt.max_position_embeddings),
                     dtype=np.int32)
  batch = step_lib.shard_batch({"safe_image": pixels, "unsafe_image": pixels,
                                "safe_ids": ids, "unsafe_ids": ids}, mesh)
  step_fn = step_lib.make_train_step(config, mesh)
  t = time.perf_counter()
  lowered = step_fn.lower(state, batch, jax.random.key(1))
  out["lower_s"] = time.perf_counter() - t
  t = time.perf_counter()
  lowered.compile()
  out["compile_s"] = time.perf_counter() - t
  out.update(config=config_name, scan=scan, vision_depth=v.num_hidden_layers,
             text_depth=txt.num_hidden_layers, device=jax.devices()[0].device_kind)
  return out


def run_child(config_name, scan, depth, timeout):
  """One measurement in a fresh process; None when it failed or timed out."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", config_name,
         "--scan" if scan else "--unrolled", "--depth", str(depth or 0)]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get(
      "JAX_PLATFORMS", ""))
  try:
    done = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
  except subprocess.TimeoutExpired:
    progress(f"  timed out after {timeout} s")
    return None
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  progress(f"  failed (exit {done.returncode}): "
           f"{done.stderr.strip().splitlines()[-1:]}")
  return None


def median_of(config_name, scan, depth, repeats, timeout):
  runs = []
  label = (f"{config_name} {'scanned' if scan else 'unrolled'}"
           + (f" vision depth {depth}" if depth else ""))
  for i in range(repeats):
    r = run_child(config_name, scan, depth, timeout)
    if r is None:
      continue
    progress(f"{label} run {i + 1}/{repeats}: lower {r['lower_s']:.2f} s, "
             f"compile {r['compile_s']:.2f} s")
    runs.append(r)
  if not runs:
    return None
  return {"label": label, "runs": len(runs),
          "compile_s": statistics.median(r["compile_s"] for r in runs),
          "lower_s": statistics.median(r["lower_s"] for r in runs),
          "compile_all": [round(r["compile_s"], 2) for r in runs],
          "device": runs[0]["device"], "vision_depth": runs[0]["vision_depth"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="vitl14", choices=CONFIGS,
                      help="configs/NAME.py (default vitl14)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="fresh-process runs per point; the median is "
                      "reported (default 3)")
  parser.add_argument("--depths", default="",
                      help="comma-separated vision depths for a sweep of the "
                      "scanned step, e.g. 6,12,24 (default: none)")
  parser.add_argument("--timeout", type=int, default=300,
                      help="seconds per measurement process (default 300)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--scan", dest="scan", action="store_true",
                      help=argparse.SUPPRESS)
  parser.add_argument("--unrolled", dest="scan", action="store_false",
                      help=argparse.SUPPRESS)
  parser.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None,
                      help="write the summary JSON here")
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(measure_one(args.child, args.scan,
                                             args.depth)), flush=True)
    return
  progress(f"compile benchmark: {args.config}, {args.repeats} runs each, "
           f"timeout {args.timeout} s per run")
  rows = []
  for scan in (True, False):
    rows.append(median_of(args.config, scan, 0, args.repeats, args.timeout))
  sweep = []
  for depth in filter(None, args.depths.split(",")):  # scanned layers
    sweep.append(median_of(args.config, True, int(depth), args.repeats,
                           args.timeout))
  print("\n| layout | vision depth | compile s (median) | runs | lower s |")
  print("|---|---|---|---|---|")
  for r in filter(None, rows + sweep):
    print(f"| {r['label']} | {r['vision_depth']} | {r['compile_s']:.2f} "
          f"{r['compile_all']} | {r['runs']} | {r['lower_s']:.2f} |")
  if rows[0] and rows[1]:
    print(f"\nscanned / unrolled compile: "
          f"{rows[0]['compile_s'] / rows[1]['compile_s']:.3f}x", flush=True)
  scanned_sweep = [r for r in sweep if r and "scanned" in r["label"]]
  if len(scanned_sweep) >= 2:
    print(f"scanned compile, deepest / shallowest: "
          f"{scanned_sweep[-1]['compile_s'] / scanned_sweep[0]['compile_s']:.3f}x",
          flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows, "sweep": sweep}, f, indent=2)


if __name__ == "__main__":
  main()
