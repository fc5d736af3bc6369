#!/usr/bin/env bash
# Cloud TPU VM launcher for dq_jax: create a TPU VM (one host or a pod slice), install the
# package on every worker, run `python -m dq_jax.main` on all workers, follow logs, delete.
# Every gcloud call goes through `run_cmd`, so `--dry-run` prints exactly what would run.
# Step-by-step guide: launch/README.md.  Usage: launch/tpu_vm.sh --help
set -euo pipefail

PROG="launch/tpu_vm.sh"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEFAULT_REPO="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [flags] [--config.KEY=VALUE ...] [-- MAIN_ARGS]

Commands (run them in this order; `all` = create + setup + run):
  create   gcloud compute tpus tpu-vm create (needs --accelerator-type)
  setup    copy the repo (local path) or clone it (git URL) to every worker, make a Python venv
           there and `pip install -e` dq_jax plus jax[tpu] in setup.py's jax range
  run      start `python -m dq_jax.main --config=... --workdir=...` on all workers
           (gcloud ... ssh --worker=all) in the background and stream their logs; Ctrl-C stops
           the streaming only, the job keeps running. Rerun `run` to resume from the latest
           checkpoint in --workdir (e.g. after a preemption, once the TPU is back).
  logs     follow the log of one worker (--worker, default 0; `all` for every worker)
  stop     stop a running job (SIGTERM to the process that `run` started, on all workers)
  status   gcloud ... describe: state (READY, PREEMPTED, ...) and accelerator type
  delete   delete the TPU VM (only ever on this explicit command; gcloud asks to confirm)
  all      create, setup, run

