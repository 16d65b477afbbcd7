"""OpenCLIP checkpoints -> this project's CLIP params and converted directory.

OpenCLIP (`open_clip.model.CLIP`) keeps the OpenAI layout; the map to our
Hugging Face names (see `hysac_jax/models/clip.py`) is:

| OpenCLIP key | our param | transform |
| --- | --- | --- |
| `token_embedding.weight` | `text_model/embeddings/token_embedding/embedding` | none |
| `positional_embedding` | `text_model/embeddings/position_embedding/embedding` | none |
| `transformer.resblocks.i.ln_1` / `ln_2` | `…/layers_i/layer_norm1` / `layer_norm2` | none |
| `….attn.in_proj_weight` `(3D, D)`, `in_proj_bias` | `…/self_attn/{q,k,v}_proj` | split in three rows, transpose |
| `….attn.out_proj` | `…/self_attn/out_proj` | transpose |
| `….mlp.c_fc` / `c_proj` | `…/mlp/fc1` / `fc2` | transpose |
| `ln_final` | `text_model/final_layer_norm` | none |
| `text_projection` `(D, E)` (used as `x @ P`) | `text_projection/kernel` | none |
| `visual.conv1.weight` `(D, 3, p, p)`, no bias | `…/patch_embedding/kernel` | `(p, p, 3, D)` |
| `visual.class_embedding` | `…/embeddings/class_embedding` | none |
| `visual.positional_embedding` | `…/embeddings/position_embedding/embedding` | none |
| `visual.ln_pre` / `ln_post` | `vision_model/pre_layrnorm` / `post_layernorm` | none |
| `visual.proj` `(D, E)` (used as `x @ P`) | `visual_projection/kernel` | none |
| `logit_scale`, `logit_bias` | - | not imported: HySAC has its own head |

The architecture comes from an OpenCLIP model config (`open_clip/
model_configs/NAME.json`, or a hub `open_clip_config.json` with `model_cfg`
and `preprocess_cfg`). Every field of open_clip 3.3's `CLIPVisionCfg` /
`CLIPTextCfg` is either mapped exactly, ignorable (it changes nothing in the
inference forward pass; the reason is noted by the field) or rejected with an
error naming it: a converted model computes what open_clip computes, or
there is no converted model.

Only torch is needed, to read `.pt`/`.bin` checkpoints (`.safetensors` need
nothing more); `open_clip` itself is only used to find its bundled config of
a model name, and is never imported.
"""

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re

import numpy as np
from flax import traverse_util

from hysac_jax.data import preprocess
from hysac_jax.formats.converted import initial_head, save_pretrained
from hysac_jax.formats.hf_clip import clip_template
from hysac_jax.formats.torch_state import (key_mismatch, load_weights_file,
                                           to_flax_layout)
from hysac_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

# OpenCLIP's `PreprocessCfg` defaults (open_clip/constants.py): OpenAI's
# dataset statistics, used by open_clip when a config names none.
OPENAI_MEAN, OPENAI_STD = preprocess.OPENAI_MEAN, preprocess.OPENAI_STD

# The hub's open_clip_config.json (model_cfg + preprocess_cfg).
HUB_CONFIG_FILE = "open_clip_config.json"

# Keys of an OpenCLIP state dict that hold no tower weights: the contrastive
# head (HySAC has its own, initialised as for Hugging Face CLIP), and the
# metadata ints of OpenAI's original checkpoints.
_IGNORED_KEYS = re.compile(
    r"^(logit_scale|logit_bias|input_resolution|context_length|vocab_size"
    r"|attn_mask)$")


class OpenCLIPConfigError(ValueError):
  """An OpenCLIP config this project cannot reproduce exactly (names the
  field)."""


# --------------------------------------------------------------------------
# Config fields, as in open_clip 3.3's model.py. Each is "used" (read below),
# "ignored" (no effect on the forward pass we reproduce; why is said here) or
# a rule: a function of the value returning an error or None.

_SAME_FORWARD = "ignored"


