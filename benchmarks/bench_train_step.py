"""HySAC train-step speed: the jitted JAX step vs the same step in PyTorch.

One step = embed a batch of B quadruples (both towers on 2B inputs, LoRA
dropout on), the seven-term HySAC loss, the backward pass through the LoRA
matrices and the head scalars only, an AdamW update and the head clamps.

The PyTorch side is written here for comparison: Hugging Face CLIP towers,
peft LoRA (rank 16, alpha 1, dropout 0.1 on k/v/out_proj, fc1, fc2 and the
patch conv), the release's head scalars, the same Lorentz formulas and
losses (SPEC.md §1-3) and torch AdamW with the same groups. On CUDA it runs
in the release's precision settings (`--torch-modes`): fp32 with a
GradScaler (as shipped), fp16 autocast + GradScaler (its AMP switch) and
bf16 autocast, each at its own batch, one worker process per mode.

Each side runs in its own worker process, so that peak memory (RSS on CPU,
the allocator's peak on GPU) is measured per side. On CPU the parent asks
the JAX and torch workers for one timed step at a time, alternating, so
both see the same machine load; on a GPU machine they run one after the
other (JAX preallocates most of the device memory). Every stage prints a
flushed progress line (imports, model build, init, lowering, compile, each
timed step), stamped with the seconds since the benchmark started.

The JAX step is lowered and compiled once; the timed calls (the first one
included) go to that compiled executable, so nothing compiles again.
MFU = the step's model FLOPs (XLA's cost analysis of the compiled step; with
remat on, of the same step lowered without remat) / s/step / the chip's
dense bf16 peak (table below, or --peak_tflops); n/a on CPU unless given.

  python benchmarks/bench_train_step.py --size small --batch 8 --repeats 7
  python benchmarks/bench_train_step.py --size vitb16 --batch 8 --repeats 3
  python benchmarks/bench_train_step.py --size vitl14 --batch 32 \
      --dtype bfloat16 --no-torch --init given --batch-search   # GPU
  python benchmarks/bench_train_step.py --size vitl14 --no-jax \
      --torch-modes fp32:32,fp16:32,bf16:128                    # GPU
"""

import argparse
import copy
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import time

import numpy as np

# `configs/` (the run configs) sits beside `benchmarks/`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import progress  # pylint: disable=g-import-not-at-top,wrong-import-position

LORA_TARGETS = ("k_proj", "v_proj", "out_proj", "fc1", "fc2",
                "patch_embedding")
# Dense bf16 peak FLOP/s (TFLOP/s) by device kind, for model FLOPs
# utilisation. H100/H200: SXM dense bf16; A100: dense bf16.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5e": 197.0,
               "v5 lite": 197.0, "v4": 275.0, "v5p": 459.0, "v6e": 918.0}
SEARCH_CAP = 256  # the largest-batch search stops doubling here
REMAT_CHOICES = ("none", "dots_saveable", "full")
ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum")
# (autocast dtype, GradScaler on CUDA) per torch precision mode.
TORCH_MODES = {"fp32": (None, True), "fp16": ("float16", True),
               "bf16": ("bfloat16", False)}


