"""launch/tpu_vm.sh and launch/multi_gpu.sh: the commands they print (--dry-run) and run.

Dry runs: the printed `+ gcloud ...` lines are parsed with shlex and checked flag by flag.
Execution: a fake `gcloud` on PATH plays one or two TPU workers on this machine (ssh runs
the --command in bash with HOME = the worker's directory, scp copies), and the worker's venv
python is a stub, so `setup` / `run` / `stop` really execute their remote shell code in seconds.
The real two-process CPU training run is opt-in (DQ_JAX_SLOW_LAUNCH_TESTS=1, ~2 min).
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
GPU = REPO / "launch" / "multi_gpu.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

BASE = ["--name=dq-test", "--zone=us-central2-b"]
RUN = ["--config=configs/digits.py", "--workdir=gs://bucket/dq/run1"]


@pytest.fixture(autouse=True)
def gcloud_guard(tmp_path, monkeypatch):
    """Puts a `gcloud` first on PATH that only records its calls: no test reaches the real one."""
    bindir = tmp_path / "guard_bin"
    bindir.mkdir()
    calls = tmp_path / "guard_calls"
    (bindir / "gcloud").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexit 99\n")
    (bindir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    yield calls


def sh(script: pathlib.Path, *args: str, env: dict | None = None, timeout: float = 30,
       cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    for k in ("DQ_JAX_COORDINATOR", "DQ_JAX_NUM_PROCESSES", "DQ_JAX_PROCESS_ID"):
        full_env.pop(k, None)
    full_env.update(env or {})
    return subprocess.run([BASH, str(script), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def dry(*args: str, **kw) -> list[list[str]]:
    """tpu_vm.sh --dry-run ARGS -> the printed commands, each split into words."""
    r = sh(TPU, "--dry-run", *args, **kw)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def gcloud(cmds: list[list[str]], verb: str) -> list[list[str]]:
    return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def flag(cmd: list[str], name: str) -> str | None:
    vals = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
    assert len(vals) <= 1, cmd
    return vals[0] if vals else None


def remote_words(cmd: list[str]) -> list[str]:
    """The words of the remote --command (shell-split, quotes removed)."""
    return shlex.split(flag(cmd, "--command"))


def setup_jax_spec() -> str:
    return re.search(r'"(jax[<>=!~][^"]*)"', (REPO / "setup.py").read_text()).group(1)


# ----------------------------------------------------------------------------- tpu_vm.sh create
def test_create_uses_accelerator_zone_version_project():
    (c,) = dry("create", *BASE, "--accelerator-type=v4-32", "--version=my-runtime",
               "--project=my-proj")
    assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dq-test"]
    assert flag(c, "--zone") == "us-central2-b"
    assert flag(c, "--accelerator-type") == "v4-32"
    assert flag(c, "--version") == "my-runtime"
    assert flag(c, "--project") == "my-proj"
    assert "--spot" not in c and "--preemptible" not in c


@pytest.mark.parametrize("accel,version", [
    ("v2-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_version_per_generation(accel, version):
    (c,) = dry("create", *BASE, f"--accelerator-type={accel}")
    assert flag(c, "--version") == version
    assert flag(c, "--project") is None


@pytest.mark.parametrize("opt", ["--spot", "--preemptible"])
def test_create_spot_or_preemptible_when_asked(opt):
    (c,) = dry("create", *BASE, "--accelerator-type", "v3-32", opt)  # also `--flag VALUE` form
    assert opt in c and flag(c, "--accelerator-type") == "v3-32"
    other = "--preemptible" if opt == "--spot" else "--spot"
    assert other not in c


def test_spot_and_preemptible_together_is_an_error():
    r = sh(TPU, "create", *BASE, "--accelerator-type=v3-8", "--spot", "--preemptible", "--dry-run")
    assert r.returncode != 0 and "--spot" in r.stderr and r.stdout == ""


def test_create_needs_accelerator_type():
    r = sh(TPU, "create", *BASE, "--dry-run")
    assert r.returncode != 0 and "--accelerator-type" in r.stderr and r.stdout == ""


# -------------------------------------------------------------------------------- tpu_vm.sh run
def test_run_on_all_workers_with_config_workdir_and_overrides():
    (c,) = dry("run", *BASE, "--accelerator-type=v3-32", *RUN, "--config.learning_rate=0.02",
               "--config.quant.weight_bits=3", "--config.note=two words", "--",
               "--variants=float,w2a2")
    assert c[4:6] == ["ssh", "dq-test"]
    assert flag(c, "--worker") == "all" and flag(c, "--zone") == "us-central2-b"
    words = remote_words(c)
    i = words.index("dq_jax.main")
    assert words[i - 1] == "-m" and words[i - 2].endswith("/dq_jax_venv/bin/python")
    assert words[i + 1:i + 8] == [
        "--config=configs/digits.py", "--workdir=gs://bucket/dq/run1",
        "--config.learning_rate=0.02", "--config.quant.weight_bits=3",
        "--config.note=two words", "--variants=float,w2a2", ">>"]


def test_run_env_and_project_reach_the_workers():
    (c,) = dry("run", *BASE, *RUN, "--project=p1", "--env", "TF_CPP_MIN_LOG_LEVEL=2")
    assert flag(c, "--project") == "p1"
    assert "export TF_CPP_MIN_LOG_LEVEL=2;" in flag(c, "--command")


@pytest.mark.parametrize("accel", ["v3-32", "v4-16", "v5litepod-16", "v6e-32", "v5p-128"])
def test_run_local_workdir_on_multi_host_is_an_error(accel):
    r = sh(TPU, "run", *BASE, f"--accelerator-type={accel}", "--config=configs/digits.py",
           "--workdir=/tmp/run1", "--dry-run")
    assert r.returncode != 0 and r.stdout == ""
    assert "gs://" in r.stderr and "multi-host" in r.stderr and accel in r.stderr


def test_run_local_workdir_unknown_host_count_is_an_error():
    r = sh(TPU, "run", *BASE, "--config=configs/digits.py", "--workdir=/tmp/run1", "--dry-run")
    assert r.returncode != 0 and "gs://" in r.stderr and "--accelerator-type" in r.stderr


@pytest.mark.parametrize("accel", ["v3-8", "v4-8", "v5litepod-8", "v6e-4"])
def test_run_local_workdir_on_single_host_is_allowed(accel):
    (c,) = dry("run", *BASE, f"--accelerator-type={accel}", "--config=configs/digits.py",
               "--workdir=/tmp/run1")
    assert "--workdir=/tmp/run1" in remote_words(c)


@pytest.mark.parametrize("missing", ["--config", "--workdir"])
def test_run_requires_config_and_workdir(missing):
    args = [a for a in RUN if not a.startswith(missing + "=")]
    r = sh(TPU, "run", *BASE, *args, "--dry-run")
    assert r.returncode != 0 and missing in r.stderr and "Usage:" in r.stderr


def test_run_rejects_a_config_missing_from_the_repo():
    r = sh(TPU, "run", *BASE, "--config=configs/nope.py", "--workdir=gs://b/r", "--dry-run")
    assert r.returncode != 0 and "configs/nope.py" in r.stderr


# ------------------------------------------------------------------------------ tpu_vm.sh setup
def test_setup_copies_the_repo_and_installs_jax_tpu_on_every_worker():
    cmds = dry("setup", *BASE, "--project=p1")
    tar, = [c for c in cmds if c[0] == "tar"]
    assert tar[tar.index("-C") + 1] == str(REPO)
    (scp,) = gcloud(cmds, "scp")
    assert flag(scp, "--worker") == "all" and scp[-4].endswith(".tar.gz")
    (ssh,) = gcloud(cmds, "ssh")
    assert flag(ssh, "--worker") == "all" and flag(ssh, "--project") == "p1"
    words = remote_words(ssh)
    i = words.index("-e")
    assert words[i - 2:i + 3] == ["pip", "install", "-e", "$HOME/dq_jax[train]",
                                  "jax[tpu]" + setup_jax_spec()[len("jax"):] + ";"]
    assert setup_jax_spec() == "jax>=0.10.2,<0.11"


def test_setup_from_git_url_clones():
    cmds = dry("setup", *BASE, "--repo=https://github.com/me/dq_jax.git", "--git-ref=v0.1")
    assert not [c for c in cmds if c[0] == "tar"] and not gcloud(cmds, "scp")
    (ssh,) = gcloud(cmds, "ssh")
    remote = flag(ssh, "--command")
    assert "git clone -q https://github.com/me/dq_jax.git" in remote
    assert "checkout -q v0.1" in remote


# ------------------------------------------------------------------- tpu_vm.sh all/delete/misc
def test_all_is_create_setup_run_in_order():
    cmds = dry("all", *BASE, "--accelerator-type=v4-32", "--spot", *RUN)
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["create", "tar", "scp", "ssh", "ssh"]
    assert "--spot" in cmds[0] and "dq_jax.main" in remote_words(cmds[-1])


@pytest.mark.parametrize("sub,extra", [
    ("create", ["--accelerator-type=v3-8"]), ("setup", []), ("run", RUN), ("logs", []),
    ("stop", []), ("status", []), ("all", ["--accelerator-type=v3-8", *RUN])])
def test_delete_appears_only_for_delete(sub, extra):
    cmds = dry(sub, *BASE, *extra)
    assert cmds and not gcloud(cmds, "delete")
    assert not any("delete" in c for c in cmds)
    assert not any(re.search(r"\bdelete\b", flag(c, "--command") or "") for c in cmds)


def test_delete_command():
    (c,) = dry("delete", *BASE, "--project=p1")
    assert c[4:6] == ["delete", "dq-test"] and flag(c, "--zone") == "us-central2-b"
    assert flag(c, "--project") == "p1" and "--quiet" not in c  # gcloud asks to confirm


def test_logs_follows_one_worker():
    (c,) = dry("logs", *BASE, "--worker=2")
    assert c[4] == "ssh" and flag(c, "--worker") == "2"
    assert "tail -n 100 -F" in flag(c, "--command")


@pytest.mark.parametrize("args,needle", [
    ((), "--name"),                                       # the brief's case
    (("--name=dq-test",), "--zone"),
    (("--zone=us-central2-b",), "--name"),
])
def test_missing_required_flag_is_named_with_usage(args, needle):
    r = sh(TPU, "create", "--accelerator-type=v3-8", *args, "--dry-run")
    assert r.returncode != 0 and r.stdout == ""
    assert f"missing required flag {needle}" in r.stderr and "Usage:" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (("bogus", *BASE), "unknown command"),
    (("run", *BASE, *RUN, "--bogus-flag=1"), "--bogus-flag"),
    (("run", *BASE, *RUN, "--config.lr", "0.1"), "--config.KEY=VALUE"),
    (("create", "--name=Bad_Name", "--zone=z", "--accelerator-type=v3-8"), "--name"),
    (("create", *BASE, "--accelerator-type=v4-abc"), "v4-abc"),
    (("create", *BASE, "--accelerator-type=v9-8"), "--version"),  # unknown generation
])
def test_bad_arguments_fail_clearly(args, needle):
    r = sh(TPU, *args, "--dry-run")
    assert r.returncode != 0 and needle in r.stderr and r.stdout == ""


def test_dry_run_runs_nothing(tmp_path, gcloud_guard):
    """The recording `gcloud` first on PATH is never called by a dry run, wherever the flag is."""
    dry("all", *BASE, "--accelerator-type=v3-8", *RUN)
    dry("delete", *BASE)
    r = sh(TPU, "run", *BASE, *RUN, "--", "--variants=w2a2", "--dry-run")   # after `--` too
    assert r.returncode == 0 and r.stdout.startswith("+ gcloud ")
    assert "--dry-run" not in r.stdout                      # not passed on to dq_jax.main
    assert not gcloud_guard.exists() and not list(tmp_path.glob("*.tar.gz"))


def test_without_dry_run_gcloud_is_called(gcloud_guard):
    """The counter-check of the guard: a real (non-dry) call reaches `gcloud`."""
    r = sh(TPU, "status", *BASE)
    assert r.returncode == 99 and "describe dq-test" in gcloud_guard.read_text()


def test_help_exits_zero():
    r = sh(TPU, "--help")
    assert r.returncode == 0 and "Usage: launch/tpu_vm.sh" in r.stdout


# ------------------------------------------------- tpu_vm.sh executed against a fake gcloud
FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake `gcloud compute tpus tpu-vm ...`: workers are $FAKE_TPU/w0, w1, ... (their $HOME).
set -u
echo "$*" >> "$FAKE_TPU/calls"
verb=$4; shift 4
worker=0 cmd=""
args=()
for a in "$@"; do
  case $a in --worker=*) worker=${a#--worker=} ;; --command=*) cmd=${a#--command=} ;;
    --*) ;; *) args+=("$a") ;; esac
done
if [[ $worker == all ]]; then workers=$(seq 0 $((FAKE_WORKERS - 1))); else workers=$worker; fi
case $verb in
  scp) for w in $workers; do mkdir -p "$FAKE_TPU/w$w"; cp "${args[0]}" "$FAKE_TPU/w$w/${args[1]#*:}"; done ;;
  ssh)
    pids=()
    for w in $workers; do
      mkdir -p "$FAKE_TPU/w$w"; HOME="$FAKE_TPU/w$w" bash -c "$cmd" & pids+=($!)
    done
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc ;;
  *) echo "fake gcloud: $verb" ;;
esac
"""

