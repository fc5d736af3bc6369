"""JAX's persistent compilation cache for the training program (`config.compilation_cache_dir`).

A DQ step compiles in 2-3x the float step's time (docs/notebook.md §2.2); a resumed or repeated run
(a preemption, another seed of the same shapes) loads the compiled programs from the cache
instead of compiling them again. The cache key covers the program, the devices and the XLA
flags, so a stale entry is never used; an entry only saves time, results are the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

import jax
from absl import logging
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

AUTO = "auto"
SUBDIR = "compilation_cache"
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"
_ENV_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_ours: str | None = None  # the directory this module set (a user's own setting is left alone)


def resolve_dir(setting: str, workdir: str | os.PathLike) -> str:
    """`config.compilation_cache_dir` -> a directory, or '' for no cache: 'auto' is
    `<workdir>/compilation_cache` (resumes of this run), a path is used as given (share one
    between runs of the same shapes, e.g. seeds), '' turns the cache off."""
    if not isinstance(setting, str):
        raise ValueError(f"config.compilation_cache_dir={setting!r} must be a string: 'auto' "
                         "(<workdir>/compilation_cache), a directory, or '' (no cache).")
    if setting == AUTO:
        return str(epath.Path(workdir) / SUBDIR)
    return setting


def enable(directory: str) -> str:
    """Makes JAX cache compiled programs in `directory` ('' = no cache, also turning off one
    this module set for an earlier run); returns the directory JAX uses ('' for none). A cache
    the user configured for JAX itself (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) wins."""
    global _ours
    current = jax.config.jax_compilation_cache_dir or ""
    if current and current != _ours:  # the user's own (the env var sets jax.config too)
        return current
    if not directory:
        if current:  # ours, from an earlier run in this process: off now, as asked
            compilation_cache.reset_cache()
            jax.config.update("jax_compilation_cache_dir", None)
            _ours = None
        return ""
    if current != directory:
        check_writable(directory)
        if current:  # ours, for another workdir (--variants): JAX reads the setting once
            compilation_cache.reset_cache()
        compilation_cache.set_cache_dir(directory)
        _ours = directory
    if _ENV_MIN_TIME not in os.environ:
        # Every program, not only those over JAX's 1 s default: a resume then compiles
        # nothing, whatever the machine's speed (entries are small next to checkpoints).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def check_writable(directory: str) -> None:
    """Creates `directory` and writes a probe file there, or raises one clear ValueError: JAX
    itself would only warn on each read and drop every write."""
    path = epath.Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"config.compilation_cache_dir={directory!r} is not a writable directory "
            f"({type(e).__name__}: {e.strerror or e}); pass a writable directory, or '' to "
            "turn the compilation cache off.") from e


@dataclasses.dataclass
class CacheStats:
    """Programs compiled (misses) and loaded from the cache (hits) while counting."""
    hits: int = 0
    misses: int = 0
    seconds_saved: float = 0.0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses,
                "compile_seconds_saved": round(self.seconds_saved, 1)}


@contextlib.contextmanager
def counting() -> Iterator[CacheStats]:
    """Counts this process's cache hits and misses (jax.monitoring events) inside the block."""
    stats = CacheStats()

    def on_event(event: str, **kwargs) -> None:
        del kwargs
        if event == _HIT:
            stats.hits += 1
        elif event == _MISS:
            stats.misses += 1

    def on_duration(event: str, seconds: float, **kwargs) -> None:
        del kwargs
        if event == _SAVED:
            stats.seconds_saved += max(float(seconds), 0.0)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield stats
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)


def log_summary(directory: str, stats: CacheStats) -> None:
    if directory:
        logging.info("Compilation cache %s: %d program(s) loaded (%.1f s of compiling saved), "
                     "%d compiled.", directory, stats.hits, stats.seconds_saved, stats.misses)
