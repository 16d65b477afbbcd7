"""PyTorch / Hugging Face CLIP and HySAC checkpoints -> Flax params; export.

Our param names are the Hugging Face `CLIPModel` names, so conversion is a
rename plus a transpose (`hysac_jax/formats/torch_state.py` has the table,
the key names and both layouts).

Entry points:
- `clip_params_from_hf(path)`: a Hugging Face CLIP directory or hub id ->
  `(CLIPConfig, params)`.
- `hysac_params_from_pytorch(checkpoint, clip_path)`: a checkpoint in the
  HySAC release layout -> `(CLIPConfig, LoRAConfig, HySAC params)`.
- `save_pretrained(out_dir, ...)` / `read_converted(out_dir)`: the converted
  directory (serve it with `hysac_jax.serving.load_model(out_dir)`).
- CLI: `python -m hysac_jax.convert --clip PATH_OR_ID
  [--hysac-checkpoint FILE] --out DIR`, or `--open-clip NAME_OR_JSON
  --checkpoint FILE --out DIR` for OpenCLIP (`hysac_jax/openclip_import.py`).
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hysac_jax import cli
from hysac_jax import finite
from hysac_jax import outdir
from hysac_jax.formats.torch_state import (CheckpointError, load_torch_file,
                                           preview, to_flax_layout,
                                           torch_key, torch_shape)
from hysac_jax.models.clip import (CLIPConfig, CLIPModel, LoRAConfig,
                                   dummy_inputs)
from hysac_jax.models.sizes import clip_config_from_hf

FORMAT = "hysac_jax.pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
HEAD_FILE = "head.json"

# Keys that carry no weights we use: buffers and CLIP's own logit scale.
_IGNORED_HF = re.compile(r"(^|\.)(position_ids|logit_scale)$")
# The release also stores the image-normalisation buffers of its model.
_IGNORED_RELEASE = re.compile(r"(^|\.)(position_ids|pixel_mean|pixel_std)$")
# Release head scalars (all stored as logarithms, as in MERU) -> our names.
RELEASE_HEAD = {"curv": "log_curv", "visual_alpha": "log_alpha_image",
                "textual_alpha": "log_alpha_text",
                "logit_scale": "log_logit_scale"}
_TOWERS = {"visual": ("vision_model.", "visual_projection."),
           "textual": ("text_model.", "text_projection.")}


# --------------------------------------------------------------------------
# State dicts -> params (pure functions).


def clip_template(config, lora=None):
  """Flat `{path: ShapeDtypeStruct}` of a `CLIPModel`'s params (no compute)."""
  model = CLIPModel(config, lora)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          *dummy_inputs(config))
  return traverse_util.flatten_dict(shapes["params"])


def params_from_state_dict(state, config, lora=None, source="checkpoint",
                           ignore=_IGNORED_HF):
  """Builds `CLIPModel` params from a state dict with HF `CLIPModel` keys.

  Args:
    state: dict of PyTorch-layout numpy arrays, keyed like HF `CLIPModel`
      (`text_model.…`, `vision_model.…`, `text_projection.weight`,
      `visual_projection.weight`; peft LoRA as `….lora_A.weight`).
    config: `CLIPConfig`.
    lora: `LoRAConfig` or None; decides which LoRA keys are expected.
    source: a name for error messages (the file).
    ignore: regex of keys that may be present and are skipped.

  Returns:
    Nested param dict (float32 numpy leaves) in the `CLIPModel` layout.

  Raises:
    CheckpointError: listing missing and unexpected keys, or naming a key
      whose shape is wrong with both shapes.
  """
  template = clip_template(config, lora)
  flat, missing, used = {}, [], set()
  for path, spec in template.items():
    key = torch_key(path)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    array = np.asarray(state[key])
    expected = torch_shape(path, spec.shape)
    if tuple(array.shape) != expected:
      raise CheckpointError(
          f"{source}: shape mismatch for {key}: checkpoint has "
          f"{tuple(array.shape)}, the model expects {expected}")
    flat[path] = np.ascontiguousarray(to_flax_layout(path, array)).astype(
        np.float32)
  unexpected = sorted(k for k in state
                      if k not in used and not ignore.search(k))
  if missing or unexpected:
    if len(missing) == len(template):
      raise CheckpointError(
          f"{source} does not look like a CLIP checkpoint: none of the "
          f"{len(template)} expected keys (e.g. {missing[0]}) is present; it "
          f"has {len(state)} keys such as {sorted(state)[:5]}")
    raise CheckpointError(
        f"{source} does not match the model: {len(missing)} missing keys "
        f"{preview(missing)}; {len(unexpected)} unexpected keys "
        f"{preview(unexpected)}")
  return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------
