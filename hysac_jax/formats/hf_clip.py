"""The Hugging Face `CLIPModel` directory: `config.json` + `model.safetensors`.

Its reader (`clip_params_from_hf`: a directory or hub id -> `(CLIPConfig,
params)`, with the one hub resolution, `hub_path`; `read_clip_config`: its
config.json -> `CLIPConfig`) and its writer
(`write_hf_clip`: the directory `transformers.CLIPModel.from_pretrained`
reads, for `export --format hf` and the `clip/` of a release export). State
dicts keyed as HF `CLIPModel` become params in `params_from_state_dict`.
"""

import json
import os
import re

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hysac_jax import finite
from hysac_jax.formats.torch_state import (StateDictError, key_mismatch,
                                           load_safetensors, load_torch_file,
                                           to_flax_layout, to_torch_layout,
                                           torch_key, torch_shape)
from hysac_jax.models import sizes
from hysac_jax.models.clip import CLIPModel, dummy_inputs
from hysac_jax.models.lora import LORA_A, LORA_B

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
# What a hub download fetches of a CLIP repository: the config and the
# safetensors weights, sharded or not.
_HUB_FILES = (CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
              "model-*.safetensors")
# Keys that carry no weights we use: buffers and CLIP's own logit scale.
IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|logit_scale)$")
# OpenAI CLIP configs say eos_token_id=2, which Hugging Face reads as "pool at
# the highest token id" (our `eos_token_id=None`).
_ARGMAX_EOS = 2


def hf_state_dict(clip_params, logit_scale):
  """`CLIPModel` params (LoRA merged) -> a Hugging Face `CLIPModel` state dict.

  Args:
    clip_params: the "clip" sub-tree of HySAC params, without LoRA leaves.
    logit_scale: the (clamped) logit scale; stored as its log, as HF does.

  Returns:
    {key: contiguous float32 NumPy array}, keys as `torch_state.torch_key`.
  """
  state = {}
  for path, value in traverse_util.flatten_dict(clip_params).items():
    if path[-1] in (LORA_A, LORA_B):
      raise ValueError(f"param {'/'.join(path)} is a LoRA leaf: merge LoRA "
                       "(merge_lora) before exporting to Hugging Face")
    state[torch_key(path)] = np.ascontiguousarray(
        to_torch_layout(path, value))
  state["logit_scale"] = np.asarray(np.log(logit_scale), np.float32)
  return state


def hf_config(config, logit_scale):
  """A Hugging Face `CLIPModel` `config.json` dict for a `CLIPConfig`."""
  t, v = config.text, config.vision
  eos = _ARGMAX_EOS if t.eos_token_id is None else t.eos_token_id

  def tower(c):
    return {"hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps,
            "projection_dim": config.projection_dim}

  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "projection_dim": config.projection_dim,
      "logit_scale_init_value": float(np.log(logit_scale)),
      "text_config": {
          "model_type": "clip_text_model", **tower(t),
          "vocab_size": t.vocab_size,
          "max_position_embeddings": t.max_position_embeddings,
          "eos_token_id": eos},
      "vision_config": {
          "model_type": "clip_vision_model", **tower(v),
          "image_size": v.image_size, "patch_size": v.patch_size,
          "num_channels": v.num_channels},
  }