def random_batch(batch, image_size, seed=0):
  """Random quadruples: NHWC float32 images, token ids with an EOT id."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 49000, size=(2, batch, 77)).astype(np.int32)
  ids[:, :, 20] = 49407  # end-of-text: pooled position
  images = rng.standard_normal(size=(2, batch, image_size, image_size, 3),
                               dtype=np.float32)
  return {"safe_image": images[0], "unsafe_image": images[1],
          "safe_ids": ids[0], "unsafe_ids": ids[1]}


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def is_oom(error):
  """Whether an exception is the accelerator running out of memory."""
  text = f"{type(error).__name__}: {error}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory",
                                 "out of memory", "OutOfMemory"))


# --------------------------------------------------------------- JAX side ---


def apply_model_flags(config, remat=None, attention=None, scan_layers=None):
  """Sets config.model.remat, .attention and .scan_layers when given.

  `remat` is one of REMAT_CHOICES; `attention` one of ATTENTION_CHOICES
  ("auto": cuDNN on GPUs with bf16/fp16 towers, XLA elsewhere).
  """
  if remat is not None:
    config.model.remat = remat
  if attention is not None:
    config.model.attention = attention
  if scan_layers is not None:
    config.model.scan_layers = scan_layers == "on"
  return config


def remat_off(config):
  """A copy of `config` with rematerialisation off."""
  config = copy.deepcopy(config)
  config.model.remat = "none"
  return config


def remat_is_on(config):
  return config.model.remat != "none"


def make_config(args):
  from configs import vitl14  # pylint: disable=g-import-not-at-top
  config = vitl14.get_config()
  config.model.clip, config.model.size = "", args["size"]
  config.model.dtype = args["dtype"]
  return apply_model_flags(config, args.get("remat"), args.get("attention"),
                           args.get("scan_layers"))


def synthetic_pretrained(model, seed=0):
  """Host float32 arrays for the frozen CLIP leaves only, as a converted
  checkpoint gives them (no LoRA, no head): what `train.py` passes to
  `create_train_state` when `config.model.clip` is set."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from hysac_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  vision, text = model.clip.vision, model.clip.text
  pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size,
                                 vision.num_channels), np.float32)
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), np.int32)
  abstract = jax.eval_shape(
      lambda r, p, i: model.init({"params": r, "dropout": r}, p, i,
                                 deterministic=True)["params"],
      jax.random.key(0), pixels, ids)
  labels = traverse_util.flatten_dict(step_lib.label_params(abstract))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, v in traverse_util.flatten_dict(abstract).items():
    if labels[k] == "frozen":
      flat[k] = (rng.standard_normal(v.shape, dtype=np.float32)
                 * np.float32(0.02))
  return traverse_util.unflatten_dict(flat)["clip"]


