"""One way to load a HySAC model, and one model object to serve it.

    from hysac_jax import serving
    model = serving.load_model("runs/vitl14")   # or a converted dir, an export
    points = model.encode_text(["a photo of a cat"])
    unsafe, distance = model.classify_unsafe(points, "text")

`load_model(path)` recognises (`detect_kind`, `hysac_jax.formats.detect`):

| kind | what the directory holds | written by |
| --- | --- | --- |
| `run` | config.json + Orbax checkpoints | train.py |
| `converted` | config.json (format hysac_jax.pretrained), params.safetensors | python -m hysac_jax.convert |
| `hf`, `orbax`, `stablehlo` | hysac_head.json + weights or functions | python -m hysac_jax.export |

Every kind gives a `Model` with `encode_image(pixels)`, `encode_text(ids or
strings)`, `curv`, `bounds`, `classify_unsafe(points, modality)` and
`traverse_to_safe(points, modality)`. Bounds come from one lookup
(`find_bounds`): an explicit file, else the first of `bounds.json` /
`hysac_bounds.json` (the release's name) in the model's directories, else an
export's `hysac_head.json`.

**One alpha per model.** The unsafe threshold b' = b + tanh((b - alpha)/c)
+ 1 depends on alpha: an export stores it (`traversal_alpha`), a run uses
its `config.eval.traversal_alpha`, a converted model the release's 0.8;
`load_model(..., traversal_alpha=)` overrides it.

**Every local device.** A Flax model (run, converted, hf, orbax) keeps its
params replicated on the local devices (`devices=`, default all of them)
and splits each batch across them: `encode_image`/`encode_text` pad a batch
that does not divide the device count, run it sharded, and drop the padding
rows. A stablehlo export runs on one device (its functions were exported
for one).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hysac_jax import checkpoint as ckpt_lib
from hysac_jax import finite
from hysac_jax import run_lock
from hysac_jax import safety
from hysac_jax.data.tokenizer import tokenize
from hysac_jax.formats import converted as converted_lib
from hysac_jax.formats import detect
from hysac_jax.formats import hf_clip
from hysac_jax.formats import release
from hysac_jax.formats import run_dir
# The export directories' names, importable from here as before.
from hysac_jax.formats.exports import (  # pylint: disable=unused-import
    EXPORT_FORMAT, EXPORT_KINDS, HEAD_FILE, ORBAX_PARAMS_DIR,
    STABLEHLO_FUNCTIONS, STABLEHLO_PARAMS_FILE, STABLEHLO_SUFFIX,
    ModelDirError, read_head, read_orbax, read_stablehlo)
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import hysac as hysac_lib
from hysac_jax.models.clip import CLIPConfig
from hysac_jax.models.lora import merge_lora as merge
from hysac_jax.training.restore import restore_run

KINDS = detect.MODEL_KINDS  # the model kinds (not `checkpoint.KINDS`)
EXPORT_FORMATS = EXPORT_KINDS
BOUNDS_FILES = (safety.BOUNDS_FILE, release.BOUNDS_FILE)
detect_kind = detect.detect_kind  # the one detector, importable from here


# --------------------------------------------------------------------------
# Bounds.


def find_bounds(directories, bounds_path=None):
  """(bounds, path): an explicit file, else the first bounds file found.

  Looks for `BOUNDS_FILES` in each directory in turn; (None, None) when
  there is none.
  """
  if bounds_path:
    return safety.load_bounds(bounds_path), os.fspath(bounds_path)
  for d in directories:
    for name in BOUNDS_FILES:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return safety.load_bounds(path), path
  return None, None


# --------------------------------------------------------------------------
# The model object.


def _tokenize_if_text(ids, context_length):
  if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids
                              and isinstance(ids[0], str)):
    return tokenize(ids, max_len=context_length)
  return ids


def batch_mesh(devices=None):
  """A one-axis ("data") mesh over `devices` (default: the local ones)."""
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices: an empty list; pass at least one device")
  return Mesh(np.asarray(devices), ("data",))


def pad_rows(rows, size):
  """`rows` with zero rows appended up to `size` (the caller drops them)."""
  rows = np.asarray(rows)
  pad = np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)
  return np.concatenate([rows, pad]) if len(pad) else rows


def _over_rows(fn, mesh):
  """`fn(batch)` on rows split across `mesh`: the batch is padded with zero
  rows to a multiple of the mesh size, placed row-sharded, and the output's
  padding rows are dropped."""
  rows = NamedSharding(mesh, P("data"))

  def call(x):
    n = len(x)
    padded = pad_rows(x, -(-max(n, 1) // mesh.size) * mesh.size)
    out = fn(jax.device_put(padded, rows))
    return out[:n] if len(padded) != n else out
  return call


class Model:
  """A HySAC model ready to embed, classify and redirect.

  Attributes:
    kind: one of `KINDS`.
    head: dict(curv, alpha_image, alpha_text, logit_scale, mode, curv_init,
      ...): the clamped head values (an export's `hysac_head.json`).
    mode: "hyp" or "euc".
    curv: the curvature magnitude (float).
    curv_init: c0, which sets the curvature's clamp range.
    bounds: release-shaped bounds (SPEC §4), or None.
    bounds_source: the file the bounds came from, or None.
    traversal_alpha: alpha of the threshold b'.
    image_size, context_length: the input sizes the towers expect.
    config: `CLIPConfig` of the towers (None for StableHLO).
    params: the HySAC params tree (StableHLO: the tree its functions take).
    lora: `LoRAConfig` when LoRA is not merged into `params`, else None.
    source: JSON-able description of where the model came from.
    mesh: the devices a batch is split across (`batch_mesh`).
  """

  def __init__(self, kind, head, bounds, image_size, context_length,
               encode_image, encode_text, *, config=None, params=None,
               lora=None, source=None, bounds_source=None, mesh=None):
    self.kind, self.head, self.bounds = kind, head, bounds
    self.mesh = mesh
    self.bounds_source = bounds_source
    # Fail closed: a NaN curvature or alpha would make b' NaN, and every
    # verdict "safe" (`finite`).
    where = bounds_source if kind in EXPORT_FORMATS else (
        f"{kind} model {json.dumps(source or {})}")
    self.mode = head["mode"]
    self.curv = finite.check_number(head["curv"], where, "curv",
                                    positive=True)
    self.curv_init = finite.check_number(head["curv_init"], where,
                                         "curv_init", positive=True)
    self.traversal_alpha = finite.check_number(head["traversal_alpha"],
                                               where, "traversal_alpha")
    self.image_size, self.context_length = image_size, context_length
    self.config, self.params, self.lora = config, params, lora
    self.source = source or {}
    self._encode_image, self._encode_text = encode_image, encode_text

  @classmethod
  def from_params(cls, kind, config, params, *, mode, curv_init, lora=None,
                  dtype=jnp.float32, bounds=None, bounds_source=None,
                  traversal_alpha=safety.DEFAULT_ALPHA, source=None,
                  devices=None):
    """A model running the Flax HySAC module on `params`, replicated on
    `devices` (default: every local device), each batch split across them."""
    # A run's params keep its layer layout (scanned or unrolled).
    module = hysac_lib.HySAC(config, lora, mode=mode, dtype=dtype,
                             curv_init=curv_init,
                             scan_layers=clip_lib.is_scanned(params))
    mesh = batch_mesh(devices)
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    image = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                              method="encode_image"),
                    in_shardings=(replicated, rows), out_shardings=rows)
    text = jax.jit(lambda p, t: module.apply({"params": p}, t,
                                             method="encode_text"),
                   in_shardings=(replicated, rows), out_shardings=rows)
    params = jax.device_put(params, replicated)
    head = {k: float(v) for k, v in
            hysac_lib.head_scalars(params, curv_init).items()}
    head.update(mode=mode, curv_init=float(curv_init),
                traversal_alpha=float(traversal_alpha))
    return cls(kind, head, bounds, config.vision.image_size,
               config.text.max_position_embeddings,
               _over_rows(lambda x: image(params, x), mesh),
               _over_rows(lambda t: text(params, t), mesh),
               config=config, params=params, lora=lora, source=source,
               bounds_source=bounds_source, mesh=mesh)

  def encode_image(self, pixels):
    """(B, H, W, 3) CLIP-normalised NHWC pixels -> (B, D) points (space
    components on the hyperboloid; unit vectors in "euc" mode)."""
    return self._encode_image(np.asarray(pixels, np.float32))

  def encode_text(self, ids):
    """(B, L) int32 token ids, or a string / list of strings (tokenised with
    the CLIP tokenizer) -> (B, D) points."""
    ids = _tokenize_if_text(ids, self.context_length)
    return self._encode_text(np.asarray(ids, np.int32))

  def safe_bound(self, modality):
    """b: the 95th-percentile distance of the modality's safe group."""
    if self.bounds is None:
      raise ValueError(f"{self.kind} model has no bounds: pass a bounds file "
                       "(bounds.json of the training run)")
    return float(self.bounds[safety.SAFE_GROUP[modality]]["up_95"])

  def threshold(self, modality):
    """b' of the modality, with this model's `traversal_alpha`."""
    self.safe_bound(modality)  # the no-bounds message
    return safety.modality_threshold(self.curv, self.bounds, modality,
                                     self.traversal_alpha)

  def classify_unsafe(self, points, modality):
    """(B, D) points -> ((B,) bool unsafe, (B,) distance from the origin)."""
    distance = safety.origin_distance(points, self.curv)
    # Fails closed: a non-finite distance is unsafe (`safety.unsafe_at`).
    return (np.asarray(safety.unsafe_at(distance, self.threshold(modality))),
            np.asarray(distance))

  def traverse_to_safe(self, points, modality):
    """(B, D) points moved toward the origin to distance <= b' (geodesic)."""
    return np.asarray(safety.traverse_to_safe(
        points, self.curv, self.safe_bound(modality), self.traversal_alpha))


class StableHLOModel(Model):
  """A `Model` whose four functions are deserialised `jax.export`s."""

  def __init__(self, head, bounds, functions, params, bounds_source=None):
    self.functions = functions
    image = jax.jit(functions["encode_image"].call)
    text = jax.jit(functions["encode_text"].call)
    clip = head["clip"]
    super().__init__("stablehlo", head, bounds,
                     clip["vision"]["image_size"],
                     clip["text"]["max_position_embeddings"],
                     lambda x: image(params, x), lambda t: text(params, t),
                     params=params, bounds_source=bounds_source,
                     source=head.get("source"),
                     mesh=batch_mesh(jax.local_devices()[:1]))
    self._classify = jax.jit(functions["classify_unsafe"].call)
    self._traverse = jax.jit(functions["traverse_to_safe"].call)

  def _scalars(self, modality):
    return (np.float32(self.curv), np.float32(self.safe_bound(modality)),
            np.float32(self.traversal_alpha))

  def classify_unsafe(self, points, modality):
    self.threshold(modality)  # raises unless b' is finite (fail closed)
    unsafe, dist = self._classify(np.asarray(points, np.float32),
                                  *self._scalars(modality))
    dist = np.asarray(dist)
    return np.asarray(unsafe) | ~np.isfinite(dist), dist

  def traverse_to_safe(self, points, modality):
    return np.asarray(self._traverse(np.asarray(points, np.float32),
                                     *self._scalars(modality)))


# --------------------------------------------------------------------------
# Loaders, one per kind.


def _from_export_params(kind, directory, head, clip_params_or_tree, dtype,
                        devices):
  if "clip" in clip_params_or_tree:
    params = clip_params_or_tree
  else:
    params = {"clip": clip_params_or_tree,
              **{k: np.asarray(v, np.float32)
                 for k, v in head["stored_logs"].items()}}
  model = Model.from_params(
      kind, CLIPConfig.from_dict(head["clip"]), params, mode=head["mode"],
      curv_init=head["curv_init"], dtype=dtype, bounds=head.get("bounds"),
      bounds_source=os.path.join(directory, HEAD_FILE),
      # Version-1 exports predate the stored alpha: the release's.
      traversal_alpha=head.get("traversal_alpha", safety.DEFAULT_ALPHA),
      source=head.get("source"), devices=devices)
  model.head = {**model.head, **head}  # the file's, as written
  return model


def _load_hf(directory, dtype, devices):
  head = read_head(directory, "hf")
  _, clip_params = hf_clip.clip_params_from_hf(directory)
  return _from_export_params("hf", directory, head, clip_params, dtype,
                             devices)


def _load_orbax(directory, dtype, devices):
  head = read_head(directory, "orbax")
  params = read_orbax(directory)
  return _from_export_params("orbax", directory, head, params, dtype,
                             devices)


def _load_stablehlo(directory, dtype, devices):
  del dtype, devices  # the exported functions fixed both (float32, 1 device)
  head = read_head(directory, "stablehlo")
  functions, params = read_stablehlo(directory, head)
  return StableHLOModel(head, head.get("bounds"), functions, params,
                        bounds_source=os.path.join(directory, HEAD_FILE))


def _load_run(directory, checkpoint, dtype, merge_lora, bounds_path,
              devices):
  # Before the restore: a bad bounds file fails in a second, not a minute;
  # an explicit one is the only one read. The checkpoint's own bounds come
  # first (each best checkpoint has its own); the run's bounds.json is that
  # of best_recall.
  bounds, bounds_source = find_bounds(
      [os.path.join(directory, checkpoint), directory], bounds_path)
  config, state = restore_run(directory, checkpoint)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        jax.device_get(state.params))
  lora = state.model.lora
  if merge_lora and lora is not None:
    params, lora = merge(params, lora), None
  return Model.from_params(
      "run", state.model.clip, params, mode=config.model.mode,
      curv_init=config.model.curv_init, lora=lora, dtype=dtype,
      bounds=bounds, bounds_source=bounds_source,
      traversal_alpha=finite.check_number(
          config.eval.traversal_alpha,
          os.path.join(directory, run_dir.CONFIG_FILE),
          "eval.traversal_alpha"),
      source={"run": directory, "checkpoint": checkpoint,
              **_restored_checkpoint(directory, checkpoint)},
      devices=devices)


