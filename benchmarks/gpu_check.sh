#!/usr/bin/env bash
# The prepared GPU check (issues 14 and 22): one run, at most 8 minutes, from
# a fresh checkout on a machine without network.
#
#   bash benchmarks/gpu_check.sh            # vitl14 on the GPU
#   bash benchmarks/gpu_check.sh tiny       # CPU dry run (or GPU_CHECK_SIZE=tiny)
#
# Needs CUDA JAX, flax, optax, orbax, torch, transformers and peft installed;
# the project's other pure-Python needs come as wheels in .whl/ (see
# BENCHMARKS.md, "GPU check"), installed here into /tmp/site.
#
# Stages, each with its own `timeout` and a flushed line when it ends:
#   env          versions, devices
#   jax_b32      JAX bf16 step at batch 32, cold compilation cache: start-up
#                stages (imports, model build, pretrained-shaped weights,
#                create_train_state, lower, compile, first step), s/step,
#                quadruples/s, MFU, peak memory
#   jax_b32_warm the same with the compilation cache warm: time to first step
#   torch_bf16   PyTorch release step, bf16 autocast, batch 128 (its best)
#   cli_train    the real CLI: train.py --config configs/SIZE.py, random
#                towers, synthetic data at the tower's image size (224 px for
#                vitl14), ~60 steps, 8 grain workers, no mid-run checkpoint
#   cli_summary  its start-up lines (metrics.jsonl), steady steps/s, input
#                wait share, peak memory (benchmarks/cli_run_summary.py)
#   cli_eval     eval.py --workdir on that run, timed
#   compile_layouts  the step's cold compile, scanned against unrolled
#   jax_search   JAX at batch 128 (the release's bf16 batch), then 256
#   torch_fp16   PyTorch, fp16 autocast + GradScaler, batch 32
#   torch_fp32   PyTorch as shipped (fp32, GradScaler), batch 32
#   summary      one table, JAX against each PyTorch setting
# Stages run in that order of priority: one that would pass the budget is
# cut to what is left, and skipped under 10 s.
# Logs and per-stage JSON go to $GPU_CHECK_OUT (default /tmp/gpu_check).

set -u
cd "$(dirname "$0")/.."
SIZE=${1:-${GPU_CHECK_SIZE:-vitl14}}
BUDGET=${GPU_CHECK_BUDGET:-480}   # seconds for the whole check
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-/tmp/gpu_check}
REPEATS=${GPU_CHECK_REPEATS:-5}
rm -rf "$OUT" && mkdir -p "$OUT"
START=$SECONDS

say() { echo "[gpu_check $((SECONDS - START)) s] $*"; }

# stage NAME LIMIT_S CMD...: runs CMD under `timeout`, capped by what is left
# of the budget; prints one line when it ends, whatever happens.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START) - 5))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 10)); then
    say "$name: SKIPPED (budget of ${BUDGET} s spent)"; return 1
  fi
  local t0=$SECONDS
  say "$name: start (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local how="ok"
  if ((rc == 124 || rc == 137)); then how="TIMED OUT";
  elif ((rc != 0)); then how="FAILED (exit $rc)"; fi
  say "$name: $how in $((SECONDS - t0)) s"
  return "$rc"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  if stage wheels 60 "$PY" -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
# This checkout's package, whether or not it is pip-installed.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# A fresh persistent compilation cache: jax_b32 fills it, jax_b32_warm reads.
export JAX_COMPILATION_CACHE_DIR=$OUT/jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# Let the batch search see most of the card (JAX preallocates 75 % otherwise).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export PYTHONUNBUFFERED=1

B=benchmarks/bench_train_step.py
JAX=(--size "$SIZE" --dtype bfloat16 --init given --no-torch
     --repeats "$REPEATS")
TORCH=(--size "$SIZE" --no-jax --repeats "$REPEATS")

stage env 30 "$PY" -c "
import platform, jax, flax, optax, torch, transformers, peft
print('python', platform.python_version(), '| jax', jax.__version__,
      '| flax', flax.__version__, '| optax', optax.__version__,
      '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| peft', peft.__version__)