def _must_be(expected, what):
  """A rule accepting only `expected` (None or False: any false value, as
  open_clip tests these fields for truth)."""
  def check(value):
    if value == expected or (expected in (None, False) and not value):
      return None
    if expected in (None, False):
      return f"is {value!r}: {what}"
    return f"is {value!r}: {what}; only {expected!r} is"
  return check


def _block_rule(value):
  if value not in (None, "default"):
    return (f"is {value!r}: custom attention blocks are not supported, only "
            "the default pre-LayerNorm block")
  return None


_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads",
                 "scale_attn_inner", "scale_attn", "scale_fc")

_COMMON_FIELDS = {
    "width": "used", "layers": "used", "mlp_ratio": "used",
    # open_clip adds LayerScale when this `is not None`, even for 0.
    "ls_init_value": lambda v: (None if v is None else
                                f"is {v!r}: layer scale is not supported"),
    # Only changes what open_clip's forward returns (the token sequence as
    # well), not the pooled features.
    "output_tokens": _SAME_FORWARD,
    "act_kwargs": _must_be(None, "activation arguments are not supported"),
    "norm_kwargs": "used",
    "block_type": _block_rule,
    **{name: _must_be(False, "a custom attention block is not supported")
       for name in _CUSTOM_BLOCK},
}

_VISION_FIELDS = {
    **_COMMON_FIELDS,
    "head_width": "used", "patch_size": "used", "image_size": "used",
    # Drops patches in training mode only; inference sees every patch.
    "patch_dropout": _SAME_FORWARD,
    "attentional_pool": _must_be(False, "the attentional pooler (CoCa) is "
                                 "not supported"),
    # Read only when attentional_pool is set (rejected above).
    "attn_pooler_queries": _SAME_FORWARD, "attn_pooler_heads": _SAME_FORWARD,
    "no_ln_pre": _must_be(False, "the Flax CLIP always has ln_pre "
                          "(pre_layrnorm)"),
    "pos_embed_type": _must_be("learnable", "only learned position "
                               "embeddings are supported"),
    # LayerNorm acts on each token alone, so with 'tok' pooling (the only one
    # accepted) normalising then pooling equals pooling then normalising.
    "final_ln_after_pool": _SAME_FORWARD,
    "pool_type": _must_be("tok", "only class-token pooling is supported"),
    "timm_model_name": _must_be(None, "timm vision towers are not "
                                "supported"),
    # Read only with timm_model_name (rejected above).
    **{name: _SAME_FORWARD for name in (
        "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
        "timm_drop", "timm_drop_path")},
}

_TEXT_FIELDS = {
    **_COMMON_FIELDS,
    "heads": "used", "context_length": "used", "vocab_size": "used",
    # The project tokenizes with OpenAI's CLIP BPE (hysac_jax/data/
    # tokenizer.py): a model trained on other token ids would be fed wrong
    # ids, silently.
    "hf_tokenizer_name": _must_be(None, "hysac_jax tokenizes with OpenAI's "
                                  "CLIP BPE only"),
    "tokenizer_mode": _must_be(None, "hysac_jax tokenizes with OpenAI's "
                               "CLIP BPE only"),
    "tokenizer_kwargs": _must_be(None, "hysac_jax tokenizes with OpenAI's "
                                 "CLIP BPE only"),
    "embed_cls": _must_be(False, "a text class token (CoCa) is not "
                          "supported"),
    # Read only with embed_cls (rejected) or a bidirectional mask (rejected).
    "pad_id": _SAME_FORWARD,
    "eos_id": "used",
    "no_causal_mask": _must_be(False, "the text tower is always causal"),
    # open_clip's CLIP.encode_text applies ln_final to every token before
    # pooling whatever this says, and LayerNorm acts on each token alone.
    "final_ln_after_pool": _SAME_FORWARD,
    "pool_type": "used",
    "proj_bias": _must_be(False, "the text projection has no bias"),
    "proj_type": _must_be("linear", "the text tower always ends in a "
                          "linear projection"),
    "hf_model_name": _must_be(None, "Hugging Face text towers are not "
                              "supported"),
    # Read only with hf_model_name (rejected above).
    "hf_model_pretrained": _SAME_FORWARD, "hf_proj_type": _SAME_FORWARD,
    "hf_pooler_type": _SAME_FORWARD,
}

