"""Flax CLIP text and vision towers (Hugging Face `CLIPModel` layout), with LoRA.

Behaviour is that of Hugging Face `CLIPTextModelWithProjection` and
`CLIPVisionModelWithProjection` (SPEC.md §2): pre-LayerNorm blocks, quick-GELU
(or GELU per config), a causal text mask with pooling at the end-of-text
token, a vision class token with learned positions and `pre_layrnorm`, pooled
= `post_layernorm(class token)`, and bias-free patch conv and projections.

Param names follow Hugging Face (`text_model/encoder/layers_3/self_attn/
k_proj/kernel`), so that `hysac_jax.convert` is a rename plus a transpose.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hysac_jax.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text transformer. `eos_token_id` None or 2 -> pool at argmax(ids)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT image tower."""
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and the shared projection width."""
  text: TextConfig
  vision: VisionConfig
  projection_dim: int

  def to_dict(self):
    """A JSON-able dict; `from_dict` reads it back."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d):
    """The config of `to_dict` (a converted model's or an export's)."""
    return cls(text=TextConfig(**d["text"]),
               vision=VisionConfig(**d["vision"]),
               projection_dim=d["projection_dim"])


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA on both towers (SPEC.md §2). `rank` 0 means no LoRA."""
  rank: int = 16
  alpha: float = 1.0
  dropout: float = 0.1
  targets: tuple[str, ...] = ("k_proj", "v_proj", "out_proj", "fc1", "fc2",
                              "patch_embedding")


def quick_gelu(x):
  """OpenAI CLIP's `x · sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name):
  """The activation function of a HF `hidden_act` name."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: "
                     f"{sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def accumulation_dtype(dtype):
  """The dtype of softmax and outputs: float32, or float64 for float64 towers.

  bfloat16 towers keep float32 scores and outputs; float64 towers (parity
  checks under `jax.enable_x64`) stay float64 throughout.
  """
  return jnp.promote_types(dtype, jnp.float32)


def _lora_kwargs(lora, name):
  """LoRA attributes for the layer called `name` (none when not targeted)."""
  if lora is None or lora.rank <= 0 or name not in lora.targets:
    return {}
  return dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)


# The LoRA-able dense layers of an encoder layer, in the order their dropout
# masks take the words of the layer's one random draw.
LAYER_LORA_SITES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")
REMAT_POLICIES = ("none", "dots_saveable", "full")


def attention_implementation(requested, dtype, head_dim, backend=None):
  """The attention implementation to use.

  Args:
    requested: "xla" or "cudnn" (`jax.nn.dot_product_attention`), "einsum"
      (`reference_attention`), or "auto"/None: cuDNN's fused (flash)
      attention on GPUs for bfloat16/float16 towers whose head width it
      takes (a multiple of 8, at most 128); on CPUs the einsums (13 % faster
      than the XLA path at ViT-B/16, BENCHMARKS.md); XLA elsewhere.
    dtype: the towers' compute dtype.
    head_dim: width of one attention head.
    backend: `jax.default_backend()` unless given.

  Returns:
    "xla", "cudnn" or "einsum".
  """
  if requested in (None, "auto"):
    backend = backend or jax.default_backend()
    fused = (backend in ("gpu", "cuda")
             and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                      jnp.dtype(jnp.float16))
             and head_dim % 8 == 0 and head_dim <= 128)
    if fused:
      return "cudnn"
    return "einsum" if backend == "cpu" else "xla"
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {requested!r} "
                     "(config.model.attention) is not one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")
  return requested


def remat_policy_name(remat):
  """"none", "dots_saveable" or "full" from a policy name or a bool.

  `True` / `False` are the older boolean `config.model.remat` (full / none).
  """
  if isinstance(remat, bool) or remat is None:
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} (config.model.remat) is not "
                     f"one of {REMAT_POLICIES}")
  return remat


def reference_attention(q, k, v, causal=False):
  """softmax(q·kᵀ [+ causal mask]) · v, spelled out as einsums.

  Scores and softmax are float32 for bfloat16/float16 inputs (as HF does)
  and float64 for float64 inputs; probabilities go back to the inputs'
  dtype.

  Args:
    q, k, v: (B, L, H, head_dim), q already scaled.
    causal: token i attends to tokens <= i.

  Returns:
    (B, L, H, head_dim).
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=accumulation_dtype(q.dtype))
  if causal:
    l = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((l, l), bool)), scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
  """Multi-head self-attention: `jax.nn.dot_product_attention` or einsums.

  Queries are scaled by `head_dim^-1/2` before the product (as HF does);
  logits and softmax are float32, probabilities are cast back to the compute
  dtype. float64 towers use `reference_attention` instead (jax's XLA path
  rounds the softmax input to float32), so that parity checks in float64
  are exact.
  """
  hidden_size: int
  num_heads: int
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  causal: bool = False
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, deterministic=True, keep=None):
    """x: (B, L, D) -> (B, L, D); causal: token i sees tokens <= i.

    `keep`: optional {projection name: dropout mask} (`EncoderLayer.keep_masks`).
    """
    keep = keep or {}
    b, l, d = x.shape
    h = self.num_heads
    hd = d // h

    def proj(name):
      return lora_lib.LoRADense(d, dtype=self.dtype, name=name,
                                **_lora_kwargs(self.lora, name))

    def heads(t):  # (B, L, D) -> (B, L, H, hd)
      return t.reshape(b, l, h, hd)

    def project(name, t):
      return proj(name)(t, deterministic, keep.get(name))

    q = heads(project("q_proj", x) * jnp.asarray(hd**-0.5, self.dtype))
    k = heads(project("k_proj", x))
    v = heads(project("v_proj", x))
    impl = attention_implementation(self.implementation, self.dtype, hd)
    if impl == "einsum" or jnp.dtype(self.dtype) == jnp.dtype(jnp.float64):
      # float64 towers verify the math (parity tests): jax's XLA attention
      # rounds the softmax input to float32, so they always take the einsums.
      out = reference_attention(q, k, v, self.causal)
    else:
      out = jax.nn.dot_product_attention(
          q, k, v, scale=1.0, is_causal=self.causal, implementation=impl)
    return project("out_proj", out.reshape(b, l, d))


