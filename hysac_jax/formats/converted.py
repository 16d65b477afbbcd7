"""The converted directory: a HySAC model as `python -m hysac_jax.convert`
writes it.

| file | what |
| --- | --- |
| `config.json` | `{"format": "hysac_jax.pretrained", "version": 1, "clip", "lora", "mode", "curv_init", "source", ["preprocess"], ["traversal_alpha"]}` |
| `params.safetensors` | float32, keys the `/`-joined param paths (`clip/text_model/encoder/layers_0/self_attn/k_proj/kernel`) |
| `head.json` | the four head scalars, stored logs and clamped values (for reading) |
| `bounds.json` | the bounds, when the model has them (`safety.BOUNDS_FILE`) |

`save_pretrained` writes it, `read_converted` reads it; serve it with
`hysac_jax.serving.load_model(path)`.
"""

import dataclasses
import json
import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from hysac_jax import finite
from hysac_jax.data.preprocess import CLIP_MEAN, CLIP_STD
from hysac_jax.formats.torch_state import StateDictError
from hysac_jax.models.clip import CLIPConfig, LoRAConfig
from hysac_jax.models.hysac import HEAD_NAMES, HySAC, head_scalars

FORMAT = "hysac_jax.pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
# The head scalars, for reading (not `exports.HEAD_FILE`, hysac_head.json).
SUMMARY_FILE = "head.json"


def is_converted_config(meta):
  """Whether a parsed config.json is a converted directory's (its tag)."""
  return isinstance(meta, dict) and meta.get("format") == FORMAT


def initial_head(config, curv_init=1.0):
  """The HySAC head scalars at their initial values (SPEC.md §2).

  Read from the HySAC module's own initialisers: called without inputs it
  creates only the four head params.
  """
  head = HySAC(config, None, curv_init=curv_init).init(jax.random.key(0))
  return {k: np.asarray(v, np.float32) for k, v in head["params"].items()}


def save_pretrained(out_dir, config, params, lora=None, mode="hyp",
                    curv_init=1.0, source=None, preprocess=None,
                    traversal_alpha=None):
  """Writes a converted HySAC model directory (see the module docstring).

  Args:
    out_dir: directory (created).
    config: `CLIPConfig`.
    params: the HySAC params tree (`{"clip": …, "log_curv", …}`).
    lora: `LoRAConfig` of the LoRA leaves in `params`, or None.
    mode: "hyp" or "euc".
    curv_init: c0, which sets the curvature's clamp range.
    source: optional dict describing where the weights came from.
    preprocess: optional `{"image_mean": [3], "image_std": [3]}` of the
      weights (an OpenCLIP import); absent means OpenAI's CLIP values.
    traversal_alpha: alpha of the unsafe threshold b' the model was
      evaluated with (an export's or a release export's), kept so that it
      travels with the model; None: the release's 0.8 when served.
  """
  # Fail closed: NaN weights would give NaN distances, i.e. no verdict.
  curv_init = finite.check_number(curv_init, "--curv-init", "curv_init",
                                  positive=True)
  src = source or {}
  where = (src.get("hysac_checkpoint") or src.get("open_clip_checkpoint")
           or src.get("clip") or "weights")
  for name, value in traverse_util.flatten_dict(params, sep="/").items():
    finite.check_finite_array(value, where, name)
  os.makedirs(out_dir, exist_ok=True)
  meta = {"format": FORMAT, "version": FORMAT_VERSION,
          "clip": config.to_dict(),
          "lora": None if lora is None else dataclasses.asdict(lora),
          "mode": mode, "curv_init": curv_init, "source": source or {}}
  if preprocess is not None:
    meta["preprocess"] = preprocess
  if traversal_alpha is not None:
    meta["traversal_alpha"] = finite.check_number(
        traversal_alpha, "traversal_alpha", "")
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    finite.dump(meta, f, indent=2)
  flat = traverse_util.flatten_dict(params, sep="/")
  save_file({k: np.array(v, np.float32, order="C")  # keeps 0-d scalars 0-d
             for k, v in flat.items()}, os.path.join(out_dir, PARAMS_FILE))
  values = head_scalars(params, curv_init)
  head = {"stored_logs": {k: float(params[k]) for k in HEAD_NAMES},
          "values": {k: float(v) for k, v in values.items()}}
  with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
    finite.dump(head, f, indent=2)


@dataclasses.dataclass(frozen=True)
class Converted:
  """The contents of a converted directory (see `read_converted`)."""
  config: CLIPConfig
  params: dict  # the HySAC params tree, float32 NumPy
  lora: LoRAConfig | None
  mode: str
  curv_init: float
  source: dict
  preprocess: dict | None  # image mean/std of an OpenCLIP import, else None
  traversal_alpha: float | None = None  # the model's own alpha, if it has one


def read_meta(path):
  """config.json of a converted directory (raises naming the file).

  Raises:
    FileNotFoundError: `path` has no config.json.
    StateDictError: its config.json is not a converted directory's.
  """
  cfg_file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{path} is not a converted hysac_jax "
                            f"directory: {cfg_file} is missing")
  with open(cfg_file) as f:
    meta = json.load(f)
  if not is_converted_config(meta):
    raise StateDictError(f"{cfg_file} is not a {FORMAT} config; write it "
                          "with `python -m hysac_jax.convert`")
  return meta


def read_converted(path):
  """Reads a directory written by `save_pretrained` (or the CLI).

  Serve it with `hysac_jax.serving.load_model(path)`; this only reads.
  """
  path = os.fspath(path)
  meta = read_meta(path)
  params = traverse_util.unflatten_dict(
      load_file(os.path.join(path, PARAMS_FILE)), sep="/")
  lora = None
  if meta["lora"]:
    lora = LoRAConfig(**{**meta["lora"],
                         "targets": tuple(meta["lora"]["targets"])})
  cfg_file = os.path.join(path, CONFIG_FILE)
  alpha = meta.get("traversal_alpha")
  return Converted(CLIPConfig.from_dict(meta["clip"]), params, lora,
                   meta["mode"],
                   finite.check_number(meta["curv_init"], cfg_file,
                                       "curv_init", positive=True),
                   meta["source"], meta.get("preprocess"),
                   None if alpha is None else finite.check_number(
                       alpha, cfg_file, "traversal_alpha"))


def converted_clip_config(path):
  """The `CLIPConfig` of a converted directory, or None if `path` is not one
  (e.g. a Hugging Face CLIP directory or hub id)."""
  try:
    return CLIPConfig.from_dict(read_meta(path)["clip"])
  except (FileNotFoundError, StateDictError):
    return None


def check_preprocess(path, pp):
  """Raises ValueError when the converted directory `path`, whose
  config.json says `"preprocess": pp`, expects images normalised otherwise
  than OpenAI's CLIP mean/std, which every image pipeline here (training,
  eval.py, predict) uses."""
  if pp is None:  # converted from Hugging Face or the release: OpenAI's
    return
  for field, want in (("image_mean", CLIP_MEAN),
                      ("image_std", CLIP_STD)):
    if not np.allclose(pp[field], want, rtol=0, atol=1e-7):
      raise ValueError(
          f"converted model {path} expects images normalised with {field} "
          f"{pp[field]}, but the image pipelines use OpenAI's "
          f"{[float(v) for v in want]}")
