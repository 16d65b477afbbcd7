"""The HySAC release's own format: `hysac_model.pth` + bounds + CLIP.

Its reader (`hysac_params_from_pytorch`, `read_extras`; `python -m
hysac_jax.convert --hysac-checkpoint`) and its writer (`export_release`;
`python -m hysac_jax.export --format release`, into `OUT/release/`):

| file | what |
| --- | --- |
| `hysac_model.pth` | the release `HySAC` module's whole `state_dict` (base towers, unmerged LoRA, head), keys as current peft names them |
| `hysac_bounds.json` | the bounds (SPEC §4), the release's shape |
| `hysac_jax.json` | our traversal alpha (and curv_init), which `convert --hysac-checkpoint` reads back (the release's code ignores it) |
| `clip/` | the base towers (no LoRA) as a Hugging Face `CLIPModel` directory |

The release builds its model as `HySAC(visual=get_peft_model(
CLIPVisionModelWithProjection.from_pretrained(clip), cfg), textual=…)` with
the hard-coded `LoraConfig(r=16, lora_alpha=1, target_modules=[k_proj,
v_proj, out_proj, fc1, fc2, patch_embedding])`, then loads the file with
`load_state_dict(strict=True)`. Its keys, as current peft (0.21) writes
them:

| ours (`torch_state.torch_key`) | release |
| --- | --- |
| `vision_model.….k_proj.weight` (a LoRA target) | `visual.base_model.model.vision_model.….k_proj.base_layer.weight` |
| `vision_model.….k_proj.lora_A.weight` | `visual.base_model.model.vision_model.….k_proj.lora_A.default.weight` |
| `text_model.….q_proj.weight` (not a target) | `textual.base_model.model.text_model.….q_proj.weight` |
| `log_curv`, `log_alpha_image`, `log_alpha_text`, `log_logit_scale` | `curv`, `visual_alpha`, `textual_alpha`, `logit_scale` (logs) |
| (none) | `pixel_mean`, `pixel_std` `(3, 1, 1)` buffers: the release's defaults, unused by its encoders |

Head logs are written clamped into their ranges (`head_bounds`): the
release's `encode_image` / `encode_text` exponentiate them unclamped, so the
clamped logs make it compute our points. A model without LoRA (merged, or
never fine-tuned) is written with zero adapters (`lora_A = lora_B = 0`), so
the release's towers equal the base. A LoRA other than the release's (rank,
alpha or targets) is refused: the release's module cannot hold it unmerged.
"""

import json
import os
import re

import numpy as np
from flax import traverse_util

from hysac_jax import finite
from hysac_jax import safety
from hysac_jax.formats.hf_clip import (clip_template, hub_path,
                                       params_from_state_dict,
                                       read_clip_config, write_hf_clip)
from hysac_jax.formats.torch_state import (StateDictError, load_torch_file,
                                           preview, to_torch_layout,
                                           torch_key)
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models.clip import CLIPConfig, LoRAConfig
from hysac_jax.models.lora import LORA_A, LORA_B

MODEL_FILE = "hysac_model.pth"
BOUNDS_FILE = "hysac_bounds.json"
# Ours beside the release's files: the traversal alpha (and curv_init).
EXTRAS_FILE = "hysac_jax.json"
CLIP_DIR = "clip"
# Release head scalars (all stored as logarithms, as in MERU) -> our names.
RELEASE_HEAD = {"curv": "log_curv", "visual_alpha": "log_alpha_image",
                "textual_alpha": "log_alpha_text",
                "logit_scale": "log_logit_scale"}
# The release also stores the image-normalisation buffers of its model.
_IGNORED = re.compile(r"(^|\.)(position_ids|pixel_mean|pixel_std)$")
_TOWERS = {"visual": ("vision_model.", "visual_projection."),
           "textual": ("text_model.", "text_projection.")}
# The release's hard-coded LoraConfig (dropout only matters for training).
RELEASE_LORA = LoRAConfig(rank=16, alpha=1.0, dropout=0.1,
                          targets=("k_proj", "v_proj", "out_proj", "fc1",
                                   "fc2", "patch_embedding"))
# Our head scalar -> the release's parameter (both store logarithms).
HEAD_KEYS = {ours: theirs for theirs, ours in RELEASE_HEAD.items()}
# The release `HySAC`'s default image-normalisation buffers; its encoders do
# not use them (its data loader normalises).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
_TOWER = {"vision_model": "visual", "visual_projection": "visual",
          "text_model": "textual", "text_projection": "textual"}


