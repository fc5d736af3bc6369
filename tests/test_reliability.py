"""Preemption, partial/corrupt checkpoints, non-finite steps, bad configs, determinism, soak."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dq_jax import train
from tests.helpers import REPO, run_python
from tests.test_train import assert_states_equal, small_digits


def constant_lr_digits(steps: int, **overrides):
    """Constant LR: the state after k steps does not depend on the planned total."""
    return small_digits(num_train_steps=steps, schedule="constant", **overrides)


PREEMPT_SCRIPT = """
import sys
from tests.test_reliability import constant_lr_digits
from dq_jax import train
out = train.train_and_evaluate(constant_lr_digits(100000, checkpoint_every_steps=10**6,
                                                  log_every_steps=5), sys.argv[1])
print('PREEMPTED', out['preempted'], out['steps'], flush=True)
"""


def test_sigterm_checkpoints_current_step_and_resume_matches(tmp_path):
    """SIGTERM mid-run -> checkpoint at that step, clean exit; resuming to step k+6
    gives exactly the state of an uninterrupted (k+6)-step run."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", PREEMPT_SCRIPT, str(tmp_path / "pre")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    events = tmp_path / "pre"
    while time.time() < deadline and not list(events.glob("events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(3.0)  # let it train some steps past compilation
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("PREEMPTED")][-1]
    _, preempted, step = line.split()
    step = int(step)
    assert preempted == "True" and 0 < step < 100000
    saved = sorted(int(p.name) for p in (tmp_path / "pre" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved == [step], saved

    # The planned length changes (100000 -> step+6): refused unless allowed, then recorded.
    with pytest.raises(ValueError, match=r"changed config \(num_train_steps: 100000 -> "):
        train.train_and_evaluate(constant_lr_digits(step + 6), str(tmp_path / "pre"))
    resumed = train.train_and_evaluate(constant_lr_digits(step + 6, allow_config_change=True),
                                       str(tmp_path / "pre"))
    assert resumed["resumed_from_step"] == step
    history = [json.loads(l) for l in (tmp_path / "pre" / "run_history.jsonl").open()]
    assert [e["event"] for e in history] == ["start", "preempted", "resume", "trained",
                                             "evaluated"]
    assert history[2]["step"] == step
    assert history[2]["changes"]["num_train_steps"] == [100000, step + 6]
    reference = train.train_and_evaluate(constant_lr_digits(step + 6), str(tmp_path / "ref"))
    assert_states_equal(resumed["state"], reference["state"])


def test_partial_checkpoint_from_killed_save_is_ignored(tmp_path):
    """A save killed mid-write leaves orbax's tmp directory: resume uses the previous one."""
    config = small_digits()
    train.train_and_evaluate(config, str(tmp_path), stop_after=16)
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / "24.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "16", partial)
    for f in sorted(p for p in partial.rglob("*") if p.is_file())[::2]:
        f.write_bytes(b"\0" * 7)  # half-written files
    out = train.train_and_evaluate(config, str(tmp_path))
    assert out["resumed_from_step"] == 16 and out["steps"] == 24


def test_corrupt_checkpoint_gives_clear_error(tmp_path, capfd):
    """The only checkpoint truncated: named as damaged, moved aside (not deleted), one error."""
    config = small_digits()
    train.train_and_evaluate(config, str(tmp_path), stop_after=8)
    step_dir = tmp_path / "checkpoints" / "8"
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(ValueError, match=r"Every checkpoint in .*checkpoints is damaged "
                                         r"\(steps \[8\].*force_new"):
        train.train_and_evaluate(config, str(tmp_path))
    assert "Checkpoint step 8 in" in capfd.readouterr().err
    assert (tmp_path / "damaged_checkpoints" / "8").is_dir() and not step_dir.exists()


def _array_files(step_dir):
    return sorted(f for f in (step_dir / "default").rglob("*")
                  if f.is_file() and "/d/" in str(f) and f.stat().st_size > 0)


@pytest.mark.parametrize("damage", ["flip_array_byte", "truncate_manifest", "silent"])
def test_damaged_latest_checkpoint_falls_back_to_previous_good(tmp_path, capfd, damage):
    """One flipped byte in an array file (or a cut manifest) of the newest checkpoint: never
    restored silently; named, moved aside, and the run resumes from the previous checkpoint,
    ending bitwise equal to an uninterrupted run."""
    config = small_digits()
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    wd = tmp_path / "damaged"
    train.train_and_evaluate(config, str(wd), stop_after=16)  # checkpoints 8 and 16
    if damage == "flip_array_byte":
        files = _array_files(wd / "checkpoints" / "16")
        assert files
        for f in files:  # flip one byte in the middle of every array file
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0x40
            f.write_bytes(bytes(b))
    elif damage == "truncate_manifest":
        manifest = wd / "checkpoints" / "16" / "default" / "manifest.ocdbt"
        manifest.write_bytes(manifest.read_bytes()[:20])
    else:  # content that reads back fine but differs from what was saved (as a flipped bit
        # inside a stored float does): simulated by recording another checksum
        (wd / "checkpoint_digests" / "16.sha256").write_text("0" * 64 + "\n")
    out = train.train_and_evaluate(config, str(wd))
    err = capfd.readouterr().err
    assert "Checkpoint step 16 in" in err and "damaged" in err, err[-2000:]
    if damage == "silent":
        assert "does not match the checksum" in err
    assert out["resumed_from_step"] == 8 and out["steps"] == 24
    assert (wd / "damaged_checkpoints" / "16").is_dir()
    assert_states_equal(out["state"], full["state"])


def test_checkpoint_of_another_structure_is_not_called_damaged(tmp_path):
    """A structure mismatch (e.g. another optimizer state) is refused, and nothing is moved."""
    from dq_jax import checkpoints
    config = small_digits()
    train.train_and_evaluate(config, str(tmp_path), stop_after=8)
    manager = checkpoints.create_manager(__import__("etils").epath.Path(tmp_path), config)
    template = {"params": {"w": np.zeros((3,), np.float32)}}
    with pytest.raises(ValueError, match=r"Checkpoint step 8 in .* does not match this config"):
        checkpoints.restore(manager, 8, template, None)
    assert (tmp_path / "checkpoints" / "8").is_dir()
    assert not (tmp_path / "damaged_checkpoints").exists()


def test_state_digest_sees_one_flipped_bit():
    from dq_jax.checkpoints import state_digest
    a = {"x": np.arange(6, dtype=np.float32), "c": np.ones((2, 2), np.uint8)}
    b = {"x": np.arange(6, dtype=np.float32), "c": np.ones((2, 2), np.uint8)}
    assert state_digest(a) == state_digest(b)
    b["x"].view(np.uint32)[3] ^= 1
    assert state_digest(a) != state_digest(b)
    # Same bytes under another dtype or shape are another content.
    assert state_digest({"x": np.zeros(4, np.float32)}) != state_digest(
        {"x": np.zeros(4, np.int32)})
    assert state_digest({"x": np.zeros(4)}) != state_digest({"x": np.zeros((2, 2))})


def _assert_finite(state):
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
        leaf = np.asarray(leaf)
        if leaf.dtype.kind == "f":
            assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)


def test_nonfinite_stop_reports_layers_and_never_checkpoints_nan(tmp_path):
    config = constant_lr_digits(24, learning_rate=1e30, log_every_steps=4)
    with pytest.raises(FloatingPointError, match=r"Non-finite .*layers: .*nonfinite_policy='skip'"):
        train.train_and_evaluate(config, str(tmp_path))
    report = json.loads((tmp_path / "nonfinite_report.json").read_text())
    assert report["steps"] and report["layers"]
    latest = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    from dq_jax import checkpoints
    restored = checkpoints.load_float_variables(str(tmp_path / "checkpoints" / str(latest)))
    _assert_finite(restored)


def test_nonfinite_skip_policy_keeps_training_finite(tmp_path, capfd):
    """lr=1e30 with 'skip': nearly every step is skipped. The state stays finite, the run says
    so on stderr and in results.json, and it ends with an error (training did not happen)."""
    config = constant_lr_digits(24, learning_rate=1e30, nonfinite_policy="skip")
    with pytest.raises(FloatingPointError, match=r"mostly did not happen: (2[0-4]) of 24 steps"):
        train.train_and_evaluate(config, str(tmp_path))
    assert "were skipped as non-finite" in capfd.readouterr().err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skipped_steps"] >= 20 and results["steps"] == 24
    from dq_jax import checkpoints
    _assert_finite(checkpoints.load_float_variables(str(tmp_path / "checkpoints" / "24")))


def test_same_seed_is_bitwise_deterministic(tmp_path):
    a = train.train_and_evaluate(small_digits(num_train_steps=12), str(tmp_path / "a"))
    b = train.train_and_evaluate(small_digits(num_train_steps=12), str(tmp_path / "b"))
    assert_states_equal(a["state"], b["state"])
    assert a["eval_loss"] == b["eval_loss"]
    c = train.train_and_evaluate(small_digits(num_train_steps=12, seed=1), str(tmp_path / "c"))
    assert c["eval_loss"] != a["eval_loss"]


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/digits.py", "--config.learnig_rate=0.1"], "learning_rate"),
    (["--config=configs/digits.py", "--config.bogus=1"], "unknown key 'config.bogus'. Did you "
                                                         "mean "),
    (["--config=configs/digits.py", "--config.quant.weight_bitz=2"],
     "unknown key 'config.quant.weight_bitz'. Did you mean weight_bits"),
    (["--config=configs/no_such_config.py"], "no_such_config.py"),
    (["--config=configs/digits.py", "--config.quant.weight_bits=12"],
     "config.quant.weight_bits=12 is out of range"),
    (["--config=configs/digits.py", "--config.dataset=npz"], "config.data_dir"),
])
def test_cli_config_errors_are_one_line(tmp_path, args, expected):
    proc = run_python(["-m", "dq_jax.main", f"--workdir={tmp_path}", *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_config_file_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    proc = run_python(["-m", "dq_jax.main", f"--config={bad}", f"--workdir={tmp_path}"])
    assert proc.returncode == 2
    assert f"config file {bad}, line 1" in proc.stderr and "Traceback" not in proc.stderr


def test_soak_random_interruptions_equal_uninterrupted(tmp_path):
    """200 digits steps, stopped and resumed at 4 random points (seeded), == one run."""
    total = 200
    config = small_digits(num_train_steps=total, checkpoint_every_steps=50, log_every_steps=25)
    reference = train.train_and_evaluate(config, str(tmp_path / "ref"))
    stops = sorted(np.random.default_rng(7).choice(np.arange(5, total), 4, replace=False))
    for stop in stops:
        out = train.train_and_evaluate(config, str(tmp_path / "soak"), stop_after=int(stop))
        assert out["steps"] == stop
    final = train.train_and_evaluate(config, str(tmp_path / "soak"))
    assert final["resumed_from_step"] == stops[-1]
    assert_states_equal(final["state"], reference["state"])
    assert final["eval_top1"] == reference["eval_top1"]


# --------------------------------------------------------------------------- one run per workdir

HOLD_LOCK = """
import sys, time
from etils import epath
from dq_jax import checkpoints
checkpoints.WorkdirLock(epath.Path(sys.argv[1])).acquire()
print('held', flush=True)
time.sleep(120)
"""


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path, capfd):
    """A live holder: refused in one line naming its pid and host (API and CLI). Killed
    (SIGKILL leaves its lock file behind): the stale lock is taken over with a warning."""
    import socket
    from etils import epath
    from dq_jax import checkpoints
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = rf"in use by another run \(pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(ValueError, match=who + r".*use another --workdir"):
            train.train_and_evaluate(small_digits(), str(tmp_path))
        proc = run_python(["-m", "dq_jax.main", "--config=configs/digits.py",
                           f"--workdir={tmp_path}"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax: error:")]
        assert len(errors) == 1 and f"pid {holder.pid} on host" in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "config.json").exists()  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()
    lock_file = tmp_path / checkpoints.LOCK_FILE
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # left behind by SIGKILL
    capfd.readouterr()
    with checkpoints.WorkdirLock(epath.Path(tmp_path)):
        assert f"stale lock {lock_file} of pid {holder.pid}" in capfd.readouterr().err
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match="in use by another run .*this same process"):
            checkpoints.WorkdirLock(epath.Path(tmp_path)).acquire()
    assert not lock_file.exists()


def test_changed_hyperparameters_on_resume_are_refused_then_allowed_and_recorded(tmp_path):
    """Learning rate / batch size / rounding changes are listed and refused; allowed, they are
    recorded (run_history.jsonl, config.json) and the run continues. Log/checkpoint frequency
    may change freely. A finished workdir run again keeps its training timings."""
    wd = tmp_path / "wd"
    train.train_and_evaluate(small_digits(), str(wd), stop_after=8)
    recorded = (wd / "config.json").read_text()
    changed = small_digits(learning_rate=0.01, batch_size=32, rounding="nearest")
    with pytest.raises(ValueError, match=r"changed config \(batch_size: 64 -> 32; "
                                         r"learning_rate: 0.05 -> 0.01; rounding: 'stochastic' "
                                         r"-> 'nearest'\).*allow_config_change=True"):
        train.train_and_evaluate(changed, str(wd))
    assert (wd / "config.json").read_text() == recorded
    assert not (wd / "workdir.lock").exists()  # released on error too
    allowed = small_digits(learning_rate=0.01, log_every_steps=4, allow_config_change=True)
    out = train.train_and_evaluate(allowed, str(wd))
    assert out["resumed_from_step"] == 8 and out["steps"] == 24
    assert json.loads((wd / "config.json").read_text())["config"]["learning_rate"] == 0.01
    history = [json.loads(l) for l in (wd / "run_history.jsonl").open()]
    resume = [e for e in history if e["event"] == "resume"]
    assert resume and resume[-1]["step"] == 8
    assert resume[-1]["changes"] == {"learning_rate": [0.05, 0.01], "log_every_steps": [8, 4],
                                     "allow_config_change": [False, True]}
    # Only frequencies differ now: no permission needed.
    first = json.loads((wd / "results.json").read_text())
    assert first["train_seconds"] > 0 and first["resumed_from_step"] == 8
    again = train.train_and_evaluate(small_digits(learning_rate=0.01, log_every_steps=2),
                                     str(wd))
    assert again["resumed_from_step"] == 24 and again["eval_top1"] == out["eval_top1"]
    results = json.loads((wd / "results.json").read_text())
    assert results["train_seconds"] == first["train_seconds"]
    assert results["steps_per_sec"] == first["steps_per_sec"]
    assert results["trained_from_step"] == 8 and "reevaluated_at" in results
    events = [json.loads(l)["event"] for l in (wd / "run_history.jsonl").open()]
    assert events[-2:] == ["resume", "re-evaluated"]


@pytest.mark.parametrize("content", ['{"identity": {"model": "digits_cnn", "data', "", "[]"])
def test_damaged_config_json_is_named_with_the_fix(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    import re
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/config.json is damaged (")
                       + r".*delete it to resume under this config"):
        train.train_and_evaluate(small_digits(), str(tmp_path))


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (full disk) leaves the previous config.json intact."""
    from etils import epath
    from dq_jax import checkpoints
    wd = epath.Path(tmp_path)
    checkpoints.record_start(wd, small_digits(), 0, {})
    before = (tmp_path / "config.json").read_text()
    real = type(wd).write_text

    def full_disk(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(wd), "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.record_start(wd, small_digits(learning_rate=0.01), 0, {})
    assert (tmp_path / "config.json").read_text() == before
    json.loads(before)


# --------------------------------------------------------------------------- exits

SIGTERM_AT = """
import os, signal, sys
from absl import app
from dq_jax import main as m, train
phase, workdir = sys.argv[1], sys.argv[2]
patched = {"start-up": "init_state", "final evaluation": "evaluate"}[phase]
real = getattr(train, patched)
def with_sigterm(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice, while this phase runs
    return real(*a, **k)
setattr(train, patched, with_sigterm)
sys.argv = ["dq_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
            "--config.num_train_steps=24", "--config.log_every_steps=8",
            "--config.checkpoint_every_steps=8", "--config.eval_every_steps=1000"]
app.run(m.main, flags_parser=m.parse_flags)
"""


@pytest.mark.parametrize("phase", ["start-up", "final evaluation"])
def test_sigterm_outside_the_training_loop_exits_cleanly(tmp_path, phase):
    """SIGTERM while the initial state compiles, or during the final eval: exit 0 with a
    message (not -15). After the final eval's, rerunning evaluates the checkpointed run and
    reports its training timings."""
    proc = run_python(["-c", SIGTERM_AT, phase, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dq_jax: Preemption requested during {'the ' if 'eval' in phase else ''}{phase}" \
        in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    if phase == "start-up":
        assert saved == []
        return
    assert saved[-1] == 24
    history = [json.loads(l) for l in (tmp_path / "run_history.jsonl").open()]
    trained = [e for e in history if e["event"] == "trained"][-1]
    out = train.train_and_evaluate(small_digits(), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert out["resumed_from_step"] == 24 and results["steps"] == 24
    assert results["train_seconds"] == trained["train_seconds"] > 0


def _run_with_read_only(paths, args):
    """The CLI with `paths` read-only: chmod for a normal user; for root (whom permissions do
    not stop), a read-only bind mount in a private mount namespace."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if os.geteuid() != 0:
        for p in paths:
            p.chmod(0o555)
        try:
            return subprocess.run([sys.executable, *args], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=150)
        finally:
            for p in paths:
                p.chmod(0o755)
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("root without mount namespaces: cannot make a directory read-only")
    mounts = " && ".join(f"mount --bind {p} {p} && mount -o remount,bind,ro {p}" for p in paths)
    return subprocess.run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"',
                           sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=150)


@pytest.mark.parametrize("case", ["workdir_is_a_file", "read_only_workdir",
                                  "read_only_checkpoints"])
def test_unusable_workdir_fails_fast_in_one_line(tmp_path, case):
    wd = tmp_path / "wd"
    args = ["-m", "dq_jax.main", "--config=configs/digits.py", f"--workdir={wd}",
            "--config.num_train_steps=16", "--config.checkpoint_every_steps=8"]
    start = time.time()
    if case == "workdir_is_a_file":
        wd.write_text("not a directory")
        proc = run_python(args, timeout=150)
        expected = f"workdir {wd} is an existing file, not a directory"
    elif case == "read_only_workdir":
        wd.mkdir()
        proc = _run_with_read_only([wd], args)
        expected = f"workdir {wd} is not writable"
    else:
        (wd / "checkpoints").mkdir(parents=True)
        proc = _run_with_read_only([wd / "checkpoints"], args)
        expected = f"directory {wd / 'checkpoints'} is not writable"
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 120


def test_num_epochs_override_of_a_step_count_config_is_an_error(tmp_path):
    cfg = tmp_path / "fixed_steps.py"
    digits = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "digits.py")
    cfg.write_text(f"import runpy\n\ndef get_config():\n"
                   f"    c = runpy.run_path({digits!r})['get_config']()\n"
                   "    c.num_train_steps = 50\n    return c\n")
    proc = run_python(["-m", "dq_jax.main", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                       "--config.num_epochs=3"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax: error:")]
    assert len(errors) == 1 and "--config.num_epochs" in errors[0], proc.stderr[-2000:]
    assert "config.num_train_steps=50" in errors[0]
    assert not (tmp_path / "wd" / "results.json").exists()


SIGTERM_AT_EXIT = """
import atexit, os, runpy, signal, sys, time
def sigterm():  # a preemption notice while the finished program shuts down
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
atexit.register(sigterm)
sys.argv = ["dq_jax.main", *sys.argv[1:]]
runpy.run_module("dq_jax.main", run_name="__main__")
"""


def test_a_single_run_ends_with_its_result_line_on_stdout(tmp_path):
    """... and a SIGTERM after that line (while the program shuts down) changes nothing: exit
    0, no message, no traceback."""
    proc = run_python(["-c", SIGTERM_AT_EXIT, "--config=configs/digits.py",
                       f"--workdir={tmp_path}", "--config.num_train_steps=8",
                       "--config.eval_every_steps=8", "--config.log_every_steps=4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "SIGTERM" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads((tmp_path / "results.json").read_text())
    assert last.startswith(f"dq_jax: {tmp_path}: top-1 {result['eval_top1']:.4f}"), last
    assert "after 8 steps" in last
    # The start-up summary: per layer and the total size at the bit widths.
    assert "model size at its bit widths:" in proc.stderr
    assert "dq W2" in proc.stderr and "kernel shape" in proc.stderr
    assert "Histogram for" not in proc.stderr  # histograms go to TensorBoard, not the log
    # Only keys that apply (digits: no ImageNet crop size, cosine: no step boundaries).
    for recorded in (result["config"], json.loads((tmp_path / "config.json").read_text())["config"]):
        assert "image_size" not in recorded and "step_boundaries" not in recorded
        assert recorded["quant"]["weight_bits"] == 2
    # The dataset facts an export needs, recorded by the run; the export uses them.
    facts = json.loads((tmp_path / "dataset.json").read_text())
    assert facts["num_classes"] == 10 and facts["image_shape"] == [8, 8, 1]
    assert facts["normalization"]["pixel_max"] == 16.0
    facts["normalization"]["mean"] = [1.25]
    (tmp_path / "dataset.json").write_text(json.dumps(facts))
    from dq_jax import export
    export.export_workdir(str(tmp_path), str(tmp_path / "m.dqz"))
    assert export.load(str(tmp_path / "m.dqz")).normalization["mean"] == [1.25]
    # Levels go to TensorBoard as one histogram per layer, not one scalar per level.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next(tmp_path.glob("events.out.tfevents.*"))),
                           size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("levels/") for t in tags), tags
    assert not any(t.startswith("levels/") and t.rsplit("/", 1)[-1].isdigit() for t in tags)


def test_log_records_go_above_the_progress_bar(monkeypatch):
    """While a bar is drawn, absl log lines are printed through tqdm.write (above the bar),
    and the handler's stream is restored afterwards."""
    import tqdm as tqdm_module
    from absl import logging as absl_logging
    from dq_jax import train
    written = []
    monkeypatch.setattr(tqdm_module.tqdm, "write",
                        classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    handler = absl_logging.get_absl_handler().python_handler
    before = handler.stream
    with train._progress(total=3, initial=0) as bar:
        assert bar is not None
        handler.stream.write("I1125 a log record\n")
        bar.update(1)
    assert written == ["I1125 a log record"]
    assert handler.stream is before


# --------------------------------------------------------------------------- round three:
# damaged float starts, false quarantines, full disks, the last silent results (issue 29)

def _flip_array_bytes(step_dir):
    files = _array_files(step_dir)
    assert files
    for f in files:
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x40
        f.write_bytes(bytes(b))


def test_init_from_verifies_the_float_run_and_refuses_nonfinite_values(tmp_path):
    """config.init_from: a damaged float step (flipped bytes, a checksum that does not match or
    is cut) is one error naming the step and an earlier one, before anything is trained or
    saved; a float checkpoint holding NaN is refused too (its levels would be NaN)."""
    from dq_jax import checkpoints
    from dq_jax.main import apply_variant
    float_wd = tmp_path / "float"
    train.train_and_evaluate(apply_variant(small_digits(num_train_steps=16), "float"),
                             str(float_wd))
    good = checkpoints.load_float_variables(str(float_wd / "checkpoints" / "8"))
    _flip_array_bytes(float_wd / "checkpoints" / "16")
    quantized = apply_variant(small_digits(init_from=str(float_wd)), "w2a2")
    with pytest.raises(ValueError, match=r"init_from='.*float': checkpoint step 16 in .*float/"
                                         r"checkpoints is damaged \(unreadable.*earlier step "
                                         r"\(.*checkpoints/8\)"):
        train.train_and_evaluate(quantized, str(tmp_path / "q"))
    assert not (tmp_path / "q" / "checkpoints").exists() or not any(
        (tmp_path / "q" / "checkpoints").iterdir())
    step8, digest8 = float_wd / "checkpoints" / "8", float_wd / "checkpoint_digests" / "8.sha256"
    for text, reason in (("0" * 64, "its content does not match the checksum recorded"),
                         (digest8.read_text()[:20], r"its checksum file .*8.sha256 is damaged")):
        digest8.write_text(text)
        with pytest.raises(ValueError, match=r"checkpoint step 8 in .* is damaged \(" + reason):
            checkpoints.load_float_variables(str(step8))
    # Not a dq_jax run (no config.json, no checksum): only the values can be checked.
    import orbax.checkpoint as ocp
    good["params"]["conv1"]["kernel"] = np.array(good["params"]["conv1"]["kernel"])
    good["params"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    with ocp.CheckpointManager(tmp_path / "other" / "checkpoints") as manager:
        manager.save(1, args=ocp.args.StandardSave(good))
    with pytest.raises(FloatingPointError, match=r"checkpoint step 1 in .*other/checkpoints: "
                                                 r"\['params'\]\['conv1'\]\['kernel'\] holds 1 "
                                                 r"NaN/inf value"):
        checkpoints.load_float_variables(str(tmp_path / "other"))


def test_save_refuses_nonfinite_state_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """No checkpoint ever holds NaN; a checksum write that finds the disk full is a
    DiskFullError naming the step, the space a checkpoint needs and the last good step."""
    import errno
    from etils import epath
    from dq_jax import checkpoints
    manager = checkpoints.create_manager(epath.Path(tmp_path), small_digits())
    state = {"w": np.ones(4, np.float32)}
    checkpoints.save(manager, 8, state, force=True)
    with pytest.raises(FloatingPointError, match=r"refusing to save checkpoint step 16 .*"
                                                 r"\['w'\] holds 1 NaN/inf value"):
        checkpoints.save(manager, 16, {"w": np.array([1, 2, np.inf, 4], np.float32)}, force=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "write_text_atomic", full)
    with pytest.raises(checkpoints.DiskFullError, match=r"no space to write checkpoint step 24 "
                                                        r"in .*checkpoints \(.*needs about 0.0 "
                                                        r"MiB per checkpoint, .* free there\); "
                                                        r"the last good checkpoint is step 8\."):
        checkpoints.save(manager, 24, state, force=True)
    checkpoints.finish_saves(manager)
    assert manager.all_steps() == [8]
    assert sorted(p.name for p in (tmp_path / "checkpoint_digests").iterdir()) == ["8.sha256"]


FULL_DISK = """
import resource, sys
from absl import app
from dq_jax import checkpoints, main as m
real = checkpoints.save
def save(manager, step, state, force=False):
    if step == 16:  # step 8 is on disk; from now on no file may grow past 40 kB
        checkpoints.finish_saves(manager)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))
    return real(manager, step, state, force=force)
checkpoints.save = save
sys.argv = ["dq_jax.main", "--config=configs/digits.py", f"--workdir={sys.argv[1]}",
            "--config.num_train_steps=24", "--config.log_every_steps=8",
            "--config.checkpoint_every_steps=8", "--config.eval_every_steps=1000",
            "--config.compilation_cache_dir="]
app.run(m.main, flags_parser=m.parse_flags)
"""


def test_a_full_disk_while_checkpointing_is_one_line_naming_space_and_last_good_step(tmp_path):
    """A file-size limit (what a full disk does to a write) reached while saving step 16: one
    error line naming the step, the directory, the space a checkpoint needs and step 8, the
    last good one; exit 2, no traceback; step 8 is intact."""
    resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs a POSIX system")
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < 40_000:
        pytest.skip(f"the hard file-size limit ({hard} bytes) is below the test's 40 kB")
    proc = run_python(["-c", FULL_DISK, str(tmp_path)], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert (f"no space to write checkpoint step 16 in {tmp_path}/checkpoints (disk full or "
            "file-size limit" in errors[0]), errors[0]
    assert "MiB per checkpoint" in errors[0] and "the last good checkpoint is step 8" in errors[0]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["8"]


def test_one_damaged_step_never_condemns_the_others(tmp_path, capfd):
    """Step 24 without its item directory, step 16 with flipped bytes *and* its checksum file
    deleted (a step this run wrote with one): both are damage, each found with a fresh
    manager; step 8 is not moved, the run resumes from it and ends bitwise equal to the run
    that wrote them. The abandoned reads print nothing."""
    config = small_digits()
    full = train.train_and_evaluate(config, str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "24" / "default")
    _flip_array_bytes(tmp_path / "checkpoints" / "16")
    (tmp_path / "checkpoint_digests" / "16.sha256").unlink()
    capfd.readouterr()
    out = train.train_and_evaluate(config, str(tmp_path))
    err = capfd.readouterr().err
    assert out["resumed_from_step"] == 8 and out["steps"] == 24, err[-3000:]
    assert "Checkpoint step 24 in" in err and "checksum file" in err and "16.sha256 is " \
        "missing (this run wrote one)" in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "damaged_checkpoints").iterdir()) == ["16", "24"]
    assert "Event loop is closed" not in err and "was never retrieved" not in err
    assert_states_equal(out["state"], full["state"])


def test_an_undeletable_old_step_is_a_warning_and_training_continues(tmp_path, capfd):
    """keep_checkpoints=1: the old step 8 cannot be deleted when step 16 is saved (no
    permission on its files): one warning naming it, training goes on to its result, and
    the next rotation still deletes step 16."""
    config = small_digits(keep_checkpoints=1)
    train.train_and_evaluate(config, str(tmp_path), stop_after=8)
    locked = tmp_path / "checkpoints" / "8" / "default"
    if os.geteuid() == 0:  # permissions do not stop root: the immutable attribute does
        if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
            pytest.skip("root on a file system without chattr +i: cannot make a step undeletable")
        unlock = ["chattr", "-i"]
    else:
        locked.chmod(0o555)
        unlock = ["chmod", "755"]
    try:
        out = train.train_and_evaluate(config, str(tmp_path))
    finally:
        for p in (tmp_path / "checkpoints").rglob("default"):
            subprocess.run([*unlock, str(p)], check=False)
    err = capfd.readouterr().err
    assert out["steps"] == 24 and out["resumed_from_step"] == 8
    warned = [l for l in err.splitlines() if "could not delete the old checkpoint" in l]
    assert len(warned) == 1 and "step 8" in warned[0] and "delete it by hand" in warned[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["24"]


def test_lost_config_json_is_taken_from_the_history_or_refused(tmp_path):
    """config.json deleted: a resume under another seed or learning rate is refused as if it
    were there (the history recorded it); a history without it refuses the resume. (And the
    whole checkpoint_digests/ lost is refused without moving a step.)"""
    from etils import epath
    from dq_jax import checkpoints
    train.train_and_evaluate(small_digits(), str(tmp_path), stop_after=8)
    # All checksums lost (not one step's): refused, and nothing is called damaged.
    (tmp_path / "checkpoint_digests").rename(tmp_path / "kept")
    with pytest.raises(ValueError, match=r"checkpoint_digests is missing: the checksums this "
                                         r"run wrote .* none can be verified \(nothing was "
                                         r"moved\)"):
        train.train_and_evaluate(small_digits(), str(tmp_path))
    assert (tmp_path / "checkpoints" / "8").is_dir()
    assert not (tmp_path / "damaged_checkpoints").exists()
    (tmp_path / "kept").rename(tmp_path / "checkpoint_digests")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"different config \(seed: workdir has 0, config "
                                         r"has 1\)"):
        train.train_and_evaluate(small_digits(seed=1), str(tmp_path))
    with pytest.raises(ValueError, match=r"changed config \(learning_rate: 0.05 -> 0.01\)"):
        train.train_and_evaluate(small_digits(learning_rate=0.01), str(tmp_path))
    assert checkpoints.check_compatible(epath.Path(tmp_path), small_digits()) == {}
    events = [json.loads(l) for l in (tmp_path / "run_history.jsonl").open()]
    (tmp_path / "run_history.jsonl").write_text("".join(
        json.dumps({k: v for k, v in e.items() if k not in ("config", "identity")}) + "\n"
        for e in events))
    with pytest.raises(ValueError, match=r"config.json is missing and run_history.jsonl does "
                                         r"not record the config .*allow_config_change=True"):
        train.train_and_evaluate(small_digits(), str(tmp_path))


def test_workdir_lock_that_is_a_directory_or_not_yet_named_is_one_line(tmp_path):
    """A directory where the lock file goes, and a holder that has taken the flock but not yet
    written its pid: one-line errors, never `pid ? on host ?`."""
    from etils import epath
    from dq_jax import checkpoints
    (tmp_path / "a" / checkpoints.LOCK_FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"workdir.lock is a directory \(.*\); the run keeps its "
                                         r"lock file there. Move it away"):
        checkpoints.WorkdirLock(epath.Path(tmp_path / "a")).acquire()
    (tmp_path / "b").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)",
         str(tmp_path / "b" / checkpoints.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=r"in use by another run \(a run that is starting "
                                             r"and has not written its pid yet\)") as info:
            checkpoints.WorkdirLock(epath.Path(tmp_path / "b")).acquire()
        assert "?" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_level_histograms_of_collapsed_levels_do_not_end_the_run(tmp_path):
    """levels_learning_rate=1e6 drives the levels of a layer to about -4.36e6, a float32 ulp
    apart: their float32 range cannot hold 30 histogram bins, and the (asynchronous) writer
    ended the run at the next log step. The histograms are float64 now."""
    from clu import metric_writers
    levels = np.array([[-4.3591095e+06, -4.3591095e+06, -4.3591085e+06, -4.3591080e+06]],
                      np.float32)
    histograms = train._level_histograms({"conv2": {"kernel_levels": levels}})
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    writer.write_histograms(8, histograms)
    writer.flush()
    assert histograms["levels/conv2"].tolist() == levels.astype(np.float64).ravel().tolist()


def test_closed_event_loop_reports_are_dropped_and_others_kept(capsys):
    """tensorstore callbacks that outlive a failed orbax operation report 'Event loop is
    closed' through sys.unraisablehook (thousands of lines after a correct recovery):
    dropped; any other unraisable error is still printed."""
    from types import SimpleNamespace
    from dq_jax import checkpoints
    printed = []
    hook = checkpoints._closed_loop_filter(printed.append)
    report = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is "
                                                                           "closed"))
    hook(report)
    other = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("something else"))
    hook(other)
    assert printed == [other]
    checkpoints.quiet_failed_writes()
    checkpoints.quiet_failed_writes()   # idempotent: one filter
    assert getattr(sys.unraisablehook, "dq_jax_quiet", False)
