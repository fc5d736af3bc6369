#!/usr/bin/env bash
# GPU launcher for dq_jax: one process per node, seeing all of the node's (selected) GPUs.
# One node: just runs `python -m dq_jax.main`. Several nodes: run this script once on every
# node with the same --coordinator/--num-nodes and its own --node-rank; it exports
# DQ_JAX_COORDINATOR / DQ_JAX_NUM_PROCESSES / DQ_JAX_PROCESS_ID, which dq_jax/distributed.py
# passes to jax.distributed.initialize(). Guide: launch/README.md. Usage: --help
set -euo pipefail

PROG="launch/multi_gpu.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/multi_gpu.sh --config=CONFIG --workdir=DIR [flags] [--config.KEY=VALUE ...] [-- MAIN_ARGS]

One node, all its GPUs (one process sees every local GPU; the batch is sharded over them):
  launch/multi_gpu.sh --config=configs/imagenet_resnet.py --workdir=/data/runs/r18_w2a2
One node, only the first 4 GPUs:
  launch/multi_gpu.sh --gpus 4 --config=... --workdir=...
Two nodes (run on each node; node 0's address must be reachable from node 1):
  node0$ launch/multi_gpu.sh --num-nodes 2 --node-rank 0 --coordinator 10.0.0.1:12345 --config=... --workdir=/shared/run
  node1$ launch/multi_gpu.sh --num-nodes 2 --node-rank 1 --coordinator 10.0.0.1:12345 --config=... --workdir=/shared/run

Flags (FLAG=VALUE or FLAG VALUE):
  --config PATH             experiment config, e.g. configs/imagenet_resnet.py (required)
  --workdir DIR             checkpoints/TensorBoard/results (required); with several nodes a
                            directory all nodes share (NFS, gs://, ...)
  --config.KEY=VALUE        config override passed to dq_jax.main (repeatable)
  -- ARGS                   everything after `--` goes to dq_jax.main verbatim
  --gpus N                  use GPUs 0..N-1 of this node (sets CUDA_VISIBLE_DEVICES);
                            default: all GPUs, CUDA_VISIBLE_DEVICES left as it is
  --cuda-visible-devices L  use exactly these GPUs, e.g. 2,3 (sets CUDA_VISIBLE_DEVICES)
  --num-nodes N             number of nodes = processes (default 1)
  --node-rank R             this node's index, 0..N-1 (default 0; node 0 hosts the coordinator)
  --coordinator HOST:PORT   node 0's address and a free port (required when --num-nodes > 1)
  --python PATH             interpreter with dq_jax + jax[cuda12] (default: $PYTHON or python3)
  --dry-run                 print the environment and the command instead of running it
  -h, --help                this text

Install (per node, Python 3.11, CUDA 12 driver):
  python3 -m venv .venv && .venv/bin/pip install -e '.[train]' "jax[cuda12]>=0.10.2,<0.11"
  (the jax[cuda12] range must match setup.py's jax range; check: .venv/bin/python -c
   "import jax; print(jax.devices())" lists the GPUs)
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

die_usage() {
  echo "$PROG: error: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

q() {  # shell-quote one word for printing
  local s=$1 safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ -n $s && $s =~ $safe ]]; then printf '%s' "$s"; else printf "'%s'" "${s//\'/\'\\\'\'}"; fi
}

CONFIG="" WORKDIR="" GPUS="" CUDA_DEVICES="" NUM_NODES="1" NODE_RANK="0" COORDINATOR=""
PYTHON_BIN="${PYTHON:-python3}" DRY_RUN=0
OVERRIDES=() PASSTHRU=()

if (($# == 0)); then usage; exit 2; fi
while (($#)); do
  arg=$1
  case $arg in
    --) shift; PASSTHRU+=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --config.*=*) OVERRIDES+=("$arg"); shift; continue ;;
    --config.*) die "write config overrides as --config.KEY=VALUE (got '$arg')" ;;
    --*=*) key=${arg%%=*} val=${arg#*=} has_val=1 ;;
    --*) key=$arg val="" has_val=0 ;;
    *) die_usage "unexpected argument '$arg' (overrides are --config.KEY=VALUE; other arguments for dq_jax.main go after '--')" ;;
  esac
  case $key in
    --config|--workdir|--gpus|--cuda-visible-devices|--num-nodes|--node-rank|--coordinator|--python)
      if ((!has_val)); then
        if (($# < 2)) || [[ $2 == --* ]]; then die "$key needs a value"; fi
        val=$2; shift
      fi
      [[ -n $val ]] || die "$key needs a non-empty value"
      case $key in
        --config) CONFIG=$val ;; --workdir) WORKDIR=$val ;; --gpus) GPUS=$val ;;
        --cuda-visible-devices) CUDA_DEVICES=$val ;; --num-nodes) NUM_NODES=$val ;;
        --node-rank) NODE_RANK=$val ;; --coordinator) COORDINATOR=$val ;; --python) PYTHON_BIN=$val ;;
      esac ;;
    --dry-run) ((!has_val)) || die "$key takes no value"; DRY_RUN=1 ;;
    *) die_usage "unknown flag '$key'" ;;
  esac
  shift
