"""Export a trained HySAC model for serving: Hugging Face, Orbax, StableHLO.

    python -m hysac_jax.export --model RUN_OR_CONVERTED_DIR --out OUT \
        --format hf orbax stablehlo

Each format goes to its own directory, `OUT/<format>/`, and every one holds
`hysac_head.json`: the HySAC head (curvature, feature scales, logit scale,
all clamped; and the stored logarithms), the mode, the bounds when known
(SPEC §4) with the derived thresholds b', and the CLIP config. LoRA is always
merged into the base weights first (`merge_lora`), so no format carries
adapters or optimizer state.

| format | files | read back with |
| --- | --- | --- |
| `hf` | `config.json`, `model.safetensors` (HF `CLIPModel` layout) | `transformers.CLIPModel.from_pretrained`, or `load_hf` |
| `orbax` | `params/` (the merged HySAC param tree, float32) | `load_orbax` |
| `stablehlo` | `encode_image`, `encode_text`, `classify_unsafe`, `traverse_to_safe` (`.jax_exported`), `params.safetensors` | `load_stablehlo` |

`--format release` writes the PyTorch HySAC release's own format instead
(`hysac_model.pth` with the LoRA unmerged, `hysac_bounds.json`, `clip/`; see
`hysac_jax/release_format.py`), for the release's code, not for
`load_exported`.

`load_exported(dir)` reads any of the three; `load_model(dir)` also takes a
training run or a converted directory. All return an object with
`encode_image(pixels)`, `encode_text(ids or strings)`,
`classify_unsafe(emb, modality)`, `traverse_to_safe(emb, modality)`, `curv`,
`head`, `bounds`.

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
and the traversal alpha as float32 scalars; `load_stablehlo` binds all of
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
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hysac_jax import cli
from hysac_jax import convert
from hysac_jax import safety
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from hysac_jax.models.lora import LORA_A, LORA_B, merge_lora

FORMATS = ("hf", "orbax", "stablehlo")
# What `export` writes: the serving formats above, which `load_exported`
# reads back, and the HySAC release's own (`hysac_jax/release_format.py`).
WRITE_FORMATS = FORMATS + ("release",)
EXPORT_FORMAT = "hysac_jax.export"
EXPORT_VERSION = 2  # 2: the StableHLO safety functions take alpha
HEAD_FILE = "hysac_head.json"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
ORBAX_PARAMS_DIR = "params"
STABLEHLO_PARAMS_FILE = "params.safetensors"
STABLEHLO_FUNCTIONS = ("encode_image", "encode_text", "classify_unsafe",
                       "traverse_to_safe")
STABLEHLO_SUFFIX = ".jax_exported"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
BOUNDS_FILES = ("bounds.json", "hysac_bounds.json")
# OpenAI CLIP configs say eos_token_id=2, which Hugging Face reads as "pool at
# the highest token id" (our `eos_token_id=None`).
_HF_ARGMAX_EOS = 2


class ModelDirError(ValueError):
  """A --model directory of the wrong kind, or an incomplete one."""


@dataclasses.dataclass(frozen=True)
class ExportSource:
  """A model ready to export: LoRA merged, head and bounds attached.

  Attributes:
    config: `CLIPConfig` of the towers.
    params: HySAC params tree `{"clip": …, "log_curv", …}` without LoRA
      leaves (float32 NumPy).
    mode: "hyp" or "euc".
    curv_init: c0, which sets the curvature's clamp range.
    bounds: release-shaped bounds dict (SPEC §4), or None.
    source: JSON-able description of where it came from.
    traversal_alpha: alpha of the traversal threshold b' (the run's
      `config.eval.traversal_alpha`; 0.8, the release's, otherwise).
    lora: the `LoRAConfig` of LoRA leaves still in `params`
      (`load_source(merge=False)`); None when merged or absent.
  """
  config: object
  params: dict
  mode: str = "hyp"
  curv_init: float = 1.0
  bounds: dict | None = None
  source: dict = dataclasses.field(default_factory=dict)
  traversal_alpha: float = safety.DEFAULT_ALPHA
  lora: object = None


# --------------------------------------------------------------------------
# Pure pieces: the head, the Flax -> Hugging Face mapping.


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
    norm_sq = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.maximum(norm_sq, 1e-12))
  return hysac_lib.lift(features, head[f"alpha_{modality}"], head["curv"])


def _to_torch(path, array):
  """Flax layout -> PyTorch layout (inverse of the conversion's transpose)."""
  array = np.asarray(array, np.float32)
  if path[-1] == "kernel":
    if array.ndim == 2:  # (in, out) -> (out, in)
      return array.T
    if array.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
      return array.transpose(3, 2, 0, 1)
  return array


def hf_state_dict(clip_params, logit_scale):
  """`CLIPModel` params (LoRA merged) -> a Hugging Face `CLIPModel` state dict.

  Args:
    clip_params: the "clip" sub-tree of HySAC params, without LoRA leaves.
    logit_scale: the (clamped) logit scale; stored as its log, as HF does.

  Returns:
    {key: contiguous float32 NumPy array}, keys as `convert.torch_key`.
  """
  state = {}
  for path, value in traverse_util.flatten_dict(clip_params).items():
    if path[-1] in (LORA_A, LORA_B):
      raise ValueError(f"param {'/'.join(path)} is a LoRA leaf: merge LoRA "
                       "(merge_lora) before exporting to Hugging Face")
    state[convert.torch_key(path)] = np.ascontiguousarray(
        _to_torch(path, value))
  state["logit_scale"] = np.asarray(np.log(logit_scale), np.float32)
  return state


def hf_config(config, logit_scale):
  """A Hugging Face `CLIPModel` `config.json` dict for a `CLIPConfig`."""
  t, v = config.text, config.vision
  eos = _HF_ARGMAX_EOS if t.eos_token_id is None else t.eos_token_id
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": config.projection_dim,
      "logit_scale_init_value": float(np.log(logit_scale)),
      "text_config": {
          "model_type": "clip_text_model",
          "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size,
          "num_hidden_layers": t.num_hidden_layers,
          "num_attention_heads": t.num_attention_heads,
          "max_position_embeddings": t.max_position_embeddings,
          "hidden_act": t.hidden_act, "layer_norm_eps": t.layer_norm_eps,
          "projection_dim": config.projection_dim, "eos_token_id": eos},
      "vision_config": {
          "model_type": "clip_vision_model",
          "image_size": v.image_size, "patch_size": v.patch_size,
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_hidden_layers": v.num_hidden_layers,
          "num_attention_heads": v.num_attention_heads,
          "num_channels": v.num_channels, "hidden_act": v.hidden_act,
          "layer_norm_eps": v.layer_norm_eps,
          "projection_dim": config.projection_dim},
  }