class MLP(nn.Module):
  """fc1 -> activation -> fc2."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True, keep=None):
    """x: (B, L, D) -> (B, L, D); `keep` as in `Attention`."""
    keep = keep or {}
    y = lora_lib.LoRADense(self.intermediate_size, dtype=self.dtype,
                           name="fc1", **_lora_kwargs(self.lora, "fc1"))(
                               x, deterministic, keep.get("fc1"))
    y = activation(self.hidden_act)(y)
    return lora_lib.LoRADense(self.hidden_size, dtype=self.dtype, name="fc2",
                              **_lora_kwargs(self.lora, "fc2"))(
                                  y, deterministic, keep.get("fc2"))


class EncoderLayer(nn.Module):
  """A pre-LayerNorm transformer block (HF `CLIPEncoderLayer`)."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  causal: bool = False
  attention: str | None = None
  scan_carry: bool = False  # return (x, None), the body of an `nn.scan`

  def keep_masks(self, rows, deterministic):
    """The layer's LoRA dropout masks, {target: (rows, in) bool}, from one
    draw of its own key (`lora_lib.keep_masks`); {} when dropout is off."""
    lora = self.lora
    if (deterministic or lora is None or lora.rank <= 0
        or lora.dropout <= 0.0):
      return {}
    widths = {name: self.hidden_size for name in LAYER_LORA_SITES}
    widths["fc2"] = self.intermediate_size
    widths = {name: w for name, w in widths.items() if name in lora.targets}
    if not widths:
      return {}
    return lora_lib.keep_masks(self.make_rng("dropout"), rows, widths,
                               lora.dropout)

  @nn.compact
  def __call__(self, x, deterministic=True):
    """x: (B, L, D) -> (B, L, D) (or ((B, L, D), None) under `scan_carry`)."""
    def norm(name):
      return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                          name=name)

    keep = self.keep_masks(x.shape[0] * x.shape[1], deterministic)
    y = norm("layer_norm1")(x)
    y = Attention(self.hidden_size, self.num_heads, self.lora, self.dtype,
                  self.causal, self.attention, name="self_attn")(
                      y, deterministic, keep)
    x = x + y
    y = norm("layer_norm2")(x)
    y = MLP(self.hidden_size, self.intermediate_size, self.hidden_act,
            self.lora, self.dtype, name="mlp")(y, deterministic, keep)
    return (x + y, None) if self.scan_carry else x + y