def write_hf_clip(out_dir, config, clip_params, logit_scale):
  """A Hugging Face `CLIPModel` directory (config.json, model.safetensors)
  of `clip_params` (no LoRA leaves) at `out_dir` (created)."""
  path = os.path.join(out_dir, CONFIG_FILE)
  hf = hf_config(config, logit_scale)
  bad = finite.non_finite_paths(hf)
  if bad:  # a null layer_norm_eps or logit scale would not load either
    raise finite.NonFiniteError(f"cannot write {path}: {', '.join(bad)} "
                                "not finite")
  os.makedirs(out_dir, exist_ok=True)
  with open(path, "w") as f:
    finite.dump(hf, f, indent=2)
    f.write("\n")
  save_file(hf_state_dict(clip_params, logit_scale),
            os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------
# Reading.


def hub_path(path_or_id, config_only=False):
  """A local path as it is, else the hub id downloaded with huggingface_hub.

  Args:
    path_or_id: a local directory (or, with `config_only`, a config.json
      file), or a hub id such as `"openai/clip-vit-large-patch14"`.
    config_only: fetch only config.json (returns that file's path);
      otherwise the config and the safetensors weights (returns the
      snapshot directory).
  """
  path = os.fspath(path_or_id)
  if os.path.isdir(path) or (config_only and os.path.isfile(path)):
    return path
  if os.path.exists(path):
    raise StateDictError(f"{path} is a file; expected a Hugging Face "
                          "CLIP directory (config.json + weights) or hub id")
  try:
    # huggingface_hub is slow to import and only a hub id needs it.
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    if config_only:
      return huggingface_hub.hf_hub_download(path, CONFIG_FILE)
    return huggingface_hub.snapshot_download(
        path, allow_patterns=list(_HUB_FILES))
  except Exception as e:
    what = ("local path and its config.json" if config_only
            else "local directory and")
    raise FileNotFoundError(
        f"{path!r} is not a {what} could not be fetched "
        f"from the Hugging Face hub ({type(e).__name__}: {e}). Offline? "
        f"Download it elsewhere (huggingface-cli download {path}) and pass "
        "the directory.") from e


def read_clip_config(path):
  """The `CLIPConfig` of a Hugging Face CLIP `config.json`.

  Args:
    path: the config.json, or a directory holding one (a hub id goes
      through `hub_path(..., config_only=True)` first). Keys it omits take
      Hugging Face's defaults (`models.sizes.clip_config_from_hf`).

  Raises:
    FileNotFoundError: there is no such file.
    ValueError: it is not a `CLIPModel` config.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP config not found: {path}")
  with open(path) as f:
    return sizes.clip_config_from_hf(json.load(f), source=path)


def load_hf_state_dict(directory):
  """The weights of a HF CLIP directory as {key: float32 numpy array}.

  Reads `model.safetensors` (or a sharded index) with `safetensors.numpy`,
  no torch needed; falls back to `pytorch_model.bin` via torch.
  """
  st = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  binary = os.path.join(directory, TORCH_WEIGHTS_FILE)
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
        f"no weights in {directory}: expected {WEIGHTS_FILE}, "
        f"{WEIGHTS_INDEX_FILE} or {TORCH_WEIGHTS_FILE}")
  state = {}
  for file in files:
    state.update(load_safetensors(file))
  return state


def clip_template(config, lora=None):
  """Flat `{path: ShapeDtypeStruct}` of a `CLIPModel`'s params (no compute)."""
  model = CLIPModel(config, lora)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          *dummy_inputs(config))
  return traverse_util.flatten_dict(shapes["params"])


def params_from_state_dict(state, config, lora=None, source="checkpoint",
                           ignore=IGNORED_KEYS):
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
    StateDictError: listing missing and unexpected keys, or naming a key
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
      raise StateDictError(
          f"{source}: shape mismatch for {key}: checkpoint has "
          f"{tuple(array.shape)}, the model expects {expected}")
    flat[path] = np.ascontiguousarray(to_flax_layout(path, array)).astype(
        np.float32)
  unexpected = sorted(k for k in state
                      if k not in used and not ignore.search(k))
  if missing or unexpected:
    raise key_mismatch(source, "a CLIP", "the model", len(template), missing,
                       unexpected, state)
  return traverse_util.unflatten_dict(flat)


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
  directory = hub_path(path)
  config = read_clip_config(directory)
  state = load_hf_state_dict(directory)
  return config, params_from_state_dict(state, config, None, source=directory)


def is_hf_clip_config(meta):
  """Whether a parsed config.json is a Hugging Face CLIP model's."""
  return isinstance(meta, dict) and meta.get("model_type") == "clip"