# Reading files.


def _resolve_hf_dir(path_or_id):
  """A local directory, or a hub id downloaded with huggingface_hub."""
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id):
    raise CheckpointError(f"{path_or_id} is a file; expected a Hugging Face "
                          "CLIP directory (config.json + weights) or hub id")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(
        path_or_id, allow_patterns=["config.json", "model.safetensors",
                                    "model.safetensors.index.json",
                                    "model-*.safetensors"])
  except Exception as e:
    raise FileNotFoundError(
        f"{path_or_id!r} is not a local directory and could not be fetched "
        f"from the Hugging Face hub ({type(e).__name__}: {e}). Offline? "
        "Download it elsewhere (huggingface-cli download "
        f"{path_or_id}) and pass the directory.") from e


def load_hf_state_dict(directory):
  """The weights of a HF CLIP directory as {key: float32 numpy array}.

  Reads `model.safetensors` (or a sharded index) with `safetensors.numpy`,
  no torch needed; falls back to `pytorch_model.bin` via torch.
  """
  st = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  binary = os.path.join(directory, "pytorch_model.bin")
  if os.path.isfile(st):
    files = [st]
  elif os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, s) for s in shards]
  elif os.path.isfile(binary):
    return load_torch_file(binary)
  else:
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = {}
  for file in files:
    try:
      state.update(load_file(file))
    except Exception as e:
      raise CheckpointError(f"{file} is not a readable safetensors file: "
                            f"{e}") from e
  return state


def clip_params_from_hf(path):
  """Converts a Hugging Face CLIP checkpoint to `CLIPModel` params.

  Args:
    path: a directory with `config.json` and `model.safetensors` (or
      `pytorch_model.bin`), or a hub id such as
      `"openai/clip-vit-large-patch14"` (needs the network or the HF cache).

  Returns:
    `(CLIPConfig, params)`: params is the nested `CLIPModel` param dict
    (float32 numpy leaves), without LoRA.
  """
  directory = _resolve_hf_dir(os.fspath(path))
  config = clip_config_from_hf(directory)
  state = load_hf_state_dict(directory)
  return config, params_from_state_dict(state, config, None, source=directory)


# --------------------------------------------------------------------------
# The HySAC release layout.


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
    raise CheckpointError(f"LoRA ranks differ across layers: {sorted(ranks)}")
  order = LoRAConfig().targets
  return LoRAConfig(rank=ranks.pop(), alpha=alpha, dropout=dropout,
                    targets=tuple(sorted(targets, key=lambda t: (
                        order.index(t) if t in order else len(order), t))))


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
  if isinstance(checkpoint, (str, os.PathLike)):
    source = os.fspath(checkpoint)
    if not os.path.isfile(source):
      raise FileNotFoundError(f"HySAC checkpoint not found: {source}")
    state = load_torch_file(source)
  else:
    source = "HySAC state dict"
    state = {k: _as_numpy(v) for k, v in checkpoint.items()}
  config = clip_path if isinstance(clip_path, CLIPConfig) else (
      clip_config_from_hf(_resolve_hf_config(clip_path)))

  canonical, head, others = {}, {}, []
  for key, array in state.items():
    tower, name = _release_key(key)
    if tower is None:
      if name in RELEASE_HEAD:
        head[RELEASE_HEAD[name]] = np.asarray(array, np.float32).reshape(())
      elif not _IGNORED_RELEASE.search(name):
        others.append(key)
      continue
    if not name.startswith(_TOWERS[tower]):
      others.append(key)
      continue
    canonical[name] = array
  lora = _lora_from_state(canonical, lora_alpha, lora_dropout)
  missing_head = [f"{k} (-> {v})" for k, v in RELEASE_HEAD.items()
                  if v not in head]
  if not canonical:
    raise CheckpointError(
        f"{source} is not a HySAC checkpoint: no `visual.`/`textual.` tower "
        f"keys; it has {len(state)} keys such as {sorted(state)[:5]}")
  if missing_head or others:
    raise CheckpointError(
        f"{source} does not match the HySAC release layout: missing head "
        f"scalars {missing_head}; unexpected keys {preview(sorted(others))}")
  clip = params_from_state_dict(canonical, config, lora, source=source,
                                ignore=_IGNORED_RELEASE)
  return config, lora, {"clip": clip, **head}