class JaxStep:
  """The library's train step, lowered and compiled once per batch size."""

  def __init__(self, args, seed=0):
    t = time.perf_counter()
    import jax  # pylint: disable=g-import-not-at-top
    from hysac_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
    self.jax, self.step_lib = jax, step_lib
    self.device = jax.devices()[0]
    self.stages = {"imports": time.perf_counter() - t}
    progress(f"jax: imports {self.stages['imports']:.1f} s "
             f"(jax {jax.__version__}, {self.device.platform}: "
             f"{self.device.device_kind} x{len(jax.devices())})")

    t = time.perf_counter()
    self.config = make_config(args)
    self.model = step_lib.model_from_config(self.config)
    self.mesh = step_lib.make_mesh()
    self._stage("model build", t)

    given = None
    if args["init"] == "given":
      t = time.perf_counter()
      given = synthetic_pretrained(self.model, seed)
      n = sum(x.size for x in jax.tree.leaves(given))
      self._stage(f"synthetic pretrained CLIP weights ({n / 1e6:.0f}M "
                  "frozen params, host)", t, key="pretrained weights (host)")
    t = time.perf_counter()
    self.state = step_lib.create_train_state(
        self.config, jax.random.key(seed), given, mesh=self.mesh,
        model=self.model)
    jax.block_until_ready(self.state)
    self._stage(f"create_train_state (init={args['init']})", t,
                key="create_train_state")
    # XLA's cost analysis counts a scanned layer body once, not once per
    # layer: the model FLOPs of a scanned step come from the same step
    # lowered unrolled, from the same weights (kept on the host for that).
    self._given = given if self.config.model.scan_layers else None
    del given
    self.step_fn = step_lib.make_train_step(self.config, self.mesh)
    self.rng = jax.random.key(seed + 1)
    self.trainable = sum(
        x.size for x in jax.tree.leaves(step_lib.trainable_params(
            self.state.params)))
    self.batch_size = None
    self.prepare(args["batch"])

  def _stage(self, name, start, key=None):
    seconds = time.perf_counter() - start
    self.stages[key or name] = seconds
    progress(f"jax: {name} {seconds:.2f} s")
    return seconds

  def prepare(self, batch_size):
    """Places a random batch, lowers and compiles the step for it."""
    jax = self.jax
    self.compiled = self.batch = None
    gc.collect()
    self.batch_size = batch_size
    t = time.perf_counter()
    image_size = self.model.clip.vision.image_size
    self.batch = self.step_lib.shard_batch(
        random_batch(batch_size, image_size), self.mesh)
    jax.block_until_ready(self.batch)
    self._stage(f"batch {batch_size}: host batch + placement", t,
                key="batch placement")
    t = time.perf_counter()
    lowered = self.step_fn.lower(self.state, self.batch, self.rng)
    self._stage(f"batch {batch_size}: lower", t, key="lower")
    t = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = self._stage(f"batch {batch_size}: compile", t,
                                 key="compile")
    self.flops = _flops(self.compiled.cost_analysis())
    self.model_flops, self.flops_source = self.flops, "compiled step"
    if self.config.model.scan_layers:
      self.model_flops, self.flops_source = self._unrolled_flops()
    elif remat_is_on(self.config):
      # Model FLOPs exclude the recomputation: count the step without remat.
      plain = self.step_lib.model_from_config(remat_off(self.config))
      self.model_flops = _flops(self.step_fn.lower(
          self.state.replace(model=plain), self.batch,
          self.rng).cost_analysis())
      self.flops_source = "step lowered without remat"
    self.first_s, loss = self.step()
    progress(f"jax: batch {batch_size}: first call {self.first_s:.3f} s "
             f"(compiled executable, no recompile), loss {loss:.4f}")
    self.stages.setdefault("first step", self.first_s)
    self.stages.setdefault("process start to first step done",
                           timing.elapsed())

  def _unrolled_flops(self):
    """(FLOPs, source) of this step lowered with unrolled layers and no
    remat (lowered only, not compiled)."""
    if self._given is None:
      return None, ("n/a: a scanned step's loop body is counted once; pass "
                    "--init given for its unrolled count")
    t = time.perf_counter()
    config = remat_off(self.config)
    config.model.scan_layers = False
    model = self.step_lib.model_from_config(config)
    state = self.step_lib.create_train_state(
        config, self.jax.random.key(0), self._given, mesh=self.mesh,
        model=model)
    flops = _flops(self.step_lib.make_train_step(config, self.mesh).lower(
        state, self.batch, self.rng).cost_analysis())
    del state
    gc.collect()
    progress(f"jax: batch {self.batch_size}: model FLOPs from the unrolled "
             f"step, lowered in {time.perf_counter() - t:.1f} s")
    return flops, "step lowered unrolled, without remat"

  def step(self):
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch, self.rng)
    loss = float(metrics["loss"])  # waits for the step
    return time.perf_counter() - start, loss

  def peak_memory_gib(self):
    if self.device.platform == "cpu":
      return peak_rss_gib()
    stats = self.device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30

  def memory_limit_gib(self):
    stats = (self.device.memory_stats() or {}) if (
        self.device.platform != "cpu") else {}
    return stats.get("bytes_limit", 0) / 2**30

  def info(self):
    kind = self.device.device_kind
    return {"trainable": self.trainable, "compile_s": self.compile_s,
            "first_s": self.first_s, "flops": self.flops,
            "model_flops": self.model_flops,
            "flops_source": self.flops_source, "batch": self.batch_size,
            "device": f"{self.device.platform}: {kind}",
            "platform": self.device.platform,
            "n_devices": len(self.jax.devices()), "stages": self.stages}

  def search(self, batches, repeats):
    """Times the step at each batch in turn until one does not fit.

    Returns:
      list of {"batch", "s_step", "peak_gib", ...} or {"batch", "oom": msg}.
    """
    results = []
    for b in batches:
      try:
        self.prepare(b)
        times = []
        for i in range(repeats):
          seconds, _ = self.step()
          times.append(seconds)
          progress(f"jax: batch {b}: step {i + 1}/{repeats} {seconds:.3f} s")
      except Exception as e:  # pylint: disable=broad-except
        if not is_oom(e):
          raise
        first = str(e).strip().splitlines()[0][:200]
        progress(f"jax: batch {b}: does not fit ({first})")
        results.append({"batch": b, "oom": first})
        break
      med = statistics.median(times)
      results.append({"batch": b, "s_step": med, "qps": b / med,
                      "peak_gib": self.peak_memory_gib(),
                      "compile_s": self.compile_s,
                      "model_flops": self.model_flops})
      progress(f"jax: batch {b}: {med:.4f} s/step, {b / med:.1f} "
               f"quadruples/s, peak {results[-1]['peak_gib']:.2f} GiB")
    return results


def _flops(cost):
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


# ----------------------------------------------------------- PyTorch side ---