print('jax devices:', jax.devices())
print('torch cuda:', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
import hysac_jax, ml_collections, tensorflow_datasets, grain, array_record
print('hysac_jax from', hysac_jax.__file__)
"
stage jax_b32 150 "$PY" $B "${JAX[@]}" --batch 32 --json "$OUT/jax_b32.json"
stage jax_b32_warm 60 "$PY" $B "${JAX[@]}" --batch 32 \
    --json "$OUT/jax_b32_warm.json"
stage torch_bf16 60 "$PY" $B "${TORCH[@]}" --torch-modes bf16:128 \
    --json "$OUT/torch_bf16.json"
# Issue 22: the real CLI, train.py then eval.py, on synthetic data at the
# towers' image size with random towers (nothing to download).
CLI_STEPS=${GPU_CHECK_CLI_STEPS:-60}
if [[ $SIZE == tiny ]]; then CLI_BATCH=16; else CLI_BATCH=32; fi
RUN=$OUT/cli_run
CLI_DEVICES=$(timeout 60 "$PY" -c "import jax; print(jax.device_count())" \
              2>/dev/null || echo 1)
CLI_GLOBAL=$((CLI_BATCH * CLI_DEVICES))
stage cli_train 200 "$PY" train.py --config "configs/$SIZE.py" \
    --workdir "$RUN" --config.model.clip= \
    --config.data.name=synthetic_visu --config.data.data_dir="$OUT/tfds" \
    --config.data.synthetic_sizes="($((CLI_STEPS * CLI_GLOBAL)),64,64)" \
    --config.data.num_workers=8 --config.data.batch_size_per_device=$CLI_BATCH \
    --config.data.eval_batch_size_per_device=32 --config.train.epochs=1 \
    --config.train.log_every=10 --config.train.checkpoint_every=0
BUDGET=$((BUDGET + 10)) stage cli_summary 10 "$PY" \
    benchmarks/cli_run_summary.py "$RUN" --devices "$CLI_DEVICES" \
    --json "$OUT/cli_summary.json"
stage cli_eval 90 "$PY" eval.py --workdir "$RUN" --out "$OUT/cli_eval"
# The step's cold compile, scanned against unrolled (one fresh process
# each, no persistent cache).
stage compile_layouts 150 "$PY" benchmarks/bench_compile.py --config "$SIZE" \
    --repeats 1 --timeout 70 --out "$OUT/compile_layouts.json"
stage jax_search 150 "$PY" $B "${JAX[@]}" --batch 128 --batch-search \
    --json "$OUT/jax_search.json"
stage torch_fp16 45 "$PY" $B "${TORCH[@]}" --torch-modes fp16:32 \
    --json "$OUT/torch_fp16.json"
stage torch_fp32 50 "$PY" $B "${TORCH[@]}" --torch-modes fp32:32 \
    --json "$OUT/torch_fp32.json"
# Budget-free: the summary only reads the JSON files (no JAX import).
BUDGET=$((BUDGET + 30)) stage summary 20 "$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
runs, other = {}, {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
  with open(path) as f:
    r = json.load(f)
  # bench_train_step.py results have "sides"; the CLI and compile stages not.
  (runs if "sides" in r else other)[os.path.basename(path)[:-5]] = r
rows = []
for stage_name, r in runs.items():
  for side, v in r["sides"].items():
    rows.append((stage_name, side, v))
  for s in r.get("search") or []:
    rows.append((stage_name, "jax (search)", s))
torch_best = max((v["qps"] for _, side, v in rows
                  if side.startswith("torch")), default=None)
print("| stage | side | batch | s/step | quadruples/s | peak GiB | MFU | "
      "vs best PyTorch |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for stage_name, side, v in rows:
  if "oom" in v:
    print(f"| {stage_name} | {side} | {v['batch']} | does not fit | | | | |")
    continue
  qps = v.get("qps") or v["batch"] / v["s_step"]
  mfu = v.get("mfu")
  print(f"| {stage_name} | {side} | {v['batch']} | {v['s_step']:.4f} | "
        f"{qps:.1f} | {v.get('peak_gib', 0):.2f} | "
        f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
        f"{'-' if not torch_best else f'{qps / torch_best:.2f}x'} |")
for name in ("jax_b32", "jax_b32_warm"):
  if name in runs and "jax" in runs[name]["sides"]:
    st = runs[name]["sides"]["jax"]["stages"]
    print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in st.items()))
largest = runs.get("jax_search", {}).get("largest_batch")
print("largest JAX batch that fits (<= 256):", largest)
for name, r in runs.items():
  for side, err in r.get("errors", {}).items():
    print(f"{name}: {side} failed: {err}")
cli = other.get("cli_summary")
if cli:
  device = cli.get("device_peak_gib")
  print(f"cli_train: {cli['steps_per_s']:.3f} steps/s, "
        f"{cli['examples_per_s']:.1f} quadruples/s at global batch "
        f"{cli['global_batch']}, input wait {cli['input_wait_share']:.1%}, "
        f"device peak {'n/a' if device is None else f'{device:.2f} GiB'}, "
        "start-up " + ", ".join(f"{k} {v:.1f} s"
                               for k, v in cli["startup_s"].items()))
for row in (other.get("compile_layouts") or {}).get("rows") or []:
  if row:
    print(f"compile_layouts: {row['label']}: compile {row['compile_s']:.1f} s, "
          f"lower {row['lower_s']:.1f} s")
EOF
say "done in $((SECONDS - START)) s (budget ${BUDGET} s); logs in $OUT"
