"""One data-parallel training step of HySAC over a device mesh.

    mesh = step_lib.make_mesh()                      # Mesh(devices, ("data",))
    state = step_lib.create_train_state(config, rng, mesh=mesh,
                                         total_steps=num_steps)
    train_step = step_lib.make_train_step(config, mesh)
    for batch in batches:                             # numpy, global batch
      state, metrics = train_step(state, step_lib.shard_batch(batch, mesh), rng)

Parameters are replicated, the batch is sharded on the mesh axis "data" and
the state's buffers are donated. Everything here works on global arrays: the
contrastive logits span the whole global batch (global negatives); XLA
partitions the computation. `config.loss.local_negatives=True` instead treats
each device's rows as its own contrastive problem, as the PyTorch release
does.

Trainable vs frozen is data: `label_params` names each leaf "lora" (LoRA
matrices: AdamW with weight decay), "head" (the four head scalars: AdamW, no
weight decay) or "frozen" (no gradient is taken, no update, no optimizer
state). The optimizer only ever sees the trainable sub-tree.

Gradient accumulation (`config.optim.accum_steps = k`): each device's rows
are cut into k micro-batches; micro-batch j holds the j-th slice of every
device's rows, so it stays sharded without communication. Gradients are
averaged over micro-batches. With local negatives, one step with k
micro-batches equals one step with a k-times larger mesh. With global
negatives, each micro-batch's negatives are that micro-batch only (B/k rows,
not B): accumulation saves memory but changes the contrastive problem.
"""

import contextlib
import functools
import re
import zlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hysac_jax import losses
from hysac_jax import lorentz
from hysac_jax.config import DTYPES  # pylint: disable=unused-import
from hysac_jax.pretrained import (  # pylint: disable=unused-import
    initial_params, model_from_config)
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models import lora as lora_lib

DATA_AXIS = "data"
LABELS = ("frozen", "lora", "head", "base")
LORA_NAMES = ("lora_A", "lora_B")
BATCH_KEYS = ("safe_image", "unsafe_image", "safe_ids", "unsafe_ids")


# ----------------------------------------------------------------- params ---


def _label(path, train_base=False):
  if path[-1] in LORA_NAMES:
    return "lora"
  if len(path) == 1 and path[0] in hysac_lib.HEAD_NAMES:
    return "head"
  return "base" if train_base else "frozen"


def label_params(params, train_base=False):
  """Labels each leaf of a HySAC params tree "frozen", "lora" or "head".

  Args:
    params: nested dict of arrays (the full tree or any sub-tree of it that
      keeps the paths from the root).
    train_base: label the CLIP weights "base" (trained, with weight decay)
      instead of "frozen": a full fine-tune (`config.model.train_base`), for
      towers that start from a random init, such as the `tiny` demo.

  Returns:
    A tree of the same structure with string leaves.
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: _label(k, train_base) for k in flat})


def trainable_params(params, train_base=False):
  """The non-"frozen" leaves of `params`, as a nested dict."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if _label(k, train_base) != "frozen"})


def merge_params(params, trainable):
  """`params` with the leaves of `trainable` (a sub-tree) put in place."""
  flat = traverse_util.flatten_dict(params)
  for k, v in traverse_util.flatten_dict(trainable).items():
    if k not in flat:
      raise KeyError(f"trainable param {'/'.join(k)} is not in the model")
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------ model ---
# The module and the weights a config describes come from `hysac_jax.
# pretrained` (which reads the files); `model_from_config` and
# `initial_params` stay importable from here.


def init_model_params(model, rng):
  """Random HySAC params (LoRA B = 0, head scalars at their inits)."""
  return _jitted_init(model, None)(rng)


def _input_structs(model):
  """Shapes of one dummy image and caption batch, for `model.init`."""
  vision, text = model.clip.vision, model.clip.text
  pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size,
                                 vision.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  return pixels, ids


