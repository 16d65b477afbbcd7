"""Export a trained HySAC model for serving: Hugging Face, Orbax, StableHLO.

    python -m hysac_jax.export --model RUN_OR_CONVERTED_DIR --out OUT \
        --format hf orbax stablehlo

Each format goes to its own directory, `OUT/<format>/`, and every one holds
`hysac_head.json`: the HySAC head (curvature, feature scales, logit scale,
all clamped; and the stored logarithms), the mode, the bounds when known
(SPEC §4) with the derived thresholds b', and the CLIP config. LoRA is always
merged into the base weights first (`merge_lora`), so no format carries
adapters or optimizer state. A non-empty `OUT/<format>/` is refused unless
`--overwrite`; each format is written beside it and moved in when complete.

| format | files | read back with |
| --- | --- | --- |
| `hf` | `config.json`, `model.safetensors` (HF `CLIPModel` layout) | `transformers.CLIPModel.from_pretrained`, or `serving.load_model` |
| `orbax` | `params/` (the merged HySAC param tree, float32) | `serving.load_model` |
| `stablehlo` | `encode_image`, `encode_text`, `classify_unsafe`, `traverse_to_safe` (`.jax_exported`), `params.safetensors` | `serving.load_model` |

`--format release` writes the PyTorch HySAC release's own format instead
(`hysac_model.pth` with the LoRA unmerged, `hysac_bounds.json`, `clip/`; see
`hysac_jax/formats/release.py`), for the release's code.

`hysac_jax.serving.load_model(dir)` reads any of the three serving formats
(and a training run or a converted directory) as a `serving.Model` with
`encode_image(pixels)`, `encode_text(ids or strings)`,
`classify_unsafe(points, modality)`, `traverse_to_safe(points, modality)`,
`curv`, `head`, `bounds`.

The HF features are the projected, *unnormalised* CLIP features; the HySAC
head turns them into points (space components on the hyperboloid):
`points = exp_map0(alpha_<modality> * features, curv)` (`apply_head`); in
`euc` mode they are L2-normalised instead.

StableHLO artifacts (`jax.export`) have a symbolic batch dimension `b`.
**The params are passed in, not closed over**: `encode_image(params, pixels)`
with `params` the tree stored in `params.safetensors` (keys are `/`-joined
paths). Closed-over weights would be inlined as constants: a ViT-L/14 image
tower (1.2 GB) would approach the 2 GB limit of the serialised format and be
copied into every compiled executable. `classify_unsafe(emb, curv, bound,
alpha)` and `traverse_to_safe(emb, curv, bound, alpha)` take the curvature,
the safe group's 95th-percentile distance `b` (`bounds["S" or "V"]["up_95"]`)
and the traversal alpha as float32 scalars; `serving.load_model` binds all of
these for you.

**One alpha per model.** The threshold b' = b + tanh((b - alpha)/c) + 1
depends on alpha. An export of a training run stores the run's
`config.eval.traversal_alpha` (the alpha `eval.py` reports with) in
`hysac_head.json` as `traversal_alpha`, and its `thresholds` use it; a
converted model gets the release's 0.8. `--traversal-alpha` (export) and
`load_model(..., traversal_alpha=)` / `predict --traversal-alpha` override
it.
"""

import argparse
import copy
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import cli
from hysac_jax import finite
from hysac_jax import outdir
from hysac_jax import safety
from hysac_jax import serving
from hysac_jax.formats import detect
from hysac_jax.formats import exports
from hysac_jax.formats import hf_clip
from hysac_jax.formats import release
from hysac_jax.formats.exports import head_json, thresholds  # pylint: disable=unused-import
from hysac_jax.formats.torch_state import StateDictError
# Moved to formats/; still importable from here.
from hysac_jax.formats.hf_clip import (  # pylint: disable=unused-import
    hf_config, hf_state_dict, write_hf_clip)
from hysac_jax.formats.torch_state import (  # pylint: disable=unused-import
    to_torch_layout)
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models.lora import merge_lora

FORMATS = exports.EXPORT_KINDS
# What `export` writes: the serving formats above, which
# `serving.load_model` reads back, and the HySAC release's own
# (`hysac_jax/formats/release.py`).
WRITE_FORMATS = FORMATS + ("release",)
EXPORT_FORMAT = exports.EXPORT_FORMAT
EXPORT_VERSION = exports.EXPORT_VERSION
HEAD_FILE = exports.HEAD_FILE
HF_CONFIG_FILE = hf_clip.CONFIG_FILE
HF_WEIGHTS_FILE = hf_clip.WEIGHTS_FILE
ORBAX_PARAMS_DIR = exports.ORBAX_PARAMS_DIR
STABLEHLO_PARAMS_FILE = exports.STABLEHLO_PARAMS_FILE
STABLEHLO_SUFFIX = exports.STABLEHLO_SUFFIX
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's lowering platforms
ModelDirError = exports.ModelDirError


# --------------------------------------------------------------------------
# Pure pieces: the head (the Flax -> Hugging Face mapping is
# `hysac_jax/formats/hf_clip.py`).