def thresholds(bounds, curv, alpha=safety.DEFAULT_ALPHA):
  """{"text": b', "image": b'} from the bounds (None without bounds)."""
  if bounds is None:
    return None
  return {m: safety.modality_threshold(curv, bounds, m, alpha)
          for m in safety.SAFE_GROUP}


def head_json(src, kind):
  """The contents of `hysac_head.json` for an export of `kind`."""
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
      "clip": dataclasses.asdict(src.config),
      "source": src.source,
  }


# --------------------------------------------------------------------------
# Sources: a training run or a converted directory.


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ModelDirError(f"{path} is not valid JSON: {e}") from None


def detect_kind(path):
  """What a model directory holds.

  Returns:
    "run" (a training run: config.json + Orbax checkpoints), "converted"
    (`python -m hysac_jax.convert`), or an export kind ("hf", "orbax",
    "stablehlo").

  Raises:
    ModelDirError: naming the directory and what was expected.
  """
  path = os.fspath(path)
  expected = ("expected a training run (config.json + checkpoints/), a "
              "converted model (python -m hysac_jax.convert) or an export "
              "(hysac_head.json, python -m hysac_jax.export)")
  if not os.path.isdir(path):
    what = "a file" if os.path.exists(path) else "missing"
    raise ModelDirError(f"model directory {path} is {what}: {expected}")
  head_file = os.path.join(path, HEAD_FILE)
  if os.path.isfile(head_file):
    head = _read_json(head_file)
    if head.get("format") == EXPORT_FORMAT and head.get("kind") in FORMATS:
      return head["kind"]
    raise ModelDirError(f"{head_file} is not a {EXPORT_FORMAT} head file "
                        f"(format {head.get('format')!r}, kind "
                        f"{head.get('kind')!r})")
  cfg_file = os.path.join(path, convert.CONFIG_FILE)
  if os.path.isfile(cfg_file):
    meta = _read_json(cfg_file)
    if meta.get("format") == convert.FORMAT:
      return "converted"
    checkpoints = [d for d in ("checkpoints", "best_recall", "best_loss")
                   if os.path.isdir(os.path.join(path, d))]
    if "model" in meta and "train" in meta:
      if not checkpoints:
        raise ModelDirError(f"{path} has a training config but no "
                            "checkpoints (checkpoints/, best_recall/): did "
                            "the run save any?")
      return "run"
    if meta.get("model_type") == "clip":
      raise ModelDirError(f"{path} is a plain Hugging Face CLIP directory "
                          f"without {HEAD_FILE}: convert it first "
                          "(python -m hysac_jax.convert --clip DIR --out ..)")
    raise ModelDirError(f"{cfg_file} is neither a run config nor a "
                        f"{convert.FORMAT} config: {expected}")
  raise ModelDirError(f"{path} has neither {HEAD_FILE} nor config.json: "
                      f"{expected}")


