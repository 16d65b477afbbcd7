"""Every flag of every CLI (train.py, eval.py, python -m hysac_jax.X) has a
--help text of its own: non-empty, and not pointing at an explanation
"above" that --help does not show."""

import argparse
import json
import re
import subprocess
import sys

import pytest

from hysac_jax import convert
from hysac_jax import demo
from hysac_jax import export
from hysac_jax import predict
import tiny_runs

ABSL_NO_HELP = "(no help available)"


def _bad_help(text):
  """Why `text` is no help, or None when it is."""
  if not text or not text.strip() or text.strip() == ABSL_NO_HELP:
    return "empty"
  if re.search(r"\babove\b", text, re.IGNORECASE):
    return "refers to 'above'"
  return None


class _Parsed(Exception):
  """Raised in place of parsing, carrying the parser main() built."""

  def __init__(self, parser):
    super().__init__()
    self.parser = parser


def _parser_of(main, monkeypatch):
  """The argparse parser `main` builds, caught as main parses."""
  def capture(self, args=None, namespace=None):
    raise _Parsed(self)
  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
  with pytest.raises(_Parsed) as caught:
    main(["--help"])
  return caught.value.parser


@pytest.mark.parametrize("module,at_least", [
    (predict, 5), (convert, 5), (export, 5), (demo, 1)],
                         ids=lambda m: getattr(m, "__name__", str(m)))
def test_every_argparse_option_has_its_own_help(module, at_least, monkeypatch):
  parser = _parser_of(module.main, monkeypatch)
  formatter = parser._get_formatter()  # pylint: disable=protected-access
  options = [a for a in parser._actions  # pylint: disable=protected-access
             if a.option_strings and a.help is not argparse.SUPPRESS]
  assert len(options) >= at_least  # the flags were found
  bad = {a.option_strings[-1]: _bad_help(
      a.help and formatter._expand_help(a))  # pylint: disable=protected-access
         for a in options}
  assert {k: v for k, v in bad.items() if v} == {}


def test_the_help_probe_fails_on_a_missing_or_above_help():
  assert _bad_help(None) == _bad_help("  ") == _bad_help(ABSL_NO_HELP) == (
      "empty")
  assert _bad_help("as explained above") == "refers to 'above'"
  assert _bad_help("image files (repeatable)") is None


_ABSL_FLAGS = """
import importlib, json, sys
from absl import flags
module = importlib.import_module(sys.argv[1])
print(json.dumps({f.name: f.help for f in
                  flags.FLAGS.flags_by_module_dict()[module.__name__]}))
"""


@pytest.mark.parametrize("script,expected", [
    ("train", {"config", "workdir", "init_from", "resume", "overwrite"}),
    ("eval", {"config", "workdir", "model", "split", "traversal_alpha",
              "out", "task", "margin", "skip_unreadable"}),
])
def test_every_absl_flag_of_train_and_eval_has_its_own_help(script, expected):
  """The flags each script defines (one process each: both define
  --config). The --config.FIELD overrides come from the config file."""
  out = subprocess.run([sys.executable, "-c", _ABSL_FLAGS, script],
                       cwd=tiny_runs.ROOT, env=tiny_runs.run_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  helps = json.loads(out.stdout.splitlines()[-1])
  assert expected <= set(helps)
  bad = {name: _bad_help(text) for name, text in helps.items()}
  assert {k: v for k, v in bad.items() if v} == {}