def apply_head(features, head, modality):
  """Projected CLIP features -> HySAC embeddings, as the model computes them.

  Args:
    features: (B, D) projected, unnormalised CLIP features (e.g. from
      `transformers.CLIPModel.get_image_features`).
    head: dict with "mode", "curv", "alpha_image", "alpha_text" (the
      contents of `hysac_head.json`).
    modality: "image" or "text".

  Returns:
    (B, D) float32: space components on the hyperboloid ("hyp"), or unit
    vectors ("euc").
  """
  if modality not in ("image", "text"):
    raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
  features = jnp.asarray(features, jnp.float32)
  if head["mode"] == "euc":
    return hysac_lib.l2_normalize(features)
  return hysac_lib.lift(features, head[f"alpha_{modality}"], head["curv"])


# --------------------------------------------------------------------------
# The source: a training run or a converted directory.


def load_source(model_dir, bounds_path=None, checkpoint=ckpt_lib.BEST_RECALL,
                traversal_alpha=None, merge=True):
  """A training run or a converted directory, ready to export.

  Args:
    merge: fold LoRA into the base weights; False keeps the LoRA leaves and
      `model.lora` (for the release format). The other arguments are
      `serving.load_model`'s.

  Returns:
    `serving.Model` (float32 NumPy params, unrolled layers).
  """
  kind = detect.detect_kind(os.path.expanduser(os.fspath(model_dir)))
  if kind in FORMATS:
    raise ModelDirError(f"{model_dir} is already an export ({kind}); export "
                        "from the training run or converted directory")
  model = serving.load_model(model_dir, bounds_path=bounds_path,
                             checkpoint=checkpoint,
                             traversal_alpha=traversal_alpha,
                             merge_lora=merge)
  # Every export holds unrolled layers (layers_<i>), the layout of Hugging
  # Face, the release and a converted directory, whatever the run trained.
  model.params = _numpy(clip_lib.unstack_layers(model.params))
  return model


def _numpy(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


# --------------------------------------------------------------------------
# Writers.


def _write_head(out_dir, src, kind):
  exports.write_head(out_dir, head_json(src, kind))


def export_hf(src, out_dir):
  """Writes the Hugging Face CLIP layout (+ hysac_head.json) to `out_dir`."""
  logit_scale = float(hysac_lib.head_scalars(
      src.params, src.curv_init)["logit_scale"])
  write_hf_clip(out_dir, src.config, src.params["clip"], logit_scale)
  _write_head(out_dir, src, "hf")
  return out_dir


def export_orbax(src, out_dir):
  """Writes the merged HySAC params with Orbax (+ hysac_head.json)."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  exports.write_orbax(out_dir, src.params)
  _write_head(out_dir, src, "orbax")
  return out_dir


def _geometry_functions():
  """The exported safety functions: pure, all inputs passed in."""

  def classify_unsafe(emb, curv, bound, alpha):
    """(b, D), (), (), () -> ((b,) bool unsafe, (b,) float32 distance)."""
    distance = safety.origin_distance(emb, curv)
    return distance > safety.safety_threshold(bound, curv, alpha), distance

  def traverse_to_safe(emb, curv, bound, alpha):
    """(b, D), (), (), () -> (b, D) points moved to distance <= b'."""
    return safety.traverse_to_safe(emb, curv, bound, alpha)

  return classify_unsafe, traverse_to_safe


def stablehlo_exports(src, platforms=DEFAULT_PLATFORMS):
  """`jax.export.Exported` of the four serving functions.

  Returns:
    {name: Exported}: `encode_image(params, pixels (b, H, W, C) float32)`,
    `encode_text(params, ids (b, L) int32)` -> (b, D) float32 points;
    `classify_unsafe(emb, curv, bound, alpha)`, `traverse_to_safe(emb,
    curv, bound, alpha)` (see the module docstring).
  """
  module = hysac_lib.HySAC(src.config, None, mode=src.mode,
                           curv_init=src.curv_init)
  params_spec = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), src.params)
  v, t = src.config.vision, src.config.text
  d = src.config.projection_dim

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(jax_export.symbolic_shape(shape), dtype)

  def encode_image(params, pixels):
    return module.apply({"params": params}, pixels, method="encode_image")

  def encode_text(params, ids):
    return module.apply({"params": params}, ids, method="encode_text")

  classify_unsafe, traverse_to_safe = _geometry_functions()
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  emb = spec(f"b, {d}", jnp.float32)
  todo = {
      "encode_image": (encode_image, (params_spec, spec(
          f"b, {v.image_size}, {v.image_size}, {v.num_channels}",
          jnp.float32))),
      "encode_text": (encode_text, (params_spec, spec(
          f"b, {t.max_position_embeddings}", jnp.int32))),
      "classify_unsafe": (classify_unsafe, (emb, scalar, scalar, scalar)),
      "traverse_to_safe": (traverse_to_safe, (emb, scalar, scalar, scalar)),
  }
  return {name: jax_export.export(jax.jit(fn), platforms=tuple(platforms))(
      *args) for name, (fn, args) in todo.items()}


