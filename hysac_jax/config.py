"""The run config: every field declared once, with its check.

    config = hysac_jax.config.base_config()   # the paper recipe (ViT-L/14)
    check_config(config)                       # ValueError naming the field

`configs/*.py` start from `base_config()` and override values; no field is
added elsewhere, and library code reads fields directly (no `.get`
fallbacks). A run saves its resolved config as WORKDIR/config.json
(`save_config`; the file is `formats.run_dir`'s); `load_run_config` reads
it back onto the base, so a run saved before a field existed gets that
field's default.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections

from hysac_jax import compilation_cache
from hysac_jax import finite
from hysac_jax.data.tokenizer import CONTEXT_LENGTH
from hysac_jax.formats import detect
from hysac_jax.formats import run_dir
# Its old home, still importable: the run's config file name.
from hysac_jax.formats.run_dir import CONFIG_FILE  # pylint: disable=unused-import
from hysac_jax.models import clip as clip_lib
from hysac_jax.models import sizes
from hysac_jax.models.hysac import MODES

DATASETS = ("synthetic_visu", "visu")
SCHEDULES = ("constant", "warmup_cosine")
# Tower compute dtypes (`config.model.dtype`), the one table: float64 is for
# verification under jax_enable_x64.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16, "float64": jnp.float64}


def base_config():
  """Every field, with the paper's values (SPEC.md §2-3, CLIP ViT-L/14)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.size = "vitl14"  # named size (hysac_jax.models.sizes), used when `clip` is empty
  c.model.clip = "openai/clip-vit-large-patch14"  # HF dir or hub id; "" = random init of `size`
  # A converted directory (python -m hysac_jax.convert) the run starts from;
  # wins over `clip`. train.py --init_from sets it, so a resumed, evaluated
  # or exported run reads its frozen weights from the same place.
  c.model.init_from = ""
  c.model.mode = "hyp"  # "hyp" (HySAC) or "euc" (CLIP baseline, cosine logits)
  c.model.dtype = "bfloat16"  # tower compute dtype; params, geometry and losses stay float32
  # Rematerialise tower layers in the backward pass: "none", "dots_saveable"
  # (keep matmul outputs, recompute the rest) or "full" (keep layer inputs).
  c.model.remat = "none"
  # Attention: "auto" (cuDNN fused attention on GPUs with bf16/fp16 towers,
  # einsums on CPUs, XLA elsewhere), "xla" or "cudnn"
  # (jax.nn.dot_product_attention), or "einsum".
  c.model.attention = "auto"
  # Run each tower's layers under nn.scan: the step compiles one layer, not
  # all of them (compile time flat in depth); params gain a leading layer
  # axis (encoder/layers). False unrolls them (layers_0 ... layers_{n-1}),
  # a little faster per step on GPUs. A run keeps the layout it started in.
  c.model.scan_layers = True
  # Text positions (token ids per caption); 0 = the CLIP's own (77). Only a
  # random-init tower may differ: `tiny` uses 32, its captions' length.
  c.model.context_length = 0
  c.model.train_base = False  # True: fine-tune the CLIP weights too (random-init towers)
  c.model.curv_init = 1.0
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 16
  c.model.lora.alpha = 1.0
  c.model.lora.dropout = 0.1
  c.model.lora.targets = ("k_proj", "v_proj", "out_proj", "fc1", "fc2",
                          "patch_embedding")

  c.loss = ml_collections.ConfigDict()
  c.loss.entail_weight = 1.0  # lambda of SPEC §3
  c.loss.aperture_scale = 1.0
  c.loss.local_negatives = False  # True reproduces the release (local batch only)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.2  # LoRA matrices only; 0 on the head scalars
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off
  c.optim.schedule = "constant"  # or "warmup_cosine" (MERU: linear warm-up, cos^2 decay)
  c.optim.warmup_steps = 0
  c.optim.accum_steps = 1  # gradient accumulation micro-batches

  c.data = ml_collections.ConfigDict()
  c.data.name = "visu"  # visu | synthetic_visu
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.manual_dir = ""  # ViSU JSON files + COCO + unsafe images (visu only)
  c.data.batch_size_per_device = 32
  c.data.eval_batch_size_per_device = 64
  c.data.num_workers = 8  # grain decode processes: ~90 quadruples/s each (BENCHMARKS.md)
  c.data.augment = False  # random-resized-crop, off as in the release
  c.data.jpeg_draft = False  # True: JPEGs decode at 1/2-1/8 scale first (faster, not pixel-identical)
  c.data.skip_invalid = False  # visu: skip bad records (report file) instead of failing
  # synthetic_visu only: examples per split (train, validation, test), seed.
  c.data.synthetic_sizes = (4096, 512, 1024)
  c.data.synthetic_seed = 0

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 50
  c.train.patience = 5  # early stopping on validation loss and recall sum
  c.train.log_every = 50
  c.train.keep_last = 2
  c.train.checkpoint_every = 1000  # steps between mid-epoch checkpoints; 0 = epoch ends only
  # Multi-process runs without the distributed runtime's preemption service:
  # steps between agreements on a SIGTERM/SIGINT (an allgather; with the
  # service, SIGTERM is agreed every step without one). A signal is acted on
  # within this many steps.
  c.train.preemption_check_every = 20
  c.train.use_wandb = False
  # JAX's persistent compilation cache ('' = off); $JAX_COMPILATION_CACHE_DIR,
  # when set, takes precedence.
  c.train.compilation_cache_dir = compilation_cache.DEFAULT_DIR

  c.eval = ml_collections.ConfigDict()
  # alpha of the traversal threshold b' = b + tanh((b - alpha)/c) + 1 (the
  # release's 0.8, tuned to ViT-L embedding scales).
  c.eval.traversal_alpha = 0.8
  return c


