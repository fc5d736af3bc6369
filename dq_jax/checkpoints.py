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
import logging as logging_lib
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any, Mapping

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
                 "num_classes", "seed", "first_last_bits", "rules", "bit_budget",
                 "allocation")
# Keys that cannot change the trained model: how often the run logs, evaluates and saves, how
# many checkpoints it keeps, the eval batch size, the start-up switches, and where compiled
# programs are cached. Changing them on resume needs no permission (the change is still
# recorded in run_history.jsonl). Any other difference (learning rates, batch size, schedule,
# rounding, steps, data_dir, init_from, ...) is refused unless config.allow_config_change=True.
NON_RESULT_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "eval_every_steps", "eval_batch_size", "force_new", "allow_config_change",
                   "compilation_cache_dir")


# Keys whose default changed when they were added: a recorded config that lacks one (written
# before it existed) ran with this value, not the new default. A DQ run with a random rounding
# recorded before issue 27 drew from the per-layer stream; resuming it under the 'hash' stream
# is a config change (refused, with the fix named in the message).
LEGACY_VALUES = {"rounding_stream": "per_layer"}


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

    def _holder_soon(self) -> dict:
        """The holder's record; a run that has just taken the flock writes it a moment
        later, so an empty file is read again for up to a second."""
        for _ in range(20):
            holder = self._holder()
            if holder.get("pid") is not None:
                return holder
            time.sleep(0.05)
        return {}

    def _refuse(self, holder: dict, note: str = "") -> None:
        who = (f"pid {holder['pid']} on host {holder.get('host', 'unknown')}, started "
               f"{holder.get('started', 'at an unknown time')}" if holder.get("pid") is not None
               else "a run that is starting and has not written its pid yet")
        raise WorkdirError(
            f"workdir {self.path.parent} is in use by another run ({who}{note}). Wait for it "
            f"to finish or stop it, or use another --workdir; if that run is gone, delete "
            f"{self.path}.")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            kind = "a directory" if os.path.isdir(self.path) else "not a usable file"
            raise WorkdirError(
                f"{self.path} is {kind} ({_os_reason(e)}); the run keeps its lock file there. "
                "Move it away (it is not dq_jax's), then rerun.") from e

    def acquire(self) -> "WorkdirLock":
        import fcntl
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            self._refuse({"pid": os.getpid(), "host": socket.gethostname()},
                         "; this same process")
        for _ in range(20):  # retried only if the file was replaced while we locked it
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock_ok = True
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder_soon())
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


def _closed_loop_filter(previous):
    def hook(unraisable) -> None:
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous(unraisable)
    hook.dq_jax_quiet = True
    return hook


class _NoDiskFullTracebacks(logging_lib.Filter):
    """orbax logs every write a full disk refused with its traceback (up to dozens); the run
    ends with one line that says so (`DiskFullError`), so those records keep their message
    only."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


_NO_DISK_FULL_TRACEBACKS = _NoDiskFullTracebacks()


class _NoAbandonedReads(logging_lib.Filter):
    """asyncio reports each tensorstore read left behind when orbax gives up on a damaged
    checkpoint ("Future exception was never retrieved"); the damage is reported once, by
    `restore`."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("was never retrieved" in str(record.msg) and error is not None
                    and "tensorstore_spec" in str(error))


_NO_ABANDONED_READS = _NoAbandonedReads()


def quiet_failed_writes() -> None:
    """Keeps a handled failure to a line: drops the "Event loop is closed" reports of
    tensorstore callbacks that arrive after orbax closed a failed operation's event loop
    (thousands of lines after a correctly handled damaged checkpoint or full disk; every
    other unraisable error is printed), asyncio's reports of the reads orbax abandoned, and
    the tracebacks of writes a full disk refused."""
    if not getattr(sys.unraisablehook, "dq_jax_quiet", False):
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)
    logging.get_absl_handler().addFilter(_NO_DISK_FULL_TRACEBACKS)  # idempotent
    logging_lib.getLogger("asyncio").addFilter(_NO_ABANDONED_READS)


