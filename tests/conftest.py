"""Shared fixtures of the test suite (small shapes, CPU).

The suite compiles the same train/eval steps many times (each `train_and_evaluate` call and
each subprocess builds them anew), so it shares JAX's persistent compilation cache across
tests, xdist workers and subprocesses. Set before JAX is imported; results are unaffected.
"""
import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dq_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture
def np_rng():
    """A fresh, seeded numpy generator per test (tests stay order-independent)."""
    return np.random.default_rng(1234)
