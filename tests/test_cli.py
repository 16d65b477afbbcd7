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