def _restored_checkpoint(directory, kind):
  """{"checkpoint_kind", "step", "training"}: what a run's restore read
  (the newest `kind` step, else the latest checkpoint, as `restore_into`
  falls back) and whether a train.py holds the run now (its lock), so a
  report can say it evaluated an intermediate checkpoint."""
  def newest(k):
    d = os.path.join(directory, k)
    steps = [int(e) for e in os.listdir(d) if e.isdigit()] if (
        os.path.isdir(d)) else []
    return max(steps, default=None)

  step = newest(kind)
  if step is None:
    kind, step = ckpt_lib.LAST, newest(ckpt_lib.LAST)
  holder = run_lock.holder(directory)
  return {"checkpoint_kind": kind, "step": step,
          "training": holder is not None,
          **({"trainer": run_lock.describe(holder)} if holder is not None
             else {})}


def _load_converted(directory, dtype, merge_lora, bounds_path, devices):
  bounds, bounds_source = find_bounds([directory], bounds_path)
  converted = converted_lib.read_converted(directory)
  # Its images would be normalised with OpenAI's mean/std here: refuse
  # another (an OpenCLIP import) rather than embed them wrongly.
  converted_lib.check_preprocess(directory, converted.preprocess)
  params, lora = converted.params, converted.lora
  if merge_lora and lora is not None:
    params, lora = merge(params, lora), None
  return Model.from_params(
      "converted", converted.config, params, mode=converted.mode,
      curv_init=converted.curv_init, lora=lora, dtype=dtype, bounds=bounds,
      bounds_source=bounds_source, source={"converted": directory},
      # Its own alpha when it came from an export or a release export.
      traversal_alpha=(safety.DEFAULT_ALPHA if converted.traversal_alpha
                       is None else converted.traversal_alpha),
      devices=devices)