def torch_lorentz():
  """The SPEC §1 formulas in PyTorch, as the release writes them (clamps)."""
  import torch  # pylint: disable=g-import-not-at-top

  def time_c(x, c):
    return torch.sqrt(1 / c + (x * x).sum(-1))

  def exp_map0(v, c):
    norm = torch.clamp(torch.sqrt(c) * v.norm(dim=-1, keepdim=True), min=1e-8)
    arg = torch.clamp(norm, max=math.asinh(2.0**15))
    return torch.sinh(arg) * v / norm

  def pairwise_dist(x, y, c):
    inner = x @ y.T - time_c(x, c)[:, None] * time_c(y, c)[None, :]
    return torch.acosh(torch.clamp(-c * inner, min=1 + 1e-8)) / torch.sqrt(c)

  def entailment_energy(x, y, c, eps=1e-5, k=0.1):
    norm_x = x.norm(dim=-1)
    aperture = torch.asin(torch.clamp(2 * k / (torch.sqrt(c) * norm_x + eps),
                                      -1 + eps, 1 - eps))
    x_t, y_t = time_c(x, c), time_c(y, c)
    ell = c * ((x * y).sum(-1) - x_t * y_t)
    numer = y_t + ell * x_t
    denom = norm_x * torch.sqrt(torch.clamp(ell**2 - 1, min=eps)) + eps
    angle = torch.acos(torch.clamp(numer / denom, -1 + eps, 1 - eps))
    return torch.relu(angle - aperture)

  return exp_map0, pairwise_dist, entailment_energy


