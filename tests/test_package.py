"""The installed package and its command-line entry points."""

import subprocess
import sys
from pathlib import Path

import hysac_jax

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_a_release_string():
  parts = hysac_jax.__version__.split(".")
  assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_cli_help_prints_usage():
  for script in ("train.py", "eval.py"):
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    # absl prints the usage and exits with status 1 after --help.
    assert out.returncode in (0, 1), out.stderr
    assert "--config" in out.stdout and "--workdir" in out.stdout


def test_bundled_vocabulary_ships_with_its_licence():
  import importlib_resources
  assets = importlib_resources.files("hysac_jax.data") / "assets"
  assert (assets / "bpe_simple_vocab_16e6.txt.gz").is_file()
  assert "MIT" in (assets / "LICENSE-CLIP-BPE").read_text()


def test_zeroshot_assets_are_listed_in_package_data_with_their_notice():
  """Every file under data/assets/zeroshot matches a setup.cfg
  package_data pattern (so a wheel ships it) and NOTICE attributes it."""
  import configparser
  import fnmatch
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  patterns = [p.strip() for p in cfg["options.package_data"][
      "hysac_jax.data.assets.zeroshot"].split(",")]
  folder = ROOT / "hysac_jax" / "data" / "assets" / "zeroshot"
  files = sorted(p.name for p in folder.iterdir()
                 if p.is_file() and p.suffix != ".py")
  assert {"NOTICE", "imagenet2012.json", "cifar10.json", "cifar100.json",
          "safe_prompts.txt", "unsafe_prompts.txt"} <= set(files)
  for name in files:
    assert any(fnmatch.fnmatch(name, p) for p in patterns), name
  notice = (folder / "NOTICE").read_text()
  assert "MIT License" in notice
  for name in files:
    if name != "NOTICE":
      assert name in notice, name