@functools.lru_cache(maxsize=8)
def _jitted_init(model, sharding):
  """model.init on dummy inputs, jitted once per (hashable) module and
  placement (None: the default device)."""
  pixels, ids = (jnp.zeros(s.shape, s.dtype) for s in _input_structs(model))

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, pixels, ids,
                           deterministic=True)
    return variables["params"]

  return jax.jit(init, out_shardings=sharding)


@functools.lru_cache(maxsize=8)
def abstract_params(model):
  """The model's params tree as `jax.ShapeDtypeStruct` leaves.

  Traces `model.init` without computing anything (`jax.eval_shape`).
  """
  def init(pixels, ids):
    return model.init({"params": jax.random.key(0)}, pixels, ids,
                      deterministic=True)["params"]

  return jax.eval_shape(init, *_input_structs(model))


def _leaf_seed(path):
  """A stable 31-bit number per param path (keys each fresh leaf)."""
  return zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF


def build_params(model, rng, given=None, *, sharding=None):
  """The model's params: the given (pretrained) leaves, the rest fresh.

  Nothing that `given` supplies is initialised: shapes come from
  `abstract_params`, given leaves are placed as they are (a copy, cast to
  the model's param dtype when it differs; float64 for float64 towers), and only the leaves `given`
  lacks, which must be LoRA matrices or head scalars, are made, on the host
  (nothing is compiled): LoRA `A` by peft's Kaiming-uniform rule, drawn
  from (`rng`, param path), `B` zeros (`lora.host_init`), the head scalars
  at `hysac.head_init`. Without `given`, the whole model is random
  (`model.init`, jitted; random towers, e.g. the `tiny` demo).

  Args:
    model: the HySAC module.
    rng: PRNG key for the fresh leaves.
    given: None, a full HySAC tree, or just its "clip" sub-tree (as
      converted from Hugging Face, without LoRA leaves or head scalars);
      numpy or jax arrays.
    sharding: where to place every leaf (e.g. replicated on a mesh); None
      for the default device.

  Returns:
    The full params tree. Its arrays never alias `given`'s, so donating them
    (the train step does) leaves the caller's arrays intact.

  Raises:
    KeyError: `given` has a leaf the model lacks, or lacks a frozen leaf.
    ValueError: a given leaf's shape differs from the model's.
  """
  if given is None:
    return _jitted_init(model, sharding)(rng)
  if "clip" not in given:
    given = {"clip": given}
  # Leaves are matched and made in the unrolled layout (as converted), so
  # that a scanned model starts from the very values an unrolled one does
  # (LoRA A is drawn per layer path); they are stacked at the end.
  scanned = getattr(model, "scan_layers", False)
  unrolled = model.clone(scan_layers=False) if scanned else model
  want = traverse_util.flatten_dict(abstract_params(unrolled))
  have = traverse_util.flatten_dict(clip_lib.unstack_layers(given))
  _check_given(want, have)
  values = _host_leaves(model, rng, want, have)
  if scanned:
    flat = traverse_util.flatten_dict(clip_lib.stack_layers(
        traverse_util.unflatten_dict(dict(zip(want, values)))))
    want, values = list(flat), list(flat.values())
  placed = _place(values, sharding)
  return traverse_util.unflatten_dict(dict(zip(want, placed)))


def _check_given(want, have):
  """Raises unless the flat `have` fits the flat model shapes `want`: no
  unknown leaf, every frozen leaf present, every shape the model's."""
  unknown = [k for k in have if k not in want]
  if unknown:
    raise KeyError("init params hold leaves the model does not have: "
                   + ", ".join("/".join(k) for k in unknown[:8]))
  missing = [k for k in want if k not in have and _label(k) == "frozen"]
  if missing:
    raise KeyError("init params lack frozen model leaves: "
                   + ", ".join("/".join(k) for k in missing[:8]))
  for k, v in have.items():
    if tuple(np.shape(v)) != tuple(want[k].shape):
      raise ValueError(f"init param {'/'.join(k)} has shape {np.shape(v)}, "
                       f"the model expects {want[k].shape}")


