"""PyTorch state dicts: key names, layouts both ways, the weights-file readers.

Our param names are the Hugging Face `CLIPModel` names (see
`hysac_jax/models/clip.py`), so a Flax leaf and its PyTorch key differ by a
rename plus a transpose:

| Flax leaf | PyTorch key suffix | layout |
| --- | --- | --- |
| `.../kernel` (dense) | `weight` `(out, in)` | Flax `(in, out)` |
| `patch_embedding/kernel` | `weight` `(out, C, p, p)` | Flax `(p, p, C, out)` |
| `.../lora_A`, `.../lora_B` | `lora_A.weight`, `lora_B.weight` | as the kernel |
| LayerNorm `scale` / `bias` | `weight` / `bias` | the same |
| `.../embedding` | `weight` | the same |
| `layers_3` | `layers.3` | |
"""

import os
import re

import numpy as np
from safetensors.numpy import load_file

from hysac_jax.models.lora import LORA_A, LORA_B

# Leaves stored transposed: Flax axis i is PyTorch axis `_FLAX_FROM_TORCH[n][i]`
# for an n-d array (dense (out, in); conv (out, in, kh, kw) -> (kh, kw, in,
# out)). Other leaves and other ranks keep their layout.
_TRANSPOSED = ("kernel", LORA_A, LORA_B)
_FLAX_FROM_TORCH = {2: (1, 0), 4: (2, 3, 1, 0)}
_TORCH_FROM_FLAX = {n: tuple(int(i) for i in np.argsort(p))
                    for n, p in _FLAX_FROM_TORCH.items()}


class StateDictError(ValueError):
  """A state dict (a weights file) that does not match the model, or cannot
  be read: names the file and keys. Not `checkpoint.CheckpointError`, an
  Orbax step of a run that cannot be restored."""


# Its old name, still importable (here and from `hysac_jax.convert`).
CheckpointError = StateDictError


def torch_key(path):
  """The PyTorch state-dict key of a Flax param path.

  Args:
    path: tuple of names, e.g. `("text_model", "encoder", "layers_0",
      "self_attn", "k_proj", "kernel")`.

  Returns:
    e.g. `"text_model.encoder.layers.0.self_attn.k_proj.weight"`.
  """
  *mods, leaf = path
  mods = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in mods]
  if leaf == "class_embedding":
    return ".".join(mods + [leaf])
  suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight",
            "bias": "bias", LORA_A: f"{LORA_A}.weight",
            LORA_B: f"{LORA_B}.weight"}.get(leaf)
  if suffix is None:
    raise ValueError(f"no PyTorch name for param {'/'.join(path)}")
  return ".".join(mods + [suffix])


def _permutation(path, ndim, table):
  """The axis permutation of the leaf at `path`, or None (layout kept)."""
  if path[-1] in _TRANSPOSED:
    return table.get(ndim)
  return None


def to_flax_layout(path, array):
  """PyTorch layout -> Flax layout for the leaf at `path` (dtype kept)."""
  perm = _permutation(path, array.ndim, _FLAX_FROM_TORCH)
  return array if perm is None else array.transpose(perm)


def to_torch_layout(path, array):
  """Flax layout -> PyTorch layout for the leaf at `path`, as float32 (the
  inverse of `to_flax_layout`)."""
  array = np.asarray(array, np.float32)
  perm = _permutation(path, array.ndim, _TORCH_FROM_FLAX)
  return array if perm is None else array.transpose(perm)


def torch_shape(path, flax_shape):
  """The PyTorch shape that maps to `flax_shape` at `path` (for messages)."""
  perm = _permutation(path, len(flax_shape), _TORCH_FROM_FLAX)
  if perm is None:
    return tuple(flax_shape)
  return tuple(flax_shape[i] for i in perm)


def preview(keys, n=12):
  """`"[a, b, …]"`: the first `n` of `keys`, for an error message."""
  shown = ", ".join(keys[:n])
  return f"[{shown}{', …' if len(keys) > n else ''}]"


def key_mismatch(source, what, target, expected, missing, unexpected, state,
                 wrong=None):
  """The `StateDictError` of a state dict whose keys do not fit a model.

  Args:
    source: the file, for the message.
    what: the checkpoint expected, e.g. "a CLIP".
    target: what it was matched against, e.g. "the model".
    expected: how many keys were expected.
    missing, unexpected: the keys (lists).
    state: the state dict (a few of its keys are named when none fit).
    wrong: optional list of shape mismatches, one line each.
  """
  if len(missing) == expected:
    return StateDictError(
        f"{source} does not look like {what} checkpoint: none of the "
        f"{expected} expected keys (e.g. {missing[0]}) is present; it has "
        f"{len(state)} keys such as {sorted(state)[:5]}")
  shapes = ("" if wrong is None else
            f"; {len(wrong)} shape mismatches {preview(wrong)}")
  return StateDictError(
      f"{source} does not match {target}: {len(missing)} missing keys "
      f"{preview(missing)}; {len(unexpected)} unexpected keys "
      f"{preview(unexpected)}{shapes}")


def load_safetensors(path):
  """A `.safetensors` file -> {key: numpy array}; `StateDictError` naming
  it when it cannot be read.

  bfloat16 tensors load as ml_dtypes' bfloat16 (registered with numpy by
  jax); callers cast them to float32, exactly.
  """
  try:
    return load_file(path)
  except Exception as e:
    raise StateDictError(f"{path} is not a readable safetensors file: "
                          f"{e}") from e


def load_torch_file(path):
  """A `torch.save`d state dict (`.pt`, `.pth`, `.bin`) -> {key: numpy array}.

  Unwraps `{"state_dict": …}` / `{"model": …}`; floating tensors become
  float32. Raises `StateDictError` naming the file when it cannot be read.
  """
  try:
    # torch is optional and slow to import: only reading these files needs it.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch: pip install "
                      "'hysac-jax[torch]' (or convert to safetensors)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors have many types
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = first.split(". ")[0]  # torch's weights_only advice runs on
    raise StateDictError(f"{path} is not a readable PyTorch checkpoint: "
                          f"{type(e).__name__}: {first}") from e
  return _state_dict_to_numpy(obj, path)


def load_weights_file(path):
  """A weights file -> {key: numpy array}: `.safetensors` by
  `load_safetensors` (no torch needed), anything else (`.pt`, `.pth`,
  `.bin`) by `load_torch_file`."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  return load_torch_file(path)


def _state_dict_to_numpy(obj, source):
  """Unwraps {"model"/"state_dict": …} and converts tensors to numpy."""
  import torch  # pylint: disable=g-import-not-at-top  # optional, as above
  if isinstance(obj, dict):
    for wrapper in ("state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict) or not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    raise StateDictError(f"{source} is not a state dict of tensors (got "
                          f"{type(obj).__name__})")
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point()
          else v.numpy() for k, v in obj.items()}
