"""The CPU path's compiled passes (``kernels/lgm_cpu.cpp``): built with g++ and OpenMP on first
use through :mod:`lgm_op.compile_cache`, loaded with ctypes, framework-free.

Everything the CPU path does outside its matrix products is a pass over N x K, N x D or K x D;
in NumPy each is a separate single-threaded sweep (and a call, which at small sizes costs more
than the sweep). The compiled passes fuse them and run each on every core once it is large enough
to pay for waking the threads (``kernels/lgm_cpu.cpp``: ``kParallelWork``). Where no compiler is
present the CPU path computes the same thing with NumPy (``lgm_op.cpu``), slower.

The environment variable ``LGM_OP_CPU_KERNELS`` chooses: unset: the compiled passes when they
build, else NumPy with a warning; ``1``: the compiled passes or an error; ``0``: NumPy.
"""
import ctypes
import os
import threading
import warnings

import numpy as np

from . import compile_cache
from .checks import validate_labels_numpy
from .kernel_source import load_source

__all__ = ["ENV", "CPUKernels", "kernels"]

ENV = "LGM_OP_CPU_KERNELS"
_VALUES = {None: "auto", "1": "compiled", "0": "numpy"}
_SOURCE = "lgm_cpu.cpp"
# -ffp-contract=off: no implicit fused multiply-add, whose single rounding turns an overflowing
# product added to -inf into -inf where the unfused form (and the reference) gives NaN; the
# passes are bound by memory, not by arithmetic.
_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
          "-ffp-contract=off", "-fvisibility=hidden")

_P, _I, _D, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
# name -> argument types (pointers are passed as integer addresses)
_SHAPE = (_I, _I, _I, _I)           # n, k, d, sd
_IVS = (_P, _D, _D, _P, _P)         # log_var, logvar_min, logvar_max, iv_cache, iv_ready
_SIGNATURES = {
    "prepare": (_P, _P, _P) + _SHAPE + (_D, _D) + (_P,) * 9,
    "forward_epilogue": (_P, _P, _P) + _IVS + _SHAPE + (_P,) * 8 + (_D, _D, _C, _C, _P, _P),
    "backward_weights": (_P, _P, _P) + _SHAPE + (_P, _P, _D) + (_P,) * 6,
    "backward_features": (_P, _P) + _IVS + _SHAPE + (_P,) * 6,
    "backward_classes": (_P, _P, _P) + _IVS + (_P,) + _SHAPE + (_P, _P, _P, _I) + (_P,) * 5 + (
        _C, _C, _C, _C, _P, _P),
}
_PER_TYPE = ("prepare", "forward_epilogue")
_LABEL_SUFFIX = {np.dtype(np.float32): "f", np.dtype(np.float64): "d", np.dtype(np.int32): "i",
                 np.dtype(np.int64): "l"}
_PER_PAIR = ("backward_weights", "backward_features", "backward_classes")
_TYPE_SUFFIX = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
_PAIR_SUFFIX = {(np.dtype(np.float32), np.dtype(np.float32)): "f",
                (np.dtype(np.float32), np.dtype(np.float64)): "fd",
                (np.dtype(np.float64), np.dtype(np.float64)): "d"}


# Instruction sets the passes are built for where the CPU has every one of a level's features
# (the flags are part of the cache key, so a machine without them builds its own module). The
# AVX-512 level takes about a tenth off the passes' time at 128 x 100 x 384 on the AMD EPYC here
# (best of alternating runs: 424 -> 390 us a step; their loops vectorise with masked tails).
_ARCH_LEVELS = (
    ({"avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"},
     ("-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl")),
    ({"avx2", "fma"}, ("-mavx2", "-mfma")),
)