Flags (FLAG=VALUE or FLAG VALUE):
  --name NAME              TPU VM name (required; lowercase letters, digits, '-')
  --zone ZONE              e.g. us-central2-b, europe-west4-a (required)
  --project PROJECT        GCP project (default: gcloud's configured core/project)
  --accelerator-type TYPE  e.g. v3-8, v3-32, v4-32, v5p-32, v5litepod-16, v6e-16
                           (required by create/all; lets run accept a non-gs:// workdir on a
                           single-host TPU)
  --version VERSION        TPU software version; default per generation: v2/v3/v4:
                           tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v5e (v5litepod):
                           v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e
  --spot | --preemptible   create a Spot / preemptible TPU VM (cheaper, can be preempted)
  --create-flag FLAG       extra flag for `tpu-vm create`, repeatable
                           (e.g. --create-flag=--network=my-net --create-flag=--internal-ips)
  --config PATH            config file relative to the repo root, e.g. configs/imagenet_resnet.py
                           (required by run/all)
  --workdir DIR            checkpoints/TensorBoard/results (required by run/all); must be
                           gs://BUCKET/... on a multi-host TPU (all hosts write one directory)
  --config.KEY=VALUE       config override passed to dq_jax.main (repeatable)
  -- ARGS                  everything after `--` is passed to dq_jax.main verbatim
  --env KEY=VALUE          environment variable for the job on every worker (repeatable)
  --repo PATH|URL          what `setup` installs: a local checkout (copied, uncommitted
                           changes included; default: this script's repository) or a git URL
  --git-ref REF            branch/tag/commit to check out when --repo is a git URL
  --remote-dir DIR         repo directory in each worker's home (default dq_jax)
  --venv DIR               venv directory in each worker's home (default dq_jax_venv)
  --python-version X.Y     Python of that venv, made with uv (default 3.11)
  --worker N|all           worker for `logs` (default 0)
  --lines N                `logs`: lines of history to show first (default 100)
  --no-follow              run: start the job, check it is still up after --startup-wait
                           seconds (default 10), return; logs: print and return
  --dry-run                print each command (`+ ...`, one per line) without running anything
  -h, --help               this text

Multi-host: on a pod slice (e.g. v3-32 = 4 hosts) `run` starts one process per host. JAX on a
TPU VM finds the other hosts itself (libtpu / GCE metadata: JAX auto-detects the coordinator).
`run` exports DQ_JAX_DISTRIBUTED=auto on multi-host slices, so dq_jax's maybe_initialize()
calls jax.distributed.initialize() (auto-detection); see launch/README.md.

Example:
  launch/tpu_vm.sh all --name=dq-v4 --zone=us-central2-b --accelerator-type=v4-32 --spot \
      --config=configs/imagenet_resnet.py --workdir=gs://MY_BUCKET/dq/resnet18_w2a2 \
      --config.data_dir=gs://MY_BUCKET/tfds
EOF
}

die() {  # die MESSAGE: one clear line, exit 2
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

die_usage() {  # die_usage MESSAGE: the message, then the usage text
  echo "$PROG: error: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

note() { echo "$PROG: $*" >&2; }

# Shell-quote one word so that a printed command can be pasted back into a shell.
q() {
  local s=$1 safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ -n $s && $s =~ $safe ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

qjoin() {  # qjoin WORD...: the words, quoted, separated by spaces
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

run_cmd() {  # dry run: print `+ CMD`; else print it to stderr and run it
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(qjoin "$@")"
  else
    printf '+ %s\n' "$(qjoin "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# Flags
SUBCMD="" NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" CONFIG="" WORKDIR="" REPO="" GIT_REF=""
REMOTE_DIR="dq_jax" VENV="dq_jax_venv" PY_VERSION="3.11" WORKER="0" LINES="100" STARTUP_WAIT="10"
SPOT=0 PREEMPTIBLE=0 DRY_RUN=0 FOLLOW=1
ENVS=() OVERRIDES=() PASSTHRU=() CREATE_FLAGS=()

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
    -*) die_usage "unknown flag '$arg'" ;;
    *)
      if [[ -z $SUBCMD ]]; then SUBCMD=$arg; shift; continue; fi
      die_usage "unexpected argument '$arg' (overrides are --config.KEY=VALUE; other arguments for dq_jax.main go after '--')" ;;
  esac
  case $key in
    --name|--zone|--project|--accelerator-type|--version|--config|--workdir|--repo|--git-ref|\
    --remote-dir|--venv|--python-version|--worker|--lines|--env|--create-flag|--startup-wait)
      if ((!has_val)); then
        if (($# < 2)) || [[ $2 == --* && $key != --create-flag ]]; then die "$key needs a value"; fi
        val=$2; shift
      fi
      [[ -n $val ]] || die "$key needs a non-empty value"
      case $key in
        --name) NAME=$val ;; --zone) ZONE=$val ;; --project) PROJECT=$val ;;
        --accelerator-type) ACCEL=$val ;; --version) VERSION=$val ;; --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;; --repo) REPO=$val ;; --git-ref) GIT_REF=$val ;;
        --remote-dir) REMOTE_DIR=$val ;; --venv) VENV=$val ;; --python-version) PY_VERSION=$val ;;
        --worker) WORKER=$val ;; --lines) LINES=$val ;; --startup-wait) STARTUP_WAIT=$val ;;
        --env) ENVS+=("$val") ;; --create-flag) CREATE_FLAGS+=("$val") ;;
      esac ;;
    --spot|--preemptible|--dry-run|--no-follow)
      ((!has_val)) || die "$key takes no value"
      case $key in
        --spot) SPOT=1 ;; --preemptible) PREEMPTIBLE=1 ;; --dry-run) DRY_RUN=1 ;;
        --no-follow) FOLLOW=0 ;;
      esac ;;
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
# Validation
case $SUBCMD in
  create|setup|run|logs|stop|status|delete|all) ;;
  "") die_usage "missing COMMAND (one of: create setup run logs stop status delete all)" ;;
  *) die_usage "unknown command '$SUBCMD' (one of: create setup run logs stop status delete all)" ;;
