"""The export directories (`python -m hysac_jax.export`): their files and
their head file.

Each export kind is one directory, `OUT/<kind>/`, holding `hysac_head.json`
(`{"format": "hysac_jax.export", "version", "kind", "curv", "curv_init",
"alpha_image", "alpha_text", "logit_scale", "stored_logs", "mode", "clip",
"bounds", "traversal_alpha", ...}`) and the kind's weights:

| kind | files |
| --- | --- |
| `hf` | `config.json`, `model.safetensors` (`formats.hf_clip`) |
| `orbax` | `params/` (the merged HySAC param tree) |
| `stablehlo` | `<function>.jax_exported` for `STABLEHLO_FUNCTIONS`, `params.safetensors` |

`head_json` / `write_head` write the head file and `read_head` reads and
checks it; `write_orbax` / `read_orbax` the orbax params,
`write_stablehlo` / `read_stablehlo` the stablehlo files (the hf weights
are `formats.hf_clip`'s). `hysac_jax.export` makes what they hold,
`hysac_jax.serving` loads them.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax import export as jax_export
from safetensors.numpy import load_file, save_file

from hysac_jax import finite
from hysac_jax import orbax_errors
from hysac_jax import safety
from hysac_jax.models import hysac as hysac_lib

EXPORT_KINDS = ("hf", "orbax", "stablehlo")
EXPORT_FORMAT = "hysac_jax.export"
EXPORT_VERSION = 2  # 2: the StableHLO safety functions take alpha
HEAD_FILE = "hysac_head.json"
ORBAX_PARAMS_DIR = "params"
STABLEHLO_PARAMS_FILE = "params.safetensors"
STABLEHLO_FUNCTIONS = ("encode_image", "encode_text", "classify_unsafe",
                       "traverse_to_safe")
STABLEHLO_SUFFIX = ".jax_exported"


class ModelDirError(ValueError):
  """A model directory of the wrong kind, or an incomplete one."""


def read_json(path):
  """A JSON file; `ModelDirError` naming it when it is not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelDirError(f"{path} is not valid JSON: {e}") from None


def head_kind(head):
  """The export kind a parsed head file names, or None if it is not one."""
  if (isinstance(head, dict) and head.get("format") == EXPORT_FORMAT
      and head.get("kind") in EXPORT_KINDS):
    return head["kind"]
  return None


def thresholds(bounds, curv, alpha=safety.DEFAULT_ALPHA):
  """{"text": b', "image": b'} from the bounds (None without bounds)."""
  if bounds is None:
    return None
  return {m: safety.modality_threshold(curv, bounds, m, alpha)
          for m in safety.SAFE_GROUP}


def head_json(src, kind):
  """The contents of `hysac_head.json` for an export of `kind` of `src` (a
  `serving.Model`: params, config, mode, curv_init, bounds, alpha, source)."""
  values = {k: float(v) for k, v in
            hysac_lib.head_scalars(src.params, src.curv_init).items()}
  how = ("points = exp_map0(alpha_<modality> * features, curv): space "
         "components on the Lorentz hyperboloid of curvature -curv"
         if src.mode == "hyp" else "points = features / ||features||")
  return {
      "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kind": kind,
      "mode": src.mode, "curv_init": float(src.curv_init), **values,
      "stored_logs": {k: float(src.params[k]) for k in hysac_lib.HEAD_NAMES},
      "bounds": src.bounds,
      "thresholds": thresholds(src.bounds, values["curv"],
                               src.traversal_alpha),
      "traversal_alpha": float(src.traversal_alpha),
      "apply": how,
      "clip": src.config.to_dict(),
      "source": src.source,
  }


def write_head(out_dir, head):
  """Writes the head dict (`head_json`) as `out_dir/hysac_head.json`."""
  with open(os.path.join(out_dir, HEAD_FILE), "w") as f:
    finite.dump(head, f, indent=2)
    f.write("\n")