class ReleaseFormatError(ValueError):
  """A model or output the release format cannot hold (says why)."""


# --------------------------------------------------------------------------
# Pure pieces.


def release_key(path, targets=RELEASE_LORA.targets):
  """The release `HySAC.state_dict()` key of a `CLIPModel` param path.

  Args:
    path: tuple of names, e.g. `("vision_model", "encoder", "layers_0",
      "self_attn", "k_proj", "kernel")`.
    targets: the LoRA target module names (their base weights move under
      peft's `base_layer`).

  Returns:
    e.g. `"visual.base_model.model.vision_model.encoder.layers.0.self_attn.
    k_proj.base_layer.weight"`.
  """
  key = torch_key(path)
  tower = _TOWER[path[0]]
  module, suffix = key.rsplit(".", 1)
  if path[-1] in (LORA_A, LORA_B):
    key = f"{module}.default.{suffix}"
  elif len(path) > 1 and path[-2] in targets:
    key = f"{module}.base_layer.{suffix}"
  return f"{tower}.base_model.model.{key}"


def check_lora(lora):
  """Refuses a LoRA the release's `HySAC` cannot hold unmerged.

  Args:
    lora: the model's `LoRAConfig`, or None (no LoRA leaves in the params).

  Raises:
    ReleaseFormatError: naming the rank, alpha and targets that differ.
  """
  if lora is None or lora.rank == 0:
    return
  want = RELEASE_LORA
  if (lora.rank, float(lora.alpha), set(lora.targets)) != (
      want.rank, want.alpha, set(want.targets)):
    raise ReleaseFormatError(
        f"the release format holds the release's LoRA only (rank "
        f"{want.rank}, alpha {want.alpha:g}, targets {list(want.targets)}: "
        f"its HySAC hard-codes that LoraConfig); this model has rank "
        f"{lora.rank}, alpha {float(lora.alpha):g}, targets "
        f"{list(lora.targets)}. Export --format hf (LoRA merged) instead")


def with_release_lora(config, params, lora):
  """`params["clip"]` with LoRA leaves: its own, or zeros when it has none.

  Zero `A` and `B` make each peft layer equal its base layer exactly.
  """
  check_lora(lora)
  clip = traverse_util.flatten_dict(params["clip"])
  if lora is not None and lora.rank:
    return clip
  for path, spec in clip_template(config, RELEASE_LORA).items():
    if path[-1] in (LORA_A, LORA_B):
      clip[path] = np.zeros(spec.shape, np.float32)
  return clip


def clamped_head(params, curv_init=1.0):
  """{release name: 0-d float32 log}: head logs clamped into their ranges.

  The clamp is `head_scalars`' own, so `exp` of these is what our model
  uses; a log already inside its range is returned unchanged.
  """
  out = {}
  for name, (low, high) in hysac_lib.head_bounds(curv_init).items():
    value = np.float32(params[name])
    out[HEAD_KEYS[name]] = np.asarray(
        np.clip(value, np.float32(low), np.float32(high)), np.float32)
  return out


def release_state_dict(config, params, lora, curv_init=1.0):
  """A HySAC params tree -> the release `HySAC.state_dict()` (NumPy).

  Args:
    config: `CLIPConfig` of the towers.
    params: the HySAC params tree (`{"clip": …, "log_curv", …}`), LoRA not
      merged.
    lora: the `LoRAConfig` of its LoRA leaves, or None (none: zero adapters
      are written).
    curv_init: c0, which sets the curvature's clamp range.

  Returns:
    {key: contiguous float32 array} in the module's order: its own
    parameters (`logit_scale`, `curv`, `visual_alpha`, `textual_alpha`),
    buffers (`pixel_mean`, `pixel_std`), then `visual.…`, `textual.…`.

  Raises:
    ReleaseFormatError: a LoRA other than the release's (`check_lora`).
  """
  head = clamped_head(params, curv_init)
  state = {k: head[k] for k in ("logit_scale", "curv", "visual_alpha",
                                "textual_alpha")}
  state["pixel_mean"] = np.asarray(PIXEL_MEAN, np.float32).reshape(3, 1, 1)
  state["pixel_std"] = np.asarray(PIXEL_STD, np.float32).reshape(3, 1, 1)
  towers = {}
  for path, value in with_release_lora(config, params, lora).items():
    towers[release_key(path)] = np.ascontiguousarray(
        to_torch_layout(path, value))
  for tower in ("visual.", "textual."):
    state.update({k: v for k, v in towers.items() if k.startswith(tower)})
  return state