_MODEL_FIELDS = {
    "embed_dim": "used", "vision_cfg": "used", "text_cfg": "used",
    "quick_gelu": "used",
    "custom_text": _must_be(False, "CustomTextCLIP (text tower under "
                            "`text.`) is not supported"),
    "multimodal_cfg": _must_be(None, "CoCa's multimodal decoder is not "
                               "supported"),
    # The contrastive head's initial values and shape: not imported (HySAC
    # starts its own head, as for Hugging Face CLIP).
    "init_logit_scale": _SAME_FORWARD, "init_logit_bias": _SAME_FORWARD,
    "nonscalar_logit_scale": _SAME_FORWARD,
}


def _check_fields(cfg, fields, where):
  """Raises OpenCLIPConfigError for an unknown or unsupported field.

  `where` prefixes the field names in messages ("f.json: vision_cfg.").
  """
  if not isinstance(cfg, dict):
    raise OpenCLIPConfigError(f"{where.rstrip('.: ')} is a "
                              f"{type(cfg).__name__}, expected an object")
  for name, value in cfg.items():
    rule = fields.get(name)
    if rule is None:
      close = difflib.get_close_matches(name, fields, 1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise OpenCLIPConfigError(
          f"{where}{name}: unknown OpenCLIP config field{hint}")
    if callable(rule):
      problem = rule(value)
      if problem:
        raise OpenCLIPConfigError(f"{where}{name} {problem}")


def _square(value, where):
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise OpenCLIPConfigError(f"{where} is {value!r}: only square sizes "
                                "are supported")
    value = value[0]
  if not isinstance(value, int) or value <= 0:
    raise OpenCLIPConfigError(f"{where} is {value!r}: expected a positive "
                              "integer")
  return value


def _positive_int(cfg, field, default, where):
  """`cfg[field]` (else `default`), a positive int; `where` + field named
  otherwise (a bool, float or string would fail later as a shape error
  blamed on the checkpoint, or a ZeroDivisionError)."""
  value = cfg.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise OpenCLIPConfigError(f"{where}{field} must be a positive integer, "
                              f"got {value!r}")
  return value


def _eps(cfg, where):
  """LayerNorm epsilon from `norm_kwargs` (torch's default 1e-5)."""
  kwargs = cfg.get("norm_kwargs") or {}
  if not isinstance(kwargs, dict):
    raise OpenCLIPConfigError(f"{where}.norm_kwargs must be an object, got "
                              f"{kwargs!r}")
  extra = sorted(set(kwargs) - {"eps"})
  if extra:
    raise OpenCLIPConfigError(f"{where}.norm_kwargs has {extra}: only 'eps' "
                              "is supported")
  eps = kwargs.get("eps", 1e-5)
  if (isinstance(eps, bool) or not isinstance(eps, (int, float))
      or not math.isfinite(eps) or eps <= 0):
    raise OpenCLIPConfigError(f"{where}.norm_kwargs.eps must be a positive "
                              f"finite number, got {eps!r}")
  return float(eps)


def _mlp_width(cfg, width, where):
  # open_clip: mlp_width = int(width * mlp_ratio).
  # A NaN or an infinity would be a ValueError or OverflowError in int(),
  # naming no field; a bool is no ratio.
  ratio = cfg.get("mlp_ratio", 4.0)
  if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
      or not math.isfinite(ratio) or int(width * ratio) < 1):
    raise OpenCLIPConfigError(f"{where}.mlp_ratio must be a positive finite "
                              f"number, got {ratio!r}")
  return int(width * ratio)


def _activation(model_cfg, source, force_quick_gelu):
  """"quick_gelu" or "gelu", from the config's `quick_gelu` field.

  open_clip builds towers with QuickGELU when `quick_gelu` is true (OpenAI's
  weights; configs named `*-quickgelu`) and torch's exact GELU otherwise, an
  absent field meaning false (`CLIP.__init__`'s default).
  """
  value = model_cfg.get("quick_gelu", False)
  if not isinstance(value, bool):
    raise OpenCLIPConfigError(
        f"{source}: quick_gelu is {value!r}: expected true (QuickGELU, "
        "OpenAI-trained weights) or false (GELU)")
  return "quick_gelu" if (value or force_quick_gelu) else "gelu"