def _host_leaves(model, rng, want, have):
  """Every leaf of `want`, in its order: the given one (cast to the param
  dtype), else a head scalar at its init, else a LoRA matrix made on the
  host from (`rng`, its path)."""
  head = hysac_lib.head_init(model.clip.projection_dim, model.curv_init)
  words = [int(w) for w in np.ravel(jax.device_get(_key_data(rng)))]
  # float64 towers (verification under jax_enable_x64) keep float64 params.
  float64 = jnp.dtype(model.dtype) == jnp.dtype(jnp.float64)
  values = []
  for k, spec in want.items():
    dtype = np.dtype(np.float64) if float64 else spec.dtype
    if k in have:
      v = _as_array(have[k])
      values.append(v if v.dtype == dtype else v.astype(dtype))
    elif k[-1] in head:
      values.append(np.asarray(head[k[-1]], dtype))
    else:
      values.append(lora_lib.host_init(k[-1], spec.shape, dtype,
                                       words + [_leaf_seed(k)]))
  return values


def _place(values, sharding):
  """`values` placed by `sharding` (None: the default device), copied."""
  if sharding is not None and not sharding.is_fully_addressable:
    # Several processes: each places its own (identical) copy on its
    # devices; device_put would first compare every leaf across hosts.
    return [_from_host(v, sharding) if isinstance(v, np.ndarray)
            else jax.device_put(v, sharding, may_alias=False)
            for v in values]
  return jax.device_put(values, sharding, may_alias=False)


def _from_host(value, sharding):
  """A global array of `sharding` from the same numpy value on every host."""
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: np.array(value[index]))


def _key_data(rng):
  """The raw uint32 words of a (typed or legacy) PRNG key."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def _as_array(x):
  return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


def random_clip_params(model, seed=0):
  """Random float32 numpy CLIP weights of the model's shapes, without LoRA.

  A cheap stand-in for a converted CLIP (benchmarks, start-up timing):
  LayerNorm scales 1, biases 0, every other weight N(0, 0.02²). Pass it as
  `init_params` to skip the random init's compile.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in traverse_util.flatten_dict(abstract_params(model)["clip"]
                                         ).items():
    if k[-1] in LORA_NAMES:
      continue
    if k[-1] == "scale":
      out[k] = np.ones(v.shape, np.float32)
    elif k[-1] == "bias":
      out[k] = np.zeros(v.shape, np.float32)
    else:
      out[k] = rng.standard_normal(v.shape, np.float32) * np.float32(0.02)
  return traverse_util.unflatten_dict(out)


# -------------------------------------------------------------- optimizer ---


def learning_rate_schedule(optim_config, total_steps=None):
  """The learning rate per optimizer update, from `config.optim`.

  "constant": `lr` after an optional linear warm-up of `warmup_steps`.
  "warmup_cosine" (MERU): linear warm-up from 0, then `lr * cos²(π/2 · p)`
  (= half-cosine) decay to 0 at `total_steps`, p the post-warm-up progress.

  Returns:
    A float for a constant rate without warm-up (it then lives in the
    optimizer state, where `with_learning_rate` can change it), else an optax
    schedule (step -> rate).
  """
  lr, warmup = optim_config.lr, int(optim_config.warmup_steps)
  if optim_config.schedule == "constant":
    if warmup <= 0:
      return float(lr)
    return optax.linear_schedule(0.0, lr, warmup)
  if optim_config.schedule == "warmup_cosine":
    if not total_steps or total_steps <= warmup:
      raise ValueError(
          "config.optim.schedule='warmup_cosine' needs total_steps > "
          f"warmup_steps ({warmup}); got total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=total_steps, end_value=0.0)
  raise ValueError(f"config.optim.schedule={optim_config.schedule!r}: "
                   "expected 'constant' or 'warmup_cosine'")


def make_optimizer(optim_config, learning_rate, train_base=False):
  """AdamW over the trainable sub-tree; weight decay on "lora" leaves only
  (and on "base" leaves in a full fine-tune).

  Decoupled weight decay scaled by the learning rate, as torch's AdamW.
  Optional global-norm clipping (`grad_clip > 0`) comes first. The AdamW
  hyperparameters live in the optimizer state (`optax.inject_hyperparams`):
  `learning_rate(state)` reads the rate of the last update, and a constant
  rate can be changed there without recompiling.

  Args:
    optim_config: `config.optim`.
    learning_rate: a float or an optax schedule (`learning_rate_schedule`).
  """
  def decay_mask(tree):
    return jax.tree.map(lambda label: label in ("lora", "base"),
                        label_params(tree, train_base))

  parts = []
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  parts.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=learning_rate, b1=optim_config.b1, b2=optim_config.b2,
      eps=optim_config.eps, weight_decay=optim_config.weight_decay,
      mask=decay_mask))
  return optax.chain(*parts)


