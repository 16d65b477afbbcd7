"""The shared command-line rule (hysac_jax/cli.py)."""

import pytest
from absl import app

from hysac_jax import cli


def _raise(error):
  raise error


@pytest.mark.parametrize("error,code", [
    (cli.CLIError("locked"), cli.EXIT_ERROR),
    (cli.CLIError("stop", cli.EXIT_INTERRUPTED), cli.EXIT_INTERRUPTED),
    (app.UsageError("bad flag"), cli.EXIT_USAGE),
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED),
    (ValueError("config.x=1:\n  expected 2"), cli.EXIT_ERROR)])
def test_expected_failures_end_in_one_line(error, code, capsys):
  assert cli.run_guarded("prog", _raise, error,
                         expected=(ValueError,)) == code
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("prog: error: ")


def test_unexpected_failures_keep_their_traceback():
  with pytest.raises(KeyError):
    cli.run_guarded("prog", _raise, KeyError("bug"), expected=(ValueError,))


def test_unknown_config_field_names_the_flag_and_keeps_the_hint():
  # What ml_collections raises for --config.model.modee=hyp.
  error = AttributeError(repr("'modee'\nDid you mean \"mode\" instead of "
                              "\"modee\"?"))
  line = cli._config_field_error(
      error, ["train.py", "--config=c.py", "--config.model.modee=hyp"])
  assert line == ("--config.model.modee: unknown config field 'modee'. "
                  "Did you mean \"mode\" instead of \"modee\"?")


CONFIG_FILE = """
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict({"epochs": 3, "patience": 2})
  c.model = ml_collections.ConfigDict({"mode": "hyp"})
  return c
"""


def _override_error(tmp_path, override):
  """The line for `override`, from the exception ml_collections raises."""
  from absl import flags
  from ml_collections import config_flags
  path = tmp_path / "c.py"
  path.write_text(CONFIG_FILE)
  argv = ["prog", f"--config={path}", override]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  with pytest.raises((AttributeError, KeyError)) as raised:
    values(argv)
  return cli._config_field_error(raised.value, argv,
                                 cli._loaded_config(values, argv))


@pytest.mark.parametrize("override,line", [
    ("--config.trian.epochs=1", "--config.trian.epochs: unknown config field "
     "'trian'. Did you mean \"train\" instead of \"trian\"?"),
    ("--config.train.batch=1", "--config.train.batch: unknown config field "
     "'batch'. config.train has: epochs, patience"),
    ("--config.zzz.batch=1", "--config.zzz.batch: unknown config field "
     "'zzz'. config has: model, train"),
    ("--config.train.epochs.x=1", "--config.train.epochs.x: config.train."
     "epochs is a value (int), not a group of fields, so it has no field "
     "'x'")])
def test_unknown_config_groups_and_fields_name_what_exists(tmp_path,
                                                           override, line):
  assert _override_error(tmp_path, override) == line


def test_a_config_file_that_raises_gives_its_last_line_only():
  message = ("flag --config=c.py:foo: Error whilst parsing config file: "
             "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
             "TypeError: get_config() takes 0 positional arguments")
  assert cli._without_traceback(message) == (
      "flag --config=c.py:foo: Error whilst parsing config file: TypeError: "
      "get_config() takes 0 positional arguments")