@dataclasses.dataclass(frozen=True)
class OpenCLIPModel:
  """What an OpenCLIP config says, in this project's terms.

  Attributes:
    config: the `CLIPConfig` of the Flax CLIP.
    image_mean, image_std: per-channel normalisation (3 floats each).
    preprocess_source: where the mean and std came from (for the record).
  """
  config: CLIPConfig
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]
  preprocess_source: str


def _preprocess(preprocess_cfg, source):
  """(mean, std, where from) as open_clip resolves them from a config."""
  pp = preprocess_cfg or {}
  if not isinstance(pp, dict):
    raise OpenCLIPConfigError(f"{source}: preprocess_cfg is not an object")
  stats = {}
  for field, default in (("mean", OPENAI_MEAN), ("std", OPENAI_STD)):
    value = pp.get(field)
    if value is None:
      stats[field] = default
      continue
    if (not isinstance(value, (list, tuple)) or len(value) != 3
        or not all(isinstance(v, (int, float)) for v in value)):
      raise OpenCLIPConfigError(f"{source}: preprocess_cfg.{field} is "
                                f"{value!r}: expected 3 numbers")
    stats[field] = tuple(float(v) for v in value)
  given = [f for f in ("mean", "std") if pp.get(f) is not None]
  where = (f"{source} preprocess_cfg ({', '.join(given)})" if given else
           "OpenCLIP's default (OpenAI's mean and std): the config sets none")
  return stats["mean"], stats["std"], where


def _vision_config(v, vw, act):
  """`VisionConfig` of open_clip's `vision_cfg` `v` (CLIPVisionCfg defaults
  where a field is absent); `vw` names it in errors."""
  layers = v.get("layers", 12)
  if isinstance(layers, (list, tuple)):
    raise OpenCLIPConfigError(f"{vw}.layers is {layers!r}: a list of stage "
                              "depths is a ModifiedResNet, not supported")
  layers = _positive_int(v, "layers", 12, f"{vw}.")
  width = _positive_int(v, "width", 768, f"{vw}.")
  head_width = _positive_int(v, "head_width", 64, f"{vw}.")
  if width % head_width:
    raise OpenCLIPConfigError(f"{vw}.head_width {head_width} does not "
                              f"divide width {width}")
  image = _square(v.get("image_size", 224), f"{vw}.image_size")
  patch = _square(v.get("patch_size", 16), f"{vw}.patch_size")
  if image % patch:
    raise OpenCLIPConfigError(f"{vw}.image_size {image} is not a multiple "
                              f"of patch_size {patch}")
  return VisionConfig(
      image_size=image, patch_size=patch, hidden_size=width,
      intermediate_size=_mlp_width(v, width, vw), num_hidden_layers=layers,
      num_attention_heads=width // head_width, hidden_act=act,
      layer_norm_eps=_eps(v, vw))


def _text_config(t, tw, act):
  """`TextConfig` of open_clip's `text_cfg` `t` (CLIPTextCfg defaults where
  a field is absent); `tw` names it in errors."""
  pool = t.get("pool_type", "argmax")
  eos = t.get("eos_id", 2)
  if pool == "argmax":
    eos_token_id = None  # ours: the position of the largest id
  elif pool == "eos":
    if eos is None or eos == 2:
      # Our pool_positions reads eos 2 as OpenAI's "largest id" rule.
      raise OpenCLIPConfigError(f"{tw}.eos_id is {eos!r}: pooling at the "
                                "first eos_id needs an id other than 2")
    if isinstance(eos, bool) or not isinstance(eos, int) or eos < 0:
      raise OpenCLIPConfigError(f"{tw}.eos_id must be a non-negative "
                                f"integer, got {eos!r}")
    eos_token_id = eos
  else:
    raise OpenCLIPConfigError(f"{tw}.pool_type is {pool!r}: only 'argmax' "
                              "and 'eos' are supported")
  twidth = _positive_int(t, "width", 512, f"{tw}.")
  heads = _positive_int(t, "heads", 8, f"{tw}.")
  if twidth % heads:
    raise OpenCLIPConfigError(f"{tw}.heads {heads} does not divide width "
                              f"{twidth}")
  return TextConfig(
      vocab_size=_positive_int(t, "vocab_size", 49408, f"{tw}."),
      hidden_size=twidth, intermediate_size=_mlp_width(t, twidth, tw),
      num_hidden_layers=_positive_int(t, "layers", 12, f"{tw}."),
      num_attention_heads=heads,
      max_position_embeddings=_positive_int(t, "context_length", 77,
                                            f"{tw}."), hidden_act=act,
      layer_norm_eps=_eps(t, tw), eos_token_id=eos_token_id)


