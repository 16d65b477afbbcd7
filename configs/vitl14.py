"""HySAC on ViSU with CLIP ViT-L/14: the paper recipe (SPEC.md §2-3).

  python train.py --config configs/vitl14.py --workdir runs/vitl14 \
      --config.data.manual_dir=/data/visu
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.size = "vitl14"  # named size (hysac_jax.models.sizes), used when `clip` is empty
  c.model.clip = "openai/clip-vit-large-patch14"  # HF dir or hub id; "" = random init of `size`
  c.model.mode = "hyp"  # "hyp" (HySAC) or "euc" (CLIP baseline, cosine logits)
  c.model.dtype = "bfloat16"  # tower compute dtype; params, geometry and losses stay float32
  # Rematerialise tower layers in the backward pass: "none", "dots_saveable"
  # (keep matmul outputs, recompute the rest) or "full" (keep layer inputs).
  c.model.remat = "none"
  # Attention: "auto" (cuDNN fused attention on GPUs with bf16/fp16 towers,
  # einsums on CPUs, XLA elsewhere), "xla" or "cudnn"
  # (jax.nn.dot_product_attention), or "einsum".
  c.model.attention = "auto"
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

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 50
  c.train.patience = 5  # early stopping on validation loss and recall sum
  c.train.log_every = 50
  c.train.keep_last = 2
  c.train.checkpoint_every = 1000  # steps between mid-epoch checkpoints; 0 = epoch ends only
  c.train.use_wandb = False
  # JAX's persistent compilation cache ('' = off); $JAX_COMPILATION_CACHE_DIR,
  # when set, takes precedence.
  c.train.compilation_cache_dir = "~/.cache/hysac_jax/xla"

  c.eval = ml_collections.ConfigDict()
  # alpha of the traversal threshold b' = b + tanh((b - alpha)/c) + 1 (the
  # release's 0.8, tuned to ViT-L embedding scales).
  c.eval.traversal_alpha = 0.8
  return c
