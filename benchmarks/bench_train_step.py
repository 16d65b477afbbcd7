"""HySAC train-step speed: the jitted JAX step vs the same step in PyTorch.

One step = embed a batch of B quadruples (both towers on 2B inputs, LoRA
dropout on), the seven-term HySAC loss, the backward pass through the LoRA
matrices and the head scalars only, an AdamW update and the head clamps.

The PyTorch side is written here for comparison: Hugging Face CLIP towers,
peft LoRA (rank 16, alpha 1, dropout 0.1 on k/v/out_proj, fc1, fc2 and the
patch conv), the release's head scalars, the same Lorentz formulas and
losses (SPEC.md §1-3) and torch AdamW with the same groups.

Each side runs in its own worker process, so that peak memory (RSS on CPU,
the allocator's peak on GPU) is measured per side; the parent asks them for
one timed step at a time, alternating, so both see the same machine load.

  python benchmarks/bench_train_step.py --size small --batch 8 --repeats 7
  python benchmarks/bench_train_step.py --size vitb16 --batch 8 --repeats 3
  python benchmarks/bench_train_step.py --size vitl14 --batch 256 \
      --dtype bfloat16 --no-torch          # GPU: quadruples/s and MFU
"""

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

# `configs/` (the run configs) sits beside `benchmarks/`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LORA_TARGETS = ("k_proj", "v_proj", "out_proj", "fc1", "fc2",
                "patch_embedding")
# Dense bf16 peak FLOP/s by device kind, for model FLOPs utilisation.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5e": 197.0,
               "v4": 275.0, "v5p": 459.0, "v6e": 918.0}