def _find_bounds(directories, bounds_path):
  """Bounds from an explicit file, else the first bounds file found."""
  if bounds_path:
    return safety.load_bounds(bounds_path)
  for d in directories:
    for name in BOUNDS_FILES:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return safety.load_bounds(path)
  return None


def run_traversal_alpha(config):
  """A run's `config.eval.traversal_alpha` (0.8 when the config has none)."""
  return float(config.get("eval", {}).get("traversal_alpha",
                                          safety.DEFAULT_ALPHA))


def load_source(model_dir, bounds_path=None, checkpoint="best_recall",
                traversal_alpha=None, merge=True):
  """Reads a training run or a converted directory for export.

  Args:
    model_dir: a run directory (`train.py --workdir`; its `config.json`
      rebuilds the frozen weights, the checkpoint holds the trainable ones)
      or a converted directory.
    bounds_path: optional bounds JSON; default `bounds.json` (or
      `hysac_bounds.json`) in the directory, else none.
    checkpoint: which checkpoint of a run: "best_recall", "best_loss" or
      "checkpoints" (the latest).
    traversal_alpha: alpha of the threshold b'; default the run's
      `config.eval.traversal_alpha` (0.8 for a converted model).
    merge: fold LoRA into the base weights; False keeps the LoRA leaves
      and sets `ExportSource.lora` (for the release format).

  Returns:
    `ExportSource` (LoRA merged when `merge`).
  """
  model_dir = os.path.abspath(os.path.expanduser(os.fspath(model_dir)))
  kind = detect_kind(model_dir)
  if kind == "run":
    from hysac_jax import trainer  # pylint: disable=g-import-not-at-top
    config = trainer.load_run_config(model_dir)
    state, _, _ = trainer.restore_for_eval(config, model_dir, checkpoint)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                          jax.device_get(state.params))
    lora = None if merge else state.model.lora
    if state.model.lora is not None and merge:
      params = merge_lora(params, state.model.lora)
    bounds = _find_bounds([model_dir, os.path.join(model_dir, checkpoint)],
                          bounds_path)
    if traversal_alpha is None:
      traversal_alpha = run_traversal_alpha(config)
    return ExportSource(state.model.clip, _numpy(params), config.model.mode,
                        float(config.model.curv_init), bounds,
                        {"run": model_dir, "checkpoint": checkpoint},
                        float(traversal_alpha), lora)
  if kind == "converted":
    model = convert.load_pretrained(model_dir, merge=merge)
    return ExportSource(model.config, _numpy(model.params), model.mode,
                        float(model.curv_init),
                        _find_bounds([model_dir], bounds_path),
                        {"converted": model_dir},
                        float(safety.DEFAULT_ALPHA if traversal_alpha is None
                              else traversal_alpha), model.lora)
  raise ModelDirError(f"{model_dir} is already an export ({kind}); export "
                      "from the training run or converted directory")