done

# A --dry-run anywhere, even among the arguments after `--`, means: run nothing.
if ((${#PASSTHRU[@]})); then
  kept=()
  for a in ${PASSTHRU[@]+"${PASSTHRU[@]}"}; do
    if [[ $a == --dry-run ]]; then DRY_RUN=1; else kept+=("$a"); fi
  done
  PASSTHRU=(${kept[@]+"${kept[@]}"})
fi

# ---------------------------------------------------------------------------------------------
[[ -n $CONFIG ]] || die_usage "missing required flag --config (e.g. --config=configs/imagenet_resnet.py)"
[[ -n $WORKDIR ]] || die_usage "missing required flag --workdir"
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "--num-nodes must be a positive integer (got '$NUM_NODES')"
[[ $NODE_RANK =~ ^[0-9]+$ ]] || die "--node-rank must be an integer >= 0 (got '$NODE_RANK')"
((NODE_RANK < NUM_NODES)) ||
  die "--node-rank $NODE_RANK is out of range for --num-nodes $NUM_NODES (ranks are 0..$((NUM_NODES - 1)))"
if [[ -n $GPUS && -n $CUDA_DEVICES ]]; then
  die "--gpus and --cuda-visible-devices are exclusive: --gpus N means GPUs 0..N-1"
fi
[[ -z $GPUS || $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer (got '$GPUS')"
[[ -z $CUDA_DEVICES || $CUDA_DEVICES =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  die "--cuda-visible-devices must be a comma-separated list of GPU indices, e.g. 0,1 (got '$CUDA_DEVICES')"
if ((NUM_NODES > 1)); then
  [[ -n $COORDINATOR ]] ||
    die "--coordinator HOST:PORT is required with --num-nodes $NUM_NODES (node 0's address and a free port, the same on every node)"
  [[ $COORDINATOR =~ ^[^:/[:space:]]+:[0-9]+$ ]] ||
    die "--coordinator must be HOST:PORT, e.g. 10.0.0.1:12345 (got '$COORDINATOR')"
  if [[ $WORKDIR != *://* ]]; then
    echo "$PROG: note: with $NUM_NODES nodes --workdir must be one directory all nodes share (NFS or gs://): '$WORKDIR'" >&2
  fi
elif [[ -n $COORDINATOR ]]; then
  echo "$PROG: note: --coordinator ignored with --num-nodes 1 (a single process needs no coordinator)" >&2
  COORDINATOR=""
fi

# The config is a file path; accept it relative to the current directory or to the repo.
if [[ -f $CONFIG ]]; then
  :
elif [[ $CONFIG != /* && -f $REPO/$CONFIG ]]; then
  CONFIG="$REPO/$CONFIG"
else
  die "--config '$CONFIG' not found (relative to $(pwd) or $REPO)"
fi

# ---------------------------------------------------------------------------------------------
SETS=() UNSETS=()
if [[ -n $GPUS ]]; then
  SETS+=("CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((GPUS - 1)))")
elif [[ -n $CUDA_DEVICES ]]; then
  SETS+=("CUDA_VISIBLE_DEVICES=$CUDA_DEVICES")
fi
if ((NUM_NODES > 1)); then
  SETS+=("DQ_JAX_COORDINATOR=$COORDINATOR" "DQ_JAX_NUM_PROCESSES=$NUM_NODES" "DQ_JAX_PROCESS_ID=$NODE_RANK")
else
  for v in DQ_JAX_COORDINATOR DQ_JAX_NUM_PROCESSES DQ_JAX_PROCESS_ID; do
    if [[ -n ${!v:-} ]]; then UNSETS+=("$v"); fi   # a stale one would make it multi-process
  done
fi
SETS+=("PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}")   # dq_jax importable without install

CMD=("$PYTHON_BIN" -m dq_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${PASSTHRU[@]+"${PASSTHRU[@]}"})

show() {
  local kv w line="+"
  for v in ${UNSETS[@]+"${UNSETS[@]}"}; do echo "unset $v"; done
  for kv in "${SETS[@]}"; do echo "export ${kv%%=*}=$(q "${kv#*=}")"; done
  for w in "${CMD[@]}"; do line+=" $(q "$w")"; done
  echo "$line"
}

if ((DRY_RUN)); then
  show
  exit 0
fi
show >&2
for v in ${UNSETS[@]+"${UNSETS[@]}"}; do unset "$v"; done
for kv in "${SETS[@]}"; do export "${kv%%=*}=${kv#*=}"; done
exec "${CMD[@]}"