def random_batch(batch, image_size, seed=0):
  """Random quadruples: NHWC float32 images, token ids with an EOT id."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 49000, size=(2, batch, 77)).astype(np.int32)
  ids[:, :, 20] = 49407  # end-of-text: pooled position
  images = rng.normal(size=(2, batch, image_size, image_size, 3))
  return {"safe_image": images[0].astype(np.float32),
          "unsafe_image": images[1].astype(np.float32),
          "safe_ids": ids[0], "unsafe_ids": ids[1]}


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------- JAX side ---


class JaxStep:
  """The library's jitted train step on all local devices."""

  def __init__(self, size, batch, dtype, seed=0):
    import jax  # pylint: disable=g-import-not-at-top
    from configs import vitl14  # pylint: disable=g-import-not-at-top
    from hysac_jax import train_lib  # pylint: disable=g-import-not-at-top
    self.jax, self.train_lib = jax, train_lib
    config = vitl14.get_config()
    config.model.clip, config.model.size = "", size
    config.model.dtype = dtype
    self.mesh = train_lib.make_mesh()
    self.state = train_lib.create_train_state(config, jax.random.key(seed),
                                              mesh=self.mesh)
    image_size = self.state.model.clip.vision.image_size
    self.batch = train_lib.shard_batch(random_batch(batch, image_size),
                                       self.mesh)
    self.step_fn = train_lib.make_train_step(config, self.mesh)
    self.rng = jax.random.key(seed + 1)
    self.trainable = sum(
        x.size for x in jax.tree.leaves(train_lib.trainable_params(
            self.state.params)))
    start = time.perf_counter()
    compiled = self.step_fn.lower(self.state, self.batch, self.rng).compile()
    self.compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get("flops", 0.0)) if cost else 0.0
    self.device = jax.devices()[0]

  def step(self):
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch, self.rng)
    loss = float(metrics["loss"])  # waits for the step
    return time.perf_counter() - start, loss

  def peak_memory_gib(self):
    if self.device.platform == "cpu":
      return peak_rss_gib()
    stats = self.device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30

  def info(self):
    kind = self.device.device_kind
    return {"trainable": self.trainable, "compile_s": self.compile_s,
            "flops": self.flops, "device": f"{self.device.platform}: {kind}",
            "n_devices": len(self.jax.devices())}


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
  """The same step with HF CLIP + peft LoRA + torch AdamW."""

  def __init__(self, size, batch, dtype, seed=0):
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from hysac_jax import export  # pylint: disable=g-import-not-at-top
    from hysac_jax.models.sizes import get_clip_config  # pylint: disable=g-import-not-at-top
    if dtype != "float32":
      raise ValueError("the PyTorch baseline runs in float32 only")
    self.torch = torch
    torch.manual_seed(seed)
    config = get_clip_config(size)
    model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(
        export.hf_config(config, logit_scale=1 / 0.07)))
    self.model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=1, lora_dropout=0.1,
        target_modules=list(LORA_TARGETS)))
    self.model.train()
    d = config.projection_dim
    self.head = torch.nn.ParameterDict({
        "log_curv": torch.nn.Parameter(torch.tensor(0.0)),
        "log_alpha_image": torch.nn.Parameter(torch.tensor(-0.5 * math.log(d))),
        "log_alpha_text": torch.nn.Parameter(torch.tensor(-0.5 * math.log(d))),
        "log_logit_scale": torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))),
    })
    lora = [p for p in self.model.parameters() if p.requires_grad]
    self.trainable = sum(p.numel() for p in lora) + 4
    self.opt = torch.optim.AdamW(
        [{"params": lora, "weight_decay": 0.2},
         {"params": list(self.head.values()), "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
    host = random_batch(batch, config.vision.image_size)
    to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    self.pixels = torch.cat([to_nchw(host["safe_image"]),
                             to_nchw(host["unsafe_image"])])
    self.ids = torch.from_numpy(
        np.concatenate([host["safe_ids"], host["unsafe_ids"]])).long()
    self.b = batch
    self.geometry = torch_lorentz()
    start = time.perf_counter()
    self.step()
    self.compile_s = time.perf_counter() - start  # first step, no compile

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
      return out if torch.is_tensor(out) else out.pooler_output

    text = exp_map0(a_txt * feats(self.model.get_text_features(
        input_ids=self.ids)), curv)
    image = exp_map0(a_img * feats(self.model.get_image_features(
        pixel_values=self.pixels)), curv)
    S, U = text[:self.b], text[self.b:]
    V, G = image[:self.b], image[self.b:]
    targets = torch.arange(self.b)

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
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      h = self.head
      h["log_curv"].clamp_(math.log(0.1), math.log(10))
      h["log_alpha_image"].clamp_(max=0.0)
      h["log_alpha_text"].clamp_(max=0.0)
      h["log_logit_scale"].clamp_(math.log(1 / 0.07), math.log(100))
    return time.perf_counter() - start, float(loss.detach())

  def peak_memory_gib(self):
    return peak_rss_gib()

  def info(self):
    return {"trainable": self.trainable, "compile_s": self.compile_s,
            "flops": 0.0, "device": "cpu (torch)", "n_devices": 1}


# ----------------------------------------------------------------- driver ---


def _worker(side, args, conn):
  """Builds one side, then answers "step" / "memory" / "stop" messages."""
  if side == "torch" and args["omp_passive"]:
    # Idle OpenMP threads sleep instead of spinning: on a shared, over-
    # subscribed CPU, spinning torch threads wait a scheduler slice at every
    # parallel region (10-30x slower steps at `tiny`). Set before torch loads.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
  try:
    cls = JaxStep if side == "jax" else TorchStep
    runner = cls(args["size"], args["batch"], args["dtype"])
    runner.step()  # warm-up beyond the first step
    conn.send(("ready", runner.info()))
    while True:
      msg = conn.recv()
      if msg == "step":
        conn.send(("step", runner.step()))
      elif msg == "memory":
        conn.send(("memory", runner.peak_memory_gib()))
      else:
        return
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"{side}: {type(e).__name__}: {e}"))


def _start(side, args):
  parent, child = mp.Pipe()
  proc = mp.get_context("spawn").Process(target=_worker,
                                         args=(side, args, child))
  proc.start()
  kind, payload = parent.recv()
  if kind == "error":
    raise RuntimeError(payload)
  return proc, parent, payload


def _ask(conn, msg):
  conn.send(msg)
  kind, payload = conn.recv()
  if kind == "error":
    raise RuntimeError(payload)
  return payload


def run(args):
  sides = ["jax"] + ([] if args.no_torch else ["torch"])
  wargs = {"size": args.size, "batch": args.batch, "dtype": args.dtype,
           "omp_passive": args.omp_passive}
  workers, info, times, losses = {}, {}, {s: [] for s in sides}, {}
  # Interleaved: both workers alive, one step each in turn. Sequential:
  # one worker at a time (halves the peak memory on the machine).
  order = [sides] if args.interleave else [[s] for s in sides]
  for group in order:
    for side in group:
      workers[side] = _start(side, wargs)
      info[side] = workers[side][2]
    for _ in range(args.repeats):
      for side in group:
        seconds, loss = _ask(workers[side][1], "step")
        times[side].append(seconds)
        losses[side] = loss
    for side in group:
      proc, conn, _ = workers[side]
      info[side]["peak_gib"] = _ask(conn, "memory")
      conn.send("stop")
      proc.join()
  return info, times, losses


def report(args, info, times, losses):
  print(f"machine: {platform.machine()}, {mp.cpu_count()} CPUs, "
        f"{info['jax']['device']} x{info['jax']['n_devices']}, "
        f"python {platform.python_version()}")
  cmd = (f"python benchmarks/bench_train_step.py --size {args.size} "
         f"--batch {args.batch} --repeats {args.repeats} --dtype {args.dtype}"
         + ("" if args.interleave else " --no-interleave")
         + (" --no-torch" if args.no_torch else "")
         + ("" if args.omp_passive else " --torch-omp-active"))
  print(f"command: `{cmd}`\n")
  print("| implementation | s/step (median of "
        f"{args.repeats}) | min-max | quadruples/s | peak memory GiB | "
        "first step s | vs PyTorch |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  base = statistics.median(times["torch"]) if "torch" in times else None
  names = {"jax": "JAX `train_lib` jitted step",
           "torch": "PyTorch (HF CLIP + peft LoRA)"}
  for side, ts in times.items():
    med = statistics.median(ts)
    ratio = f"{base / med:.2f}x" if base else "-"
    print(f"| {names[side]} | {med:.3f} | {min(ts):.3f}-{max(ts):.3f} | "
          f"{args.batch / med:.1f} | {info[side]['peak_gib']:.2f} | "
          f"{info[side]['compile_s']:.1f} | {ratio} |")
  print()
  print("trainable params: " + ", ".join(
      f"{s} {info[s]['trainable']:,}" for s in times)
        + "; last loss: " + ", ".join(f"{s} {losses[s]:.4f}" for s in times))
  flops = info["jax"]["flops"]
  if flops:
    med = statistics.median(times["jax"])
    line = f"XLA cost analysis: {flops / 1e12:.3f} TFLOP/step, "
    line += f"{flops / med / 1e12:.2f} TFLOP/s achieved"
    kind = info["jax"]["device"]
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if peak and not kind.startswith("cpu"):
      per_device = flops / med / 1e12 / info["jax"]["n_devices"]
      line += f", MFU {100 * per_device / peak:.1f}% of {peak:.0f} TFLOP/s"
    print(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="small",
                      choices=["tiny", "small", "vitb32", "vitb16", "vitl14"])
  parser.add_argument("--batch", type=int, default=8,
                      help="quadruples per step (global)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--no-torch", action="store_true",
                      help="skip the PyTorch baseline (GPU, bfloat16)")
  parser.add_argument("--no-interleave", dest="interleave",
                      action="store_false",
                      help="run the sides one after the other (less memory)")
  parser.add_argument("--torch-omp-active", dest="omp_passive",
                      action="store_false",
                      help="keep OpenMP's default spin-waiting in the torch "
                      "worker (the default sets OMP_WAIT_POLICY=PASSIVE)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="per-device peak for MFU (default by device kind)")
  args = parser.parse_args()
  report(args, *run(args))


if __name__ == "__main__":
  main()