def _numpy(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


# --------------------------------------------------------------------------
# Writers.


def _write_head(out_dir, src, kind):
  with open(os.path.join(out_dir, HEAD_FILE), "w") as f:
    json.dump(head_json(src, kind), f, indent=2)
    f.write("\n")


def export_hf(src, out_dir):
  """Writes the Hugging Face CLIP layout (+ hysac_head.json) to `out_dir`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  logit_scale = float(hysac_lib.head_scalars(
      src.params, src.curv_init)["logit_scale"])
  with open(os.path.join(out_dir, HF_CONFIG_FILE), "w") as f:
    json.dump(hf_config(src.config, logit_scale), f, indent=2)
    f.write("\n")
  save_file(hf_state_dict(src.params["clip"], logit_scale),
            os.path.join(out_dir, HF_WEIGHTS_FILE), metadata={"format": "pt"})
  _write_head(out_dir, src, "hf")
  return out_dir


def export_orbax(src, out_dir):
  """Writes the merged HySAC params with Orbax (+ hysac_head.json)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  target = os.path.join(out_dir, ORBAX_PARAMS_DIR)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(target, src.params, force=True)
    ckpt.wait_until_finished()
  _write_head(out_dir, src, "orbax")
  return out_dir


def _geometry_functions():
  """The exported safety functions: pure, all inputs passed in."""

  def classify_unsafe(emb, curv, bound, alpha):
    """(b, D), (), (), () -> ((b,) bool unsafe, (b,) float32 distance)."""
    distance = safety.unsafe_score(emb, curv)
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
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
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
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  for name, exported in stablehlo_exports(src, platforms).items():
    with open(os.path.join(out_dir, name + STABLEHLO_SUFFIX), "wb") as f:
      f.write(exported.serialize())
  flat = traverse_util.flatten_dict(src.params, sep="/")
  save_file({k: np.array(v, np.float32, order="C") for k, v in flat.items()},
            os.path.join(out_dir, STABLEHLO_PARAMS_FILE))
  _write_head(out_dir, src, "stablehlo")
  return out_dir


def export(src, out, formats=FORMATS, platforms=DEFAULT_PLATFORMS,
           overwrite=False):
  """Exports `src` in each of `formats` to `out/<format>/`.

  `src` may hold unmerged LoRA (`src.lora`): the serving formats get it
  merged, "release" gets it as is. `overwrite` lets "release" replace a
  non-empty `out/release`.

  Returns:
    {format: directory}.
  """
  from hysac_jax import release_format  # pylint: disable=g-import-not-at-top
  unknown = [f for f in formats if f not in WRITE_FORMATS]
  if unknown:
    raise ValueError(f"unknown export formats {unknown}; known: "
                     f"{WRITE_FORMATS}")
  if "release" in formats:  # refuse before writing any format
    release_format.check_source(src, os.path.join(out, "release"), overwrite)
  merged = src
  if src.lora is not None and any(f != "release" for f in formats):
    merged = dataclasses.replace(
        src, params=_numpy(merge_lora(src.params, src.lora)), lora=None)
  writers = {"hf": lambda d: export_hf(merged, d),
             "orbax": lambda d: export_orbax(merged, d),
             "stablehlo": lambda d: export_stablehlo(merged, d, platforms),
             "release": lambda d: release_format.export_release(
                 src, d, overwrite)}
  return {f: writers[f](os.path.join(out, f)) for f in formats}


# --------------------------------------------------------------------------
# Loaders.


class ServingModel:
  """An exported (or source) model: embed, classify, redirect.

  Attributes:
    kind: "hf", "orbax", "stablehlo", "run" or "converted".
    head: dict(curv, alpha_image, alpha_text, logit_scale, mode, ...).
    mode: "hyp" or "euc".
    curv: the curvature magnitude (float).
    bounds: release-shaped bounds, or None.
    traversal_alpha: alpha of the threshold b' (the head's
      `traversal_alpha`, unless overridden).
    image_size, context_length: the input sizes the towers expect.
  """

  def __init__(self, kind, head, bounds, image_size, context_length,
               encode_image, encode_text):
    self.kind, self.head, self.bounds = kind, head, bounds
    self.mode, self.curv = head["mode"], float(head["curv"])
    self.traversal_alpha = float(head.get("traversal_alpha",
                                          safety.DEFAULT_ALPHA))
    self.image_size, self.context_length = image_size, context_length
    self._encode_image, self._encode_text = encode_image, encode_text

  def encode_image(self, pixels):
    """(B, H, W, 3) float32 NHWC CLIP-normalised -> (B, D) float32 points."""
    return np.asarray(self._encode_image(
        np.asarray(pixels, np.float32)))

  def encode_text(self, ids):
    """(B, L) int32 token ids, or strings (tokenised) -> (B, D) points."""
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids
                                and isinstance(ids[0], str)):
      from hysac_jax.data.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
      ids = tokenize(ids, max_len=self.context_length)
    return np.asarray(self._encode_text(np.asarray(ids, np.int32)))

  def safe_bound(self, modality):
    """b: the 95th-percentile distance of the modality's safe group."""
    if self.bounds is None:
      raise ValueError(f"{self.kind} model has no bounds: pass a bounds file "
                       "(bounds.json of the training run)")
    return float(self.bounds[safety.SAFE_GROUP[modality]]["up_95"])

  def threshold(self, modality):
    """b' of the modality, with this model's `traversal_alpha`."""
    self.safe_bound(modality)  # a clear error without bounds
    return safety.modality_threshold(self.curv, self.bounds, modality,
                                     self.traversal_alpha)

  def classify_unsafe(self, emb, modality):
    """(B, D) points -> ((B,) bool unsafe, (B,) distance from the origin)."""
    self.safe_bound(modality)  # a clear error without bounds
    emb = jnp.asarray(emb, jnp.float32)
    return (np.asarray(safety.classify_unsafe(emb, self.curv, self.bounds,
                                              modality,
                                              self.traversal_alpha)),
            np.asarray(safety.unsafe_score(emb, self.curv)))

  def traverse_to_safe(self, emb, modality):
    """(B, D) points moved toward the origin to distance <= b' (geodesic)."""
    return np.asarray(safety.traverse_to_safe(
        emb, self.curv, self.safe_bound(modality), self.traversal_alpha))