def load_model(path, *, bounds_path=None, checkpoint=ckpt_lib.BEST_RECALL,
               traversal_alpha=None, dtype=jnp.float32, merge_lora=True,
               devices=None):
  """Any model directory as a `Model`: a run, a converted model, an export.

  Args:
    path: the directory (see `detect_kind`).
    bounds_path: a bounds JSON overriding the model's own.
    checkpoint: for a run, one of `checkpoint.KINDS` (falls back to the
      latest checkpoint when the run has none of that kind).
    traversal_alpha: alpha of the threshold b'; default the model's own.
    dtype: tower compute dtype of a Flax model (e.g. `jnp.bfloat16`).
    merge_lora: fold LoRA into the base weights (same outputs, faster).
    devices: the devices a batch is split across (default: every local
      device; a stablehlo export uses the first).
  """
  directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
  kind = detect_kind(directory)
  if kind == "run":
    if checkpoint not in ckpt_lib.KINDS:
      raise ValueError(f"checkpoint {checkpoint!r}: expected one of "
                       f"{ckpt_lib.KINDS}")
    model = _load_run(directory, checkpoint, dtype, merge_lora, bounds_path,
                      devices)
  elif kind == "converted":
    model = _load_converted(directory, dtype, merge_lora, bounds_path,
                            devices)
  else:
    loaders = {"hf": _load_hf, "orbax": _load_orbax,
               "stablehlo": _load_stablehlo}
    model = loaders[kind](directory, dtype, devices)
    if bounds_path:  # instead of the head's
      model.bounds, model.bounds_source = find_bounds([], bounds_path)
  if traversal_alpha is not None:
    model.traversal_alpha = finite.check_number(
        traversal_alpha, "--traversal-alpha", "traversal_alpha")
  return model