class Encoder(nn.Module):
  """A stack of `EncoderLayer`s: `layers_0 ... layers_{n-1}`, or one scanned
  `layers` whose params carry a leading layer axis.

  `remat` ("none", "dots_saveable" or "full"; see `remat_policy_name`)
  rematerialises each layer in the backward pass: "full" keeps only the
  layer inputs, "dots_saveable" keeps the matmul outputs and recomputes the
  rest (norms, activations, softmax).

  `scan` runs the layers under `nn.scan` (as big_vision's ViT does): the
  step compiles one layer instead of `num_layers`, so compile time no longer
  grows with depth. Every layer draws its own dropout key. The params are
  those of the unrolled stack stacked on a leading axis (`stack_layers`).
  """
  num_layers: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  remat: Any = "none"
  causal: bool = False
  attention: str | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, x, deterministic=True):
    """x: (B, L, D) -> (B, L, D)."""
    policy = remat_policy_name(self.remat)
    layer_cls = EncoderLayer
    if policy != "none":
      # static_argnums counts `self`: (self, x, deterministic). Under scan,
      # CSE across iterations cannot undo the remat, so it need not be
      # prevented (flax's advice for remat inside scan).
      layer_cls = nn.remat(
          EncoderLayer, static_argnums=(2,), prevent_cse=not self.scan,
          policy=(jax.checkpoint_policies.dots_saveable
                  if policy == "dots_saveable" else None))
    args = (self.hidden_size, self.intermediate_size, self.num_heads,
            self.hidden_act, self.layer_norm_eps, self.lora, self.dtype,
            self.causal, self.attention)
    if self.scan:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=nn.broadcast, length=self.num_layers)
      x, _ = scanned(*args, scan_carry=True, name=SCANNED_LAYERS)(
          x, deterministic)
      return x
    for i in range(self.num_layers):
      x = layer_cls(*args, name=f"layers_{i}")(x, deterministic)
    return x


SCANNED_LAYERS = "layers"
_UNROLLED_LAYER = re.compile(r"^layers_(\d+)$")


def stack_layers(params):
  """The scanned layout of a param tree: each `encoder`'s `layers_0 ...
  layers_{n-1}` -> one `layers` whose leaves are stacked on a new leading
  (layer) axis.

  Works on any nesting (a CLIP tree, a HySAC tree, its trainable part) and
  leaves an already scanned tree as it is. Leaves are stacked with NumPy
  when they are NumPy arrays (conversion, on the host), else with jnp.

  Raises:
    ValueError: the layer numbers are not 0..n-1, or two layers hold
      different leaves.
  """
  def walk(node, path):
    if not isinstance(node, dict):
      return node
    out = {k: walk(v, path + (k,)) for k, v in node.items()}
    layer_keys = [k for k in out if _UNROLLED_LAYER.match(str(k))]
    if not (path and path[-1] == "encoder" and layer_keys):
      return out
    numbers = sorted(int(_UNROLLED_LAYER.match(k).group(1))
                     for k in layer_keys)
    where = "/".join(path) or "<root>"
    if numbers != list(range(len(numbers))):
      raise ValueError(f"{where}: layers are not numbered 0..n-1: "
                       f"{numbers}")
    if SCANNED_LAYERS in out:
      raise ValueError(f"{where} holds both {SCANNED_LAYERS} and "
                       "layers_<i>")
    layers = [out.pop(f"layers_{i}") for i in numbers]
    flats = [traverse_util.flatten_dict(l) for l in layers]
    for i, flat in enumerate(flats[1:], 1):
      if set(flat) != set(flats[0]):
        raise ValueError(f"{where}/layers_{i} holds other leaves than "
                         f"layers_0: {sorted(set(flat) ^ set(flats[0]))}")
    stacked = {}
    for k in flats[0]:
      leaves = [f[k] for f in flats]
      xp = np if all(isinstance(v, np.ndarray) for v in leaves) else jnp
      stacked[k] = xp.stack(leaves)
    out[SCANNED_LAYERS] = traverse_util.unflatten_dict(stacked)
    return out

  return walk(params, ())


