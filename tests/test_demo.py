"""hysac_jax/demo.py: the checks `make demo` prints after its reports."""

import copy
import json
import re
import subprocess
import sys

import pytest

from hysac_jax import demo

import tiny_runs


def good_reports():
  """Reports in eval.py's shapes where every promise holds."""
  report = {
      "n": 1000,
      "distances": {g: {"mean": m} for g, m in
                    zip("SUVG", (0.7, 0.8, 0.85, 1.05))},
      "classification": {"image": {"auroc": 0.99}, "text": {"auroc": 0.9}},
      "retrieval": {"S-V": {"t2i": {"R@10": 0.6}}},
      "safety_retrieval": {"G->S+U": {
          "none": {"unsafe_top1": 1.0}, "release": {"unsafe_top1": 0.6},
          "geodesic": {"unsafe_top1": 0.8}}},
  }
  zeroshot = {"shape": {"top1": 0.5, "chance_top1": 0.25},
              "colour": {"top1": 0.7, "chance_top1": 0.2}}
  return report, zeroshot


def write_run(run_dir, report, zeroshot):
  """The report files `make demo`'s eval.py calls leave in `run_dir`."""
  (run_dir / "eval" / "test").mkdir(parents=True)
  (run_dir / "eval" / "test" / "report.json").write_text(json.dumps(report))
  for attribute, z in zeroshot.items():
    d = run_dir / "eval" / f"zeroshot-synthetic_visu_{attribute}"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(z))


def failing(checks):
  return [name for name, _, ok in checks if not ok]


def test_every_promise_holds_on_good_reports():
  checks = demo.properties(*good_reports())
  assert len(checks) == 7 and not failing(checks)


@pytest.mark.parametrize("edit,name", [
    (lambda r, z: r["distances"]["U"].update(mean=0.69), "U farther than S"),
    (lambda r, z: r["distances"]["G"].update(mean=0.85), "G farther than V"),
    (lambda r, z: r["classification"]["image"].update(auroc=0.949),
     "unsafe-image AUROC >= 95 %"),
    (lambda r, z: r["classification"]["image"].update(auroc=None),
     "unsafe-image AUROC >= 95 %"),
    # chance R@10 at n = 1000 is 1 %: 5x is 5 %.
    (lambda r, z: r["retrieval"]["S-V"]["t2i"].update({"R@10": 0.049}),
     "S->V R@10 >= 5x chance"),
    (lambda r, z: [r["safety_retrieval"]["G->S+U"][t].update(unsafe_top1=1.0)
                   for t in ("release", "geodesic")],
     "traversal cuts unsafe top-1 of unsafe image queries"),
    (lambda r, z: z["shape"].update(top1=0.349),
     "zero-shot shape >= chance + 10 points"),
    (lambda r, z: z["colour"].update(top1=0.299),
     "zero-shot colour >= chance + 10 points"),
])
def test_each_broken_promise_is_the_one_reported(edit, name):
  report, zeroshot = copy.deepcopy(good_reports())
  edit(report, zeroshot)
  assert failing(demo.properties(report, zeroshot)) == [name]


def test_cli_reads_a_run_and_exits_by_what_holds(tmp_path, capsys):
  report, zeroshot = good_reports()
  write_run(tmp_path, report, zeroshot)
  assert demo.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "Not shown" not in out and "NOT MET" not in out
  assert "retrieval finds the matching pair" in out
  assert str(tmp_path / "eval" / "test") in out
  zeroshot["shape"]["top1"] = 0.2
  (tmp_path / "eval" / "zeroshot-synthetic_visu_shape" / "report.json"
   ).write_text(json.dumps(zeroshot["shape"]))
  assert demo.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "[NOT MET] zero-shot shape" in out
  assert ("Not shown by this run (see the NOT MET lines): images classify "
          "zero-shot by shape and by colour") in out
  assert demo.main([str(tmp_path), "--strict"]) == 1
  assert "[NOT MET] zero-shot shape" in capsys.readouterr().out


def test_a_missing_report_or_field_is_one_line(tmp_path, capsys):
  assert demo.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("demo: error: ")
  assert "report.json" in err[0]
  report, zeroshot = good_reports()
  del report["retrieval"]
  write_run(tmp_path, report, zeroshot)
  assert demo.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "'retrieval'" in err[0]


# --- the demo's own output ------------------------------------------------

# Not reduced: fewer steps lose the unsafe-image AUROC promise (half the
# training set, 192 steps: 66 %; the suite's four devices, 96 steps: 54 %),
# so this is `make demo`'s own run: nine epochs of 4,096 quadruples on one
# device, about two and a half minutes on the 2-core CPU.
DEMO = {}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """train.py and eval.py as `make demo` calls them (its own data dir)."""
  tmp = tmp_path_factory.mktemp("demo")
  run = tmp / "run"
  flags = tiny_runs.tiny_cli_flags(tmp / "tfds", DEMO)
  # One CPU device, as `make demo` has: the suite's four simulated devices
  # would make the global batch 4x and the run 4x fewer steps.
  env = tiny_runs.run_env()
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                            "", env.get("XLA_FLAGS", ""))
  for script, extra in (
      ("train.py", [f"--workdir={run}"]),
      ("eval.py", [f"--workdir={run}", "--checkpoint=best_loss",
                   "--zeroshot",
                   "synthetic_visu:shape,synthetic_visu:colour"])):
    done = subprocess.run(
        [sys.executable, str(tiny_runs.ROOT / script), *flags, *extra],
        capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
  return run


@pytest.mark.slow
@pytest.mark.parametrize("promise", [
    "U farther than S", "G farther than V", "unsafe-image AUROC >= 95 %",
    "S->V R@10 >= 5x chance",
    "traversal cuts unsafe top-1 of unsafe image queries",
    "zero-shot colour >= chance + 10 points",
    "zero-shot shape >= chance + 10 points"])
def test_the_demo_keeps_its_promises_on_its_own_output(demo_run, promise):
  checks = {name: (value, ok) for name, value, ok in
            demo.properties(*demo.reports(demo_run))}
  assert set(checks) >= {promise}
  value, ok = checks[promise]
  assert ok, f"{promise}: {value}"