class Manager(ocp.CheckpointManager):
    """An orbax manager that leaves rotation to `save` (`keep` newest steps): orbax's own
    deletion runs in its save thread, and one undeletable old step there fails every later
    save of the run."""

    def __init__(self, directory: epath.Path, keep: int):
        super().__init__(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=True))
        self.keep = keep
        self.in_flight: tuple[int, int] | None = None  # (step, bytes) of the running save
        self.undeletable: set[int] = set()             # old steps already warned about


def create_manager(workdir: epath.Path, config: ml_collections.ConfigDict) -> Manager:
    quiet_failed_writes()
    return Manager(workdir / CHECKPOINT_DIR, int(config.keep_checkpoints))


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


DIGEST_DIR = "checkpoint_digests"   # beside checkpoints/, so orbax never lists or rotates it
DAMAGED_DIR = "damaged_checkpoints"  # damaged steps are moved here, never deleted


def _host_array(x: Any) -> np.ndarray:
    """The full value of a (replicated) leaf on this host, also on multi-host meshes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def _host_leaves(state: Any) -> list[tuple[str, np.ndarray]]:
    """(path, contiguous host copy) of every leaf, in tree order: fetched once per save."""
    return [(jax.tree_util.keystr(path), np.ascontiguousarray(_host_array(leaf)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)]


def _digest_of(leaves: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for path, a in leaves:
        h.update(f"{path}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_digest(state: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal iff the content is equal."""
    return _digest_of(_host_leaves(state))


def refuse_nonfinite(leaves: list[tuple[str, np.ndarray]], what: str, fix: str) -> None:
    """FloatingPointError naming the first float leaf of `leaves` holding NaN or inf."""
    for path, a in leaves:
        if jnp.issubdtype(a.dtype, jnp.inexact) and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise FloatingPointError(f"{what}: {path} holds {bad} NaN/inf value(s). {fix}")


def _digest_path(directory: epath.Path, step: int) -> epath.Path:
    return epath.Path(directory).parent / DIGEST_DIR / f"{step}.sha256"


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write-then-rename: a crash or a full disk leaves the old file or the new, never half."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


class DiskFullError(WorkdirError):
    """A checkpoint (or record) could not be written: no space left or a file-size limit."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded",
                   "os_error_code='28'", "os_error_code='27'", "os_error_code='122'")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a write refused for lack of space or by a
    file-size limit, as an OSError or as tensorstore's message."""
    return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS)
               or any(t in str(e) for t in _DISK_FULL_TEXT) for e in _chain(error))


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def disk_full_message(path: epath.Path, what: str, needed: int | None,
                      last_good: int | None) -> str:
    """One line: what could not be written where, the space it needs, what is free there,
    and the checkpoint a rerun resumes from."""
    try:
        free = f"{_mib(shutil.disk_usage(str(path)).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"about {_mib(needed)} per checkpoint" if needed else "some space"
    resume = (f"the last good checkpoint is step {last_good}" if last_good is not None
              else "no checkpoint is saved yet")
    return (f"no space to write {what} in {path} (disk full or file-size limit, ulimit -f; "
            f"needs {need}, {free}); {resume}. Free space or raise the limit, then rerun the "
            "same command to resume.")


def disk_full_line(error: BaseException, workdir: str) -> str:
    """`disk_full_message` for a write outside a checkpoint save (history, TensorBoard
    events, results): the file it names, and the newest step saved in its workdir."""
    path = next((epath.Path(c.filename) for c in _chain(error)
                 if isinstance(getattr(c, "filename", None), str)), epath.Path(workdir))
    steps = []
    for d in (path, *path.parents):
        if (d / CHECKPOINT_DIR).is_dir():
            steps = [int(c.name) for c in (d / CHECKPOINT_DIR).iterdir() if c.name.isdigit()]
            break
        if str(d) == str(workdir):
            break
    if not steps:
        return disk_full_message(path.parent, path.name, None, None)
    newest = d / CHECKPOINT_DIR / str(max(steps))
    size = sum(f.stat().st_size for f in pathlib.Path(newest).rglob("*") if f.is_file())
    return disk_full_message(path.parent, path.name, size, max(steps))