def _adamw_state(opt_state):
  """The InjectHyperparamsState of AdamW, last in the chain."""
  return opt_state[-1]


def learning_rate(state):
  """The learning rate of the state's last (or, at step 0, first) update."""
  return _adamw_state(state.opt_state).hyperparams["learning_rate"]


def with_learning_rate(state, lr):
  """`state` with a new constant learning rate (no recompilation).

  Only meaningful with `schedule="constant"` and no warm-up: a schedule
  overwrites the value at the next update.
  """
  adamw = _adamw_state(state.opt_state)
  old = adamw.hyperparams["learning_rate"]
  hyper = dict(adamw.hyperparams,
               learning_rate=jnp.full_like(old, lr))
  if hasattr(old, "sharding"):
    hyper["learning_rate"] = jax.device_put(hyper["learning_rate"],
                                            old.sharding)
  adamw = adamw._replace(hyperparams=hyper)
  return state.replace(opt_state=state.opt_state[:-1] + (adamw,))


# ------------------------------------------------------------------ state ---


@flax.struct.dataclass
class TrainState:
  """Training state: the full params, AdamW state of the trainable part.

  Attributes:
    step: int32 scalar, optimizer updates done.
    params: the full HySAC params tree (frozen and trainable leaves).
    opt_state: optax state over `trainable_params(params)` only.
    model: the HySAC module (static).
    tx: the optax transformation (static).
    train_base: whether the CLIP weights are trained too (static).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model: hysac_lib.HySAC = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  train_base: bool = flax.struct.field(pytree_node=False, default=False)

  def trainable(self):
    """The trainable sub-tree of `params` (what the optimizer sees)."""
    return trainable_params(self.params, self.train_base)


def create_train_state(config, rng, init_params=None, *, mesh=None,
                       total_steps=None, model=None):
  """A fresh TrainState, replicated over `mesh` when one is given.

  Args:
    config: the run config (`config.model`, `config.optim`).
    rng: PRNG key for the random init (LoRA A, and every leaf not given).
    init_params: optional pretrained params: a full HySAC tree or its "clip"
      sub-tree (see `build_params`).
    mesh: optional device mesh; the state's arrays are replicated on it.
    total_steps: optimizer updates in the run (needed by "warmup_cosine").
    model: optional HySAC module overriding `model_from_config(config)`.

  Returns:
    TrainState at step 0. Its static `model` and `tx` key the jit cache of
    the train step: derive later states from this one (as the step does),
    do not rebuild it, or the step recompiles.
  """
  model = model or model_from_config(config)
  replicated = NamedSharding(mesh, P()) if mesh is not None else None
  params = build_params(model, rng, init_params, sharding=replicated)
  train_base = bool(config.model.train_base)
  tx = make_optimizer(config.optim,
                      learning_rate_schedule(config.optim, total_steps),
                      train_base)

  # Given head scalars may lie outside their range: project them. Eager
  # ops: one small program per leaf shape, where a jitted init would
  # compile a kernel per output buffer.
  trainable = hysac_lib.project_head(trainable_params(params, train_base),
                                     model.curv_init)
  opt_state = tx.init(trainable)
  step = jnp.zeros((), jnp.int32)
  if replicated is not None:
    step, trainable, opt_state = jax.device_put((step, trainable, opt_state),
                                                replicated)
  return TrainState(step=step, params=merge_params(params, trainable),
                    opt_state=opt_state, model=model, tx=tx,
                    train_base=train_base)


# ------------------------------------------------------------------- mesh ---


def make_mesh(devices=None):
  """A 1-D `Mesh(devices, ("data",))` over all (or the given) devices."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def num_shards(mesh):
  return mesh.shape[DATA_AXIS]