class TorchStep:
  """The same step with HF CLIP + peft LoRA + torch AdamW.

  `mode` (TORCH_MODES): "fp32" as the release ships (no autocast; its
  GradScaler on, which on CUDA only scales the loss), "fp16" autocast +
  GradScaler (the release's AMP switch), "bf16" autocast, no scaler. Under
  autocast only the towers run in half precision; the head, geometry and
  losses take float32 features. On CPU, fp32 runs without a GradScaler
  (the long-standing CPU baseline).
  """

  def __init__(self, args, mode, batch, seed=0):
    t = time.perf_counter()
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from hysac_jax import export  # pylint: disable=g-import-not-at-top
    from hysac_jax.models.sizes import get_clip_config  # pylint: disable=g-import-not-at-top
    name = f"torch {mode}"
    device = args["torch_device"]
    if device == "auto":
      device = "cuda" if torch.cuda.is_available() else "cpu"
    self.torch, self.name = torch, name
    self.device = torch.device(device)
    progress(f"{name}: imports {time.perf_counter() - t:.1f} s (torch "
             f"{torch.__version__}, {self._device_name()})")
    t = time.perf_counter()
    torch.manual_seed(seed)
    config = get_clip_config(args["size"])
    with self.device:  # random init on the device: seconds, not a minute
      model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(
          export.hf_config(config, logit_scale=1 / 0.07)))
      self.model = peft.get_peft_model(model, peft.LoraConfig(
          r=16, lora_alpha=1, lora_dropout=0.1,
          target_modules=list(LORA_TARGETS))).to(self.device)
    self.model.train()
    d = config.projection_dim
    self.head = torch.nn.ParameterDict({
        "log_curv": torch.nn.Parameter(torch.tensor(0.0)),
        "log_alpha_image": torch.nn.Parameter(torch.tensor(-0.5 * math.log(d))),
        "log_alpha_text": torch.nn.Parameter(torch.tensor(-0.5 * math.log(d))),
        "log_logit_scale": torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))),
    }).to(self.device)
    lora = [p for p in self.model.parameters() if p.requires_grad]
    self.trainable = sum(p.numel() for p in lora) + 4
    self.opt = torch.optim.AdamW(
        [{"params": lora, "weight_decay": 0.2},
         {"params": list(self.head.values()), "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
    amp, scaler_on = TORCH_MODES[mode]
    self.amp = getattr(torch, amp) if amp else None
    if self.device.type == "cpu" and mode == "fp32":
      scaler_on = False
    self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaler_on)
    progress(f"{name}: model build {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    host = random_batch(batch, config.vision.image_size)
    to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    self.pixels = torch.cat([to_nchw(host["safe_image"]),
                             to_nchw(host["unsafe_image"])]).to(self.device)
    self.ids = torch.from_numpy(np.concatenate(
        [host["safe_ids"], host["unsafe_ids"]])).long().to(self.device)
    self.b = batch
    self.geometry = torch_lorentz()
    progress(f"{name}: batch {batch} placement "
             f"{time.perf_counter() - t:.1f} s")
    self.compile_s, loss = self.step()  # first step, nothing to compile
    self.first_s = self.compile_s
    progress(f"{name}: first step {self.compile_s:.3f} s, loss {loss:.4f}")

  def _device_name(self):
    if self.device.type == "cuda":
      return f"cuda: {self.torch.cuda.get_device_name(self.device)}"
    return f"cpu, {self.torch.get_num_threads()} threads"

  def loss(self):
    torch = self.torch
    exp_map0, pairwise_dist, entail = self.geometry
    h = self.head
    curv = torch.exp(torch.clamp(h["log_curv"], math.log(0.1), math.log(10)))
    a_img = torch.exp(torch.clamp(h["log_alpha_image"], max=0.0))
    a_txt = torch.exp(torch.clamp(h["log_alpha_text"], max=0.0))
    scale = torch.exp(torch.clamp(h["log_logit_scale"], math.log(1 / 0.07),
                                  math.log(100)))

    def feats(out):
      out = out if torch.is_tensor(out) else out.pooler_output
      return out.float()

    with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                        enabled=self.amp is not None):
      text_feats = feats(self.model.get_text_features(input_ids=self.ids))
      image_feats = feats(self.model.get_image_features(
          pixel_values=self.pixels))
    text = exp_map0(a_txt * text_feats, curv)
    image = exp_map0(a_img * image_feats, curv)
    S, U = text[:self.b], text[self.b:]
    V, G = image[:self.b], image[self.b:]
    targets = torch.arange(self.b, device=self.device)

    def contrastive(t, v):
      logits = -scale * pairwise_dist(t, v, curv)
      return 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                    + torch.nn.functional.cross_entropy(logits.T, targets))

    terms = [contrastive(S, V), contrastive(U, G), contrastive(S, G),
             contrastive(U, V), entail(S, V, curv).mean(),
             entail(U, G, curv).mean(), entail(V, U, curv).mean()]
    return sum(terms) / 7 / 7  # weights 1/7 each, then the release's /7

  def step(self):
    torch = self.torch
    start = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss()
    self.scaler.scale(loss).backward()
    self.scaler.step(self.opt)
    self.scaler.update()
    with torch.no_grad():
      h = self.head
      h["log_curv"].clamp_(math.log(0.1), math.log(10))
      h["log_alpha_image"].clamp_(max=0.0)
      h["log_alpha_text"].clamp_(max=0.0)
      h["log_logit_scale"].clamp_(math.log(1 / 0.07), math.log(100))
    value = float(loss.detach())
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
    return time.perf_counter() - start, value

  def peak_memory_gib(self):
    if self.device.type == "cuda":
      return self.torch.cuda.max_memory_allocated(self.device) / 2**30
    return peak_rss_gib()

  def info(self):
    return {"trainable": self.trainable, "compile_s": self.compile_s,
            "first_s": self.first_s, "flops": 0.0,
            "device": f"torch {self._device_name()}",
            "platform": self.device.type, "n_devices": 1}


# ----------------------------------------------------------------- driver ---


def _worker(side, args, conn):
  """Builds one side, then answers "step" / "memory" / "search" / "stop"."""
  timing.set_start(args["t0"])
  if side["kind"] == "torch" and args["omp_passive"]:
    # Idle OpenMP threads sleep instead of spinning: on a shared, over-
    # subscribed CPU, spinning torch threads wait a scheduler slice at every
    # parallel region (10-30x slower steps at `tiny`). Set before torch loads.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
  try:
    if side["kind"] == "jax":
      runner = JaxStep(dict(args, batch=side["batch"]))
    else:
      runner = TorchStep(args, side["mode"], side["batch"])
    seconds, _ = runner.step()  # warm-up beyond the first step
    progress(f"{side['name']}: warm-up step {seconds:.3f} s")
    conn.send(("ready", runner.info()))
    while True:
      msg = conn.recv()
      if msg == "step":
        conn.send(("step", runner.step()))
      elif msg == "memory":
        conn.send(("memory", runner.peak_memory_gib()))
      elif isinstance(msg, tuple) and msg[0] == "search":
        conn.send(("search", runner.search(*msg[1:])))
      else:
        return
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    kind = "oom" if is_oom(e) else "error"
    if kind == "oom" and side["kind"] == "jax":
      limit = ""
      try:
        limit = f"; the device has {runner.memory_limit_gib():.1f} GiB"
      except Exception:  # pylint: disable=broad-except
        pass
      text = (f"batch {side['batch']} does not fit in device memory{limit} "
              f"({text}); try --remat or a smaller --batch")
    conn.send((kind, f"{type(e).__name__}: {text}"))


def _start(side, args):
  parent, child = mp.Pipe()
  proc = mp.get_context("spawn").Process(target=_worker,
                                         args=(side, args, child))
  proc.start()
  return proc, parent, _ask(parent, None)


def _ask(conn, msg):
  if msg is not None:
    conn.send(msg)
  try:
    kind, payload = conn.recv()
  except EOFError:
    raise RuntimeError("worker process died (killed or crashed)") from None
  if kind in ("error", "oom"):
    raise RuntimeError(payload)
  return payload


def _gpu_machine():
  """An NVIDIA GPU machine, told without importing JAX or torch."""
  return os.path.exists("/dev/nvidiactl") or bool(shutil.which("nvidia-smi"))


def parse_torch_modes(text, batch):
  """"fp32,fp16:32,bf16:128" -> [("fp32", batch), ("fp16", 32), ...]."""
  modes = []
  for item in filter(None, (x.strip() for x in text.split(","))):
    mode, _, b = item.partition(":")
    if mode not in TORCH_MODES:
      raise ValueError(f"--torch-modes: unknown mode {mode!r}; expected "
                       f"{'/'.join(TORCH_MODES)}")
    modes.append((mode, int(b) if b else batch))
  return modes


def _search_batches(start):
  batches, b = [], start * 2
  while b <= SEARCH_CAP:
    batches.append(b)
    b *= 2
  return batches


def run(args):
  """Runs every side; returns (sides, info, times, losses, search, errors)."""
  sides = []
  if not args.no_jax:
    sides.append({"name": "jax", "kind": "jax", "batch": args.batch})
  if not args.no_torch:
    for mode, b in parse_torch_modes(args.torch_modes, args.batch):
      sides.append({"name": f"torch {mode}", "kind": "torch", "mode": mode,
                    "batch": b})
  wargs = {"size": args.size, "dtype": args.dtype, "init": args.init,
           "remat": args.remat, "attention": args.attention,
           "scan_layers": args.scan_layers,
           "omp_passive": args.omp_passive, "torch_device": args.torch_device,
           "t0": args.t0}
  interleave = args.interleave
  if interleave == "auto":  # on a GPU machine the workers share the device
    interleave = "off" if _gpu_machine() else "on"
  order = ([sides] if interleave == "on" else [[s] for s in sides])
  info, times, losses, errors, search = {}, {}, {}, {}, None
  for group in order:
    workers = {}
    for side in group:
      name = side["name"]
      progress(f"{name}: starting worker (batch {side['batch']})")
      try:
        workers[name] = _start(side, wargs)
        info[name] = dict(workers[name][2], batch=side["batch"])
        times[name] = []
      except RuntimeError as e:
        errors[name] = str(e)
        progress(f"{name}: FAILED: {e}")
    for i in range(args.repeats):
      for name in list(workers):
        try:
          seconds, loss = _ask(workers[name][1], "step")
        except RuntimeError as e:
          errors[name] = str(e)
          progress(f"{name}: FAILED: {e}")
          workers.pop(name)[0].join(5)
          continue
        times[name].append(seconds)
        losses[name] = loss
        progress(f"{name}: timed step {i + 1}/{args.repeats} {seconds:.4f} s"
                 f" (batch {info[name]['batch']}, loss {loss:.4f})")
    for name, (proc, conn, _) in workers.items():
      info[name]["peak_gib"] = _ask(conn, "memory")
      if name == "jax" and args.batch_search:
        progress(f"jax: largest-batch search over "
                 f"{_search_batches(args.batch)} (stops at the first OOM)")
        search = _ask(conn, ("search", _search_batches(args.batch),
                             args.repeats))
      conn.send("stop")
      proc.join()
  times = {k: v for k, v in times.items() if v}
  return sides, info, times, losses, search, errors


def _peak(info, args):
  """Per-device dense bf16 peak in TFLOP/s, or None (CPU: only if given)."""
  if args.peak_tflops:
    return args.peak_tflops
  if info["platform"] == "cpu":
    return None
  return next((v for k, v in PEAK_TFLOPS.items() if k in info["device"]),
              None)


def mfu(model_flops, seconds, info, args):
  peak = _peak(info, args)
  if not (peak and model_flops):
    return None
  # cost_analysis() counts the per-device (SPMD-partitioned) program.
  return model_flops / seconds / 1e12 / peak


def report(args, sides, info, times, losses, search, errors):
  """Prints the result tables; returns a JSON-safe summary."""
  print(flush=True)
  first = next(iter(info.values()), {"device": "?", "n_devices": 0})
  devices = ", ".join(sorted({f"{v['device']} x{v['n_devices']}"
                              for v in info.values()}))
  print(f"machine: {platform.machine()}, {mp.cpu_count()} CPUs, "
        f"{devices or first['device']}, python {platform.python_version()}")
  print(f"command: `python benchmarks/bench_train_step.py "
        f"{' '.join(sys.argv[1:])}`\n")
  torch_qps = {k: info[k]["batch"] / statistics.median(v)
               for k, v in times.items() if k.startswith("torch")}
  base_name = max(torch_qps, key=torch_qps.get) if torch_qps else None
  print(f"| implementation | batch | s/step (median of {args.repeats}) | "
        "min-max | quadruples/s | peak memory GiB | first step s | MFU | "
        f"vs {base_name or 'PyTorch'} |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  names = {"jax": "JAX `training.step` step (compiled once)",
           "torch fp32": "PyTorch fp32 (HF CLIP + peft LoRA)",
           "torch fp16": "PyTorch fp16 autocast + GradScaler",
           "torch bf16": "PyTorch bf16 autocast"}
  summary = {"sides": {}, "errors": errors, "search": search,
             "command": " ".join(sys.argv[1:])}
  for name, ts in times.items():
    med, b = statistics.median(ts), info[name]["batch"]
    qps = b / med
    ratio = f"{qps / torch_qps[base_name]:.2f}x" if base_name else "-"
    util = (mfu(info[name].get("model_flops"), med, info[name], args)
            if name == "jax" else None)
    util_s = f"{100 * util:.1f}%" if util is not None else "n/a"
    print(f"| {names[name]} | {b} | {med:.4f} | {min(ts):.4f}-{max(ts):.4f} "
          f"| {qps:.1f} | {info[name]['peak_gib']:.2f} | "
          f"{info[name]['first_s']:.3f} | {util_s} | {ratio} |")
    summary["sides"][name] = {"batch": b, "s_step": med, "qps": qps,
                              "peak_gib": info[name]["peak_gib"],
                              "first_s": info[name]["first_s"],
                              "mfu": util, "device": info[name]["device"]}
  for name, err in errors.items():
    print(f"| {names.get(name, name)} | - | failed: {err} | | | | | | |")
  print()
  if times:
    print("trainable params: " + ", ".join(
        f"{s} {info[s]['trainable']:,}" for s in times)
          + "; last loss: " + ", ".join(f"{s} {losses[s]:.4f}"
                                        for s in times))
  if "jax" in times:
    jinfo = info["jax"]
    med = statistics.median(times["jax"])
    print("JAX start-up stages (s): " + ", ".join(
        f"{k} {v:.2f}" for k, v in jinfo["stages"].items()))
    flops = jinfo["flops"]
    if flops:
      line = (f"XLA cost analysis: {flops / 1e12:.3f} TFLOP/step (compiled"
              f" step), {flops / med / 1e12:.2f} TFLOP/s achieved per device")
      if jinfo["model_flops"] is None:
        line += f"; model FLOPs {jinfo['flops_source']}"
      elif jinfo["model_flops"] != flops:
        line += (f"; model FLOPs {jinfo['model_flops'] / 1e12:.3f} TFLOP "
                 f"({jinfo['flops_source']})")
      peak = _peak(jinfo, args)
      line += (f"; MFU against {peak:g} TFLOP/s per device" if peak else
               "; MFU n/a (CPU or unknown device: pass --peak_tflops)")
      print(line)
    summary["sides"]["jax"]["stages"] = jinfo["stages"]
    summary["sides"]["jax"]["compile_s"] = jinfo["compile_s"]
    summary["sides"]["jax"]["model_flops"] = jinfo["model_flops"]
  if search is not None:
    print("\nLargest-batch search (JAX, doubling up to "
          f"{SEARCH_CAP}, median of {args.repeats}):\n")
    print("| batch | s/step | quadruples/s | peak memory GiB | compile s | "
          "MFU |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [{"batch": args.batch, "s_step": statistics.median(times["jax"]),
             "peak_gib": info["jax"]["peak_gib"],
             "compile_s": info["jax"]["compile_s"],
             "model_flops": info["jax"]["model_flops"]}] if (
                 "jax" in times) else []
    for r in rows + search:
      if "oom" in r:
        print(f"| {r['batch']} | does not fit | | | | |")
        continue
      util = mfu(r["model_flops"], r["s_step"], info["jax"], args)
      print(f"| {r['batch']} | {r['s_step']:.4f} | "
            f"{r['batch'] / r['s_step']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['compile_s']:.1f} | "
            f"{'n/a' if util is None else f'{100 * util:.1f}%'} |")
    fits = [r for r in rows + search if "oom" not in r]
    if fits:
      best = max(fits, key=lambda r: r["batch"])
      print(f"\nlargest batch that fits (<= {SEARCH_CAP}): {best['batch']}")
      summary["largest_batch"] = best["batch"]
  sys.stdout.flush()
  return summary