def _last_good_step(manager: ocp.CheckpointManager, failed: int | None) -> int | None:
    manager.reload()
    steps = [s for s in manager.all_steps() if s != failed]
    return max(steps) if steps else None


def _raise_save_failure(manager: Manager, error: BaseException) -> None:
    """A full disk as one DiskFullError line; any other failure unchanged."""
    step, nbytes = manager.in_flight or (None, None)
    manager.in_flight = None
    if not is_disk_full(error):
        raise error
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    raise DiskFullError(disk_full_message(epath.Path(manager.directory), what, nbytes,
                                          _last_good_step(manager, step))) from None


def finish_saves(manager: Manager) -> None:
    """Waits for the asynchronous save, then deletes the steps beyond the newest `keep`.

    A full disk during the save is a `DiskFullError` naming the step, the space and the last
    good step; an old step that cannot be deleted is a warning (the new one is saved).
    """
    try:
        manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types)
        _raise_save_failure(manager, e)
    manager.in_flight = None
    _rotate(manager)


def _rotate(manager: Manager) -> None:
    if jax.process_index() != 0:
        return
    manager.reload()
    old = sorted(manager.all_steps())[:-manager.keep]
    for step in old:
        if step not in manager.undeletable:
            _delete_step(manager, step)
    if old:
        manager.reload()


def _delete_step(manager: Manager, step: int) -> None:
    """Renames the step out of the listing, then deletes it; failing that, warns once."""
    directory = epath.Path(manager.directory)
    gone = directory / f".deleting.{step}"
    try:
        if gone.exists():
            gone.rmtree()
        (directory / str(step)).rename(gone)
        gone.rmtree()
    except OSError as e:
        manager.undeletable.add(step)
        left = gone if gone.exists() else directory / str(step)
        where = getattr(e, "filename", None) or left
        _warn(f"could not delete the old checkpoint step {step} ({_os_reason(e)}: {where}) "
              f"while keeping the newest {manager.keep}; it stays in {left}, delete it by "
              "hand. Training continues.")


def _warn(message: str) -> None:
    logging.warning(message)
    print(f"dq_jax: warning: {message}", file=sys.stderr, flush=True)


def save(manager: Manager, step: int, state: Any, force: bool = False) -> None:
    """Saves `state` at `step` (asynchronously) with a checksum of its content.

    The previous save is finished first (`finish_saves`), so its failure names its own step.
    A state holding NaN/inf is refused (FloatingPointError): no checkpoint is ever
    non-finite. The checksum is written before the save starts: a committed checkpoint
    always has one (an interrupted save leaves a checksum without a checkpoint, which
    nothing reads).
    """
    if not force and not manager.should_save(step):
        return
    finish_saves(manager)
    leaves = _host_leaves(state)
    refuse_nonfinite(leaves, f"refusing to save checkpoint step {step} in {manager.directory}",
                     "Nothing was saved; the previous checkpoints are intact. Lower "
                     "config.learning_rate / config.levels_learning_rate, or check "
                     "config.init_from.")
    manager.in_flight = (step, sum(a.nbytes for _, a in leaves))
    try:
        if jax.process_index() == 0:
            path = _digest_path(manager.directory, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, _digest_of(leaves) + "\n")
        manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001
        _raise_save_failure(manager, e)


class DamagedCheckpoint(Exception):
    """A checkpoint whose structure matches but whose content cannot be read or verified."""