class StableHLOModel(ServingModel):
  """A `ServingModel` whose four functions are deserialised `jax.export`s."""

  def __init__(self, head, bounds, image_size, context_length, functions,
               params):
    self.functions = functions
    self.params = params
    image = jax.jit(functions["encode_image"].call)
    text = jax.jit(functions["encode_text"].call)
    super().__init__("stablehlo", head, bounds, image_size, context_length,
                     lambda x: image(params, x), lambda t: text(params, t))
    self._classify = jax.jit(functions["classify_unsafe"].call)
    self._traverse = jax.jit(functions["traverse_to_safe"].call)

  def classify_unsafe(self, emb, modality):
    unsafe, dist = self._classify(np.asarray(emb, np.float32),
                                  np.float32(self.curv),
                                  np.float32(self.safe_bound(modality)),
                                  np.float32(self.traversal_alpha))
    return np.asarray(unsafe), np.asarray(dist)

  def traverse_to_safe(self, emb, modality):
    return np.asarray(self._traverse(np.asarray(emb, np.float32),
                                     np.float32(self.curv),
                                     np.float32(self.safe_bound(modality)),
                                     np.float32(self.traversal_alpha)))


def _flax_model(kind, config, params, head, bounds):
  """A ServingModel running the Flax HySAC module on merged params."""
  model = convert.PretrainedHySAC(config, params, None, mode=head["mode"],
                                  curv_init=head["curv_init"])
  return ServingModel(kind, head, bounds, config.vision.image_size,
                      config.text.max_position_embeddings,
                      model.encode_image, model.encode_text)


def _read_head(directory, kind):
  path = os.path.join(directory, HEAD_FILE)
  if not os.path.isfile(path):
    raise ModelDirError(f"{directory} is not a {kind} export: {HEAD_FILE} "
                        "is missing")
  head = _read_json(path)
  if head.get("format") != EXPORT_FORMAT or head.get("kind") != kind:
    raise ModelDirError(f"{path} describes a {head.get('kind')!r} export "
                        f"(format {head.get('format')!r}), not {kind!r}")
  return head


def _clip_config(d):
  """`CLIPConfig` from the "clip" entry of hysac_head.json."""
  return CLIPConfig(text=TextConfig(**d["text"]),
                    vision=VisionConfig(**d["vision"]),
                    projection_dim=d["projection_dim"])


def _head_params(head):
  return {k: np.asarray(v, np.float32)
          for k, v in head["stored_logs"].items()}


def load_hf(directory):
  """Reads an `hf` export back with `convert.clip_params_from_hf` + the head.

  Returns:
    `ServingModel` (kind "hf").
  """
  directory = os.fspath(directory)
  head = _read_head(directory, "hf")
  config, clip_params = convert.clip_params_from_hf(directory)
  params = {"clip": clip_params, **_head_params(head)}
  return _flax_model("hf", config, params, head, head.get("bounds"))