def read_head(directory, kind):
  """The checked `hysac_head.json` of the `kind` export in `directory`.

  Every number a verdict depends on is checked here, where it is read.

  Raises:
    ModelDirError: the file is missing, or describes another kind.
    finite.NonFiniteError: a head number is not finite (or not positive).
  """
  path = os.path.join(directory, HEAD_FILE)
  if not os.path.isfile(path):
    raise ModelDirError(f"{directory} is not a {kind} export: {HEAD_FILE} "
                        "is missing")
  head = read_json(path)
  if head.get("format") != EXPORT_FORMAT or head.get("kind") != kind:
    raise ModelDirError(f"{path} describes a {head.get('kind')!r} export "
                        f"(format {head.get('format')!r}), not {kind!r}")
  for field in ("curv", "curv_init", "alpha_image", "alpha_text",
                "logit_scale"):
    finite.check_number(head.get(field), path, field, positive=True)
  finite.check_number(head.get("traversal_alpha", safety.DEFAULT_ALPHA),
                      path, "traversal_alpha")
  for field, value in (head.get("stored_logs") or {}).items():
    finite.check_number(value, path, f"stored_logs.{field}")
  if head.get("bounds") is not None:
    head["bounds"] = safety.validate_bounds(head["bounds"],
                                            f"{path}: bounds")
  return head


def write_stablehlo(out_dir, functions, params):
  """Writes a stablehlo export's functions and params to `out_dir`.

  Args:
    out_dir: the directory (exists).
    functions: {name: `jax.export.Exported`} for `STABLEHLO_FUNCTIONS`.
    params: the params tree the functions take (float32, saved with
      `/`-joined paths as keys).
  """
  for name, exported in functions.items():
    with open(os.path.join(out_dir, name + STABLEHLO_SUFFIX), "wb") as f:
      f.write(exported.serialize())
  flat = traverse_util.flatten_dict(params, sep="/")
  save_file({k: np.array(v, np.float32, order="C") for k, v in flat.items()},
            os.path.join(out_dir, STABLEHLO_PARAMS_FILE))


def read_stablehlo(directory, head):
  """({name: `jax.export.Exported`}, params) of the stablehlo export in
  `directory`, whose head file `head` (`read_head`) is already read.

  Raises:
    ModelDirError: a version-1 export (its safety functions take no alpha),
      a missing function or params file, or an unreadable params file.
  """
  if head.get("version", 1) < 2:
    raise ModelDirError(f"{directory} is a version-{head.get('version', 1)} "
                        "stablehlo export, whose safety functions take no "
                        "alpha: export the model again")
  functions = {}
  for name in STABLEHLO_FUNCTIONS:
    path = os.path.join(directory, name + STABLEHLO_SUFFIX)
    if not os.path.isfile(path):
      raise ModelDirError(f"stablehlo export incomplete: {path} is missing")
    with open(path, "rb") as f:
      functions[name] = jax_export.deserialize(bytearray(f.read()))
  params_file = os.path.join(directory, STABLEHLO_PARAMS_FILE)
  try:
    params = traverse_util.unflatten_dict(load_file(params_file), sep="/")
  except FileNotFoundError:
    raise ModelDirError(f"stablehlo export incomplete: {params_file} is "
                        "missing") from None
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError (a truncated file) is no OSError or ValueError.
    raise ModelDirError(f"{params_file} is not a readable safetensors file: "
                        f"{e}") from e
  return functions, params


def write_orbax(out_dir, params):
  """Writes an orbax export's params tree to `out_dir/params/` (`out_dir`
  absolute); a failed write is one `CheckpointWriteError` line."""
  target = os.path.join(out_dir, ORBAX_PARAMS_DIR)

  def write():
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(target, params, force=True)
      ckpt.wait_until_finished()

  # A full disk: one line, not Orbax's thread tracebacks.
  orbax_errors.save_quietly(write, f"orbax export {target}")


def read_orbax(directory):
  """The params tree (float32 NumPy) of the orbax export in `directory`.

  Raises:
    ModelDirError: the params cannot be restored (missing or damaged files;
      one line naming the innermost cause).
  """
  params_dir = os.path.join(directory, ORBAX_PARAMS_DIR)

  def restore():
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(params_dir)

  # Orbax raises plain Exceptions for missing or damaged files.
  params, cause = orbax_errors.call_quietly(restore)
  if cause is not None:
    raise ModelDirError(f"orbax export {params_dir} cannot be restored: "
                        f"{cause}")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