def _finite(value):
  """Whether a config number is finite (`finite.check_number`'s rule:
  `not x > 0` lets an infinity through)."""
  try:
    finite.check_number(value, "config", "")
  except finite.NonFiniteError:
    return False
  return True


def _bad(field, value, expected):
  raise ValueError(f"config.{field}={value!r}: expected {expected}")


def _check_model(m):
  if m.mode not in MODES:
    _bad("model.mode", m.mode, " or ".join(map(repr, MODES)))
  if m.dtype not in DTYPES:
    _bad("model.dtype", m.dtype, f"one of {sorted(DTYPES)}")
  if not m.clip and not m.init_from:
    try:
      sizes.get_clip_config(m.size)
    except (KeyError, ValueError):
      _bad("model.size", m.size, "a named size of hysac_jax.models.sizes")
  if m.init_from:
    _check_init_from(m.init_from)
  if not isinstance(m.remat, bool) and m.remat not in clip_lib.REMAT_POLICIES:
    _bad("model.remat", m.remat, f"one of {clip_lib.REMAT_POLICIES}")
  if (isinstance(m.context_length, bool)
      or not isinstance(m.context_length, int)
      or not 0 <= m.context_length <= CONTEXT_LENGTH):
    _bad("model.context_length", m.context_length,
         f"0 (the CLIP's own) or a number of positions up to "
         f"{CONTEXT_LENGTH}")
  if not isinstance(m.scan_layers, bool):
    _bad("model.scan_layers", m.scan_layers, "true or false")
  if m.attention not in clip_lib.ATTENTION_IMPLEMENTATIONS:
    _bad("model.attention", m.attention,
         f"one of {clip_lib.ATTENTION_IMPLEMENTATIONS}")
  if m.lora.rank < 0:
    _bad("model.lora.rank", m.lora.rank, "rank >= 0")
  if not 0.0 <= m.lora.dropout < 1.0:
    _bad("model.lora.dropout", m.lora.dropout, "a rate in [0, 1)")
  if not _finite(m.curv_init) or not m.curv_init > 0:
    _bad("model.curv_init", m.curv_init, "a finite positive curvature")
  if not _finite(m.lora.alpha):
    _bad("model.lora.alpha", m.lora.alpha, "a finite LoRA scale")


def _check_init_from(path):
  """`model.init_from` must be a converted directory; a run or an export
  gets the commands that make one from it."""
  expected = "a converted directory (python -m hysac_jax.convert)"
  if not os.path.isdir(os.path.expanduser(path)):
    _bad("model.init_from", path, f"{expected}; there is no directory "
         f"{path}")
  try:
    kind = detect.detect_kind(os.path.expanduser(path))
  except detect.ModelDirError as e:
    _bad("model.init_from", path, f"{expected}; {e}")
  if kind != "converted":
    _bad("model.init_from", path, f"{expected}; {detect.how_to_convert(kind)}")


def _check_data(d):
  if d.name not in DATASETS:
    _bad("data.name", d.name, f"one of {DATASETS}")
  if d.name == "synthetic_visu":
    sizes = d.synthetic_sizes
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 3
        or not all(isinstance(n, int) and n > 0 for n in sizes)):
      _bad("data.synthetic_sizes", sizes,
           "three positive example counts (train, validation, test), "
           "e.g. --config.data.synthetic_sizes=(4096,512,1024)")
  if d.name == "visu" and not d.manual_dir:
    _bad("data.manual_dir", d.manual_dir,
         "the directory holding the ViSU JSON files, coco/ and the unsafe "
         "images (see README, 'Train HySAC on ViSU')")
  for field in ("batch_size_per_device", "eval_batch_size_per_device"):
    if d[field] < 1:
      _bad(f"data.{field}", d[field], "a positive batch size")
  if d.num_workers < 0:
    _bad("data.num_workers", d.num_workers, "0 or more worker processes")


