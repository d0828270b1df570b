import numpy as np
import pytest


@pytest.fixture
def seed(request):
    """A fixed seed per test, derived from its name so parametrized cases differ."""
    import zlib
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)
