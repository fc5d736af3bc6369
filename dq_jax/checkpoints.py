"""Orbax checkpoints: save/resume the whole TrainState, and float -> quantized init.

A checkpoint holds params, integer codes, levels, activation and BN statistics,
optimizer state (incl. the code-update PRNG key) and the step. The data
position is the step itself: input pipelines are a pure function of
(seed, step), so resuming at step k replays exactly the batches an
uninterrupted run would see.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import socket
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dq_jax import conversion
from dq_jax.optim import CODES, LEVELS, PARAMS, with_feedback_residual, with_inertia_residual
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
HISTORY_FILE = "run_history.jsonl"   # append-only: one JSON object per line, one per event
LOCK_FILE = "workdir.lock"           # held (flock + pid/host inside) while a run uses the workdir
# Keys that define what a checkpoint *is*; resuming under different values
# would silently mix two experiments.
IDENTITY_KEYS = ("model", "model_kwargs", "dataset", "quant", "quantize_first_last",
                 "num_classes", "seed")
# Keys that cannot change the trained model: how often the run logs, evaluates and saves, how
# many checkpoints it keeps, the eval batch size, the start-up switches, and where compiled
# programs are cached. Changing them on resume needs no permission (the change is still
# recorded in run_history.jsonl). Any other difference (learning rates, batch size, schedule,
# rounding, steps, data_dir, init_from, ...) is refused unless config.allow_config_change=True.
NON_RESULT_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "eval_every_steps", "eval_batch_size", "force_new", "allow_config_change",
                   "compilation_cache_dir")


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked: in use by another run, not writable, a file,
    damaged bookkeeping, or a changed config. The message is one line naming the fix."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


# --------------------------------------------------------------------------- workdir

def prepare_workdir(workdir: epath.Path) -> None:
    """Creates `workdir` and proves it (and its checkpoint folders) writable, or fails in one
    line: a file in its place, no permission, a read-only file system."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is an existing file, not a directory; give a "
                           "directory path (it is created if missing).")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir} ({_os_reason(e)}); give a "
                           "--workdir in a writable location.") from e
    for d in (workdir, workdir / CHECKPOINT_DIR, workdir / DIGEST_DIR):
        if d != workdir and not d.exists():
            continue
        if not d.is_dir():
            raise WorkdirError(f"{d} is a file where the run keeps a directory; move it away.")
        probe = d / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            probe.write_text("probe")
            probe.unlink()
        except OSError as e:
            what = "workdir" if d == workdir else "directory"
            raise WorkdirError(
                f"{what} {d} is not writable ({_os_reason(e)}); checkpoints could not be "
                "saved. Fix its permissions (or remount it read-write), or give another "
                "--workdir.") from e


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD_HERE: set[str] = set()  # lock files this process holds (two runs in one process too)


class WorkdirLock:
    """One run per workdir: an exclusive `flock` on `workdir/workdir.lock`, which names the
    holder (pid, host, start time).

    The kernel drops an flock when its process dies, so a lock file left by a killed run is
    stale: it is taken over with a warning (on the same host, its pid is also checked). A lock
    naming another host whose flock this host cannot see is refused (its process cannot be
    checked from here); delete the file if that run is gone. Not used on non-local paths
    (gs://), and only process 0 of a multi-process run takes it.
    """

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                holder = json.loads(f.read() or "{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict, note: str = "") -> None:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        raise WorkdirError(
            f"workdir {self.path.parent} is in use by another run (pid {pid} on host {host}, "
            f"started {holder.get('started', '?')}{note}). Wait for it to finish or stop it, "
            f"or use another --workdir; if that run is gone, delete {self.path}.")

    def acquire(self) -> "WorkdirLock":
        import fcntl
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            self._refuse({"pid": os.getpid(), "host": socket.gethostname()},
                         "; this same process")
        for _ in range(20):  # retried only if the file was replaced while we locked it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock_ok = True
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder())
            except OSError as e:  # file system without flock: the pid/host check alone
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                flock_ok = False
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed it between our open and flock
                os.close(fd)
                continue
            holder = self._holder()
            if holder:
                here = holder.get("host") == socket.gethostname()
                pid = holder.get("pid")
                pid = pid if isinstance(pid, int) and pid > 0 else -1
                if not here:
                    os.close(fd)
                    self._refuse(holder, "; a process on another host cannot be checked "
                                         "from here")
                if pid != os.getpid() and _pid_alive(pid) and not flock_ok:
                    os.close(fd)
                    self._refuse(holder)
                state = "has exited" if not _pid_alive(pid) else "no longer holds it"
                message = (f"taking over the stale lock {self.path} of pid {pid} on this host "
                           f"(started {holder.get('started', '?')}; that process {state}).")
                logging.warning(message)
                print(f"dq_jax: warning: {message}", file=sys.stderr, flush=True)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                    "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            _HELD_HERE.add(key)
            return self
        raise WorkdirError(f"could not lock {self.path} (it keeps being replaced); is another "
                           "program using this workdir?")

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD_HERE.discard(os.path.realpath(self.path))
        try:
            os.unlink(self.path)  # before closing: a waiter that locked the old file retries
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_workdir(workdir: epath.Path):
    """The workdir lock as a context manager (a no-op where it does not apply)."""
    import contextlib
    if not _is_local(workdir) or jax.process_index() != 0:
        if not _is_local(workdir):
            logging.info("Workdir %s is not a local path: no workdir lock.", workdir)
        return contextlib.nullcontext()
    return WorkdirLock(workdir)