def _structure_matches(directory: epath.Path, step: int, template: Any) -> bool | None:
    """Whether the saved arrays have the template's shapes and dtypes (as a multiset, so key
    naming conventions do not matter); None when the metadata itself cannot be read."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(directory) / str(step) / "default")
        meta = getattr(meta, "tree", meta)
        saved = sorted((tuple(m.shape), str(np.dtype(m.dtype))) for m in jax.tree.leaves(meta))
    except Exception:  # noqa: BLE001  (damaged _METADATA / manifest: many exception types)
        return None
    if not saved:
        return None
    mine = sorted((tuple(np.shape(x)), str(np.dtype(_dtype(x)))) for x in jax.tree.leaves(template))
    return saved == mine


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def _written_with_digest(directory: epath.Path, step: int) -> bool:
    """Whether the run that wrote `step` recorded its checksum: an earlier step has one, or a
    run that started before `step` kept run_history.jsonl (every version that keeps the
    history writes checksums). Only a step of an older version may lack one."""
    workdir = epath.Path(directory).parent
    digests = workdir / DIGEST_DIR
    if digests.is_dir() and any(p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) < step
                                for p in digests.iterdir() if p.name.endswith(".sha256")):
        return True
    return any(e.get("event") in ("start", "resume") and isinstance(e.get("step"), int)
               and e["step"] < step for e in read_history(workdir))


def _recorded_digest(directory: epath.Path, step: int) -> str | None:
    """The checksum recorded at save; None for a step of a version before checksums.

    Raises DamagedCheckpoint when it is missing for a step written with one, or cut."""
    path = _digest_path(directory, step)
    if not path.exists():
        if not _written_with_digest(directory, step):
            return None
        if not path.parent.is_dir():  # all of them lost, not this step's: nothing is proven
            raise UnreadableCheckpoint(
                f"{path.parent} is missing: the checksums this run wrote for the checkpoints in "
                f"{directory} are gone, so none can be verified (nothing was moved). Restore it "
                "from a backup of the workdir, or start over with --config.force_new=True.")
        raise DamagedCheckpoint(f"its checksum file {path} is missing (this run wrote one)")
    text = path.read_text().strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise DamagedCheckpoint(f"its checksum file {path} is damaged ({len(text)} characters, "
                                "not a sha256)")
    return text


class UnreadableCheckpoint(WorkdirError):
    """A checkpoint this process cannot read for a reason outside its bytes (permissions,
    memory): not damage, so nothing is moved."""


_NOT_DAMAGE = ("PERMISSION_DENIED", "Permission denied", "RESOURCE_EXHAUSTED")


def _read(directory: epath.Path, step: int, abstract: Any | None) -> Any:
    """Restores `step` with a fresh manager (after one failed restore an orbax manager fails
    every later one): a failure is about this step's files, not an earlier attempt."""
    args = ocp.args.StandardRestore(abstract) if abstract is not None else \
        ocp.args.StandardRestore()
    quiet_failed_writes()
    try:
        with ocp.CheckpointManager(epath.Path(directory)) as fresh:
            return fresh.restore(step, args=args)
    except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types on bad bytes)
        if any(isinstance(c, (PermissionError, MemoryError))
               or any(t in str(c) for t in _NOT_DAMAGE) for c in _chain(e)):
            raise UnreadableCheckpoint(
                f"cannot read checkpoint step {step} in {directory} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); it is not damaged, so nothing was moved. "
                "Fix its permissions (or free memory) and rerun.") from e
        raise DamagedCheckpoint(f"unreadable ({type(e).__name__})") from e


def _restore_verified(directory: epath.Path, step: int, abstract: Any) -> Any:
    expected = _recorded_digest(directory, step)
    state = _read(directory, step, abstract)
    if expected is None:
        logging.warning("Checkpoint step %d in %s has no recorded checksum (written by an older "
                        "version): restored without verification.", step, directory)
    elif state_digest(state) != expected:
        raise DamagedCheckpoint("its content does not match the checksum recorded at save")
    return state


def _quarantine(directory: epath.Path, step: int, reason: DamagedCheckpoint) -> None:
    """Moves a step proven damaged to damaged_checkpoints/ (a new name if that one is taken:
    nothing is ever deleted)."""
    parent = epath.Path(directory).parent / DAMAGED_DIR
    where, n = parent / str(step), 1
    while where.exists():
        n += 1
        where = parent / f"{step}.{n}"
    _warn(f"Checkpoint step {step} in {directory} is damaged ({reason}); moved to {where} and "
          "trying the previous checkpoint.")
    if jax.process_index() == 0:
        parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(directory) / str(step)).rename(where)


