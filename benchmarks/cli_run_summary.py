"""What a train.py run's metrics.jsonl says about its speed (gpu_check.sh).

  python benchmarks/cli_run_summary.py WORKDIR [--json OUT]

Prints the start-up stages (the "startup" record), the steady steps/s (the
median of the logged intervals' examples/s over the global batch, the first
interval left out), the median input-wait share, and the peak memory (the
device's peak allocation where the backend reports it, and the host's peak
resident memory).
"""

import argparse
import json
import os
import statistics
import sys


def summarise(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(workdir, "config.json")) as f:
    data = json.load(f)["data"]
  startup = next((l for l in lines if l.get("kind") == "startup"), {})
  train = [l for l in lines if l.get("kind") == "train"]
  steady = train[1:] or train
  if not steady:
    raise ValueError(f"{path} has no train line: did the run log a step?")
  out = {
      "startup_s": {k: round(v, 2) for k, v in startup.items()
                    if k not in ("kind", "step", "time") and isinstance(v, float)},
      "steps": train[-1]["step"],
      "examples_per_s": statistics.median(l["examples_per_s"]
                                          for l in steady),
      "input_wait_share": statistics.median(l["input_wait_share"]
                                            for l in steady),
      "host_peak_rss_gib": max((l.get("host_peak_rss_gib", 0) for l in train),
                               default=None),
      "device_peak_gib": max((l["device_peak_gib"] for l in train
                              if "device_peak_gib" in l), default=None),
      "intervals": len(steady),
  }
  return out, data["batch_size_per_device"]


def main(argv=None):
  parser = argparse.ArgumentParser(prog="cli_run_summary.py",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="a train.py run directory")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices the run used (the global batch is the "
                      "per-device batch times this; default 1)")
  parser.add_argument("--json", default=None, help="also write the summary")
  args = parser.parse_args(argv)
  try:
    out, per_device = summarise(args.workdir)
  except (OSError, ValueError, KeyError) as e:
    print(f"cli_run_summary.py: error: {e}", file=sys.stderr)
    return 1
  out["global_batch"] = per_device * args.devices
  out["steps_per_s"] = out["examples_per_s"] / out["global_batch"]
  print("start-up: " + ", ".join(f"{k} {v:.1f} s"
                                 for k, v in out["startup_s"].items()))
  print(f"steady: {out['steps_per_s']:.3f} steps/s, "
        f"{out['examples_per_s']:.1f} quadruples/s (median of "
        f"{out['intervals']} log intervals of {out['steps']} steps), input "
        f"wait {out['input_wait_share']:.1%}")
  device = ("n/a (not reported by this backend)"
            if out["device_peak_gib"] is None
            else f"{out['device_peak_gib']:.2f} GiB")
  print(f"peak memory: device {device}; host RSS "
        f"{out['host_peak_rss_gib']:.2f} GiB")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