def shard_batch(batch, mesh):
  """Places a host batch (dict of numpy arrays) sharded on "data".

  Each process passes its own rows; the global batch is their concatenation.
  """
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  n = num_shards(mesh) // jax.process_count()
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % n:
      raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows, not "
                       f"divisible by the {n} local devices of the mesh")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


# ------------------------------------------------------------- the step ---


def _check_batch(batch):
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing}; it has {sorted(batch)}")


def embed_quadruples(model, params, batch, rng=None, deterministic=True):
  """Embeds a batch of quadruples with one call per tower.

  Safe and unsafe inputs are interleaved (row 2i safe, 2i+1 unsafe), not
  concatenated, so the rows of a sharded batch stay on their device.

  Args:
    model: HySAC module.
    params: its params tree.
    batch: dict with "safe_image", "unsafe_image" (B, H, W, 3) and
      "safe_ids", "unsafe_ids" (B, L).
    rng: dropout key (needed unless deterministic).
    deterministic: disables LoRA dropout.

  Returns:
    dict S, U, V, G of (B, D) float32 embeddings.
  """
  b = batch["safe_ids"].shape[0]
  ids = jnp.stack([batch["safe_ids"], batch["unsafe_ids"]], axis=1)
  pixels = jnp.stack([batch["safe_image"], batch["unsafe_image"]], axis=1)
  ids = ids.reshape((2 * b,) + ids.shape[2:])
  pixels = pixels.reshape((2 * b,) + pixels.shape[2:])
  rngs = {} if deterministic else {"dropout": rng}
  image, text = model.apply({"params": params}, pixels, ids,
                            deterministic=deterministic, rngs=rngs)
  image = image.reshape((b, 2, -1))
  text = text.reshape((b, 2, -1))
  return {"S": text[:, 0], "U": text[:, 1], "V": image[:, 0],
          "G": image[:, 1]}


def _mean_valid(x, mask):
  if mask is None:
    return jnp.mean(x)
  valid = mask > 0
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def loss_and_metrics(model, params, batch, loss_config, num_groups, rng=None,
                     deterministic=True):
  """The HySAC loss of a batch, with the embeddings and per-batch metrics.

  Returns:
    (total, (embeddings, metrics)): metrics has the seven terms, "loss",
    curv, logit_scale, alpha_image, alpha_text and the mean distance from
    the origin of S, U, V and G (Euclidean norm in "euc" mode).
  """
  emb = embed_quadruples(model, params, batch, rng, deterministic)
  scalars = hysac_lib.head_scalars(params, model.curv_init)
  mask = batch.get("mask")
  total, terms = losses.hysac_loss(
      emb["S"], emb["U"], emb["V"], emb["G"], scalars["curv"],
      scalars["logit_scale"], loss_config, mask=mask, num_groups=num_groups,
      mode=model.mode)
  metrics = dict(terms, loss=total, **scalars)
  for name, x in emb.items():
    if model.mode == "hyp":
      radius = lorentz.dist0(x, scalars["curv"])
    else:
      radius = jnp.linalg.norm(x, axis=-1)
    metrics[f"dist0_{name}"] = _mean_valid(radius, mask)
  return total, (emb, metrics)


