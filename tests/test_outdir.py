"""Output directories of the CLIs (hysac_jax/outdir.py)."""

import os
import stat
from pathlib import Path

import pytest

from hysac_jax import outdir


def test_a_file_or_a_non_empty_directory_is_refused_unless_overwrite(
    tmp_path):
  outdir.check(tmp_path / "new")  # missing: fine
  (tmp_path / "empty").mkdir()
  outdir.check(tmp_path / "empty")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(outdir.OutputExistsError,
                     match=f"--out {tmp_path / 'full'} is not empty: pass "
                           "--overwrite"):
    outdir.check(tmp_path / "full")
  outdir.check(tmp_path / "full", overwrite=True)
  (tmp_path / "f").write_text("x")
  with pytest.raises(outdir.OutputExistsError, match="is a file"):
    outdir.check(tmp_path / "f", overwrite=True)


def test_a_complete_write_replaces_the_old_directory_whole(tmp_path):
  final = tmp_path / "out"
  final.mkdir()
  (final / "stale.txt").write_text("earlier")

  def writes(directory):
    (Path(directory) / "new.txt").write_text("new")
    return "result"

  assert outdir.write_in_place(str(final), writes) == "result"
  assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
  umask = os.umask(0)
  os.umask(umask)  # readable by others as a plain mkdir would make it
  assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask
  assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_leaves_the_earlier_directory_whole(tmp_path):
  final = tmp_path / "hf"
  final.mkdir()
  (final / "model.safetensors").write_text("earlier")

  def fails_half_way(directory):
    (Path(directory) / "model.safetensors").write_text("half")
    raise OSError("No space left on device")

  with pytest.raises(OSError, match="No space left"):
    outdir.write_in_place(str(final), fails_half_way)
  assert (final / "model.safetensors").read_text() == "earlier"
  assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no partial left


def test_an_output_under_a_file_cannot_be_created(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(outdir.OutputExistsError,
                     match=f"cannot be created: {tmp_path / 'f'} is a file"):
    outdir.check_writable(tmp_path / "f" / "sub" / "out")
  outdir.check_writable(tmp_path / "new" / "deeper")  # creatable
  assert not (tmp_path / "new").exists()  # and nothing was created