def config_from_openclip(model_cfg, source="OpenCLIP config",
                         preprocess_cfg=None, force_quick_gelu=False):
  """The Flax CLIP an OpenCLIP model config describes.

  Args:
    model_cfg: the model config dict (`embed_dim`, `vision_cfg`,
      `text_cfg`, optional `quick_gelu` ...), as in open_clip's
      `model_configs/*.json`.
    source: a name for error messages (the file).
    preprocess_cfg: open_clip's `preprocess_cfg` dict (`mean`, `std`, ...)
      or None; missing entries take open_clip's defaults (OpenAI's values).
    force_quick_gelu: QuickGELU even if the config says GELU (open_clip's
      `force_quick_gelu`, for OpenAI weights under a GELU config).

  Returns:
    `OpenCLIPModel`.

  Raises:
    OpenCLIPConfigError: naming the field the Flax CLIP cannot reproduce.
  """
  _check_fields(model_cfg, _MODEL_FIELDS, f"{source}: ")
  for name in ("embed_dim", "vision_cfg", "text_cfg"):
    if name not in model_cfg:
      raise OpenCLIPConfigError(f"{source}: missing {name!r}; not an "
                                "OpenCLIP model config")
  v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  vw, tw = f"{source}: vision_cfg", f"{source}: text_cfg"
  _check_fields(v, _VISION_FIELDS, f"{vw}.")
  _check_fields(t, _TEXT_FIELDS, f"{tw}.")
  act = _activation(model_cfg, source, force_quick_gelu)
  vision = _vision_config(v, vw, act)
  text = _text_config(t, tw, act)
  mean, std, where = _preprocess(preprocess_cfg, source)
  return OpenCLIPModel(
      CLIPConfig(text=text, vision=vision,
                 projection_dim=_positive_int(model_cfg, "embed_dim", None,
                                              f"{source}: ")),
      mean, std, where)


# --------------------------------------------------------------------------
# Finding and reading configs.


def bundled_config_path(name):
  """open_clip's own `model_configs/NAME.json`, found without importing it.

  Raises:
    FileNotFoundError: open_clip is not installed, or has no such model.
  """
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"--open-clip {name!r} is not a JSON file, and open_clip is not "
        "installed to resolve model names: pass the path to the model's "
        "config JSON (open_clip/model_configs/NAME.json or a hub "
        f"{HUB_CONFIG_FILE})")
  folder = os.path.join(list(spec.submodule_search_locations)[0],
                        "model_configs")
  path = os.path.join(folder, f"{name}.json")
  if not os.path.isfile(path):
    names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
    close = difflib.get_close_matches(name, names, 3)
    raise FileNotFoundError(
        f"--open-clip {name!r}: no such OpenCLIP model (no {path})"
        + (f"; did you mean {', '.join(close)}?" if close else ""))
  return path