def unstack_layers(params):
  """The unrolled layout of a param tree: each scanned `layers` (leading
  layer axis) -> `layers_0 ... layers_{n-1}`. The inverse of
  `stack_layers`; an unrolled tree is returned as it is."""
  def walk(node, path):
    if not isinstance(node, dict):
      return node
    out = {k: walk(v, path + (k,)) for k, v in node.items()}
    if path and path[-1] == "encoder" and SCANNED_LAYERS in out:
      flat = traverse_util.flatten_dict(out.pop(SCANNED_LAYERS))
      depth = {np.shape(v)[0] for v in flat.values()}
      if len(depth) != 1:
        raise ValueError(f"{'/'.join(path)}/{SCANNED_LAYERS}: leaves have "
                         f"different layer counts {sorted(depth)}")
      for i in range(depth.pop()):
        out[f"layers_{i}"] = traverse_util.unflatten_dict(
            {k: v[i] for k, v in flat.items()})
    return out

  return walk(params, ())


def is_scanned(params):
  """True when some `encoder` of the tree holds scanned `layers`."""
  return any(len(k) >= 2 and k[-2] == "encoder" and k[-1] == SCANNED_LAYERS
             for k in _dict_paths(params))


def _dict_paths(node, path=()):
  if isinstance(node, dict):
    yield path
    for k, v in node.items():
      yield from _dict_paths(v, path + (k,))


def _embedding_init():
  return nn.initializers.normal(0.02)


class TextTransformer(nn.Module):
  """HF `CLIPTextTransformer`: ids -> pooled (B, D) before the projection."""
  config: TextConfig
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  remat: Any = "none"
  attention: str | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, input_ids, deterministic=True):
    """input_ids: (B, L) int, L <= max_position_embeddings -> (B, D)."""
    cfg = self.config
    l = input_ids.shape[1]
    if l > cfg.max_position_embeddings:
      raise ValueError(f"text length {l} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    x = _TextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings,
                        cfg.hidden_size, name="embeddings")(input_ids)
    x = x.astype(self.dtype)
    x = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                self.lora, self.dtype, self.remat, causal=True,
                attention=self.attention, scan=self.scan,
                name="encoder")(x, deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     name="final_layer_norm")(x)
    pos = pool_positions(input_ids, cfg.eos_token_id)
    return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class _TextEmbeddings(nn.Module):
  """HF `CLIPTextEmbeddings`: `token_embedding` and `position_embedding`."""
  vocab_size: int
  max_positions: int
  hidden_size: int

  @nn.compact
  def __call__(self, input_ids):
    """(B, L) int -> (B, L, D) float32: token + position embeddings."""
    length = input_ids.shape[1]
    tok = nn.Embed(self.vocab_size, self.hidden_size,
                   embedding_init=_embedding_init(), name="token_embedding")
    pos = nn.Embed(self.max_positions, self.hidden_size,
                   embedding_init=_embedding_init(), name="position_embedding")
    return tok(input_ids) + pos.embedding[None, :length]


def pool_positions(input_ids, eos_token_id):
  """The end-of-text position of each sequence (HF's rule).

  Args:
    input_ids: (B, L) int.
    eos_token_id: None or 2 (the original OpenAI configs): the position of
      the highest id (the end-of-text token has the largest id in the OpenAI
      vocabulary). Otherwise the first position of `eos_token_id`.

  Returns:
    (B,) int32 positions.
  """
  if eos_token_id is None or eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class VisionTransformer(nn.Module):
  """HF `CLIPVisionTransformer`: pixels -> pooled (B, D) before projection."""
  config: VisionConfig
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  remat: Any = "none"
  attention: str | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, pixels, deterministic=True):
    """pixels: (B, H, W, C) float, normalised, H = W = image_size -> (B, D)."""
    cfg = self.config
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(
          f"pixels must be (B, {cfg.image_size}, {cfg.image_size}, "
          f"{cfg.num_channels}) NHWC, got {pixels.shape}")
    x = _VisionEmbeddings(cfg, self.lora, self.dtype, name="embeddings")(
        pixels, deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                     name="pre_layrnorm")(x)
    x = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps,
                self.lora, self.dtype, self.remat,
                attention=self.attention, scan=self.scan,
                name="encoder")(x, deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        name="post_layernorm")(x[:, 0])