esac

[[ -n $NAME ]] || die_usage "missing required flag --name (the TPU VM name)"
[[ -n $ZONE ]] || die_usage "missing required flag --zone (e.g. --zone=us-central2-b)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)"
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible are exclusive: pick one"
for v in "$REMOTE_DIR" "$VENV"; do
  [[ $v =~ ^[A-Za-z0-9._-]+$ && $v != . && $v != .. ]] ||
    die "--remote-dir/--venv must be a plain directory name in the worker's home (got '$v')"
done
[[ $PY_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11 (got '$PY_VERSION')"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker index or 'all' (got '$WORKER')"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number (got '$LINES')"
[[ $STARTUP_WAIT =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--startup-wait must be a number of seconds (got '$STARTUP_WAIT')"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE (got '$kv')"
done

# Accelerator type -> hosts and default software version.
# v2/v3/v4/v5p-N: N TensorCores, 8 per host. v5e (v5litepod-N) / v6e-N: N chips; up to 8 chips
# fit one host, larger slices have 4 chips per host.
HOSTS=""          # empty: unknown
DEFAULT_VERSION=""
if [[ -n $ACCEL ]]; then
  n=${ACCEL##*-}
  case $ACCEL in
    v2-*|v3-*|v4-*|v5p-*|v5litepod-*|v6e-*)
      [[ $n =~ ^[1-9][0-9]*$ ]] || die "--accelerator-type '$ACCEL': expected GENERATION-SIZE, e.g. v4-32" ;;
  esac
  case $ACCEL in
    v2-*|v3-*|v4-*) HOSTS=$(((n + 7) / 8)); DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
    v5p-*)          HOSTS=$(((n + 7) / 8)); DEFAULT_VERSION="v2-alpha-tpuv5" ;;
    v5litepod-*)    HOSTS=$((n <= 8 ? 1 : n / 4)); DEFAULT_VERSION="v2-alpha-tpuv5-lite" ;;
    v6e-*)          HOSTS=$((n <= 8 ? 1 : n / 4)); DEFAULT_VERSION="v2-alpha-tpuv6e" ;;
    *) note "unrecognised accelerator type '$ACCEL': treating it as multi-host; give --version" ;;
  esac
fi
if [[ -z $VERSION ]]; then VERSION=$DEFAULT_VERSION; fi

needs_create=0 needs_setup=0 needs_run=0
case $SUBCMD in
  create) needs_create=1 ;; setup) needs_setup=1 ;; run) needs_run=1 ;;
  all) needs_create=1 needs_setup=1 needs_run=1 ;;
esac

if ((needs_create)); then
  [[ -n $ACCEL ]] || die_usage "missing required flag --accelerator-type for '$SUBCMD' (e.g. --accelerator-type=v4-32)"
  [[ -n $VERSION ]] || die "no default TPU software version for '$ACCEL': give --version"
fi