# `uv` on the worker: `uv venv ... DIR` makes DIR/bin/python a copy of the stub python below.
FAKE_UV = r"""#!/usr/bin/env bash
echo "uv $*" >> "$HOME/uv_calls"
if [[ $1 == venv ]]; then
  dir=${@: -1}; mkdir -p "$dir/bin"; cp "$FAKE_TPU/python_stub" "$dir/bin/python"
fi
"""

# The worker's venv python: pip calls are logged, `-m dq_jax.main` prints its argv and env,
# waits for $HOME/release (if FAKE_BLOCK) and exits with $FAKE_RC.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$HOME/python_calls"
case "$1 $2" in
  "-m pip") exit 0 ;;
  "-c "*) echo 0.10.2; exit 0 ;;
  "-m dq_jax.main")
    echo "main argv: ${*:3}"; echo "main env: MY_VAR=${MY_VAR:-} cwd=$(pwd)"
    if [[ -n ${FAKE_BLOCK:-} ]]; then
      trap 'echo "main got SIGTERM"; exit 143' TERM
      while [[ ! -f $HOME/release ]]; do sleep 0.05; done
    fi
    echo "main done"; exit "${FAKE_RC:-0}" ;;
esac
exit 3
"""


@pytest.fixture
def fake_tpu(tmp_path):
    tpu = tmp_path / "tpu"
    tpu.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    no_py = "#!/bin/sh\necho \"python3 $*\" >> \"$FAKE_TPU/python3_calls\"\nexit 97\n"
    for name, text in (("gcloud", FAKE_GCLOUD), ("uv", FAKE_UV), ("python3", no_py)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tpu / "python_stub").write_text(FAKE_PYTHON)
    (tpu / "python_stub").chmod(0o755)
    py = tpu / "w0" / "dq_jax_venv" / "bin" / "python"   # worker 0 has a venv, worker 1 not yet
    py.parent.mkdir(parents=True)
    shutil.copy(tpu / "python_stub", py)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_TPU": str(tpu), "FAKE_WORKERS": "2"}
    return tpu, env


def test_setup_executes_on_every_worker(fake_tpu):
    tpu, env = fake_tpu
    r = sh(TPU, "setup", *BASE, env=env)
    assert r.returncode == 0, r.stderr
    for w in (0, 1):
        home = tpu / f"w{w}"
        assert (home / "dq_jax" / "setup.py").read_text() == (REPO / "setup.py").read_text()
        assert (home / "dq_jax" / "launch" / "tpu_vm.sh").exists()
        assert not (home / "dq_jax" / ".git").exists() and not (home / "dq_jax_src.tar.gz").exists()
        pip = (home / "python_calls").read_text()
        assert f"-m pip install -e {home}/dq_jax[train] jax[tpu]>=0.10.2,<0.11" in pip
    assert not (tpu / "w0" / "uv_calls").exists()          # venv there: kept
    assert (tpu / "w1" / "uv_calls").read_text() == \
        f"uv venv -q --seed --python 3.11 {tpu}/w1/dq_jax_venv\n"
    assert r.stdout.count("dq_jax installed, jax 0.10.2") == 2
    assert not list(tpu.parent.glob("*.tar.gz"))           # local tarball removed
    assert not (tpu / "python3_calls").exists()             # no pip of the system python


def test_run_executes_streams_logs_and_returns_the_exit_code(fake_tpu):
    tpu, env = fake_tpu
    for w in (0, 1):                                        # as after `setup`
        (tpu / f"w{w}" / "dq_jax").mkdir(parents=True)
        (tpu / f"w{w}" / "dq_jax_venv" / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(tpu / "python_stub", tpu / f"w{w}" / "dq_jax_venv" / "bin" / "python")
    r = sh(TPU, "run", *BASE, "--accelerator-type=v3-8", "--config=configs/digits.py",
           "--workdir=/tmp/wd", "--config.note=a b", "--env=MY_VAR=x y",
           env={**env, "FAKE_RC": "7"})
    assert r.returncode == 7, r.stderr
    assert r.stdout.count("main argv: --config=configs/digits.py --workdir=/tmp/wd "
                          "--config.note=a b") == 2           # streamed from both workers
    assert r.stdout.count("main env: MY_VAR=x y cwd=") == 2 and "main done" in r.stdout
    log = (tpu / "w0" / "dq_jax_run.log").read_text()
    assert "=== " in log and "main done" in log


def test_run_refuses_a_second_job_and_stop_stops_it(fake_tpu):
    tpu, env = fake_tpu
    env = {**env, "FAKE_WORKERS": "1", "FAKE_BLOCK": "1"}
    (tpu / "w0" / "dq_jax").mkdir()
    args = ("--accelerator-type=v3-8", "--config=configs/digits.py", "--workdir=/tmp/wd")
    r = sh(TPU, "run", *BASE, *args, "--no-follow", "--startup-wait=0.2", env=env)
    assert r.returncode == 0 and "dq_jax started" in r.stdout, r.stderr
    pid = int((tpu / "w0" / "dq_jax_run.pid").read_text())
    os.kill(pid, 0)                                       # still running after `run` returned
    r = sh(TPU, "run", *BASE, *args, "--no-follow", "--startup-wait=0.2", env=env)
    assert r.returncode != 0 and "still running" in r.stderr
    r = sh(TPU, "stop", *BASE, env=env)
    assert r.returncode == 0 and f"SIGTERM sent to dq_jax (pid {pid})" in r.stdout
    for _ in range(100):
        if "main got SIGTERM" in (tpu / "w0" / "dq_jax_run.log").read_text():
            break
        time.sleep(0.05)
    assert "main got SIGTERM" in (tpu / "w0" / "dq_jax_run.log").read_text()


def test_without_gcloud_the_error_is_clear(tmp_path):
    bindir = tmp_path / "only_bash"          # a PATH with the tools the script needs, no gcloud
    bindir.mkdir()
    for tool in ("dirname", "cat"):
        (bindir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([BASH, str(TPU), "status", *BASE], env={"PATH": str(bindir)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "gcloud not found" in r.stderr


# ------------------------------------------------------------------------------ multi_gpu.sh
def gpu_dry(*args: str, **kw) -> tuple[dict, list[str], list[str]]:
    """multi_gpu.sh ARGS --dry-run -> (exports, unsets, command words)."""
    r = sh(GPU, "--dry-run", *args, **kw)
    assert r.returncode == 0, r.stderr
    exports, unsets, cmds = {}, [], []
    for line in r.stdout.splitlines():
        if line.startswith("export "):
            (kv,) = shlex.split(line[len("export "):])
            exports[kv.split("=", 1)[0]] = kv.split("=", 1)[1]
        elif line.startswith("unset "):
            unsets += line.split()[1:]
        else:
            assert line.startswith("+ "), line
            cmds.append(shlex.split(line[2:]))
    assert len(cmds) == 1, r.stdout
    return exports, unsets, cmds[0]


GPU_RUN = ["--config=configs/digits.py", "--workdir=/shared/run"]


def test_gpu_multi_node_exports_and_command():
    env, _, cmd = gpu_dry("--num-nodes", "4", "--node-rank", "3", "--coordinator",
                          "10.0.0.1:12345", *GPU_RUN, "--config.learning_rate=0.1",
                          "--python=/opt/venv/bin/python", "--", "--variants=w2a2")
    assert env["DQ_JAX_COORDINATOR"] == "10.0.0.1:12345"
    assert env["DQ_JAX_NUM_PROCESSES"] == "4" and env["DQ_JAX_PROCESS_ID"] == "3"
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert cmd == ["/opt/venv/bin/python", "-m", "dq_jax.main", "--config=configs/digits.py",
                   "--workdir=/shared/run", "--config.learning_rate=0.1", "--variants=w2a2"]


def test_gpu_single_node_has_no_distributed_env():
    env, unsets, cmd = gpu_dry(*GPU_RUN, "--gpus", "2",
                               env={"DQ_JAX_COORDINATOR": "stale:1"})
    assert not any(k.startswith("DQ_JAX_") for k in env)
    assert unsets == ["DQ_JAX_COORDINATOR"]                  # a stale one would go multi-process
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert cmd[1:3] == ["-m", "dq_jax.main"]


def test_gpu_visible_devices_list():
    env, _, _ = gpu_dry(*GPU_RUN, "--cuda-visible-devices=2,3")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("args,needle", [
    (("--num-nodes", "2", "--node-rank", "2", "--coordinator", "h:1"), "--node-rank 2"),
    (("--num-nodes", "2", "--node-rank", "5", "--coordinator", "h:1"), "out of range"),
    (("--num-nodes", "2", "--node-rank", "1"), "--coordinator"),
    (("--num-nodes", "2", "--coordinator", "nohostport"), "HOST:PORT"),
    (("--num-nodes", "0"), "--num-nodes"),
    (("--gpus", "2", "--cuda-visible-devices", "0,1"), "exclusive"),
    (("--gpus", "two"), "--gpus"),
    (("--node-rank", "-1"), "--node-rank"),
])
def test_gpu_bad_flag_combinations(args, needle):
    r = sh(GPU, *args, *GPU_RUN, "--dry-run")
    assert r.returncode != 0 and needle in r.stderr and r.stdout == ""


@pytest.mark.parametrize("missing", ["--config", "--workdir"])
def test_gpu_missing_required_flag(missing):
    r = sh(GPU, *[a for a in GPU_RUN if not a.startswith(missing)], "--dry-run")
    assert r.returncode != 0 and missing in r.stderr and "Usage:" in r.stderr


def test_gpu_executes_with_the_exported_env(tmp_path):
    """Not a dry run: the stub interpreter sees the DQ_JAX_* env and the arguments."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\necho \"env $DQ_JAX_COORDINATOR $DQ_JAX_NUM_PROCESSES "
                    "$DQ_JAX_PROCESS_ID $CUDA_VISIBLE_DEVICES\"\necho \"argv $*\"\nexit 5\n")
    stub.chmod(0o755)
    r = sh(GPU, "--num-nodes=2", "--node-rank=1", "--coordinator=localhost:1234", "--gpus=1",
           f"--python={stub}", *GPU_RUN)
    assert r.returncode == 5
    assert "env localhost:1234 2 1 0" in r.stdout
    assert "argv -m dq_jax.main --config=configs/digits.py --workdir=/shared/run" in r.stdout


@pytest.mark.skipif(os.environ.get("DQ_JAX_SLOW_LAUNCH_TESTS") != "1",
                    reason="real 2-process training (~2 min); set DQ_JAX_SLOW_LAUNCH_TESTS=1")
def test_gpu_two_processes_on_cpu_train_together(tmp_path):
    """multi_gpu.sh --num-nodes 2 on one machine (CPU): jax.distributed joins both processes."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = ["--num-nodes=2", f"--coordinator=localhost:{port}", "--config=configs/digits.py",
              f"--workdir={tmp_path / 'wd'}", "--config.num_train_steps=20",
              "--config.eval_every_steps=20", "--config.checkpoint_every_steps=20",
              f"--python={sys.executable}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([BASH, str(GPU), *common, f"--node-rank={i}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        assert f"process {i} of 2" in out and "1 local / 2 global devices" in out
    assert (tmp_path / "wd" / "results.json").exists()
