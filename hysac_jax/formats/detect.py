"""What a path holds: the one detector of model directories.

`holds(path)` names what is there, without judging it:

| kind | what the directory holds |
| --- | --- |
| `run` | config.json of a training run (+ checkpoints, `formats.run_dir`) |
| `converted` | config.json tagged hysac_jax.pretrained (`formats.converted`) |
| `hf`, `orbax`, `stablehlo` | an export's hysac_head.json (`formats.exports`) |
| `exports` | no model, but export directories (`export --out` itself) |
| `release` | the PyTorch release's hysac_model.pth (`formats.release`) |
| `hf_clip` | a plain Hugging Face CLIP directory (`formats.hf_clip`) |
| `foreign` | a config.json of none of these |
| `none` | none of these files (an empty or a new directory, other files) |

With `strict=False` a damaged file is named, not raised: `export` (a
hysac_head.json that is not an export's) and `unreadable` (a config.json
that is not valid JSON).

`detect_kind(path)` is what `serving.load_model` can serve (`MODEL_KINDS`),
or the one `ModelDirError`, naming the path and, where there is one, the
command that converts it. `how_to_convert(kind)` says how a model of each
kind becomes a converted directory (`config.model.init_from`).
"""

import os

from hysac_jax.formats import converted
from hysac_jax.formats import exports
from hysac_jax.formats import hf_clip
from hysac_jax.formats import release
from hysac_jax.formats import run_dir
from hysac_jax.formats.exports import ModelDirError, read_json

# What `serving.load_model` serves.
MODEL_KINDS = ("run", "converted") + exports.EXPORT_KINDS
EXPORTS, RELEASE, HF_CLIP, FOREIGN, NONE = (
    "exports", "release", "hf_clip", "foreign", "none")
EXPORT, UNREADABLE = "export", "unreadable"  # holds(strict=False) only
_EXPECTED = ("expected a training run (config.json + checkpoints/), a "
             "converted model (python -m hysac_jax.convert) or an export "
             f"({exports.HEAD_FILE}, python -m hysac_jax.export)")
_FROM_RUN = ("export it as hf (python -m hysac_jax.export --format hf --out "
             "OUT) and convert that (python -m hysac_jax.convert --clip "
             "OUT/hf --out DIR; its head is kept)")
_TO_CONVERTED = {
    "run": f"this is a training run: to start from its weights, {_FROM_RUN}",
    "hf": "this is an hf export: convert it (python -m hysac_jax.convert "
          "--clip PATH --out DIR; its head is kept)",
    "orbax": f"this is an orbax export: from its run, {_FROM_RUN}",
    "stablehlo": f"this is a stablehlo export: from its run, {_FROM_RUN}",
}


def exports_inside(path):
  """The names of the export directories directly inside `path`."""
  return sorted(d for d in os.listdir(path)
                if os.path.isfile(os.path.join(path, d, exports.HEAD_FILE)))


def holds(path, strict=True):
  """What the directory `path` holds: a kind of the module docstring.

  Args:
    path: a directory.
    strict: raise on a damaged head file or config.json; False names it
      (`EXPORT`, `UNREADABLE`): what is there, not what can be loaded.

  Raises:
    ModelDirError: `path` is not a directory; with `strict`, also its
      hysac_head.json is not an export's, or a config.json or head file is
      not valid JSON.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    what = "a file" if os.path.exists(path) else "missing"
    raise ModelDirError(f"model directory {path} is {what}: {_EXPECTED}")
  head_file = os.path.join(path, exports.HEAD_FILE)
  if os.path.isfile(head_file):
    try:
      head = read_json(head_file)
    except ModelDirError:
      if strict:
        raise
      return EXPORT
    kind = exports.head_kind(head)
    if kind is None and strict:
      raise ModelDirError(
          f"{head_file} is not a {exports.EXPORT_FORMAT} head file (format "
          f"{head.get('format')!r}, kind {head.get('kind')!r})")
    return kind or EXPORT
  cfg_file = os.path.join(path, run_dir.CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    if os.path.isfile(os.path.join(path, release.MODEL_FILE)):
      return RELEASE
    return EXPORTS if exports_inside(path) else NONE
  try:
    meta = read_json(cfg_file)
  except ModelDirError:
    if strict:
      raise
    return UNREADABLE
  if converted.is_converted_config(meta):
    return "converted"
  if run_dir.is_run_config(meta):
    return "run"
  return HF_CLIP if hf_clip.is_hf_clip_config(meta) else FOREIGN


def detect_kind(path):
  """What a model directory holds: one of `MODEL_KINDS`.

  Raises:
    ModelDirError: naming the directory, what was expected and, for the
      release or a plain CLIP directory, the command that converts it.
  """
  path = os.fspath(path)
  kind = holds(path)
  if kind in exports.EXPORT_KINDS or kind == "converted":
    return kind
  if kind == "run":
    if not run_dir.has_checkpoints(path):
      raise ModelDirError(f"{path} has a training config but no "
                          "checkpoints (checkpoints/, best_recall/): did "
                          "the run save any?")
    return kind
  raise ModelDirError(_not_a_model(path, kind))


def _not_a_model(path, kind):
  """The message of `detect_kind` for a directory of no model kind."""
  if kind == RELEASE:
    model = os.path.join(path, release.MODEL_FILE)
    return (f"{path} is in the PyTorch release's format "
            f"({release.MODEL_FILE}), for the release's code: convert it "
            "first (python -m hysac_jax.convert --clip "
            f"{os.path.join(path, release.CLIP_DIR)} --hysac-checkpoint "
            f"{model} --out DIR)")
  if kind == EXPORTS:
    inside = exports_inside(path)
    return (f"{path} holds exports, not a model: pass one of them, e.g. "
            f"{os.path.join(path, inside[0])} (found: {', '.join(inside)})")
  if kind == HF_CLIP:
    return (f"{path} is a plain Hugging Face CLIP directory without "
            f"{exports.HEAD_FILE}: convert it first (python -m "
            "hysac_jax.convert --clip DIR --out ..)")
  if kind == FOREIGN:
    return (f"{os.path.join(path, run_dir.CONFIG_FILE)} is neither a run "
            f"config nor a {converted.FORMAT} config: {_EXPECTED}")
  return (f"{path} has neither {exports.HEAD_FILE} nor "
          f"{run_dir.CONFIG_FILE}: {_EXPECTED}")


def how_to_convert(kind):
  """How a model of `kind` (of `MODEL_KINDS`, not "converted") becomes a
  converted directory: the commands, as one clause."""
  return _TO_CONVERTED[kind]
