"""The model a config describes, and the pretrained weights it starts from.

    model = pretrained.model_from_config(config)   # the HySAC module
    params = pretrained.initial_params(config)     # None: a random init

`config.model.clip` names the towers' architecture and weights (a Hugging
Face CLIP directory or hub id, or a converted directory), else
`config.model.size` a named size; `config.model.init_from` a converted
directory the run starts from. The files are read by the formats
(`formats.hf_clip`, `formats.converted`); the train step receives the
module and the params and reads no file.
"""

import dataclasses

from hysac_jax.config import DTYPES
from hysac_jax.formats import converted
from hysac_jax.formats import hf_clip
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models import sizes


def model_from_config(config):
  """The HySAC module described by `config.model`.

  The architecture comes from `config.model.clip` (a Hugging Face CLIP
  directory or hub id, or a directory written by `hysac_jax.convert`) when
  set, else from the named `config.model.size`.
  """
  m = config.model
  if m.clip:
    clip_config = (converted.converted_clip_config(m.clip)
                   or hf_clip.read_clip_config(m.clip))
  else:
    clip_config = sizes.get_clip_config(m.size)
  clip_config = _with_context_length(clip_config, m.get("context_length", 0),
                                     m.clip)
  lora = None
  if m.lora.rank > 0:
    lora = clip_lib.LoRAConfig(rank=m.lora.rank, alpha=m.lora.alpha,
                               dropout=m.lora.dropout,
                               targets=tuple(m.lora.targets))
  if m.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r}: expected one of "
                     f"{sorted(DTYPES)}")
  attention = m.attention
  clip_lib.attention_implementation(attention, DTYPES[m.dtype], 64)  # checks
  return hysac_lib.HySAC(clip=clip_config, lora=lora, mode=m.mode,
                         dtype=DTYPES[m.dtype],
                         remat=clip_lib.remat_policy_name(m.remat),
                         curv_init=m.curv_init,
                         attention=None if attention == "auto" else attention,
                         scan_layers=bool(m.scan_layers))


def _with_context_length(clip_config, context_length, pretrained):
  """`clip_config` with `config.model.context_length` text positions (0: its
  own). Only a random-init text tower may change it: a pretrained one has
  learned exactly its own positions."""
  own = clip_config.text.max_position_embeddings
  if not context_length or context_length == own:
    return clip_config
  if pretrained:
    raise ValueError(
        f"config.model.context_length={context_length}: the CLIP of "
        f"config.model.clip ({pretrained}) has {own} text positions; leave "
        "it 0 (or equal) for a pretrained CLIP")
  text = dataclasses.replace(clip_config.text,
                             max_position_embeddings=int(context_length))
  return dataclasses.replace(clip_config, text=text)


def initial_params(config):
  """Pretrained weights a run starts from, or None for a random init.

  `config.model.init_from` (a directory written by `python -m
  hysac_jax.convert`: CLIP, LoRA and head) wins over `config.model.clip` (a
  Hugging Face CLIP directory or hub id, converted here, or a converted
  directory, read as `init_from`). A resumed, evaluated or exported run
  reads its frozen weights from the same place.
  """
  init_from, clip = config.model.init_from, config.model.clip
  if not init_from and clip and converted.converted_clip_config(clip):
    init_from = clip  # A converted directory: its params, as --init_from.
  if init_from:
    # The towers are built from the config: the weights must fit them.
    check_run_compatible(init_from, model_from_config(config).clip)
    return converted.read_converted(init_from).params
  if clip:
    _, params = hf_clip.clip_params_from_hf(clip)
    return params
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
  meta = converted.read_meta(path)
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
  converted.check_preprocess(path, meta.get("preprocess"))
