"""`python -m hysac_jax.convert`: PyTorch / Hugging Face CLIP, the HySAC
release and OpenCLIP -> a converted directory.

    python -m hysac_jax.convert --clip PATH_OR_ID [--hysac-checkpoint FILE] \
        --out DIR
    python -m hysac_jax.convert --open-clip NAME_OR_JSON \
        --open-clip-weights FILE --out DIR

A thin tool over the formats: `formats.hf_clip` reads the Hugging Face CLIP
directory, `formats.release` the release's `hysac_model.pth`,
`formats.openclip` the OpenCLIP checkpoint, and `formats.converted` writes
the directory (serve it with `hysac_jax.serving.load_model(out)`). The
names that lived here (`clip_params_from_hf`, `hysac_params_from_pytorch`,
`save_pretrained`, `read_converted`, ...) stay importable from here.
"""

import argparse
import json
import os
import sys
import warnings

import jax.numpy as jnp

from hysac_jax import cli
from hysac_jax import finite
from hysac_jax.formats import openclip
from hysac_jax import outdir
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.formats import detect
from hysac_jax.formats import release
# Moved to formats/ and pretrained; still importable from here.
from hysac_jax.formats.converted import (  # pylint: disable=unused-import
    CONFIG_FILE, FORMAT, FORMAT_VERSION, PARAMS_FILE, Converted,
    check_preprocess, converted_clip_config, initial_head, read_converted,
    save_pretrained)
from hysac_jax.formats.converted import SUMMARY_FILE
from hysac_jax.formats.hf_clip import (  # pylint: disable=unused-import
    clip_params_from_hf, clip_template, load_hf_state_dict,
    params_from_state_dict)
from hysac_jax.formats.release import (  # pylint: disable=unused-import
    RELEASE_HEAD, hysac_params_from_pytorch)
from hysac_jax.formats.torch_state import (  # pylint: disable=unused-import
    CheckpointError, StateDictError)
from hysac_jax.models.lora import merge_lora
from hysac_jax.pretrained import check_run_compatible  # pylint: disable=unused-import

# The converted directory's head.json under its old name here (not
# `formats.exports.HEAD_FILE`, an export's hysac_head.json).
HEAD_FILE = SUMMARY_FILE
RELEASE_BOUNDS_FILE = release.BOUNDS_FILE
RELEASE_EXTRAS_FILE = release.EXTRAS_FILE


def load_pretrained(path, dtype=jnp.float32, merge=False):
  """Deprecated: use `hysac_jax.serving.load_model(path)`."""
  warnings.warn("hysac_jax.convert.load_pretrained is deprecated; use "
                "hysac_jax.serving.load_model", DeprecationWarning,
                stacklevel=2)
  return serving.load_model(path, dtype=dtype, merge_lora=merge)


def convert(clip, out, hysac_checkpoint=None, merge=False, curv_init=1.0,
            lora_alpha=1.0):
  """Converts CLIP (and optionally a HySAC release checkpoint) to `out`.

  Without `hysac_checkpoint` the head scalars take their initial values, so
  the directory is the HySAC starting point (CLIP lifted to the hyperboloid),
  unless `clip` is an `export --format hf` directory: then its head (and
  bounds) are kept, with its own `curv_init`.

  Returns:
    The `out` directory.
  """
  mode, lora, alpha = "hyp", None, None
  if hysac_checkpoint:
    config, lora, params = hysac_params_from_pytorch(
        hysac_checkpoint, clip, lora_alpha=lora_alpha)
    # A release (ours: export --format release) keeps its bounds and alpha
    # beside the .pth: they travel on with the model.
    alpha = _release_extras(os.path.dirname(os.fspath(hysac_checkpoint)),
                            out)
  elif _holds(clip) in serving.EXPORT_FORMATS + (detect.EXPORT,):
    # An hf export: its trained head (serving reads and checks it), not the
    # initial one, and its bounds.
    kind = detect.detect_kind(os.path.expanduser(os.fspath(clip)))
    if kind != "hf":
      raise ValueError(f"{clip} is a {kind} export: --clip takes a Hugging "
                       "Face CLIP directory or an hf export (export the run "
                       "with --format hf)")
    export = serving.load_model(clip)
    config, params = export.config, export.params
    mode, curv_init = export.mode, export.curv_init
    alpha = export.traversal_alpha
    if export.bounds:
      os.makedirs(out, exist_ok=True)
      safety.save_bounds(export.bounds,
                         os.path.join(out, safety.BOUNDS_FILE))
  else:
    config, clip_params = clip_params_from_hf(clip)
    params = {"clip": clip_params, **initial_head(config, curv_init)}
  if merge and lora is not None:
    params = merge_lora(params, lora)
    lora = None
  save_pretrained(out, config, params, lora=lora, mode=mode,
                  curv_init=curv_init, traversal_alpha=alpha,
                  source={"clip": os.fspath(clip),
                          "hysac_checkpoint": hysac_checkpoint and
                                              os.fspath(hysac_checkpoint),
                          "merged_lora": bool(merge)})
  return out