def restore(manager: ocp.CheckpointManager, step: int, template: Any, sharding) -> Any:
    """Restores `step` into the structure/dtypes of `template`, placed with `sharding`,
    verifying its checksum.

    A checkpoint of another model/optimizer structure is refused (ValueError). A step proven
    damaged (unreadable by a fresh manager, content differing from its checksum, or its
    checksum lost) is moved to `damaged_checkpoints/` with a warning naming it, and the
    previous step is tried, each on its own; nothing is deleted. A step that cannot be read
    for another reason (permissions) is an error, and nothing is moved.
    """
    directory = epath.Path(manager.directory)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
        template)
    damaged = []
    while step is not None:
        if _structure_matches(directory, step, template) is False:
            raise ValueError(
                f"Checkpoint step {step} in {directory} does not match this config's "
                "model/optimizer state (its saved arrays differ in names or shapes). Use a new "
                "--workdir, or --config.force_new=True to start over in this one.")
        try:
            state = _restore_verified(directory, step, abstract)
        except DamagedCheckpoint as e:
            _quarantine(directory, step, e)
            damaged.append(step)
            manager.reload()
            older = [s for s in manager.all_steps() if s < step]
            step = max(older) if older else None
            continue
        if damaged:
            logging.warning("Resumed from step %d, the newest undamaged checkpoint.", step)
        return state
    raise ValueError(
        f"Every checkpoint in {directory} is damaged (steps {damaged}, moved to "
        f"{directory.parent / DAMAGED_DIR}); nothing to resume from. "
        "Start over with --config.force_new=True, or restore a backup of the workdir.")


