"""`config.compilation_cache_dir`: a resumed or repeated run loads its compiled programs from
JAX's persistent cache, with the same results."""
import json
import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from dq_jax import jit_cache
from helpers import run_python

SMALL = ["--config=configs/digits.py", "--config.num_train_steps=4", "--config.batch_size=32",
         "--config.log_every_steps=2", "--config.checkpoint_every_steps=4",
         "--config.eval_every_steps=4"]


def _run(workdir, *extra) -> dict:
    """The CLI, without the test suite's own JAX cache (conftest), so the config's is used."""
    proc = run_python(["-m", "dq_jax.main", f"--workdir={workdir}", *SMALL, *extra],
                      unset=("JAX_COMPILATION_CACHE_DIR",
                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def test_second_run_loads_every_program_from_the_cache_with_the_same_results(tmp_path):
    first = _run(tmp_path / "a")
    cache = first["compilation_cache"]
    assert cache["dir"] == str(tmp_path / "a" / "compilation_cache")  # 'auto'
    assert cache["misses"] > 0 and any((tmp_path / "a" / "compilation_cache").iterdir())
    # Another workdir sharing that cache: nothing left to compile, the same numbers.
    second = _run(tmp_path / "b", f"--config.compilation_cache_dir={cache['dir']}")
    assert second["compilation_cache"]["dir"] == cache["dir"]
    assert second["compilation_cache"]["misses"] == 0
    assert second["compilation_cache"]["hits"] == cache["hits"] + cache["misses"]
    for key in ("eval_loss", "eval_top1", "eval_top5", "steps"):
        assert second[key] == first[key], key


def test_empty_setting_turns_the_cache_off(tmp_path):
    out = _run(tmp_path / "w", "--config.compilation_cache_dir=")
    assert out["compilation_cache"] == {"dir": "", "hits": 0, "misses": 0,
                                        "compile_seconds_saved": 0.0}
    assert not (tmp_path / "w" / "compilation_cache").exists()


def test_resolve_dir():
    assert jit_cache.resolve_dir("auto", "/w/x") == "/w/x/compilation_cache"
    assert jit_cache.resolve_dir("gs://b/cache", "/w") == "gs://b/cache"
    assert jit_cache.resolve_dir("", "/w") == ""
    with pytest.raises(ValueError, match=r"compilation_cache_dir=3 must be a string"):
        jit_cache.resolve_dir(3, "/w")


def test_an_unwritable_directory_is_one_clear_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        with pytest.raises(ValueError, match=r"compilation_cache_dir=.* is not a writable "
                                             r"directory .*; pass a writable directory, or ''"):
            jit_cache.check_writable(str(bad))
    jit_cache.check_writable(str(tmp_path / "new" / "cache"))  # created
    assert (tmp_path / "new" / "cache").is_dir() and not any((tmp_path / "new" / "cache").iterdir())


def test_a_cache_the_user_configured_for_jax_wins(tmp_path):
    """This process runs under conftest's JAX_COMPILATION_CACHE_DIR: the program keeps it."""
    user = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jit_cache.enable(str(tmp_path / "mine")) == user
    assert jax.config.jax_compilation_cache_dir == user
    assert jit_cache.enable("") == user


def test_one_process_switches_between_directories_and_off(tmp_path, monkeypatch):
    """Several runs in one process (--variants, a library user): each run's setting holds."""
    user = os.environ["JAX_COMPILATION_CACHE_DIR"]
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    x = jnp.ones(3)
    try:
        for name, factor in (("a", 3.0), ("b", 5.0)):
            where = str(tmp_path / name)
            assert jit_cache.enable(where) == where
            assert jax.config.jax_compilation_cache_dir == where
            with jit_cache.counting() as stats:
                jax.jit(lambda v, f=factor: v * f + 1.0)(x).block_until_ready()
            assert stats.misses == 1 and any((tmp_path / name).iterdir()), name
        assert jit_cache.enable("") == "" and not jax.config.jax_compilation_cache_dir
        with jit_cache.counting() as stats:
            jax.jit(lambda v: v * 7.0 - 1.0)(x).block_until_ready()
        assert stats.misses == 0 and stats.hits == 0  # no cache consulted
    finally:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", user)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jit_cache._ours = None