def export_stablehlo(src, out_dir, platforms=DEFAULT_PLATFORMS):
  """Writes serialised `jax.export` functions, params and hysac_head.json."""
  os.makedirs(out_dir, exist_ok=True)
  exports.write_stablehlo(out_dir, stablehlo_exports(src, platforms),
                          src.params)
  _write_head(out_dir, src, "stablehlo")
  return out_dir


def check_out(out, formats, overwrite=False):
  """Refuses, before anything is written, an `out` or `out/<format>` that is
  a file, and a non-empty `out/<format>` unless `overwrite`."""
  outdir.check_writable(out)
  for fmt in formats:
    outdir.check(os.path.join(out, fmt), overwrite, what="export")


def export(src, out, formats=FORMATS, platforms=DEFAULT_PLATFORMS,
           overwrite=False):
  """Exports `src` in each of `formats` to `out/<format>/`.

  `src` may hold unmerged LoRA (`src.lora`): the serving formats get it
  merged, "release" gets it as is. A non-empty `out/<format>` is refused
  (`outdir.OutputExistsError`) unless `overwrite`; every check runs before any
  format is written, and each format is written beside its place and then
  moved there, so an export that fails leaves the old one whole.

  Returns:
    {format: directory}.
  """
  unknown = [f for f in formats if f not in WRITE_FORMATS]
  if unknown:
    raise ValueError(f"unknown export formats {unknown}; known: "
                     f"{WRITE_FORMATS}")
  check_out(out, formats, overwrite)
  if "release" in formats:
    release.check_source(src)
  merged = src
  if src.lora is not None and any(f != "release" for f in formats):
    merged = copy.copy(src)
    merged.params = _numpy(merge_lora(src.params, src.lora))
    merged.lora = None
  writers = {"hf": lambda d: export_hf(merged, d),
             "orbax": lambda d: export_orbax(merged, d),
             "stablehlo": lambda d: export_stablehlo(merged, d, platforms),
             "release": lambda d: release.export_release(src, d)}
  for f in formats:
    outdir.write_in_place(os.path.join(out, f), writers[f])
  return {f: os.path.join(out, f) for f in formats}


def load_model(directory, bounds_path=None, checkpoint=ckpt_lib.BEST_RECALL,
               traversal_alpha=None):
  """Deprecated: use `hysac_jax.serving.load_model`."""
  warnings.warn("hysac_jax.export.load_model is deprecated; use "
                "hysac_jax.serving.load_model", DeprecationWarning,
                stacklevel=2)
  return serving.load_model(directory, bounds_path=bounds_path,
                            checkpoint=checkpoint,
                            traversal_alpha=traversal_alpha)


# --------------------------------------------------------------------------
# CLI.


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m hysac_jax.export",
      description="Export a HySAC training run or converted model for "
                  "serving (each format to OUT/<format>/).")
  parser.add_argument("--model", required=True,
                      help="training run directory or converted directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--format", nargs="+", required=True,
                      choices=WRITE_FORMATS,
                      help="one or more of: %(choices)s")
  parser.add_argument("--bounds", default=None,
                      help="bounds JSON (default: the model's own: a run's "
                      "checkpoint, then the run)")
  parser.add_argument("--checkpoint", default=ckpt_lib.BEST_RECALL,
                      choices=ckpt_lib.KINDS,
                      help="which checkpoint of a training run")
  parser.add_argument("--platforms", nargs="+", default=list(DEFAULT_PLATFORMS),
                      choices=PLATFORMS,
                      help="stablehlo lowering platforms (default: "
                           "%(default)s)")
  parser.add_argument("--traversal-alpha", type=float, default=None,
                      help="alpha of the unsafe threshold b' stored in "
                           "hysac_head.json (default: the run's "
                           "config.eval.traversal_alpha; 0.8 for a "
                           "converted model)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a non-empty OUT/<format> (refused "
                           "without it)")
  args = parser.parse_args(argv)
  if args.traversal_alpha is not None:
    try:
      finite.check_number(args.traversal_alpha, "", "--traversal-alpha")
    except finite.NonFiniteError as e:
      parser.error(str(e))
  prog = parser.prog
  out = os.path.expanduser(args.out)
  try:
    check_out(out, args.format, args.overwrite)  # before the model loads
    src = load_source(args.model, args.bounds, args.checkpoint,
                      args.traversal_alpha,
                      merge="release" not in args.format)
    written = export(src, out, tuple(dict.fromkeys(args.format)),
                     tuple(args.platforms), args.overwrite)
  except (ModelDirError, StateDictError, ValueError, OSError) as e:
    # OSError: a missing bounds file, an --out that cannot be written.
    return cli.fail(prog, e)
  for fmt, directory in written.items():
    print(f"wrote {fmt}: {directory}")
  if src.bounds is None:
    print("note: no bounds found (pass --bounds): unsafe classification and "
          "traversal need them", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
