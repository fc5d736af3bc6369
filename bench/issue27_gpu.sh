#!/usr/bin/env bash
# Issue 27's GPU items as one script, most needed first (a lent GPU gives ~15 device minutes).
#   OUT=/path/to/dir bash bench/issue27_gpu.sh          # on the GPU machine (device tool: $OUT)
#   DRY=1 OUT=/tmp/x bash bench/issue27_gpu.sh         # print the commands only
#   ONLY=step_resnet50,largest OUT=dir bash bench/issue27_gpu.sh   # items whose names start so
# One device call runs at most 10 minutes: a call that is cut off keeps the items it finished
# (and step_time's rows so far, marked incomplete); the next call resumes with ONLY=...
# Timing rows run one process at a time (processes sharing the GPU would time each other).
# Each item has its own time limit and a failure does not stop the next; `$OUT/log.txt` says
# which ran. Copy step_time_resnet{20,18}_gpu.json to results/ (bar gpu-step-ratio reads them).
set -u
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
PY=${PY:-python}
QUANT=float,dq_w2a2,dq_w2a2_inertia,lsq_w2a2,latent_ste_w2a2
BF16=float_bf16,dq_w2a2_bf16,dq_w2a2_inertia_bf16,lsq_w2a2_bf16,latent_ste_w2a2_bf16

item() {  # item NAME LIMIT_S CMD...   (DRY=1: print the commands, run nothing)
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ]; then
    local want=0 p
    for p in ${ONLY//,/ }; do [[ $name == "$p"* ]] && want=1; done
    [ $want = 1 ] || return 0
  fi
  if [ -n "${DRY:-}" ]; then echo "$*"; return; fi
  echo "$(date +%T) start $name" >> "$OUT/log.txt"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$(date +%T) end $name rc=$?" >> "$OUT/log.txt"
}

# 1. the step ratios the bar reads (float32 and bfloat16 rows in one process per model)
item step_resnet20 240 $PY bench/step_time.py --model=resnet20 --batch=128 --repeats=20 \
  --methods=$QUANT,$BF16 --json="$OUT/step_time_resnet20_gpu.json"
item step_resnet18 300 $PY bench/step_time.py --model=resnet18 --batch=128 --repeats=10 \
  --methods=$QUANT,$BF16 --json="$OUT/step_time_resnet18_gpu.json"
# 2. the profile: per-piece times of the DQ step, and jax.profiler traces (kernels per method)
item profile_resnet20 150 $PY bench/step_time.py --model=resnet20 --batch=128 --repeats=10 \
  --methods=float,dq_w2a2,lsq_w2a2,latent_ste_w2a2 --profile --trace_dir="$OUT/trace_resnet20" \
  --json="$OUT/profile_resnet20_gpu.json"
item kernels_resnet20 150 $PY bench/kernel_table.py --model=resnet20 --batch=128 --steps=5 \
  --methods=float,dq_w2a2,lsq_w2a2,latent_ste_w2a2 --json="$OUT/kernel_table_resnet20_gpu.json"
# 3. compile ratio on the GPU
item compile_resnet20 150 $PY bench/compile_time.py --model=resnet20 --batch=128 --rounds=3 \
  --methods=float,dq_w2a2,dq_w2a2_inertia --counts --json="$OUT/compile_time_resnet20_gpu.json"
# 4. ResNet-50 224x224 b256 bfloat16: images/s and step memory, one method per process (the
#    device's peak_bytes_in_use is per process), then the largest batch from XLA's plan
for m in float_bf16 dq_w2a2_bf16 lsq_w2a2_bf16 latent_ste_w2a2_bf16; do
  item "step_resnet50_$m" 150 $PY bench/step_time.py --model=resnet50 --batch=256 --repeats=5 \
    --warmup=1 --methods=$m --json="$OUT/step_time_resnet50_${m}_gpu.json"
done
item largest_batch_resnet50 240 $PY bench/largest_batch.py --model=resnet50 --batches=128,256 \
  --methods=float_bf16,dq_w2a2_bf16,latent_ste_w2a2_bf16 --json="$OUT/largest_batch_resnet50_gpu.json"
[ -n "${DRY:-}" ] || echo "$(date +%T) done" >> "$OUT/log.txt"