if [[ -z $REPO ]]; then REPO=$DEFAULT_REPO; fi
REPO_IS_GIT=0
if [[ $REPO =~ ^(https?|ssh|git|file)://|^[A-Za-z0-9._-]+@[^:]+: ]]; then
  REPO_IS_GIT=1
elif ((needs_setup || needs_run)); then
  [[ -d $REPO ]] || die "--repo '$REPO' is neither a directory nor a git URL"
  REPO=$(cd "$REPO" && pwd)
  [[ -f $REPO/setup.py && -d $REPO/dq_jax ]] || die "--repo '$REPO' is not a dq_jax checkout (no setup.py + dq_jax/)"
fi
[[ -z $GIT_REF || $REPO_IS_GIT == 1 ]] || die "--git-ref only applies when --repo is a git URL"

if ((needs_run)); then
  [[ -n $CONFIG ]] || die_usage "missing required flag --config for '$SUBCMD' (e.g. --config=configs/imagenet_resnet.py)"
  [[ -n $WORKDIR ]] || die_usage "missing required flag --workdir for '$SUBCMD' (e.g. --workdir=gs://MY_BUCKET/dq/run1)"
  [[ $CONFIG != /* ]] || die "--config must be relative to the repository root (e.g. configs/imagenet_resnet.py): it is read on the workers, in ~/$REMOTE_DIR"
  if ((!REPO_IS_GIT)) && [[ ! -f $REPO/$CONFIG ]]; then
    die "--config '$CONFIG' not found in $REPO"
  fi
  if [[ $WORKDIR != gs://* ]]; then
    if [[ -z $HOSTS ]]; then
      die "--workdir must be a gs:// path unless the TPU is known to be single-host: '$WORKDIR' is not (pass --accelerator-type, e.g. v3-8, for a single-host TPU)"
    elif ((HOSTS > 1)); then
      die "--workdir must be a gs://BUCKET/... path on a multi-host TPU ($ACCEL has $HOSTS hosts, all writing the same checkpoints): '$WORKDIR' is a local path, a different disk on each host"
    fi
    note "warning: local --workdir '$WORKDIR' lives on the TPU VM's disk and is lost with the VM (use gs:// to resume after preemption)"
  fi
fi

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud CLI (launch/README.md, step 1) or add --dry-run"
fi

# ---------------------------------------------------------------------------------------------
# Commands
GC=(gcloud compute tpus tpu-vm)
SCOPE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then SCOPE+=("--project=$PROJECT"); fi
# Remote paths, double-quoted for (and $HOME expanded by) the worker's shell.
rpath() { printf '"$HOME/%s"' "$1"; }
RDIR=$(rpath "$REMOTE_DIR") RPY=$(rpath "$VENV/bin/python") RVENV=$(rpath "$VENV")
LOG=$(rpath dq_jax_run.log) PIDF=$(rpath dq_jax_run.pid) RTAR=$(rpath dq_jax_src.tar.gz)
TAG='[$(hostname)]'

jax_requirement() {  # jax range from setup.py, as jax[tpu]
  local spec=""
  if [[ -f $DEFAULT_REPO/setup.py ]]; then
    spec=$(grep -oE '"jax[<>=!~][^"]*"' "$DEFAULT_REPO/setup.py" | head -n 1 | tr -d '"') || true
  fi
  spec=${spec:-jax>=0.10.2,<0.11}
  printf 'jax[tpu]%s' "${spec#jax}"
}

do_create() {
  local cmd=("${GC[@]}" create "$NAME" "${SCOPE[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  if ((PREEMPTIBLE)); then cmd+=(--preemptible); fi
  cmd+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  note "creating $ACCEL (${HOSTS:-?} host(s)), software version $VERSION"
  run_cmd "${cmd[@]}"
}

do_setup() {
  local fetch install
  if ((REPO_IS_GIT)); then
    fetch="rm -rf $RDIR; git clone -q $(q "$REPO") $RDIR"
    if [[ -n $GIT_REF ]]; then fetch+="; git -C $RDIR checkout -q $(q "$GIT_REF")"; fi
  else
    local tarball="${TMPDIR:-/tmp}/dq_jax_src_${NAME}.tar.gz"
    # Copy the working tree as it is (uncommitted changes included), without VCS/venv/caches.
    COPYFILE_DISABLE=1 run_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=venv \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=build \
      --exclude=dist -C "$REPO" .
    run_cmd "${GC[@]}" scp "$tarball" "$NAME:dq_jax_src.tar.gz" --worker=all "${SCOPE[@]}"
    if ((!DRY_RUN)); then rm -f "$tarball"; fi
    fetch="rm -rf $RDIR; mkdir -p $RDIR; tar -xzf $RTAR -C $RDIR; rm -f $RTAR"
  fi
  # Python >= 3.11 (jax/numpy ranges of setup.py) via uv: TPU images ship Ubuntu 22.04's 3.10.
  install="export PATH=\"\$HOME/.local/bin:\$PATH\""
  install+="; command -v uv >/dev/null 2>&1 || python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv"
  install+="; [ -x $RPY ] || uv venv -q --seed --python $PY_VERSION $RVENV"
  install+="; $RPY -m pip install -q -U pip"
  install+="; $RPY -m pip install -e \"$RDIR[train]\" \"$(jax_requirement)\""
  install+="; echo \"$TAG dq_jax installed, jax \$($RPY -c \"import jax, dq_jax; print(jax.__version__)\")\""
  run_cmd "${GC[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all --command="set -e; $fetch; $install"
}

do_run() {
  local prog env_exports="" kv remote
  prog="$RPY -m dq_jax.main $(qjoin "--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${PASSTHRU[@]+"${PASSTHRU[@]}"})"
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do env_exports+="export ${kv%%=*}=$(q "${kv#*=}"); "; done
  # Multi-host slices: have dq_jax call jax.distributed.initialize() (JAX auto-detects the pod).
  if [[ -z $HOSTS || $HOSTS -gt 1 ]]; then env_exports+="export DQ_JAX_DISTRIBUTED=auto; "; fi
  remote="cd $RDIR || { echo \"$TAG ~/$REMOTE_DIR missing: run setup first\" >&2; exit 1; }"
  remote+="; if [ -f $PIDF ] && kill -0 \"\$(cat $PIDF)\" 2>/dev/null; then echo \"$TAG dq_jax still running (pid \$(cat $PIDF)): stop it, or wait until it has exited\" >&2; exit 1; fi"
  remote+="; ${env_exports}off=\$(( \$(stat -c %s $LOG 2>/dev/null || echo 0) + 1 ))"
  remote+="; echo \"=== \$(date -u +%FT%TZ) start\" >> $LOG"
  # setsid + nohup: the job survives the end of this ssh session (Ctrl-C, network loss).
  remote+="; setsid nohup $prog >> $LOG 2>&1 < /dev/null & pid=\$!; echo \$pid > $PIDF"
  remote+="; echo \"$TAG dq_jax started (pid \$pid), log: ~/dq_jax_run.log\""
  if ((FOLLOW)); then
    remote+="; tail -c +\$off -F --pid=\$pid $LOG 2>/dev/null | sed -u \"s/^/$TAG /\"; wait \$pid"
  else
    remote+="; sleep $STARTUP_WAIT; if ! kill -0 \$pid 2>/dev/null; then tail -n 30 $LOG | sed \"s/^/$TAG /\"; wait \$pid; fi"
  fi
  note "job: python -m dq_jax.main $(qjoin "--config=$CONFIG" "--workdir=$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${PASSTHRU[@]+"${PASSTHRU[@]}"}) on ${HOSTS:-all} host(s)"
  run_cmd "${GC[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$remote"
}

do_logs() {
  local follow=""
  if ((FOLLOW)); then follow=" -F"; fi
  run_cmd "${GC[@]}" ssh "$NAME" "${SCOPE[@]}" "--worker=$WORKER" \
    --command="tail -n $LINES$follow $LOG | sed -u \"s/^/$TAG /\""
}

do_stop() {
  run_cmd "${GC[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all \
    --command="if [ -f $PIDF ] && kill \"\$(cat $PIDF)\" 2>/dev/null; then echo \"$TAG SIGTERM sent to dq_jax (pid \$(cat $PIDF)): it checkpoints and exits\"; else echo \"$TAG dq_jax not running\"; fi"
}

case $SUBCMD in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  status) run_cmd "${GC[@]}" describe "$NAME" "${SCOPE[@]}" "--format=value(state,acceleratorType)" ;;
  delete) run_cmd "${GC[@]}" delete "$NAME" "${SCOPE[@]}" ;;
  all) do_create; do_setup; do_run ;;
esac
