"""Shared fixtures of the quantizer tests (small shapes, CPU)."""
import numpy as np
import pytest


@pytest.fixture
def np_rng():
    """A fresh, seeded numpy generator per test (tests stay order-independent)."""
    return np.random.default_rng(1234)