def _micro_batches(batch, k, num_groups):
  """(B, ...) leaves -> (k, B // k, ...): micro-batch j = j-th slice per shard."""
  def split(x):
    b = x.shape[0]
    if b % (num_groups * k):
      raise ValueError(f"batch of {b} rows cannot be cut into {k} micro-"
                       f"batches on {num_groups} devices "
                       "(config.optim.accum_steps)")
    m = b // (num_groups * k)
    x = x.reshape((num_groups, k, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((k, num_groups * m) + x.shape[3:])
  return jax.tree.map(split, batch)


def train_step(state, batch, rng, *, loss_config, num_groups=1,
               accum_steps=1):
  """One optimizer update (pure; `make_train_step` jits it over a mesh).

  Args:
    state: TrainState.
    batch: dict of global arrays (see `embed_quadruples`; optional "mask").
    rng: PRNG key; dropout keys derive from it, the step and micro-batch.
    loss_config: `config.loss`.
    num_groups: devices on the mesh (groups for local negatives and
      accumulation).
    accum_steps: micro-batches per update.

  Returns:
    (new_state, metrics): float32 scalars (see `loss_and_metrics`), plus
    "grad_norm" (global norm of the trainable gradients before clipping) and
    "lr".
  """
  _check_batch(batch)
  model = state.model
  trainable = state.trainable()
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(trainable, micro, key):
    params = merge_params(state.params, trainable)
    total, (_, metrics) = loss_and_metrics(
        model, params, micro, loss_config, num_groups, key,
        deterministic=False)
    return total, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, metrics), grads = grad_fn(trainable, batch, rng)
  else:
    grads, metrics = _accumulated(
        grad_fn, trainable, _micro_batches(batch, accum_steps, num_groups),
        rng, accum_steps)

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  trainable = hysac_lib.project_head(trainable, model.curv_init)
  new_state = state.replace(step=state.step + 1,
                            params=merge_params(state.params, trainable),
                            opt_state=opt_state)
  metrics = dict(metrics, grad_norm=grad_norm,
                 lr=learning_rate(new_state))
  return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def _accumulated(grad_fn, trainable, micro, rng, accum_steps):
  """(gradients, metrics) averaged over the `accum_steps` micro-batches of
  `micro` (leading axis), one `lax.scan` step each; micro-batch j's key is
  `rng` folded with j."""

  def body(carry, xs):
    index, mb = xs
    (_, m), g = grad_fn(trainable, mb, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (g, m)), None

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  zero_metrics = jax.eval_shape(
      lambda: grad_fn(trainable, jax.tree.map(lambda x: x[0], micro),
                      rng)[0][1])
  zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                              zero_metrics)
  (grads, metrics), _ = jax.lax.scan(
      body, (zeros, zero_metrics), (jnp.arange(accum_steps), micro))
  return jax.tree.map(lambda x: x / accum_steps, (grads, metrics))


def make_train_step(config, mesh, compiler_options=None):
  """`train_step` jitted over `mesh`: (state, batch, rng) -> (state, metrics).

  The batch is sharded on "data", the state and rng replicated, the state's
  buffers donated; metrics come back replicated. `compiler_options` go to
  XLA (e.g. {"xla_backend_optimization_level": 0} halves CPU compile time in
  tests).
  """
  replicated = NamedSharding(mesh, P())
  fn = functools.partial(
      train_step, loss_config=config.loss, num_groups=num_shards(mesh),
      accum_steps=int(config.optim.accum_steps))
  return jax.jit(fn, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS)),
                                   replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler_options)


def eval_step(state, batch, *, loss_config, num_groups=1):
  """Deterministic embeddings and loss of a batch (pure; see make_eval_step).

  Returns:
    (embeddings, metrics): dict S, U, V, G of (B, D) float32 points; the
    loss metrics of `loss_and_metrics` (padding rows, mask 0, excluded).
  """
  _check_batch(batch)
  _, (emb, metrics) = loss_and_metrics(
      state.model, state.params, batch, loss_config, num_groups,
      deterministic=True)
  return emb, metrics


