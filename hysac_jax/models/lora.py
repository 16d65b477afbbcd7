"""LoRA (low-rank adaptation) layers for the CLIP towers, and merging.

A LoRA layer computes `y = x W + b + s · B(A(drop(x)))` with `s = alpha / r`
(SPEC.md §2). The base `kernel` is frozen by the optimizer; `lora_A` and
`lora_B` sit beside it in the same param dict, so one labelling function can
tell them apart by name. The layouts mirror peft transposed into Flax order,
so conversion from peft is a rename plus a transpose:

| layer | `kernel` | `lora_A` | `lora_B` |
| --- | --- | --- | --- |
| `LoRADense` | `(in, out)` | `(in, r)` | `(r, out)` |
| `LoRAPatchConv` | `(p, p, C, out)` | `(p, p, C, r)` (conv, same stride) | `(1, 1, r, out)` (1x1 conv) |

Details that exist for speed (issue 10's CPU profile):
- the LoRA layer has a hand-written backward (`lora_dense`, a
  `jax.custom_vjp`) that contracts over tokens with the small operand
  transposed, instead of letting XLA transpose a tokens×features array;
- the LoRA up-projection rides in the base matmul (`[x | s·h] @ [W ; B]`),
  so the (tokens, out) output is written once;
- dropout masks come from random bytes (uint32 words split in four) against
  a threshold (`dropout_keep_mask`), far cheaper than float uniforms.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LORA_A = "lora_A"
LORA_B = "lora_B"


def kaiming_uniform_a_sqrt5(key, shape, dtype=jnp.float32):
  """peft's `kaiming_uniform_(a=sqrt(5))` init for a Flax-layout LoRA `A`.

  With `a = sqrt(5)` the bound is `1 / sqrt(fan_in)`, where `fan_in` is the
  product of all axes but the last (the rank axis): `in` for a dense layer,
  `p·p·C` for a conv.

  Args:
    key: PRNG key.
    shape: `(in, r)` or `(kh, kw, C, r)`.
    dtype: param dtype.

  Returns:
    Array of `shape`, uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`.
  """
  bound = kaiming_uniform_bound(shape)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def kaiming_uniform_bound(shape):
  """`1 / sqrt(fan_in)`, fan_in = the product of all axes but the last."""
  return 1.0 / math.sqrt(int(np.prod(shape[:-1])))


# The init rule of each LoRA leaf: `A` as peft, `B` zeros (so that a fresh
# LoRA layer equals its base layer).
INITIALIZERS = {LORA_A: kaiming_uniform_a_sqrt5,
                LORA_B: nn.initializers.zeros}


def host_init(name, shape, dtype, seed):
  """A LoRA leaf drawn on the host by its rule in `INITIALIZERS`.

  NumPy, so that initialising the adapters of a pretrained model compiles
  nothing (XLA:CPU spends seconds per output buffer of an init program).

  Args:
    name: LORA_A or LORA_B.
    shape: the leaf's shape.
    dtype: its dtype.
    seed: anything `np.random.default_rng` accepts (e.g. a list of ints).

  Returns:
    numpy array: `A` uniform in `[-1/sqrt(fan_in), 1/sqrt(fan_in)]`, `B`
    zeros.
  """
  if name == LORA_B:
    return np.zeros(shape, dtype)
  if name != LORA_A:
    raise ValueError(f"not a LoRA leaf: {name!r}")
  bound = kaiming_uniform_bound(shape)
  return np.random.default_rng(seed).uniform(-bound, bound, shape).astype(
      dtype)


def dropout_keep_mask(rng, shape, rate):
  """Draws a Bernoulli keep-mask cheaply from random bytes.

  An element is dropped when its byte is below `t = round(256 · rate)`, so the
  exact drop rate is `t / 256`: for `rate = 0.1`, `t = 26` and the drop rate
  is 26/256 = 0.1015625 (the keep probability is 230/256). Use
  `keep_probability(rate)` to rescale kept values so that the expectation is
  preserved exactly.

  The bytes are uint32 random words split in four: with jax's default
  partitionable threefry every drawn element costs one hash whatever its
  width, so a direct uint8 draw would hash each byte separately.

  Args:
    rng: PRNG key.
    shape: mask shape.
    rate: nominal drop probability in [0, 1).

  Returns:
    bool array of `shape`, True where the element is kept.
  """
  shape = tuple(shape)
  lead, last = (shape[:-1], shape[-1]) if shape else ((), 1)
  rows = math.prod(lead)
  return keep_masks(rng, rows, {"x": last}, rate)["x"].reshape(shape)


def keep_masks(rng, rows, widths, rate):
  """Keep-masks of several LoRA inputs from one random draw.

  A transformer layer has a LoRA input per target (k, v, out, fc1, fc2):
  drawing them together gives each layer one threefry hash graph instead of
  one per target, which is most of what LoRA dropout adds to the compiled
  train step (and the kernels it launches). Every input owns its own words
  of the draw, so the masks are independent, each as `dropout_keep_mask`'s.

  Args:
    rng: PRNG key.
    rows: N, the rows of every (flattened) input.
    widths: {name: input width} (insertion order fixes the words used).
    rate: nominal drop probability in [0, 1).

  Returns:
    {name: (rows, width) bool}, True where the element is kept.
  """
  threshold = _drop_threshold(rate)
  words = {name: -(-width // 4) for name, width in widths.items()}
  bits = jax.random.bits(rng, (rows, sum(words.values())), jnp.uint32)
  masks, start = {}, 0
  for name, width in widths.items():
    part = bits[:, start:start + words[name]]
    start += words[name]
    # (rows, words) uint32 -> (rows, words, 4) uint8 -> (rows, width) bytes.
    bytes_ = jax.lax.bitcast_convert_type(part, jnp.uint8)
    bytes_ = bytes_.reshape(rows, 4 * words[name])[:, :width]
    masks[name] = bytes_ >= jnp.uint8(threshold)
  return masks


def _drop_threshold(rate):
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"LoRA dropout rate must be in [0, 1), got {rate}")
  return int(round(256 * rate))


def keep_probability(rate):
  """The exact keep probability of `dropout_keep_mask` (a multiple of 1/256)."""
  return 1.0 - _drop_threshold(rate) / 256.0


def _masked(x, keep):
  return x if keep is None else jnp.where(keep, x, jnp.zeros((), x.dtype))


@jax.custom_vjp
def lora_dense(x, kernel, a, b, scale, keep):
  """`x @ kernel + scale · ((x ⊙ keep) @ a) @ b` as one stacked matmul.

  The LoRA up-projection is folded into the base matmul: `[x | scale·h] @
  [kernel ; b]` with `h = (x ⊙ keep) @ a`, so the (N, out) output is written
  once instead of a second K=r matmul plus an add over (N, out) (on CPU that
  pair cost about half the base matmul). The backward gets the base and the
  LoRA input gradients from one matmul as well: `g @ [kernel ; b]ᵀ`.

  Args:
    x: (N, in) inputs.
    kernel: (in, out) base kernel, same dtype as `x`.
    a: (in, r) LoRA `A`, same dtype as `x`.
    b: (r, out) LoRA `B`, same dtype as `x`.
    scale: scalar (float) multiplier, `alpha / r` divided by the keep
      probability when dropout is on.
    keep: (N, in) bool keep-mask, or None for no dropout.

  Returns:
    (N, out), without the base bias.
  """
  return _lora_dense_fwd(x, kernel, a, b, scale, keep)[0]


def _lora_dense_fwd(x, kernel, a, b, scale, keep):
  hs = (_masked(x, keep) @ a) * jnp.asarray(scale, x.dtype)  # (N, r)
  y = (jnp.concatenate([x, hs], axis=1)
       @ jnp.concatenate([kernel, b], axis=0))
  return y, (x, kernel, a, b, scale, keep, hs)


def _lora_dense_bwd(res, g):
  x, kernel, a, b, scale, keep, hs = res
  d_in = x.shape[1]
  # (N, out) @ (out, in + r): the base and LoRA input gradients together.
  gcat = g @ jnp.concatenate([kernel, b], axis=0).T
  dh = gcat[:, d_in:] * jnp.asarray(scale, g.dtype)  # (N, r)
  db = hs.T @ g  # (r, out)
  da = (dh.T @ _masked(x, keep)).T  # (in, r)
  dx = gcat[:, :d_in] + _masked(dh @ a.T, keep)  # (N, in)
  # Unused for a frozen kernel (XLA drops it); correct when it is trained.
  dkernel = x.T @ g
  return (dx, dkernel.astype(kernel.dtype), da.astype(a.dtype),
          db.astype(b.dtype), None, None)


lora_dense.defvjp(_lora_dense_fwd, _lora_dense_bwd)


class LoRADense(nn.Module):
  """A dense layer (HF `nn.Linear` names) with an optional LoRA branch.

  Params: `kernel (in, out)`, `bias (out,)` when `use_bias`, and when
  `rank > 0`: `lora_A (in, r)` (Kaiming-uniform) and `lora_B (r, out)` (zeros,
  so the layer starts equal to the base layer).

  Attributes:
    features: output width.
    use_bias: whether the base layer has a bias.
    rank: LoRA rank; 0 disables LoRA.
    alpha: LoRA alpha; the update is scaled by `alpha / rank`.
    dropout: LoRA-input dropout rate (rng stream "dropout"); see
      `dropout_keep_mask` for the exact rate.
    dtype: compute dtype; params are `param_dtype`.
  """
  features: int
  use_bias: bool = True
  rank: int = 0
  alpha: float = 1.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, deterministic=True, keep=None):
    """x: (..., in) -> (..., features) in `dtype`.

    `keep`, an optional (N, in) bool mask over the flattened input, is the
    dropout mask drawn by the caller (see `keep_masks`); without it the
    layer draws its own when dropout is on and not `deterministic`.
    """
    d_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (d_in, self.features),
                        self.param_dtype)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if self.rank > 0:
      a = self.param(LORA_A, INITIALIZERS[LORA_A], (d_in, self.rank),
                     self.param_dtype)
      b = self.param(LORA_B, INITIALIZERS[LORA_B], (self.rank, self.features),
                     self.param_dtype)
      y = _apply_lora(self, x, kernel, a, b, deterministic, keep)
      y = y.reshape(x.shape[:-1] + (self.features,))
    else:
      y = x @ kernel
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LoRAPatchConv(nn.Module):
  """The ViT patch embedding: a bias-free conv with stride = kernel = patch.

  Computed as patchify + matmul (identical to the conv with VALID padding:
  trailing pixels that do not fill a patch are dropped). Params:
  `kernel (p, p, C, out)` and, when `rank > 0`, peft's conv LoRA: `lora_A
  (p, p, C, r)` (a conv with the same kernel and stride) and `lora_B
  (1, 1, r, out)` (a 1x1 conv).

  Attributes: as `LoRADense`, with `features` the embedding width and `patch`
  the patch size.
  """
  features: int
  patch: int
  rank: int = 0
  alpha: float = 1.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels, deterministic=True):
    """pixels: (B, H, W, C) -> (B, H//p, W//p, features) in `dtype`."""
    n, h, w, c = pixels.shape
    p = self.patch
    gh, gw = h // p, w // p
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (p, p, c, self.features), self.param_dtype)
    x = pixels[:, :gh * p, :gw * p, :].astype(self.dtype)
    # (B, gh, p, gw, p, C) -> (B, gh, gw, p, p, C): patch vectors in the
    # (kh, kw, C) order of the kernel.
    x = x.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, gh, gw, p * p * c)
    kernel = kernel.reshape(p * p * c, self.features).astype(self.dtype)
    if self.rank <= 0:
      return x @ kernel
    a = self.param(LORA_A, INITIALIZERS[LORA_A], (p, p, c, self.rank),
                   self.param_dtype)
    b = self.param(LORA_B, INITIALIZERS[LORA_B],
                   (1, 1, self.rank, self.features), self.param_dtype)
    a = a.reshape(p * p * c, self.rank)
    b = b.reshape(self.rank, self.features)
    # Dropout on the conv input is elementwise, so it commutes with
    # patchifying; mask the patch vectors.
    y = _apply_lora(self, x, kernel, a, b, deterministic)
    return y.reshape(x.shape[:-1] + (self.features,))


def _apply_lora(module, x, kernel, a, b, deterministic, keep=None):
  """Flattens x to (N, in), draws the dropout mask unless given, calls
  `lora_dense`."""
  x2 = x.reshape(-1, x.shape[-1])
  scale = module.alpha / module.rank
  if module.dropout > 0.0 and not deterministic:
    if keep is None:
      keep = dropout_keep_mask(module.make_rng("dropout"), x2.shape,
                               module.dropout)
    elif keep.shape != x2.shape:
      raise ValueError(f"{module.name}: dropout mask of shape {keep.shape} "
                       f"for an input of {x2.shape}")
    scale = scale / keep_probability(module.dropout)
  else:
    keep = None
  return lora_dense(x2, kernel, a.astype(x.dtype), b.astype(x.dtype), scale,
                    keep)


def lora_delta(lora_a, lora_b, scale):
  """The merged weight update `scale · A·B` in the base kernel's layout.

  Args:
    lora_a: `(in, r)`, `(kh, kw, C, r)`, or `(layers, in, r)` for scanned
      layers (`clip.stack_layers`).
    lora_b: `(r, out)`, `(1, 1, r, out)` or `(layers, r, out)`.
    scale: `alpha / r`.

  Returns:
    `(in, out)`, `(kh, kw, C, out)` or `(layers, in, out)`, float32
    (float64 for float64 inputs).
  """
  acc = jnp.promote_types(jnp.result_type(lora_a, lora_b), jnp.float32)
  a = jnp.asarray(lora_a, acc)
  b = jnp.asarray(lora_b, acc)
  if b.ndim == 3:  # scanned dense layers: one product per layer
    return scale * jnp.einsum("lir,lro->lio", a, b)
  r = a.shape[-1]
  b2 = b.reshape(r, b.shape[-1])
  return scale * jnp.einsum("...r,ro->...o", a, b2)


def merge_lora(params, lora_config):
  """Folds every LoRA pair into its base kernel and removes the LoRA leaves.

  `kernel ← kernel + (alpha / r) · A·B` wherever a dict holds `kernel`,
  `lora_A` and `lora_B`. The result has the param tree of a model built
  without LoRA (`lora=None`).

  Args:
    params: a param tree (nested dicts); may be wrapped, e.g. `{"params":
      ...}` or the HySAC tree with a `"clip"` subtree.
    lora_config: an object with `rank` and `alpha` (`LoRAConfig`); the rank
      must equal the stored `A`'s last axis.

  Returns:
    A new tree, the same nesting, without `lora_A` / `lora_B` leaves.
  """
  def merge(node, path):
    if not isinstance(node, dict) and not hasattr(node, "items"):
      return node
    node = dict(node)
    if LORA_A in node or LORA_B in node:
      if not (LORA_A in node and LORA_B in node and "kernel" in node):
        raise ValueError(f"incomplete LoRA pair at {'/'.join(path)}: has "
                         f"{sorted(node)}")
      a, b = node.pop(LORA_A), node.pop(LORA_B)
      if a.shape[-1] != lora_config.rank:
        raise ValueError(
            f"LoRA rank mismatch at {'/'.join(path)}: lora_A has rank "
            f"{a.shape[-1]}, lora_config.rank is {lora_config.rank}")
      kernel = node["kernel"]
      delta = lora_delta(a, b, lora_config.alpha / lora_config.rank)
      acc = jnp.promote_types(kernel.dtype, jnp.float32)  # float64 stays
      node["kernel"] = (jnp.asarray(kernel, acc) + delta).astype(
          kernel.dtype)
    return {k: merge(v, path + (k,)) for k, v in node.items()}

  return merge(params, ())