def _check_training(o, l, t):
  if not _finite(o.lr) or not o.lr > 0:
    _bad("optim.lr", o.lr, "a finite positive learning rate")
  if o.schedule not in SCHEDULES:
    _bad("optim.schedule", o.schedule, f"one of {SCHEDULES}")
  if o.accum_steps < 1:
    _bad("optim.accum_steps", o.accum_steps, "1 or more micro-batches")
  if not _finite(o.grad_clip) or o.grad_clip < 0:
    _bad("optim.grad_clip", o.grad_clip, "0 (off) or a positive norm")
  for field in ("b1", "b2"):
    if not _finite(o[field]) or not 0 <= o[field] < 1:
      _bad(f"optim.{field}", o[field], "a finite Adam decay rate in [0, 1)")
  if not _finite(o.eps) or not o.eps > 0:
    _bad("optim.eps", o.eps, "a finite positive Adam epsilon")
  if not _finite(o.weight_decay) or o.weight_decay < 0:
    _bad("optim.weight_decay", o.weight_decay,
         "0 (off) or a finite positive weight decay")
  if (isinstance(o.warmup_steps, bool) or not isinstance(o.warmup_steps, int)
      or o.warmup_steps < 0):
    _bad("optim.warmup_steps", o.warmup_steps, "a whole number of steps >= 0")
  if not _finite(l.aperture_scale) or not l.aperture_scale > 0:
    _bad("loss.aperture_scale", l.aperture_scale, "a finite positive scale")
  if not _finite(l.entail_weight) or l.entail_weight < 0:
    _bad("loss.entail_weight", l.entail_weight, "a non-negative weight")
  for field, low, expected in (
      ("epochs", 1, "at least one epoch"), ("patience", 1, "at least 1"),
      ("keep_last", 1, "at least 1"), ("log_every", 1, "at least 1"),
      ("checkpoint_every", 0, "0 (epoch ends only) or a step interval"),
      ("preemption_check_every", 1, "at least 1 (steps between agreements "
       "on a preemption signal)")):
    if t[field] < low:
      _bad(f"train.{field}", t[field], expected)


def _check_eval(e):
  if not _finite(e.traversal_alpha):
    _bad("eval.traversal_alpha", e.traversal_alpha,
         "a finite alpha (a NaN threshold b' would call everything safe)")


def check_config(config):
  """Raises ValueError naming the first config field with a bad value."""
  _check_model(config.model)
  _check_data(config.data)
  _check_training(config.optim, config.loss, config.train)
  _check_eval(config.eval)


# Fields a resumed run may change: how it runs, where its data lives, how
# long it trains and how it is evaluated. The per-device batch may change
# with the topology; the global batch is checked by the saved input position
# (pipeline `set_state`). Every other field defines the run (model, loss,
# optimiser, data, seed) and must stay as saved.
RESUME_MAY_CHANGE = ("train.", "eval.", "data.data_dir", "data.manual_dir",
                     "data.num_workers", "data.batch_size_per_device",
                     "data.eval_batch_size_per_device", "model.dtype",
                     "model.remat", "model.attention")


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else value
  return out


def resume_conflicts(saved, config):
  """The fields in which `config` differs from a run's `saved` config and
  that a resumed run must keep, each as "FIELD SAVED (now NEW)".

  `train.epochs` may change (to train longer) unless the learning-rate
  schedule depends on the run's length (`optim.schedule` warmup_cosine).
  """
  old, new = _flat(saved), _flat(config)
  conflicts = []
  for field in sorted(set(old) | set(new)):
    if old.get(field) == new.get(field):
      continue
    fixed_length = (field == "train.epochs"
                    and new.get("optim.schedule") != "constant")
    if fixed_length or not field.startswith(RESUME_MAY_CHANGE):
      conflicts.append(f"{field} {old.get(field)!r} (now {new.get(field)!r})")
  return conflicts


def save_config(config, workdir):
  """Writes the resolved config as workdir/config.json (process 0)."""
  if jax.process_index() == 0:
    run_dir.write_config(workdir, config)


def _merge(base, saved, prefix, path):
  for key, value in saved.items():
    if key not in base:
      raise ValueError(f"{path}: unknown field {prefix}{key} (not in "
                       "hysac_jax.config.base_config)")
    if isinstance(base[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ValueError(f"{path}: {prefix}{key} should be a section, not "
                         f"{value!r}")
      _merge(base[key], value, f"{prefix}{key}.", path)
    else:
      if isinstance(base[key], tuple) and isinstance(value, list):
        value = tuple(value)  # JSON has no tuples
      with base.ignore_type():
        base[key] = value


def load_run_config(workdir):
  """The config a run saved in workdir/config.json, on the base schema.

  Fields the file lacks (a run saved before they existed) take their
  `base_config` defaults, except `model.scan_layers`, False: such runs
  saved unrolled layers. A field the schema lacks is an error naming it.
  """
  saved, path = run_dir.read_config(workdir)
  config = base_config()
  # Runs saved before `model.scan_layers` existed hold unrolled layers.
  config.model.scan_layers = False
  _merge(config, saved, "", path)
  return config