class _VisionEmbeddings(nn.Module):
  config: VisionConfig
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels, deterministic=True):
    """(B, H, W, C) -> (B, 1 + num_patches, D): class token + patches."""
    cfg = self.config
    d = cfg.hidden_size
    n_pos = (cfg.image_size // cfg.patch_size)**2 + 1
    cls = self.param("class_embedding", _embedding_init(), (d,), jnp.float32)
    patches = lora_lib.LoRAPatchConv(
        d, cfg.patch_size, dtype=self.dtype, name="patch_embedding",
        **_lora_kwargs(self.lora, "patch_embedding"))(pixels, deterministic)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, d)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    pos = nn.Embed(n_pos, d, embedding_init=_embedding_init(),
                   name="position_embedding")
    return x + pos.embedding[None].astype(self.dtype)


class CLIPModel(nn.Module):
  """Both CLIP towers with their projections (HF `CLIPModel` without
  `logit_scale`).

  Attributes:
    config: `CLIPConfig`.
    lora: `LoRAConfig`, or None (or rank 0) for no LoRA.
    dtype: compute dtype (e.g. `jnp.bfloat16`); params stay float32 and the
      outputs are float32.
    remat: rematerialisation of each transformer block in the backward
      pass: "none", "dots_saveable" or "full" (see `Encoder`).
    attention: `jax.nn.dot_product_attention` implementation, "xla",
      "cudnn", or None/"auto" (see `attention_implementation`).
    scan: run each tower's layers under `nn.scan` (see `Encoder`); the
      params then hold one `encoder/layers` with a leading layer axis.

  `model.init(rng, input_ids, pixels)` creates both towers' params;
  `model.apply(variables, ids, method="encode_text")` runs one tower.
  LoRA dropout (when `deterministic=False`) draws from the "dropout" stream.
  """
  config: CLIPConfig
  lora: LoRAConfig | None = None
  dtype: Any = jnp.float32
  remat: Any = "none"
  attention: str | None = None
  scan: bool = False

  def setup(self):
    lora = self.lora if (self.lora is not None and self.lora.rank > 0) else None
    self.text_model = TextTransformer(self.config.text, lora, self.dtype,
                                      self.remat, self.attention, self.scan)
    self.vision_model = VisionTransformer(self.config.vision, lora,
                                          self.dtype, self.remat,
                                          self.attention, self.scan)
    self.text_projection = lora_lib.LoRADense(
        self.config.projection_dim, use_bias=False, dtype=self.dtype)
    self.visual_projection = lora_lib.LoRADense(
        self.config.projection_dim, use_bias=False, dtype=self.dtype)

  def encode_text(self, input_ids, deterministic=True):
    """input_ids: (B, L) int32 -> (B, projection_dim) float32, not normalised."""
    pooled = self.text_model(input_ids, deterministic)
    return self.text_projection(pooled).astype(accumulation_dtype(self.dtype))

  def encode_image(self, pixels, deterministic=True):
    """pixels: (B, H, W, 3) float32 NHWC, normalised -> (B, projection_dim)
    float32, not normalised."""
    pooled = self.vision_model(pixels, deterministic)
    return self.visual_projection(pooled).astype(accumulation_dtype(self.dtype))

  def __call__(self, input_ids, pixels, deterministic=True):
    """Both towers: returns (text (B_t, P), image (B_i, P)) float32."""
    return (self.encode_text(input_ids, deterministic),
            self.encode_image(pixels, deterministic))


def dummy_inputs(config, batch=1):
  """Zero inputs of the right shapes for `CLIPModel.init`.

  Returns:
    (input_ids (batch, max_position_embeddings) int32,
     pixels (batch, image_size, image_size, num_channels) float32).
  """
  ids = jnp.zeros((batch, config.text.max_position_embeddings), jnp.int32)
  v = config.vision
  pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels),
                     jnp.float32)
  return ids, pixels