def load_orbax(directory):
  """Reads an `orbax` export. Returns a `ServingModel` (kind "orbax")."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.fspath(directory))
  head = _read_head(directory, "orbax")
  params_dir = os.path.join(directory, ORBAX_PARAMS_DIR)
  from hysac_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  def restore():
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(params_dir)

  # Orbax raises plain Exceptions for missing or damaged files.
  params, cause = ckpt_lib.call_quietly(restore)
  if cause is not None:
    raise ModelDirError(f"orbax export {params_dir} cannot be restored: "
                        f"{cause}")
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  config = _clip_config(head["clip"])
  return _flax_model("orbax", config, params, head, head.get("bounds"))


def load_stablehlo(directory):
  """Deserialises a `stablehlo` export; binds params, curvature and bounds.

  Returns:
    `StableHLOModel`; its `functions` are the raw `jax.export.Exported`.
  """
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  head = _read_head(directory, "stablehlo")
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
  clip = head["clip"]
  return StableHLOModel(head, head.get("bounds"),
                        clip["vision"]["image_size"],
                        clip["text"]["max_position_embeddings"], functions,
                        params)


_LOADERS = {"hf": load_hf, "orbax": load_orbax, "stablehlo": load_stablehlo}


def load_exported(directory):
  """Reads any export directory (`OUT/hf`, `OUT/orbax`, `OUT/stablehlo`)."""
  kind = detect_kind(directory)
  if kind not in _LOADERS:
    raise ModelDirError(f"{directory} is a {kind} directory, not an export "
                        "(use load_model, or export it first)")
  return _LOADERS[kind](directory)


def load_model(directory, bounds_path=None, checkpoint="best_recall",
               traversal_alpha=None):
  """Any model directory as a `ServingModel`: export, run or converted.

  Args:
    directory: an export, a training run or a converted directory.
    bounds_path: optional bounds JSON overriding the directory's own.
    checkpoint: for a run: "best_recall", "best_loss" or "checkpoints".
    traversal_alpha: alpha of the threshold b'; default the model's own
      (an export's `hysac_head.json`, a run's `config.eval.traversal_alpha`,
      0.8 for a converted model).
  """
  kind = detect_kind(directory)
  if kind in _LOADERS:
    bounds = safety.load_bounds(bounds_path) if bounds_path else None
    model = _LOADERS[kind](directory)
    if bounds is not None:
      model.bounds = bounds
    if traversal_alpha is not None:
      model.traversal_alpha = float(traversal_alpha)
    return model
  src = load_source(directory, bounds_path, checkpoint, traversal_alpha)
  head = head_json(src, kind)
  return _flax_model(kind, src.config, src.params, head, src.bounds)


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
                      help="bounds JSON (default: bounds.json in --model)")
  parser.add_argument("--checkpoint", default="best_recall",
                      choices=("best_recall", "best_loss", "checkpoints"),
                      help="which checkpoint of a training run")
  parser.add_argument("--platforms", nargs="+", default=list(DEFAULT_PLATFORMS),
                      help="stablehlo lowering platforms (default: "
                           "%(default)s)")
  parser.add_argument("--traversal-alpha", type=float, default=None,
                      help="alpha of the unsafe threshold b' stored in "
                           "hysac_head.json (default: the run's "
                           "config.eval.traversal_alpha; 0.8 for a "
                           "converted model)")
  parser.add_argument("--overwrite", action="store_true",
                      help="let --format release replace the files of a "
                           "non-empty OUT/release")
  args = parser.parse_args(argv)
  prog = parser.prog
  out = os.path.expanduser(args.out)
  if os.path.exists(out) and not os.path.isdir(out):
    return cli.fail(prog, f"--out {out} is a file, not a directory")
  for fmt in args.format:
    sub = os.path.join(out, fmt)
    if os.path.exists(sub) and not os.path.isdir(sub):
      return cli.fail(prog, f"{sub} is a file, not a directory")
  try:
    src = load_source(args.model, args.bounds, args.checkpoint,
                      args.traversal_alpha,
                      merge="release" not in args.format)
    written = export(src, out, tuple(dict.fromkeys(args.format)),
                     tuple(args.platforms), args.overwrite)
  except (ModelDirError, convert.CheckpointError, ValueError, OSError) as e:
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
