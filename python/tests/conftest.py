"""Shared fixtures: seeded random generators, ISA parametrization."""
import os
import zlib

import numpy as np
import pytest

import nibble

SEED = int(os.environ.get("NIBBLE_TEST_SEED", "20261123"))


def pytest_report_header(config):
    return (f"nibble {nibble.__version__}: isa={nibble.isa()} supported={nibble.supported_isas()} "
            f"threads={nibble.num_threads()} seed={SEED} (set NIBBLE_TEST_SEED to change)")


@pytest.fixture
def rng(request):
    # One stream per test, derived from the global seed and the test id: reproducible in isolation.
    h = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng([SEED, h])


@pytest.fixture(params=nibble.supported_isas())
def each_isa(request):
    """Runs the test once per kernel path the CPU supports (scalar reference included)."""
    before = nibble.isa()
    nibble.set_isa(request.param)
    yield request.param
    nibble.set_isa(before)