def make_eval_step(config, mesh, compiler_options=None):
  """`eval_step` jitted over `mesh`: (state, batch) -> (embeddings, metrics).

  Embeddings come back sharded like the batch, metrics replicated.
  """
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(DATA_AXIS))
  fn = functools.partial(eval_step, loss_config=config.loss,
                         num_groups=num_shards(mesh))
  return jax.jit(fn, in_shardings=(replicated, data),
                 out_shardings=(data, replicated),
                 compiler_options=compiler_options)


# ---------------------------------------------------------- out of memory ---


class OutOfMemoryError(RuntimeError):
  """A step (or its compile) does not fit in accelerator memory."""


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KiB": 2**10,
          "M": 2**20, "MB": 2**20, "MiB": 2**20, "G": 2**30, "GB": 2**30,
          "GiB": 2**30, "T": 2**40, "TB": 2**40, "TiB": 2**40}
_SIZE = r"([0-9.]+)\s*(bytes|[KMGT]i?B?|B)?"


def _bytes(number, unit):
  return float(number) * _UNITS.get("" if unit in (None, "bytes") else unit,
                                    1)


def _gib(n):
  return f"{n / 2**30:.2f} GiB"


def out_of_memory_message(text, *, batch_per_device, global_batch,
                          stage="in the train step", available=None):
  """One line explaining an XLA RESOURCE_EXHAUSTED error, or None.

  Args:
    text: the error's message.
    batch_per_device: `config.data.batch_size_per_device`.
    global_batch: the global batch (per device x devices).
    stage: where it happened, e.g. "compiling the train step".
    available: the device's memory in bytes (`device_memory_limit()`), used
      when the message does not say.

  Returns:
    "out of accelerator memory ... at batch B per device (G global): asked
    for X, Y available; ..." with what can be parsed from `text` (GPU/CPU
    "Out of memory while trying to allocate N bytes" and the buffer
    assignment's "total allocation", TPU "Used X of Y hbm"), or None when
    `text` is not an out-of-memory error.
  """
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return None
  asked = None
  m = re.search(r"[Uu]sed " + _SIZE + r" of " + _SIZE + r" (\w+)", text)
  if m:  # TPU: "Used 20.5G of 15.48G hbm."
    asked = _bytes(m.group(1), m.group(2))
    available = _bytes(m.group(3), m.group(4))
  m_total = re.search(r"total allocation:\s*" + _SIZE, text)
  m_alloc = re.search(r"allocate " + _SIZE, text)
  parts = []
  if asked is not None:
    parts.append(f"asked for {_gib(asked)}")
  else:
    if m_alloc:
      parts.append(f"asked for {_gib(_bytes(*m_alloc.groups()))} more")
    if m_total:
      parts.append(f"the step needs {_gib(_bytes(*m_total.groups()))}")
  if available:
    parts.append(f"{_gib(available)} available")
  detail = ": " + ", ".join(parts) if parts else ""
  return (f"out of accelerator memory {stage} at batch {batch_per_device} "
          f"per device ({global_batch} global){detail}; lower "
          "config.data.batch_size_per_device, rematerialise with "
          "config.model.remat=dots_saveable or full, or split the batch "
          "with config.optim.accum_steps=2 or more")


def device_memory_limit(device=None):
  """Bytes of memory of a (the first local) device, or None if unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backend without stats
    return None
  return (stats or {}).get("bytes_limit")


@contextlib.contextmanager
def explain_out_of_memory(stage, batch_per_device, global_batch):
  """Turns XLA's RESOURCE_EXHAUSTED into an `OutOfMemoryError` naming the
  batch, the memory asked for and available (see `out_of_memory_message`)."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    message = out_of_memory_message(
        str(e), batch_per_device=batch_per_device,
        global_batch=global_batch, stage=stage,
        available=device_memory_limit())
    if message is None:
      raise
    raise OutOfMemoryError(message) from None