def read_config(name_or_path):
  """(model_cfg, preprocess_cfg, source) of a model name, JSON file or
  directory holding `open_clip_config.json`."""
  path = os.path.expanduser(os.fspath(name_or_path))
  if os.path.isdir(path):
    path = os.path.join(path, HUB_CONFIG_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--open-clip directory has no {path}")
  elif not os.path.isfile(path):
    if path.endswith(".json") or os.sep in path:
      raise FileNotFoundError(f"OpenCLIP config not found: {path}")
    path = bundled_config_path(path)
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise OpenCLIPConfigError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise OpenCLIPConfigError(f"{path} is not a JSON object")
  if "model_cfg" in data:  # The hub's open_clip_config.json.
    return data["model_cfg"], data.get("preprocess_cfg"), path
  return data, data.pop("preprocess_cfg", None), path


# --------------------------------------------------------------------------
# The state dict.


def _block_keys(prefix, root, cfg):
  """{OpenCLIP key: (our path, kind, OpenCLIP shape)} of one tower's blocks."""
  d, m = cfg.hidden_size, cfg.intermediate_size
  keys = {}
  for i in range(cfg.num_hidden_layers):
    b = f"{prefix}transformer.resblocks.{i}."
    layer = root + (f"layers_{i}",)
    keys[b + "attn.in_proj_weight"] = (layer + ("self_attn",), "in_proj_w",
                                       (3 * d, d))
    keys[b + "attn.in_proj_bias"] = (layer + ("self_attn",), "in_proj_b",
                                     (3 * d,))
    for theirs, ours, shape in (
        ("attn.out_proj", ("self_attn", "out_proj"), (d, d)),
        ("mlp.c_fc", ("mlp", "fc1"), (m, d)),
        ("mlp.c_proj", ("mlp", "fc2"), (d, m))):
      keys[f"{b}{theirs}.weight"] = (layer + ours + ("kernel",), "linear",
                                     shape)
      keys[f"{b}{theirs}.bias"] = (layer + ours + ("bias",), "copy",
                                   shape[:1])
    for theirs, ours in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
      keys[f"{b}{theirs}.weight"] = (layer + (ours, "scale"), "copy", (d,))
      keys[f"{b}{theirs}.bias"] = (layer + (ours, "bias"), "copy", (d,))
  return keys


def key_map(config):
  """{OpenCLIP key: (our param path, kind, OpenCLIP shape)} for `config`.

  kind: "copy" (as is: embeddings, norms, and the projections open_clip
  uses as `x @ P`), "linear" / "conv" (a torch `nn.Linear` / `nn.Conv2d`
  weight: `torch_state.to_flax_layout`), "in_proj_w" / "in_proj_b" (packed
  q, k, v: split in three, then each as "linear").
  """
  t, v = config.text, config.vision
  e = config.projection_dim
  grid = v.image_size // v.patch_size
  tm, vm = ("text_model",), ("vision_model",)
  out = {
      "token_embedding.weight": (
          tm + ("embeddings", "token_embedding", "embedding"), "copy",
          (t.vocab_size, t.hidden_size)),
      "positional_embedding": (
          tm + ("embeddings", "position_embedding", "embedding"), "copy",
          (t.max_position_embeddings, t.hidden_size)),
      "ln_final.weight": (tm + ("final_layer_norm", "scale"), "copy",
                          (t.hidden_size,)),
      "ln_final.bias": (tm + ("final_layer_norm", "bias"), "copy",
                        (t.hidden_size,)),
      "text_projection": (("text_projection", "kernel"), "copy",
                          (t.hidden_size, e)),
      "visual.conv1.weight": (
          vm + ("embeddings", "patch_embedding", "kernel"), "conv",
          (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)),
      "visual.class_embedding": (vm + ("embeddings", "class_embedding"),
                                 "copy", (v.hidden_size,)),
      "visual.positional_embedding": (
          vm + ("embeddings", "position_embedding", "embedding"), "copy",
          (grid * grid + 1, v.hidden_size)),
      "visual.proj": (("visual_projection", "kernel"), "copy",
                      (v.hidden_size, e)),
  }
  for theirs, ours in (("ln_pre", "pre_layrnorm"),
                       ("ln_post", "post_layernorm")):
    out[f"visual.{theirs}.weight"] = (vm + (ours, "scale"), "copy",
                                      (v.hidden_size,))
    out[f"visual.{theirs}.bias"] = (vm + (ours, "bias"), "copy",
                                    (v.hidden_size,))
  out.update(_block_keys("", tm + ("encoder",), t))
  out.update(_block_keys("visual.", vm + ("encoder",), v))
  return out


def _unwrap(state):
  """Strips DDP's `module.` prefix (open_clip training checkpoints)."""
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def params_from_openclip_state(state, config, source="checkpoint"):
  """`CLIPModel` params from an OpenCLIP state dict.

  Args:
    state: {key: numpy array} in open_clip's `CLIP.state_dict()` layout
      (optionally with DDP's `module.` prefix).
    config: the `CLIPConfig` (from `config_from_openclip`).
    source: a name for error messages (the file).

  Returns:
    The nested `CLIPModel` param dict, float32 numpy leaves.

  Raises:
    StateDictError: listing every missing key, unexpected key and shape
      mismatch (with both shapes).
  """
  state = _unwrap(state)
  expected = key_map(config)
  missing = [k for k in expected if k not in state]
  unexpected = sorted(k for k in state
                      if k not in expected and not _IGNORED_KEYS.match(k))
  wrong = [f"{k}: checkpoint {tuple(np.shape(state[k]))}, config {shape}"
           for k, (_, _, shape) in expected.items()
           if k in state and tuple(np.shape(state[k])) != shape]
  if missing or unexpected or wrong:
    raise key_mismatch(source, "an OpenCLIP CLIP", "the OpenCLIP config",
                       len(expected), missing, unexpected, state, wrong)
  flat = {}
  for key, (path, kind, _) in expected.items():
    a = np.asarray(state[key], np.float32)
    if kind in ("in_proj_w", "in_proj_b"):
      leaf = "kernel" if kind == "in_proj_w" else "bias"
      for name, part in zip(("q_proj", "k_proj", "v_proj"),
                            np.split(a, 3, axis=0)):
        flat[path + (name, leaf)] = to_flax_layout(path + (name, leaf), part)
    elif kind in ("linear", "conv"):
      flat[path] = to_flax_layout(path, a)
    else:
      flat[path] = a
  flat = {k: np.ascontiguousarray(v) for k, v in flat.items()}
  # The map above must cover the Flax CLIP exactly: a gap is a bug here.
  template = clip_template(config)
  assert set(template) == set(flat), sorted(set(template) ^ set(flat))
  for path, spec in template.items():
    assert flat[path].shape == spec.shape, (path, flat[path].shape,
                                            spec.shape)
  return traverse_util.unflatten_dict(flat)


def load_state(checkpoint):
  """{key: numpy array} of a `.safetensors` or `torch.save`d file
  (`torch_state.load_weights_file`; bfloat16 becomes float32 exactly in
  `params_from_openclip_state`)."""
  path = os.fspath(checkpoint)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"OpenCLIP checkpoint not found: {path}")
  return load_weights_file(path)


