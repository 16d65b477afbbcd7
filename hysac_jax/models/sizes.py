"""Named CLIP sizes, and the CLIP config a Hugging Face `config.json` dict says.

| name | image / patch | vision width, layers, heads | text width, layers, heads | proj |
| --- | --- | --- | --- | --- |
| `tiny` (tests) | 32 / 8 | 64, 2, 2 | 64, 2, 2 | 64 |
| `small` (CPU benchmarks) | 224 / 32 | 384, 6, 6 | 256, 6, 4 | 256 |
| `vitb32` | 224 / 32 | 768, 12, 12 | 512, 12, 8 | 512 |
| `vitb16` | 224 / 16 | 768, 12, 12 | 512, 12, 8 | 512 |
| `vitl14` | 224 / 14 | 1024, 24, 16 | 768, 12, 12 | 768 |
| `vitl14_336` | 336 / 14 | 1024, 24, 16 | 768, 12, 12 | 768 |

All use the OpenAI vocabulary (49408 ids, so the real tokenizer works),
context 77, MLP width 4× and quick-GELU; the real sizes match the
`openai/clip-vit-*` checkpoints. The file itself is read in
`hysac_jax.formats.hf_clip` (`read_clip_config`); this module reads no file.
"""

import json
import os
import warnings

from hysac_jax.models.clip import CLIPConfig, TextConfig, VisionConfig

_VOCAB = 49408
_CONTEXT = 77


def _config(image, patch, v_width, v_layers, v_heads, t_width, t_layers,
            t_heads, proj):
  return CLIPConfig(
      text=TextConfig(vocab_size=_VOCAB, hidden_size=t_width,
                      intermediate_size=4 * t_width,
                      num_hidden_layers=t_layers,
                      num_attention_heads=t_heads,
                      max_position_embeddings=_CONTEXT),
      vision=VisionConfig(image_size=image, patch_size=patch,
                          hidden_size=v_width, intermediate_size=4 * v_width,
                          num_hidden_layers=v_layers,
                          num_attention_heads=v_heads),
      projection_dim=proj)


_SIZES = {
    "tiny": lambda: _config(32, 8, 64, 2, 2, 64, 2, 2, 64),
    "small": lambda: _config(224, 32, 384, 6, 6, 256, 6, 4, 256),
    "vitb32": lambda: _config(224, 32, 768, 12, 12, 512, 12, 8, 512),
    "vitb16": lambda: _config(224, 16, 768, 12, 12, 512, 12, 8, 512),
    "vitl14": lambda: _config(224, 14, 1024, 24, 16, 768, 12, 12, 768),
    "vitl14_336": lambda: _config(336, 14, 1024, 24, 16, 768, 12, 12, 768),
}

SIZE_NAMES = tuple(_SIZES)


def get_clip_config(name):
  """The `CLIPConfig` of a named size (see the module docstring)."""
  if name not in _SIZES:
    raise ValueError(f"unknown CLIP size {name!r}; known: {SIZE_NAMES}")
  return _SIZES[name]()


# Hugging Face defaults (`CLIPTextConfig` / `CLIPVisionConfig` /
# `CLIPConfig`), used for keys a config.json omits.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512,
                         intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5,
                         eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(image_size=224, patch_size=32, hidden_size=768,
                           intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, num_channels=3,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_PROJECTION_DIM = 512


def clip_config_from_hf(config, source="config dict"):
  """A `CLIPConfig` from a Hugging Face CLIP `config.json`, parsed.

  Args:
    config: the parsed JSON, a dict. It must be a `CLIPModel` config (with
      `text_config` and `vision_config`); keys it omits take Hugging Face's
      defaults, as `transformers` would. A path (to `config.json`, or a
      directory holding one) still works for this release, with a
      `DeprecationWarning` pointing at `formats.hf_clip.read_clip_config`.
    source: the file the dict came from, for error messages.

  Returns:
    `CLIPConfig`.
  """
  if isinstance(config, (str, os.PathLike)):
    warnings.warn("sizes.clip_config_from_hf(path) is deprecated: read the "
                  "file with hysac_jax.formats.hf_clip.read_clip_config",
                  DeprecationWarning, stacklevel=2)
    config, source = _read_deprecated(os.fspath(config))
  if not isinstance(config, dict):
    raise TypeError(f"expected a dict or a path, got {type(config).__name__}")
  missing = [k for k in ("text_config", "vision_config") if k not in config]
  if missing:
    raise ValueError(
        f"{source} is not a Hugging Face CLIPModel config (model_type "
        f"{config.get('model_type')!r}): missing {missing}")

  def pick(section, defaults):
    given = config.get(section) or {}
    return {k: given.get(k, v) for k, v in defaults.items()}

  return CLIPConfig(
      text=TextConfig(**pick("text_config", _HF_TEXT_DEFAULTS)),
      vision=VisionConfig(**pick("vision_config", _HF_VISION_DEFAULTS)),
      projection_dim=config.get("projection_dim", _HF_PROJECTION_DIM))


def _read_deprecated(path):
  """(parsed config.json, its path) for the deprecated path argument of
  `clip_config_from_hf`; goes when it does (the reader is
  `formats.hf_clip.read_clip_config`)."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CLIP config not found: {path}")
  with open(path) as f:
    return json.load(f), path
