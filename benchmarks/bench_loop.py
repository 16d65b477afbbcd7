"""The training loop's overhead: train.py's steady-state steps/s against the
bare compiled train step called in a tight loop on the same batches.

  python benchmarks/bench_loop.py                     # tiny, 3 repeats
  python benchmarks/bench_loop.py --steps 32 --repeats 1   # a dry run

One repeat, in this process, on the same config and machine:
  1. loop: `training.loop.train_and_evaluate` (what train.py runs) for one
     epoch of `--steps` steps in a fresh workdir, logging every
     `--log_every` steps, with no mid-epoch checkpoint. Its steady-state
     rate is the median of the logged intervals' examples/s (the first
     interval left out) over the global batch. The input pipeline, the
     prefetch to the devices, the divergence record and the preemption check
     are all inside it;
  2. bare: the same train step, lowered and compiled on its own, called
     back to back on the same batches in the tightest loop that still reads
     them: draw from the same input pipeline, place, step; one wait at the
     end;
  3. placed: the same, on the same batches placed on the devices
     beforehand (no input work at all).
loop / bare is the loop's own overhead (goal: at least 0.97); loop / placed
also counts the input pipeline's work, which on a CPU shares the cores with
the step. Every stage prints a flushed, time-stamped line.
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from hysac_jax.data import pipeline  # pylint: disable=wrong-import-position
from hysac_jax.training import loop as loop_lib  # pylint: disable=wrong-import-position
from hysac_jax.training import step as step_lib  # pylint: disable=wrong-import-position

progress = timing.progress


def bench_config(name, steps, log_every, data_dir):
  config = importlib.import_module(f"configs.{name}").get_config()
  global_batch = config.data.batch_size_per_device * jax.device_count()
  validation = 2 * config.data.eval_batch_size_per_device * jax.device_count()
  config.data.synthetic_sizes = (steps * global_batch, validation, validation)
  config.data.data_dir = data_dir
  config.train.epochs = 1
  config.train.log_every = log_every
  config.train.checkpoint_every = 0
  config.train.compilation_cache_dir = ""
  return config


def loop_rate(config, workdir):
  """Steady-state steps/s of one train.py run, from its metrics.jsonl."""
  start = time.perf_counter()
  summary = loop_lib.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  global_batch = config.data.batch_size_per_device * jax.device_count()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  rates = [l["examples_per_s"] / global_batch for l in lines
           if l.get("kind") == "train"][1:]
  waits = [l["input_wait_share"] for l in lines
           if l.get("kind") == "train"][1:]
  if not rates:
    raise SystemExit("bench_loop: error: too few log intervals; raise "
                     "--steps or lower --log_every")
  return {"steps_per_s": statistics.median(rates), "intervals": len(rates),
          "input_wait_share": statistics.median(waits),
          "steps": summary["steps"], "wall_s": wall}


def bare_rates(config, steps):
  """Steps/s of the compiled step called back to back: drawing each batch
  from the pipeline ("bare"), and on batches placed beforehand ("placed")."""
  mesh = step_lib.make_mesh()
  model = step_lib.model_from_config(config)
  image_size = model.clip.vision.image_size

  def batches():
    return pipeline.make_dataset(
        config.data, "train", image_size, seed=config.seed, num_epochs=1,
        context_length=model.clip.text.max_position_embeddings)

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  state = step_lib.create_train_state(
      config, init_key, step_lib.initial_params(config), mesh=mesh,
      total_steps=steps, model=model)
  source = batches()
  first = step_lib.shard_batch(next(source), mesh)
  compiled = step_lib.make_train_step(config, mesh).lower(
      state, first, step_key).compile()
  progress("bare: state built, step compiled")
  state, metrics = compiled(state, first, step_key)  # warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps - 1):
    state, metrics = compiled(state, step_lib.shard_batch(next(source), mesh),
                              step_key)
  jax.block_until_ready((state, metrics))
  bare = (steps - 1) / (time.perf_counter() - start)
  progress(f"bare: {steps - 1} steps timed, drawing each batch")
  source.close()
  source = batches()
  placed = [step_lib.shard_batch(next(source), mesh) for _ in range(steps)]
  source.close()
  jax.block_until_ready(placed)
  start = time.perf_counter()
  for batch in placed[1:]:
    state, metrics = compiled(state, batch, step_key)
  jax.block_until_ready((state, metrics))
  return {"steps_per_s": bare,
          "placed_steps_per_s": (steps - 1) / (time.perf_counter() - start)}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="bench_loop.py",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="tiny",
                      help="a module of configs/ (default: tiny)")
  parser.add_argument("--steps", type=int, default=96,
                      help="steps per run, one epoch (default: 96)")
  parser.add_argument("--log_every", type=int, default=8,
                      help="the loop's log interval in steps (default: 8)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="loop/bare pairs; medians are reported "
                      "(default: 3)")
  args = parser.parse_args(argv)
  if args.steps < 2 * args.log_every or args.repeats < 1:
    parser.error("--steps must be at least 2 x --log_every, --repeats >= 1")
  progress(f"{jax.device_count()} {jax.default_backend()} device(s); "
           f"config {args.config}, {args.steps} steps, log every "
           f"{args.log_every}, {args.repeats} repeat(s)")
  with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
    config = bench_config(args.config, args.steps, args.log_every,
                          os.path.join(tmp, "tfds"))
    pipeline.prepare(config.data, step_lib.model_from_config(
        config).clip.vision.image_size)
    progress("dataset built")
    loops, bares = [], []
    for r in range(args.repeats):
      loops.append(loop_rate(config, os.path.join(tmp, f"run{r}")))
      progress(f"repeat {r + 1}: loop {loops[-1]['steps_per_s']:.3f} steps/s "
               f"(median of {loops[-1]['intervals']} intervals, input wait "
               f"{loops[-1]['input_wait_share']:.1%}, run "
               f"{loops[-1]['wall_s']:.1f} s)")
      bares.append(bare_rates(config, args.steps))
      progress(f"repeat {r + 1}: bare {bares[-1]['steps_per_s']:.3f} steps/s "
               f"(loop / bare {loops[-1]['steps_per_s'] / bares[-1]['steps_per_s']:.3f}), "
               f"placed {bares[-1]['placed_steps_per_s']:.3f} steps/s (loop / "
               f"placed {loops[-1]['steps_per_s'] / bares[-1]['placed_steps_per_s']:.3f})")
  loop_med = statistics.median(l["steps_per_s"] for l in loops)
  bare_med = statistics.median(b["steps_per_s"] for b in bares)
  placed_med = statistics.median(b["placed_steps_per_s"] for b in bares)
  result = {"config": args.config, "steps": args.steps,
            "log_every": args.log_every, "repeats": args.repeats,
            "devices": jax.device_count(), "backend": jax.default_backend(),
            "loop_steps_per_s": loop_med, "bare_steps_per_s": bare_med,
            "placed_steps_per_s": placed_med,
            "input_wait_share": statistics.median(
                l["input_wait_share"] for l in loops),
            "ratio": loop_med / bare_med,
            "ratio_to_placed": loop_med / placed_med,
            "ratios": [l["steps_per_s"] / b["steps_per_s"]
                       for l, b in zip(loops, bares)]}
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