def _holds(clip):
  """What the --clip directory holds (`detect.holds`), or None for a hub
  id or a path that is no directory."""
  path = os.path.expanduser(os.fspath(clip))
  if not os.path.isdir(path):
    return None
  return detect.holds(path, strict=False)


def _release_extras(directory, out):
  """Copies the release's `hysac_bounds.json` in `directory` (if any) to
  `out/bounds.json`; returns the traversal alpha of its `hysac_jax.json`
  (written by `export --format release`), or None."""
  bounds_file = os.path.join(directory, release.BOUNDS_FILE)
  if os.path.isfile(bounds_file):
    os.makedirs(out, exist_ok=True)
    safety.save_bounds(safety.load_bounds(bounds_file),
                       os.path.join(out, safety.BOUNDS_FILE))
  return release.read_extras(directory)


def _parser():
  parser = argparse.ArgumentParser(
      prog="python -m hysac_jax.convert",
      description="Convert Hugging Face CLIP (and a HySAC release "
                  "checkpoint), or an OpenCLIP checkpoint, to a hysac_jax "
                  "directory.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--clip", help="Hugging Face CLIP directory or hub id")
  source.add_argument("--open-clip", metavar="NAME_OR_CONFIG",
                      help="OpenCLIP model name (open_clip's bundled "
                           "config) or config JSON / open_clip_config.json")
  parser.add_argument("--open-clip-weights", "--checkpoint",
                      dest="open_clip_weights", default=None,
                      help="the OpenCLIP weights (.safetensors, .pt, .bin); "
                           "--checkpoint is its old spelling")
  parser.add_argument("--force-quick-gelu", action="store_true",
                      help="OpenCLIP: QuickGELU although the config says "
                           "GELU (OpenAI weights under a non-quickgelu "
                           "config, as open_clip's force_quick_gelu)")
  parser.add_argument("--hysac-checkpoint", default=None,
                      help="HySAC release checkpoint (hysac_model.pth)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty --out (refused without it)")
  parser.add_argument("--merge-lora", action="store_true",
                      help="fold LoRA into the base weights")
  parser.add_argument("--curv-init", type=float, default=1.0,
                      help="c0 > 0, the curvature the head starts from, "
                           "which sets the clamp range of the learned "
                           "curvature (default 1.0, the release's)")
  parser.add_argument("--lora-alpha", type=float, default=1.0,
                      help="LoRA alpha of the checkpoint (release: 1)")
  return parser


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  for flag, value in (("--curv-init", args.curv_init),
                      ("--lora-alpha", args.lora_alpha)):
    try:  # before math.log of it (a 'math domain error' named no flag)
      finite.check_number(value, "", flag, positive=True)
    except finite.NonFiniteError as e:
      parser.error(str(e))
  out = os.path.expanduser(args.out)
  try:
    outdir.check(out, args.overwrite)
  except outdir.OutputExistsError as e:
    return cli.fail(parser.prog, e)
  if args.open_clip is not None:
    return _main_open_clip(parser, args, out)
  if args.open_clip_weights or args.force_quick_gelu:
    return cli.fail(parser.prog, "--open-clip-weights and --force-quick-gelu "
                    "go with --open-clip (for --clip use --hysac-checkpoint)",
                    cli.EXIT_USAGE)
  try:
    outdir.write_in_place(out, lambda d: convert(
        args.clip, d, args.hysac_checkpoint, merge=args.merge_lora,
        curv_init=args.curv_init, lora_alpha=args.lora_alpha))
  except (StateDictError, ValueError, OSError, ImportError) as e:
    # ValueError: a bad config.json; OSError: missing or unwritable files;
    # ImportError: torch, needed for .pth / .bin checkpoints.
    return cli.fail(parser.prog, e)
  with open(os.path.join(out, SUMMARY_FILE)) as f:
    print(f"wrote {out}: {json.load(f)['values']}")
  return 0


def _main_open_clip(parser, args, out):
  """The --open-clip branch of `main`."""
  if not args.open_clip_weights:
    return cli.fail(parser.prog, "--open-clip needs --open-clip-weights FILE "
                    "(the OpenCLIP weights; old spelling --checkpoint)",
                    cli.EXIT_USAGE)
  if args.hysac_checkpoint or args.merge_lora:
    return cli.fail(parser.prog, "--hysac-checkpoint and --merge-lora go "
                    "with --clip, not --open-clip", cli.EXIT_USAGE)
  def write(directory):
    return openclip.convert_openclip(
        args.open_clip, args.open_clip_weights, directory,
        curv_init=args.curv_init,
        force_quick_gelu=args.force_quick_gelu)[1]

  try:
    model = outdir.write_in_place(out, write)
  except (StateDictError, ValueError, OSError, ImportError) as e:
    # ValueError: a config the Flax CLIP cannot reproduce (names the field).
    return cli.fail(parser.prog, e)
  print(f"wrote {out}: activation {model.config.text.hidden_act}, image "
        f"mean {list(model.image_mean)} std {list(model.image_std)} (from "
        f"{model.preprocess_source})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
