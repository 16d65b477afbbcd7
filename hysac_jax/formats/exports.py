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

`read_head` reads and checks the head file; `hysac_jax.export` writes the
directories and `hysac_jax.serving` loads them.
"""

import json
import os

from hysac_jax import finite
from hysac_jax import safety

EXPORT_KINDS = ("hf", "orbax", "stablehlo")
EXPORT_FORMAT = "hysac_jax.export"
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