def base_clip_params(params):
  """`params["clip"]` without its LoRA leaves: the frozen base towers."""
  flat = traverse_util.flatten_dict(params["clip"])
  return traverse_util.unflatten_dict(
      {p: v for p, v in flat.items() if p[-1] not in (LORA_A, LORA_B)})


# --------------------------------------------------------------------------
# Writing.


def check_source(src):
  """Everything about the model that can refuse a release export, checked
  before anything is written (`export.check_out` checks the directory).

  Args:
    src: a `serving.Model`, LoRA unmerged (`export.load_source(merge=False)`).

  Raises:
    ReleaseFormatError: a Euclidean model, no bounds, or a LoRA other than
      the release's.
  """
  if src.mode != "hyp":
    raise ReleaseFormatError(
        f"the release format holds HySAC models (mode 'hyp'); this one is "
        f"{src.mode!r}")
  if src.bounds is None:
    raise ReleaseFormatError(
        f"the release format needs bounds ({BOUNDS_FILE}, which the "
        "release's HySAC loads): pass --bounds FILE, the run's bounds.json, "
        "which train.py writes when the run ends (a run stopped early: rerun "
        "its train.py command to finish it), or a release's "
        f"{BOUNDS_FILE}")
  check_lora(src.lora)


def export_release(src, out_dir):
  """Writes `hysac_model.pth`, `hysac_bounds.json` and `clip/` to `out_dir`
  (created; `export.export` gives it a fresh one and checks the old).

  Args:
    src: a `serving.Model` with LoRA unmerged (`src.lora` its config) or
      without LoRA.
    out_dir: the directory.

  Returns:
    `out_dir`.
  """
  check_source(src)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ReleaseFormatError(f"writing {MODEL_FILE} needs torch: pip install "
                             "'hysac-jax[torch]'") from e
  state = release_state_dict(src.config, src.params, src.lora, src.curv_init)
  clip_dir = os.path.join(out_dir, CLIP_DIR)
  os.makedirs(out_dir, exist_ok=True)
  torch.save({k: torch.tensor(v) for k, v in state.items()},
             os.path.join(out_dir, MODEL_FILE))
  safety.save_bounds(src.bounds, os.path.join(out_dir, BOUNDS_FILE))
  # The release's code hard-codes alpha 0.8; ours travels beside it, so that
  # convert --hysac-checkpoint keeps the model's threshold b'.
  with open(os.path.join(out_dir, EXTRAS_FILE), "w") as f:
    finite.dump({"traversal_alpha": float(src.traversal_alpha),
                 "curv_init": float(src.curv_init)}, f, indent=2)
    f.write("\n")
  write_hf_clip(clip_dir, src.config, base_clip_params(src.params),
                float(np.exp(state["logit_scale"])))
  return out_dir


# --------------------------------------------------------------------------
# Reading.


def _release_key(key):
  """Canonical name of a release key: (tower or None, HF-style key).

  Handles `module.` (DDP), peft's `base_model.model.` prefix, the new
  `base_layer` wrapper and the adapter name (`lora_A.default.weight`).
  """
  key = re.sub(r"^module\.", "", key)
  tower, _, rest = key.partition(".")
  if tower not in _TOWERS:
    return None, key
  rest = re.sub(r"^base_model\.model\.", "", rest)
  rest = rest.replace(".base_layer.", ".")
  rest = re.sub(r"\.(lora_[AB])\.(?!weight$)[^.]+\.weight$", r".\1.weight",
                rest)
  return tower, rest


def _lora_from_state(canonical, alpha, dropout):
  """The LoRAConfig implied by the LoRA keys present (None if there are none)."""
  ranks, targets = set(), set()
  for key, array in canonical.items():
    m = re.search(r"\.([^.]+)\.lora_A\.weight$", key)
    if m:
      ranks.add(int(array.shape[0]))
      targets.add(m.group(1))
  if not ranks:
    return None
  if len(ranks) > 1:
    raise StateDictError(f"LoRA ranks differ across layers: {sorted(ranks)}")
  order = LoRAConfig().targets
  return LoRAConfig(rank=ranks.pop(), alpha=alpha, dropout=dropout,
                    targets=tuple(sorted(targets, key=lambda t: (
                        order.index(t) if t in order else len(order), t))))


