#!/usr/bin/env bash
# Issue 27's GPU items as one script, most needed first (a lent GPU gives ~15 device minutes).
#   OUT=/path/to/dir bash bench/issue27_gpu.sh          # on the GPU machine (device tool: $OUT)
#   DRY=1 OUT=/tmp/x bash bench/issue27_gpu.sh         # print the commands only
#   ONLY=step_resnet50,largest OUT=dir bash bench/issue27_gpu.sh   # items whose names start so
#   SMOKE=1 OUT=/tmp/x bash bench/issue27_gpu.sh       # every item at toy sizes: a CPU check
# One device call runs at most 10 minutes: a call that is cut off keeps the items it finished
# (and step_time's rows so far, marked incomplete); the next call resumes with ONLY=...
# Timing rows run one process at a time (processes sharing the GPU would time each other).
# Each item has its own time limit and a failure does not stop the next; `log.txt` says which ran.
#
# What comes back: the device tool returns at most 8 files of $OUT, 2 folders deep, so the items
# write under $WORK (default /tmp/issue27, outside $OUT) and after every item $OUT holds only
#   log.txt                                  which items ran, their exit codes, the preflight
#   step_time_resnet{20,18}_gpu.json         the rows bar gpu-step-ratio reads (copy to results/)
#   issue27.tar.gz                           every item's output and JSON
#   issue27_traces.tar.gz                    the jax.profiler traces (profile item)
# The preflight imports the program and prints the versions and devices first; if it cannot
# import, the script stops at once (a device minute, not the call). A package of setup.py's
# install_requires that the device's image lacks (e.g. ml-collections) travels as a wheel: here,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl ml-collections==1.1.0
# (`.whl/` is git-ignored), name `.whl` in the call's carry, and the preflight installs
# `.whl/*.whl` into $WORK/site and puts it on PYTHONPATH.
set -u
OUT=${OUT:?set OUT to the output directory}
WORK=${WORK:-/tmp/issue27}
PY=${PY:-python3}
QUANT=float,dq_w2a2,dq_w2a2_inertia,lsq_w2a2,latent_ste_w2a2
BF16=float_bf16,dq_w2a2_bf16,dq_w2a2_inertia_bf16,lsq_w2a2_bf16,latent_ste_w2a2_bf16
# Sizes: issue 27's, or toy ones under SMOKE=1 (same items, methods and flags).
# (A CPU compiles slower than the GPU runs these: SMOKE scales the items' time limits by 4,
# and gives largest_batch a memory size, which a CPU device does not report.)
if [ -n "${SMOKE:-}" ]; then
  B20=8 B18=2 B50=2 BIG="2,4" REP=1 STEPS=1 ROUNDS=1 SCALE=4 MEM=--memory_gb=4
else
  B20=128 B18=128 B50=256 BIG="128,256" REP="" STEPS=5 ROUNDS=3 SCALE=1 MEM=""
fi
rep() { echo "${REP:-$1}"; }  # repeats: the item's own, or 1 under SMOKE

bundle() {  # $OUT <- the bar's JSONs and two archives of $WORK (<= 8 files come back)
  local f
  for f in step_time_resnet20_gpu.json step_time_resnet18_gpu.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"
  done
  tar czf "$OUT/issue27.tar.gz" -C "$WORK" --exclude='./trace_*' --exclude=./site . 2>/dev/null
  if compgen -G "$WORK/trace_*" > /dev/null; then
    (cd "$WORK" && tar czf "$OUT/issue27_traces.tar.gz" trace_*)
  fi
}

item() {  # item NAME LIMIT_S CMD...   (DRY=1: print the commands, run nothing)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ]; then
    local want=0 p
    for p in ${ONLY//,/ }; do [[ $name == "$p"* ]] && want=1; done
    [ $want = 1 ] || return 0
  fi
  if [ -n "${DRY:-}" ]; then echo "$*"; return; fi
  echo "$(date +%T) start $name" >> "$OUT/log.txt"
  timeout "$((limit * SCALE))" "$@" > "$WORK/$name.txt" 2>&1
  local rc=$?  # before any other expansion resets $?
  echo "$(date +%T) end $name rc=$rc" >> "$OUT/log.txt"
  bundle
}

if [ -z "${DRY:-}" ]; then
  mkdir -p "$OUT" "$WORK"
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl >> "$OUT/log.txt" 2>&1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  echo "$(date +%T) preflight (SMOKE=${SMOKE:-}, ONLY=${ONLY:-})" >> "$OUT/log.txt"
  if ! $PY -c "
import importlib, sys
sys.path.insert(0, '.')
import jax
for m in ('flax', 'optax', 'orbax.checkpoint', 'chex', 'ml_collections', 'etils'):
    print(m, getattr(importlib.import_module(m), '__version__', '?'))
from bench import step_time  # the program itself (dq_jax.train, models, optimizer)
print('jax', jax.__version__, jax.devices())
" >> "$OUT/log.txt" 2>&1; then
    echo "preflight FAILED: the program does not import here (see above); carry the missing" \
      "package as a wheel (bench/issue27_gpu.sh's header)" >> "$OUT/log.txt"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/log.txt" 2>&1
fi

# 1. the step ratios the bar reads (float32 and bfloat16 rows in one process per model)
item step_resnet20 240 $PY bench/step_time.py --model=resnet20 --batch=$B20 --repeats=$(rep 20) \
  --methods=$QUANT,$BF16 --json="$WORK/step_time_resnet20_gpu.json"
item step_resnet18 300 $PY bench/step_time.py --model=resnet18 --batch=$B18 --repeats=$(rep 10) \
  --methods=$QUANT,$BF16 --json="$WORK/step_time_resnet18_gpu.json"
# 2. the profile: per-piece times of the DQ step, and jax.profiler traces (kernels per method)
item profile_resnet20 150 $PY bench/step_time.py --model=resnet20 --batch=$B20 --repeats=$(rep 10) \
  --methods=float,dq_w2a2,lsq_w2a2,latent_ste_w2a2 --profile --trace_dir="$WORK/trace_resnet20" \
  --json="$WORK/profile_resnet20_gpu.json"
item kernels_resnet20 150 $PY bench/kernel_table.py --model=resnet20 --batch=$B20 --steps=$STEPS \
  --methods=float,dq_w2a2,lsq_w2a2,latent_ste_w2a2 --json="$WORK/kernel_table_resnet20_gpu.json"
# 3. compile ratio on the GPU
item compile_resnet20 150 $PY bench/compile_time.py --model=resnet20 --batch=$B20 --rounds=$ROUNDS \
  --methods=float,dq_w2a2,dq_w2a2_inertia --counts --json="$WORK/compile_time_resnet20_gpu.json"
# 4. ResNet-50 224x224 b256 bfloat16: images/s and step memory, one method per process (the
#    device's peak_bytes_in_use is per process), then the largest batch from XLA's plan
for m in float_bf16 dq_w2a2_bf16 lsq_w2a2_bf16 latent_ste_w2a2_bf16; do
  item "step_resnet50_$m" 150 $PY bench/step_time.py --model=resnet50 --batch=$B50 \
    --repeats=$(rep 5) --warmup=1 --methods=$m --json="$WORK/step_time_resnet50_${m}_gpu.json"
done
item largest_batch_resnet50 240 $PY bench/largest_batch.py --model=resnet50 --batches=$BIG $MEM \
  --methods=float_bf16,dq_w2a2_bf16,latent_ste_w2a2_bf16 --json="$WORK/largest_batch_resnet50_gpu.json"
[ -n "${DRY:-}" ] || { echo "$(date +%T) done" >> "$OUT/log.txt"; bundle; }
