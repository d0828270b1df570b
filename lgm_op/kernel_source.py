"""Locating and reading the CUDA sources that ship with the package.

Sources are read only from the package's own ``kernels`` folder (installed as ``lgm_op.kernels``,
or the ``kernels/`` folder beside ``lgm_op/`` in a source checkout); never from the working
directory or a path taken from the environment. Local ``#include "x.cuh"`` lines are expanded here,
so NVRTC, the CPU simulator and the cache key all see one self-contained text.
"""
import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["kernels_dir", "load_source", "source_hash", "KERNEL_FILES"]

KERNEL_FILES = ("lgm_class_terms.cu", "lgm_forward.cu", "lgm_backward.cu")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_.]+)"[ \t]*$', re.M)


def kernels_dir():
    """The folder holding the ``.cu``/``.cuh`` sources."""
    spec = importlib.util.find_spec("lgm_op.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    checkout = Path(__file__).resolve().parent.parent / "kernels"
    if (checkout / "__init__.py").is_file():
        return checkout
    raise FileNotFoundError("lgm: the CUDA sources (package lgm_op.kernels) are not installed")


@lru_cache(maxsize=None)
def load_source(name):
    """The text of kernels/<name> with its local includes expanded (each at most once)."""
    folder = kernels_dir()
    seen = set()

    def expand(fname):
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise ValueError(f"lgm: kernel source name must be a plain file name, got {fname!r}")
        if fname in seen:
            return ""
        seen.add(fname)
        text = (folder / fname).read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def source_hash(text):
    """A short stable digest of a source text, for compile caches."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