def create_manager(workdir: epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


DIGEST_DIR = "checkpoint_digests"   # beside checkpoints/, so orbax never lists or rotates it
DAMAGED_DIR = "damaged_checkpoints"  # damaged steps are moved here, never deleted


def _host_array(x: Any) -> np.ndarray:
    """The full value of a (replicated) leaf on this host, also on multi-host meshes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def state_digest(state: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal iff the content is equal."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = np.ascontiguousarray(_host_array(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _digest_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory).parent / DIGEST_DIR / f"{step}.sha256"


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write-then-rename: a crash or a full disk leaves the old file or the new, never half."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
    """Saves `state` at `step` (asynchronously) with a checksum of its content.

    The checksum is written before the save starts: a committed checkpoint always has one (an
    interrupted save leaves a checksum without a checkpoint, which nothing reads).
    """
    if not force and not manager.should_save(step):
        return
    digest = state_digest(state)
    if jax.process_index() == 0:
        path = _digest_path(manager, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, digest + "\n")
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


class DamagedCheckpoint(Exception):
    """A checkpoint whose structure matches but whose content cannot be read or verified."""


def _structure_matches(manager: ocp.CheckpointManager, step: int, template: Any) -> bool | None:
    """Whether the saved arrays have the template's shapes and dtypes (as a multiset, so key
    naming conventions do not matter); None when the metadata itself cannot be read."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(manager.directory) / str(step) / "default")
        meta = getattr(meta, "tree", meta)
        saved = sorted((tuple(m.shape), str(np.dtype(m.dtype))) for m in jax.tree.leaves(meta))
    except Exception:  # noqa: BLE001  (damaged _METADATA / manifest: many exception types)
        return None
    if not saved:
        return None
    mine = sorted((tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for x in jax.tree.leaves(template))
    return saved == mine


def _restore_verified(manager, step: int, abstract: Any) -> Any:
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types on bad bytes)
        raise DamagedCheckpoint(f"unreadable ({type(e).__name__})") from e
    path = _digest_path(manager, step)
    if path.exists():
        expected = path.read_text().strip()
        if state_digest(state) != expected:
            raise DamagedCheckpoint("its content does not match the checksum recorded at save")
    else:
        logging.warning("Checkpoint step %d in %s has no recorded checksum (written by an older "
                        "version?): restored without verification.", step, manager.directory)
    return state