def _as_numpy(value):
  if hasattr(value, "detach"):
    value = value.detach().float().numpy()
  return np.asarray(value)


def _resolve_hf_config(path_or_id):
  """The config.json of a HF directory or hub id (downloads only that)."""
  path = os.fspath(path_or_id)
  if os.path.isdir(path) or os.path.isfile(path):
    return path
  try:
    from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
    return hf_hub_download(path, CONFIG_FILE)
  except Exception as e:
    raise FileNotFoundError(
        f"{path!r} is not a local path and its config.json could not be "
        f"fetched from the Hugging Face hub ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------
# The converted directory.


def initial_head(config, curv_init=1.0):
  """The HySAC head scalars at their initial values (SPEC.md §2).

  Read from the HySAC module's own initialisers: called without inputs it
  creates only the four head params.
  """
  from hysac_jax.models.hysac import HySAC  # pylint: disable=g-import-not-at-top
  head = HySAC(config, None, curv_init=curv_init).init(jax.random.key(0))
  return {k: np.asarray(v, np.float32) for k, v in head["params"].items()}


def save_pretrained(out_dir, config, params, lora=None, mode="hyp",
                    curv_init=1.0, source=None, preprocess=None,
                    traversal_alpha=None):
  """Writes a converted HySAC model directory.

  Files: `config.json` (CLIP + LoRA configs, mode, curv_init),
  `params.safetensors` (float32, keys are `/`-joined param paths, e.g.
  `clip/text_model/encoder/layers_0/self_attn/k_proj/kernel`) and
  `head.json` (the four head scalars, stored logs and clamped values, for
  reading).

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
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
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
  from hysac_jax.models.hysac import head_scalars  # pylint: disable=g-import-not-at-top
  values = head_scalars(params, curv_init)
  head = {"stored_logs": {k: float(params[k]) for k in RELEASE_HEAD.values()},
          "values": {k: float(v) for k, v in values.items()}}
  with open(os.path.join(out_dir, HEAD_FILE), "w") as f:
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


def _read_meta(path):
  """config.json of a converted directory (raises naming the file)."""
  cfg_file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{path} is not a converted hysac_jax "
                            f"directory: {cfg_file} is missing")
  with open(cfg_file) as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{cfg_file} is not a {FORMAT} config; write it "
                          "with `python -m hysac_jax.convert`")
  return meta


def read_converted(path):
  """Reads a directory written by `save_pretrained` (or the CLI).

  Serve it with `hysac_jax.serving.load_model(path)`; this only reads.
  """
  path = os.fspath(path)
  meta = _read_meta(path)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
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


def load_pretrained(path, dtype=jnp.float32, merge=False):
  """Deprecated: use `hysac_jax.serving.load_model(path)`."""
  warnings.warn("hysac_jax.convert.load_pretrained is deprecated; use "
                "hysac_jax.serving.load_model", DeprecationWarning,
                stacklevel=2)
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  return serving.load_model(path, dtype=dtype, merge_lora=merge)


def converted_clip_config(path):
  """The `CLIPConfig` of a converted directory, or None if `path` is not one
  (e.g. a Hugging Face CLIP directory or hub id)."""
  try:
    return CLIPConfig.from_dict(_read_meta(path)["clip"])
  except (FileNotFoundError, CheckpointError):
    return None


def _same_pooling(a, b, vocab_size):
  """Whether two `eos_token_id`s pool at the same position: None (largest
  id) and 49407 agree on the OpenAI vocabulary, whose end-of-text token has
  the largest id."""
  openai_eot = {None, 2, 49407} if vocab_size == 49408 else {None, 2}
  return a == b or (a in openai_eot and b in openai_eot)


def check_run_compatible(path, clip_config):
  """Raises ValueError unless the converted directory `path` computes what
  a run's towers compute: the same `CLIPConfig` (widths, depths, activation,
  epsilons, pooling) and the image mean/std the data pipeline uses.

  `train.py --init_from` builds its model from the run config and only
  takes the weights from `path`, so an activation or normalisation the run
  does not share would change the model silently. (`config.model.clip=path`
  builds the towers from `path` itself.)
  """
  meta = _read_meta(path)
  ours = clip_config.to_dict()
  theirs = meta.get("clip", {})
  diffs = []
  for tower in ("text", "vision"):
    for field, value in ours[tower].items():
      other = theirs.get(tower, {}).get(field)
      if field == "eos_token_id" and _same_pooling(
          value, other, ours[tower].get("vocab_size")):
        continue
      if other != value:
        diffs.append(f"{tower}.{field} {other!r} (run: {value!r})")
  if theirs.get("projection_dim") != ours["projection_dim"]:
    diffs.append(f"projection_dim {theirs.get('projection_dim')!r} (run: "
                 f"{ours['projection_dim']!r})")
  if diffs:
    raise ValueError(
        f"converted model {path} does not match the run's CLIP "
        f"(config.model.clip / config.model.size): {'; '.join(diffs)}; "
        f"--config.model.clip={path} builds the run's towers from it")
  check_preprocess(path, meta.get("preprocess"))


def check_preprocess(path, pp):
  """Raises ValueError when the converted directory `path`, whose
  config.json says `"preprocess": pp`, expects images normalised otherwise
  than OpenAI's CLIP mean/std, which every image pipeline here (training,
  eval.py, predict) uses."""
  from hysac_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  if pp is None:  # converted from Hugging Face or the release: OpenAI's
    return
  for field, want in (("image_mean", preprocess.CLIP_MEAN),
                      ("image_std", preprocess.CLIP_STD)):
    if not np.allclose(pp[field], want, rtol=0, atol=1e-7):
      raise ValueError(
          f"converted model {path} expects images normalised with {field} "
          f"{pp[field]}, but the image pipelines use OpenAI's "
          f"{[float(v) for v in want]}")


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
  from hysac_jax import serving  # pylint: disable=g-import-not-at-top
  mode, lora, alpha = "hyp", None, None
  if hysac_checkpoint:
    config, lora, params = hysac_params_from_pytorch(
        hysac_checkpoint, clip, lora_alpha=lora_alpha)
    # A release (ours: export --format release) keeps its bounds and alpha
    # beside the .pth: they travel on with the model.
    alpha = _release_extras(os.path.dirname(os.fspath(hysac_checkpoint)),
                            out)
  elif os.path.isfile(os.path.join(os.path.expanduser(os.fspath(clip)),
                                   serving.HEAD_FILE)):
    # An hf export: its trained head (serving reads and checks it), not the
    # initial one, and its bounds.
    kind = serving.detect_kind(os.path.expanduser(os.fspath(clip)))
    if kind != "hf":
      raise ValueError(f"{clip} is a {kind} export: --clip takes a Hugging "
                       "Face CLIP directory or an hf export (export the run "
                       "with --format hf)")
    export = serving.load_model(clip)
    config, params = export.config, export.params
    mode, curv_init = export.mode, export.curv_init
    alpha = export.traversal_alpha
    if export.bounds:
      from hysac_jax import safety  # pylint: disable=g-import-not-at-top
      os.makedirs(out, exist_ok=True)
      safety.save_bounds(export.bounds, os.path.join(out, "bounds.json"))
  else:
    config, clip_params = clip_params_from_hf(clip)
    params = {"clip": clip_params, **initial_head(config, curv_init)}
  if merge and lora is not None:
    from hysac_jax.models.lora import merge_lora  # pylint: disable=g-import-not-at-top
    params = merge_lora(params, lora)
    lora = None
  save_pretrained(out, config, params, lora=lora, mode=mode,
                  curv_init=curv_init, traversal_alpha=alpha,
                  source={"clip": os.fspath(clip),
                          "hysac_checkpoint": hysac_checkpoint and
                                              os.fspath(hysac_checkpoint),
                          "merged_lora": bool(merge)})
  return out


RELEASE_BOUNDS_FILE = "hysac_bounds.json"  # release_format's names
RELEASE_EXTRAS_FILE = "hysac_jax.json"


def _release_extras(directory, out):
  """Copies the release's `hysac_bounds.json` in `directory` (if any) to
  `out/bounds.json`; returns the traversal alpha of its `hysac_jax.json`
  (written by `export --format release`), or None."""
  from hysac_jax import safety  # pylint: disable=g-import-not-at-top
  bounds_file = os.path.join(directory, RELEASE_BOUNDS_FILE)
  if os.path.isfile(bounds_file):
    os.makedirs(out, exist_ok=True)
    safety.save_bounds(safety.load_bounds(bounds_file),
                       os.path.join(out, "bounds.json"))
  extras_file = os.path.join(directory, RELEASE_EXTRAS_FILE)
  if not os.path.isfile(extras_file):
    return None
  try:
    with open(extras_file) as f:
      extras = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{extras_file} is not valid JSON: {e}") from None
  if not isinstance(extras, dict) or "traversal_alpha" not in extras:
    raise CheckpointError(f"{extras_file}: expected an object with "
                          "traversal_alpha")
  return finite.check_number(extras["traversal_alpha"], extras_file,
                             "traversal_alpha")


def main(argv=None):
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
  parser.add_argument("--checkpoint", default=None,
                      help="the OpenCLIP weights (.safetensors, .pt, .bin)")
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
  if args.checkpoint or args.force_quick_gelu:
    return cli.fail(parser.prog, "--checkpoint and --force-quick-gelu go "
                    "with --open-clip (for --clip use --hysac-checkpoint)",
                    cli.EXIT_USAGE)
  try:
    outdir.write_in_place(out, lambda d: convert(
        args.clip, d, args.hysac_checkpoint, merge=args.merge_lora,
        curv_init=args.curv_init, lora_alpha=args.lora_alpha))
  except (CheckpointError, ValueError, OSError, ImportError) as e:
    # ValueError: a bad config.json; OSError: missing or unwritable files;
    # ImportError: torch, needed for .pth / .bin checkpoints.
    return cli.fail(parser.prog, e)
  with open(os.path.join(out, HEAD_FILE)) as f:
    print(f"wrote {out}: {json.load(f)['values']}")
  return 0


def _main_open_clip(parser, args, out):
  """The --open-clip branch of `main`."""
  from hysac_jax import openclip_import  # pylint: disable=g-import-not-at-top
  if not args.checkpoint:
    return cli.fail(parser.prog, "--open-clip needs --checkpoint FILE (the "
                    "OpenCLIP weights)", cli.EXIT_USAGE)
  if args.hysac_checkpoint or args.merge_lora:
    return cli.fail(parser.prog, "--hysac-checkpoint and --merge-lora go "
                    "with --clip, not --open-clip", cli.EXIT_USAGE)
  def write(directory):
    return openclip_import.convert_openclip(
        args.open_clip, args.checkpoint, directory, curv_init=args.curv_init,
        force_quick_gelu=args.force_quick_gelu)[1]

  try:
    model = outdir.write_in_place(out, write)
  except (CheckpointError, ValueError, OSError, ImportError) as e:
    # ValueError: a config the Flax CLIP cannot reproduce (names the field).
    return cli.fail(parser.prog, e)
  print(f"wrote {out}: activation {model.config.text.hidden_act}, image "
        f"mean {list(model.image_mean)} std {list(model.image_std)} (from "
        f"{model.preprocess_source})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