def _base_config() -> ml_collections.ConfigDict:
    from dq_jax import configlib  # local: configlib imports the zoo
    return configlib.base_config()


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
    or not applicable then) counts as its default, except a key in LEGACY_VALUES: what runs
    before that key existed did (e.g. the per-layer random stream)."""
    from dq_jax import configlib
    defaults = {**_flat(_config_json(configlib.base_config())), **LEGACY_VALUES}
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
            "it from a backup, or delete it to resume under this config (checked against the "
            f"config {HISTORY_FILE} recorded, if any; the checkpoints' structure is still "
            "checked), or pass --config.force_new=True to start over.") from e


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
    if path.exists():
        recorded = _read_config_json(workdir)
    elif not has_checkpoints(workdir):
        return {}
    else:  # lost: the history recorded it at every start (rewritten by `record_start`)
        recorded = _recorded_in_history(workdir)
        if recorded is None:
            if config.allow_config_change:
                return {}
            raise WorkdirError(
                f"{path} is missing and {HISTORY_FILE} does not record the config that wrote "
                f"the checkpoints in {workdir}, so this config cannot be checked against it. "
                "Restore config.json from a backup, pass --config.allow_config_change=True to "
                "resume under this config (recorded), or --config.force_new=True to start over.")
        _warn(f"{path} is missing; using the config {HISTORY_FILE} recorded at the run's "
              f"latest start (step {recorded['step']}); it is written back when this run starts.")
    # A key newer than the workdir's record had its default there.
    theirs = {**json.loads(json.dumps(_identity(_base_config()), default=str)),
              **recorded["identity"]}
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
        stream = (refused.get("rounding_stream", [None])[0]
                  if "rounding" not in refused else None)
        hint = (f" (This workdir drew its stochastic rounding from the {stream!r} random "
                f"stream: pass --config.rounding_stream={stream} to resume it bitwise.)"
                if stream else "")
        raise WorkdirError(
            f"Resuming {workdir} under a changed config ({details}). Rerun with the recorded "
            f"values ({path}), pass --config.allow_config_change=True to continue with the "
            f"changes (recorded in {HISTORY_FILE}), or use a new --workdir.{hint}")
    return changes


def _recorded_in_history(workdir: epath.Path) -> dict | None:
    """The identity and config of the latest start/resume in run_history.jsonl (what
    config.json held then), with its step; None when no event records them."""
    for event in reversed(read_history(workdir)):
        if (event.get("event") in ("start", "resume") and isinstance(event.get("identity"), dict)
                and isinstance(event.get("config"), dict)):
            return event
    return None


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
    """Writes config.json (atomically) and the start/resume event with its config changes
    and the config itself (a lost config.json is restored from it)."""
    if jax.process_index() != 0:
        return
    from dq_jax import configlib
    record = {"identity": json.loads(json.dumps(_identity(config), default=str)),
              "config": configlib.applicable(config)}
    write_text_atomic(workdir / CONFIG_FILE, json.dumps(record, indent=2))
    fields: dict[str, Any] = {"step": step, "changes": changes,
                              "pid": os.getpid(), "host": socket.gethostname(), **record}
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


def _run_state_shapes(workdir: epath.Path) -> Any | None:
    """The abstract TrainState a dq_jax run in `workdir` saves, rebuilt from its config.json
    and dataset.json (what its checksums are computed over); None where those are missing or
    from another version (another program's checkpoint: nothing to verify against)."""
    from dq_jax import build, configlib
    try:
        config = configlib.complete(json.loads((workdir / CONFIG_FILE).read_text())["config"])
        facts = json.loads((workdir / "dataset.json").read_text())
        num_classes = config.num_classes if config.num_classes > 0 else int(facts["num_classes"])
        model = build.create_model(config, QuantConfig.from_mapping(config.quant), num_classes)
        k = int(config.grad_accum_steps)
        optimizer = build.create_optimizer(config, k, 1)
        shapes = jax.eval_shape(lambda: build.init_state(
            model, optimizer, tuple(facts["image_shape"]), int(config.seed)))
    except Exception as e:  # noqa: BLE001  (missing/foreign files: many exception types)
        logging.info("Cannot rebuild the state of the run in %s (%s).", workdir, e)
        return None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def load_float_variables(path: str) -> dict:
    """The `params` and `batch_stats` of a checkpoint, as a nested dict of numpy arrays.

    A dq_jax run's checkpoint is verified against its recorded checksum; a damaged one, or
    one holding NaN/inf, is refused in one line naming the step and the fix.
    """
    root, step = _find_checkpoint(path)
    where = f"config.init_from={path!r}: checkpoint step {step} in {root}"
    earlier = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and int(c.name) < step)
    fix = (f"Point config.init_from at an earlier step ({root / str(earlier[-1])})"
           if earlier else "Point config.init_from at another float checkpoint")
    fix += " or rerun the float training."
    abstract = _run_state_shapes(root.parent)
    try:
        if abstract is not None and _structure_matches(root, step, abstract) is not False:
            state = _restore_verified(root, step, abstract)
            restored = {"params": state.params, "batch_stats": state.batch_stats}
        else:
            if _recorded_digest(root, step) is not None:
                _warn(f"{where} has a checksum but its run's config.json/dataset.json do not "
                      "rebuild its state: restored without verification.")
            restored = _read(root, step, None)
    except DamagedCheckpoint as e:
        raise ValueError(f"{where} is damaged ({e}). {fix}") from e
    variables = jax.tree.map(np.asarray, {"params": restored["params"],
                                          "batch_stats": restored.get("batch_stats") or {}})
    refuse_nonfinite(_host_leaves(variables), where, "The float run diverged or the file is "
                     f"damaged; its levels would be NaN. {fix}")
    return variables


def init_from_float(path: str, state: Any, quant: QuantConfig | Mapping[tuple, QuantConfig],
                    optimizer: optax.GradientTransformation, *,
                    float_residual: bool = False,
                    inertia_code_rate: float | None = None) -> Any:
    """Quantized state initialised from a float checkpoint (DESIGN §1.1 "Initialisation").

    `quant`: the training config, or module path tuple -> each layer's (mixed widths).
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
        source, state.params, state.codes,
        quant.__getitem__ if isinstance(quant, Mapping) else lambda module: quant,
        source=f"config.init_from={path!r}")
    params = flax.traverse_util.unflatten_dict(new_params)
    refuse_nonfinite(_host_leaves(params), f"config.init_from={path!r}: the initial parameters",
                     "Its float kernels give no finite levels; use another float checkpoint.")
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