def restore(manager: ocp.CheckpointManager, step: int, template: Any, sharding) -> Any:
    """Restores `step` into the structure/dtypes of `template`, placed with `sharding`,
    verifying its checksum.

    A checkpoint of another model/optimizer structure is refused (ValueError). A damaged one
    (unreadable, or content differing from its checksum) is moved to `damaged_checkpoints/`
    with a warning naming it, and the previous step is tried; nothing is deleted.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
        template)
    damaged = []
    while step is not None:
        if _structure_matches(manager, step, template) is False:
            raise ValueError(
                f"Checkpoint step {step} in {manager.directory} does not match this config's "
                "model/optimizer state (its saved arrays differ in names or shapes). Use a new "
                "--workdir, or --config.force_new=True to start over in this one.")
        try:
            state = _restore_verified(manager, step, abstract)
            if damaged:
                logging.warning("Resumed from step %d, the newest undamaged checkpoint.", step)
            return state
        except DamagedCheckpoint as e:
            where = epath.Path(manager.directory).parent / DAMAGED_DIR / str(step)
            message = (f"Checkpoint step {step} in {manager.directory} is damaged ({e}); "
                       f"moved to {where} and trying the previous checkpoint.")
            logging.warning(message)
            print(f"dq_jax: warning: {message}", file=sys.stderr, flush=True)
            damaged.append(step)
            if jax.process_index() == 0:
                where.parent.mkdir(parents=True, exist_ok=True)
                if where.exists():
                    where.rmtree()
                (epath.Path(manager.directory) / str(step)).rename(where)
            manager.reload()
            older = [s for s in manager.all_steps() if s < step]
            step = max(older) if older else None
    raise ValueError(
        f"Every checkpoint in {manager.directory} is damaged (steps {damaged}, moved to "
        f"{epath.Path(manager.directory).parent / DAMAGED_DIR}); nothing to resume from. "
        "Start over with --config.force_new=True, or restore a backup of the workdir.")


def _identity(config: ml_collections.ConfigDict) -> dict:
    d = config.to_dict()
    return {k: d.get(k) for k in IDENTITY_KEYS}


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(recorded: dict, config: ml_collections.ConfigDict) -> dict[str, list]:
    """Dotted key -> [recorded value, new value] for every key that differs (identity keys
    excluded: they are checked separately). Only keys that apply to the new config count
    (`configlib.applicable`); a key the recorded config lacks (written before that key existed,
    or not applicable then) counts as its default."""
    from dq_jax import configlib
    defaults = _flat(_config_json(configlib.base_config()))
    old, new = _flat(recorded), _flat(configlib.applicable(config))
    changes = {}
    for key in sorted(new):
        if key.split(".")[0] in IDENTITY_KEYS:
            continue
        before = old.get(key, defaults.get(key))
        if before != new[key]:
            changes[key] = [before, new[key]]
    return changes


def _read_config_json(workdir: epath.Path) -> dict:
    path = workdir / CONFIG_FILE
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
            raise ValueError("no 'identity' record")
        return recorded
    except (ValueError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())[:120]
        raise WorkdirError(
            f"{path} is damaged ({reason}); it records which config wrote this workdir. Restore "
            "it from a backup, or delete it to resume under this config (the checkpoints are "
            "kept; their structure is still checked), or pass --config.force_new=True to start "
            "over.") from e


def has_checkpoints(workdir: epath.Path) -> bool:
    root = workdir / CHECKPOINT_DIR
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


def check_compatible(workdir: epath.Path, config: ml_collections.ConfigDict) -> dict[str, list]:
    """Refuses to resume a workdir written by a different experiment, or under changed
    hyperparameters unless config.allow_config_change; returns the changes (to record).

    Discards the checkpoints with config.force_new. Writes nothing else: `record_start`
    writes config.json and the history once the run has really started.
    """
    path = workdir / CONFIG_FILE
    if config.force_new:
        for d in (CHECKPOINT_DIR, DIGEST_DIR):
            if (workdir / d).exists():
                (workdir / d).rmtree()
        return {}
    if not path.exists():
        return {}
    recorded = _read_config_json(workdir)
    theirs = recorded["identity"]
    mine = json.loads(json.dumps(_identity(config), default=str))
    diff = sorted(k for k in IDENTITY_KEYS if theirs.get(k) != mine.get(k))
    if diff:
        details = "; ".join(f"{k}: workdir has {theirs.get(k)!r}, config has {mine.get(k)!r}"
                            for k in diff)
        raise ValueError(
            f"Workdir {workdir} was written by a different config ({details}). Use a new "
            "--workdir, or pass --config.force_new=True to discard its checkpoints.")
    changes = config_changes(recorded.get("config", {}), config)
    refused = {k: v for k, v in changes.items() if k not in NON_RESULT_KEYS}
    if refused and has_checkpoints(workdir) and not config.allow_config_change:
        details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise WorkdirError(
            f"Resuming {workdir} under a changed config ({details}). Rerun with the recorded "
            f"values ({path}), pass --config.allow_config_change=True to continue with the "
            f"changes (recorded in {HISTORY_FILE}), or use a new --workdir.")
    return changes


def append_history(workdir: epath.Path, event: str, **fields: Any) -> None:
    """Appends one JSON line {time, event, ...} to run_history.jsonl (process 0 only)."""
    if jax.process_index() != 0:
        return
    line = json.dumps({"time": _now(), "event": event, **fields}, default=str) + "\n"
    path = workdir / HISTORY_FILE
    if _is_local(path):
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    else:  # object stores cannot append
        write_text_atomic(path, (path.read_text() if path.exists() else "") + line)


def read_history(workdir: epath.Path) -> list[dict]:
    """The events of run_history.jsonl (a damaged line, e.g. cut by a full disk, is skipped)."""
    path = workdir / HISTORY_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def record_start(workdir: epath.Path, config: ml_collections.ConfigDict, step: int,
                 changes: dict[str, list]) -> None:
    """Writes config.json (atomically) and the start/resume event with its config changes."""
    if jax.process_index() != 0:
        return
    mine = json.loads(json.dumps(_identity(config), default=str))
    from dq_jax import configlib
    write_text_atomic(workdir / CONFIG_FILE, json.dumps(
        {"identity": mine, "config": configlib.applicable(config)}, indent=2))
    fields: dict[str, Any] = {"step": step, "changes": changes,
                              "pid": os.getpid(), "host": socket.gethostname()}
    if config.force_new:
        fields["force_new"] = True
    append_history(workdir, "resume" if step > 0 else "start", **fields)


def _find_checkpoint(path: str) -> tuple[epath.Path, int]:
    """Accepts a workdir, its checkpoints/ dir, or one step directory."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"config.init_from={path!r} does not exist; give a float run's workdir "
            "(containing checkpoints/) or one of its checkpoint step directories.")
    for root in (p / CHECKPOINT_DIR, p):
        if root.is_dir():
            steps = [int(c.name) for c in root.iterdir() if c.name.isdigit()]
            if steps:
                return root, max(steps)
    if p.name.isdigit():
        return p.parent, int(p.name)
    raise FileNotFoundError(
        f"config.init_from={path!r} holds no orbax checkpoint (no numeric step directory "
        f"in it or in {path}/{CHECKPOINT_DIR}).")