def _as_numpy(value):
  if hasattr(value, "detach"):
    value = value.detach().float().numpy()
  return np.asarray(value)


def _read_state(checkpoint):
  """(state dict of numpy arrays, its name for messages)."""
  if isinstance(checkpoint, (str, os.PathLike)):
    source = os.fspath(checkpoint)
    if not os.path.isfile(source):
      raise FileNotFoundError(f"HySAC checkpoint not found: {source}")
    return load_torch_file(source), source
  return ({k: _as_numpy(v) for k, v in checkpoint.items()},
          "HySAC state dict")


def _split_state(state, source):
  """A release state dict -> (tower keys in HF names, head logs by our
  names); raises `StateDictError` on keys of neither."""
  canonical, head, others = {}, {}, []
  for key, array in state.items():
    tower, name = _release_key(key)
    if tower is None:
      if name in RELEASE_HEAD:
        head[RELEASE_HEAD[name]] = np.asarray(array, np.float32).reshape(())
      elif not _IGNORED.search(name):
        others.append(key)
    elif name.startswith(_TOWERS[tower]):
      canonical[name] = array
    else:
      others.append(key)
  missing_head = [f"{k} (-> {v})" for k, v in RELEASE_HEAD.items()
                  if v not in head]
  if not canonical:
    raise StateDictError(
        f"{source} is not a HySAC checkpoint: no `visual.`/`textual.` tower "
        f"keys; it has {len(state)} keys such as {sorted(state)[:5]}")
  if missing_head or others:
    raise StateDictError(
        f"{source} does not match the HySAC release layout: missing head "
        f"scalars {missing_head}; unexpected keys {preview(sorted(others))}")
  return canonical, head


def hysac_params_from_pytorch(checkpoint, clip_path, lora_alpha=1.0,
                              lora_dropout=0.1):
  """Converts a checkpoint in the HySAC release layout.

  The release (`hysac_model.pth`) is a `torch.save`d `HySAC.state_dict()`:
  peft-wrapped towers under `visual.base_model.model.vision_model…` /
  `textual.base_model.model.text_model…` (plus `visual_projection` /
  `text_projection`), the scalars `curv`, `visual_alpha`, `textual_alpha`,
  `logit_scale` — all stored as logarithms, as in MERU — and the
  `pixel_mean` / `pixel_std` buffers (ignored). Both peft layouts are
  accepted: old (`k_proj.weight`) and new (`k_proj.base_layer.weight`), with
  or without the adapter name (`lora_A.default.weight` / `lora_A.weight`).

  Args:
    checkpoint: path to the `.pth` file, or an already loaded state dict
      (tensors or numpy arrays).
    clip_path: the base CLIP (HF directory or hub id, only its config.json is
      read) or a `CLIPConfig`.
    lora_alpha: LoRA alpha (not stored in the checkpoint; the release uses 1).
    lora_dropout: LoRA dropout for further training (release: 0.1).

  Returns:
    `(CLIPConfig, LoRAConfig or None, params)` with params the HySAC tree
    `{"clip": …, "log_curv", "log_alpha_image", "log_alpha_text",
    "log_logit_scale"}` (float32 numpy leaves). The rank and targets of the
    LoRAConfig are read from the checkpoint.
  """
  state, source = _read_state(checkpoint)
  config = clip_path if isinstance(clip_path, CLIPConfig) else (
      read_clip_config(hub_path(clip_path, config_only=True)))
  canonical, head = _split_state(state, source)
  lora = _lora_from_state(canonical, lora_alpha, lora_dropout)
  clip = params_from_state_dict(canonical, config, lora, source=source,
                                ignore=_IGNORED)
  return config, lora, {"clip": clip, **head}


def read_extras(directory):
  """The traversal alpha of `directory/hysac_jax.json` (written by `export
  --format release`), or None when there is no such file."""
  extras_file = os.path.join(directory, EXTRAS_FILE)
  if not os.path.isfile(extras_file):
    return None
  try:
    with open(extras_file) as f:
      extras = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StateDictError(f"{extras_file} is not valid JSON: {e}") from None
  if not isinstance(extras, dict) or "traversal_alpha" not in extras:
    raise StateDictError(f"{extras_file}: expected an object with "
                          "traversal_alpha")
  return finite.check_number(extras["traversal_alpha"], extras_file,
                             "traversal_alpha")