def _arch_flags():
    """The compiler flags of the widest level of ``_ARCH_LEVELS`` this CPU has; nothing
    machine-specific otherwise."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((level for needed, level in _ARCH_LEVELS if needed <= flags), ())
    except OSError:
        pass
    return ()


class CPUKernels:
    """The loaded module: ``call(name, dtype, *args)`` for the per-type passes,
    ``call(name, (dtype, work), *args)`` for the backward's, and ``row_starts(*args)``."""

    def __init__(self, lib):
        self._functions = {}
        for name in _PER_TYPE:
            for dtype, sfx in _TYPE_SUFFIX.items():
                self._functions[name, dtype] = self._bind(lib, f"lgm_{name}_{sfx}", name)
        for name in _PER_PAIR:
            for pair, sfx in _PAIR_SUFFIX.items():
                self._functions[name, pair] = self._bind(lib, f"lgm_{name}_{sfx}", name)
        self.row_starts = lib.lgm_direct_row_starts
        self.row_starts.argtypes = (_P, _P, _P, _I, _I, _P)
        self.row_starts.restype = None
        self._labels = {}
        for dtype, sfx in _LABEL_SUFFIX.items():
            function = getattr(lib, f"lgm_labels_{sfx}")
            function.argtypes = (_P, _I, _I, _P)
            function.restype = _I
            self._labels[dtype] = function
        self._set_parallel_work = lib.lgm_set_parallel_work
        self._set_parallel_work.argtypes = (_I,)
        self._set_parallel_work.restype = _I
        self._set_thread_parallel_work = lib.lgm_set_thread_parallel_work
        self._set_thread_parallel_work.argtypes = (_I,)
        self._set_thread_parallel_work.restype = _I
        self._threads_for = lib.lgm_threads_for
        self._threads_for.argtypes = (_I,)
        self._threads_for.restype = _I

    def labels(self, label, num_classes):
        """Labels (N,) as int64 class ids, after checking every value is an integer in [0, K),
        in one pass (``checks.validate_labels_numpy`` does the same in NumPy, and gives the
        message for a bad one)."""
        label = np.asarray(label)
        function = self._labels.get(label.dtype)
        if function is None or label.ndim != 1 or not label.flags.c_contiguous:
            return validate_labels_numpy(label, num_classes)
        out = np.empty(label.shape, np.int64)
        if function(label.ctypes.data, label.shape[0], num_classes, out.ctypes.data) >= 0:
            validate_labels_numpy(label, num_classes)  # raises, naming the first bad value
            raise AssertionError("lgm: the label checks disagree")  # pragma: no cover
        return out

    def set_parallel_work(self, elements):
        """Sets the size (elements of the array a pass sweeps) from which the passes run on
        several threads, for every caller in the process; 0 restores the default (2^20).
        Returns the previous value. For tests and measurements."""
        return int(self._set_parallel_work(int(elements)))

    def set_thread_parallel_work(self, elements):
        """The same for the calling thread only (the lower of this and the process-wide value
        applies; 0: none); returns the thread's previous value (0 when it had none)."""
        return int(self._set_thread_parallel_work(int(elements)))

    def threads_for(self, elements):
        """How many threads a pass over ``elements`` elements would use on the calling thread."""
        return int(self._threads_for(int(elements)))

    @staticmethod
    def _bind(lib, symbol, name):
        function = getattr(lib, symbol)
        function.argtypes = _SIGNATURES[name]
        function.restype = None
        return function

    def call(self, name, types, *args):
        function = self._functions.get((name, types))   # types given as NumPy dtypes already
        if function is None:
            function = self._functions[name, tuple(map(np.dtype, types)) if isinstance(
                types, tuple) else np.dtype(types)]
        function(*args)


_lock = threading.Lock()
_loaded = {}


def mode():
    """'auto', 'compiled' or 'numpy', from ``LGM_OP_CPU_KERNELS``."""
    value = os.environ.get(ENV)
    if value not in _VALUES:
        raise ValueError(f"lgm: environment variable {ENV} must be unset, 1 (the compiled CPU "
                         f"passes, or an error) or 0 (the NumPy CPU path), got {value!r}")
    return _VALUES[value]


def kernels():
    """The compiled passes, or None for the NumPy path (``LGM_OP_CPU_KERNELS=0``, or unset where
    they cannot be built: a warning says why, once). Built once per process."""
    how = mode()
    if how == "numpy":
        return None
    with _lock:
        if "module" not in _loaded:
            try:
                path = compile_cache.build_shared_object(
                    "cpu", load_source(_SOURCE), _FLAGS + _arch_flags())
                _loaded["module"] = CPUKernels(compile_cache.load_shared_object(path))
            except (compile_cache.CompileError, compile_cache.CacheError, OSError) as exc:
                _loaded["module"] = None
                _loaded["error"] = exc
                if how == "auto":
                    warnings.warn(f"lgm: the compiled CPU passes are unavailable ({exc}); the CPU "
                                  f"path runs on NumPy alone, slower", RuntimeWarning,
                                  stacklevel=3)
        module = _loaded["module"]
    if module is None and how == "compiled":
        raise RuntimeError(f"lgm: {ENV}=1 asks for the compiled CPU passes, which are "
                           f"unavailable: {_loaded['error']}")
    return module