def convert_openclip(config_name_or_path, checkpoint, out, curv_init=1.0,
                     force_quick_gelu=False):
  """Converts an OpenCLIP checkpoint to a hysac_jax directory at `out`.

  The head scalars take their initial values (as for Hugging Face CLIP):
  the directory is the HySAC starting point for `train.py --init_from`.

  Returns:
    (out, OpenCLIPModel).
  """
  model_cfg, preprocess_cfg, source = read_config(config_name_or_path)
  model = config_from_openclip(model_cfg, source, preprocess_cfg,
                               force_quick_gelu)
  state = load_state(checkpoint)
  params = params_from_openclip_state(state, model.config,
                                      source=os.fspath(checkpoint))
  params = {"clip": params, **initial_head(model.config, curv_init)}
  save_pretrained(
      out, model.config, params, curv_init=curv_init,
      source={"open_clip_config": source,
              "open_clip_checkpoint": os.fspath(checkpoint),
              "activation": model.config.text.hidden_act,
              "force_quick_gelu": bool(force_quick_gelu),
              "preprocess_source": model.preprocess_source,
              # For the record: the pipeline resizes bicubic, shorter side
              # then centre crop (open_clip's defaults), whatever this says.
              "open_clip_preprocess_cfg": preprocess_cfg or {}},
      preprocess={"image_mean": list(model.image_mean),
                  "image_std": list(model.image_std)})
  return out, model
