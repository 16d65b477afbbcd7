"""The Hugging Face `CLIPModel` directory: `config.json` + `model.safetensors`.

The writer of the directory `transformers.CLIPModel.from_pretrained` reads
(`export --format hf`, and the `clip/` of a release export).
"""

import os

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hysac_jax import finite
from hysac_jax.formats.torch_state import to_torch_layout, torch_key
from hysac_jax.models.lora import LORA_A, LORA_B

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
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
