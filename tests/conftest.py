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


@pytest.fixture(params=["compiled", "numpy"])
def cpu_path(request, monkeypatch):
    """Runs a test on both CPU implementations: the compiled passes (LGM_OP_CPU_KERNELS=1, an
    error if they cannot be built) and the NumPy fallback (LGM_OP_CPU_KERNELS=0)."""
    monkeypatch.setenv("LGM_OP_CPU_KERNELS", "1" if request.param == "compiled" else "0")
    return request.param