def load_float_variables(path: str) -> dict:
    """The `params` and `batch_stats` of a checkpoint, as a nested dict of numpy arrays."""
    root, step = _find_checkpoint(path)
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


def init_from_float(path: str, state: Any, quant: QuantConfig,
                    optimizer: optax.GradientTransformation, *,
                    float_residual: bool = False,
                    inertia_code_rate: float | None = None) -> Any:
    """Quantized state initialised from a float checkpoint (DESIGN §1.1 "Initialisation").

    Float kernels become: DQ-W levels by Lloyd + nearest codes; latent-STE the
    same kernel plus Lloyd levels; LSQ the same kernel plus LSQ's initial step.
    Every other leaf (biases, BN, float first/last layers) is copied; shapes
    must match exactly. The optimizer state is `optimizer.init` of the new values (the
    state's `tx`; its code-update key is the optimizer's own, as at `train.init_state`).
    `float_residual` (feedback-rounding ablations only): the optimizer's residual starts at
    float kernel - W_q instead of 0, so the implied latent `W_q + r` is the float kernel, as
    latent-STE's is. With `inertia_code_rate` (rounding='inertia': the code LR of the first
    update) the residual seeds the code momentum instead (`optim.with_inertia_residual`).
    """
    src = load_float_variables(path)
    source = flax.traverse_util.flatten_dict(src["params"])
    new_params, new_codes = conversion.convert_params(
        source, state.params, state.codes, lambda module: quant,
        source=f"config.init_from={path!r}")
    params = flax.traverse_util.unflatten_dict(new_params)
    codes_tree = flax.traverse_util.unflatten_dict(new_codes) if new_codes else state.codes
    batch_stats = jax.tree.map(jnp.asarray, src["batch_stats"]) or state.batch_stats
    opt_state = optimizer.init({PARAMS: params, CODES: codes_tree})
    if float_residual:
        residual = {k: jnp.asarray(source[k], jnp.float32)
                    - wq.gather_levels(new_params[k[:-1] + (LEVELS,)], c)
                    for k, c in new_codes.items()}
        residual = flax.traverse_util.unflatten_dict(residual)
        opt_state = (with_feedback_residual(opt_state, residual) if inertia_code_rate is None
                     else with_inertia_residual(opt_state, residual, inertia_code_rate))
    return state.replace(params=params, codes=codes_tree, batch_stats=batch_stats,
                         opt_state=opt_state)