def main():
  t0 = timing.start_time()  # this process's start
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="small",
                      choices=["tiny", "small", "vitb32", "vitb16", "vitl14"])
  parser.add_argument("--batch", type=int, default=8,
                      help="quadruples per step (global)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"],
                      help="the JAX towers' compute dtype")
  parser.add_argument("--init", default="random", choices=["random", "given"],
                      help="random: random-init every leaf; given: pass "
                      "random frozen CLIP weights as init params, as "
                      "train.py does with a pretrained CLIP")
  parser.add_argument("--remat", default=None, choices=REMAT_CHOICES,
                      help="config.model.remat (default: the config's)")
  parser.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                      help="config.model.attention (default: the config's)")
  parser.add_argument("--scan-layers", dest="scan_layers", default=None,
                      choices=["on", "off"],
                      help="config.model.scan_layers: the towers' layers "
                      "under nn.scan or unrolled (default: the config's, on)")
  parser.add_argument("--batch-search", action="store_true",
                      help="after the timed steps, double the JAX batch up "
                      f"to {SEARCH_CAP}, stopping at the first that does not "
                      "fit")
  parser.add_argument("--no-torch", action="store_true",
                      help="skip the PyTorch baseline")
  parser.add_argument("--no-jax", action="store_true",
                      help="skip the JAX step (torch baselines only)")
  parser.add_argument("--torch-modes", default=None,
                      help="comma list of mode[:batch], modes fp32/fp16/bf16 "
                      "(default fp32 on CPU, fp32,fp16,bf16 on a GPU machine;"
                      " batch defaults to --batch)")
  parser.add_argument("--torch-device", default="auto",
                      choices=["auto", "cpu", "cuda"])
  parser.add_argument("--interleave", default="auto",
                      choices=["auto", "on", "off"],
                      help="step the workers alternately (auto: on without "
                      "a GPU, off on a GPU machine)")
  parser.add_argument("--no-interleave", dest="interleave",
                      action="store_const", const="off",
                      help="same as --interleave off")
  parser.add_argument("--torch-omp-active", dest="omp_passive",
                      action="store_false",
                      help="keep OpenMP's default spin-waiting in the torch "
                      "worker (the default sets OMP_WAIT_POLICY=PASSIVE)")
  parser.add_argument("--peak_tflops", "--peak-tflops", type=float,
                      default=None,
                      help="per-device peak for MFU (default by device kind;"
                      " needed on CPU)")
  parser.add_argument("--json", default=None,
                      help="also write the results to this JSON file")
  args = parser.parse_args()
  args.t0 = t0
  if args.torch_modes is None:
    args.torch_modes = ("fp32,fp16,bf16" if _gpu_machine()
                        else "fp32")
  prog = "bench_train_step.py"
  try:
    if not args.no_jax:  # flag errors before any worker starts
      make_config({"size": args.size, "dtype": args.dtype,
                   "remat": args.remat, "attention": args.attention,
                   "scan_layers": args.scan_layers})
    parse_torch_modes(args.torch_modes, args.batch)
  except ValueError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  parts = [f"size {args.size}"]
  if not args.no_jax:
    parts.append(f"JAX batch {args.batch}, dtype {args.dtype}, init "
                 f"{args.init}, scan_layers {args.scan_layers or 'default'}")
  if not args.no_torch:
    parts.append(f"torch {args.torch_modes} (device {args.torch_device})")
  progress("bench_train_step: " + "; ".join(parts))
  summary = report(args, *run(args))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  if summary["errors"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
