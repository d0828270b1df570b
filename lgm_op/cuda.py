"""The CUDA path: launchers for the kernels in ``kernels/*.cu`` (SPEC sections 1-2).

API (the signatures of ``cpu.py``, plus the deferred label check)::

    lgm_forward_cuda(x, label, mu, log_var, opts, training, out=None, defer_check=False)
        -> (logits (N, K), lkd (N,)), or (logits, lkd, check) with defer_check=True
    lgm_backward_cuda(x, label, mu, log_var, grad_logits, grad_lkd, opts, training,
                      need=(True, True, True), out=None) -> (dx | None, dmu | None, dlog_var | None)

``out``: preallocated C-contiguous arrays of x's dtype (entries may be None) that the kernels write
into directly. ``need``: which of (dx, dmu, dlog_var) to compute; no kernel runs for the others.
The forward checks the labels inside its kernel: with ``defer_check=False`` it reads the 4-byte
result back at once and raises ``ValueError`` as the CPU path does; with ``defer_check=True`` it
reads nothing and returns ``check``, to be called after the caller's one stream synchronisation
(it raises the same error). The backward does not check the labels again: a value that is not a
class counts as no class.

Framework-free. The array type picks where the kernels run:

- CuPy arrays: on their GPU, through ``cupy.RawModule`` (NVRTC), on the current stream. Nothing is
  synchronised here (except the label read-back of a forward without ``defer_check``).
- NumPy arrays: on the CPU simulator ``lgm_op.cudasim``, which runs the unmodified kernel sources
  (built with AddressSanitizer when the process runs with its runtime, ``cudasim.asan_env()``).

Kernels are templates, one per kernel, instantiated by name expression per dtype (``T`` float or
double; label dtype ``L`` float, double, int or long long). Launches per call (256 threads; 64 x 64
output tiles, the float32 forward 128 samples x 64 classes):

- both: ``lgm::centroid<T>`` (one block) shifts by a centroid of the means, and
  ``lgm::class_terms<T>`` forms once the interleaved (mean, iv) (K, D, 2), the log-determinants
  (K,), the operands of the scaled or expanded forms (K, D, 2) and the bad classes (K,); the
  backward converts the labels to int32 class ids once (``lgm::class_ids<L>``) and marks the
  samples with a non-finite feature in them (``lgm::row_flags<T>``).
- forward: ``lgm::forward<T, L, true>`` over (K, N) tiles, checking labels, in the scaled form
  with the label column and any entry that may have cancelled recomputed directly. Label-free:
  ``lgm::forward<T, int, false>``, an argmax by the array library, then ``lgm::lkd_rows<T>``.
- backward: ``lgm::backward_dx<T>`` over (N, D) tiles and ``lgm::backward_params<T>`` over
  (K, D) tiles, the expanded forms (a float32 call below ``WIDE_BACKWARD_DIM`` features runs the
  float64 kernels on converted inputs). The loop over classes (dx) or samples (parameters) is
  split over gridDim.z into as many slices as fill the GPU's resident blocks with the least tail
  (from each kernel's real occupancy), into partial buffers that ``lgm::sum_partials<T>`` adds in
  a fixed order; the isotropic log-variance gradient always goes through one such sum (over the
  feature tiles). No atomics, so results are bitwise reproducible. No N x K buffer is made
  (grad_logits is read in place when it is C-contiguous in x's dtype), except the float64 copy
  of grad_logits of a float32 call below ``WIDE_BACKWARD_DIM`` features.

The accuracy of each form, and which entries take the direct one, is written in the kernels.

CuPy is imported lazily: ``import lgm_op.cuda`` needs neither CuPy nor a GPU.
"""
import contextlib
import ctypes
import functools
import glob
import importlib.util
import math
import os

import numpy as np

from .checks import check_float_dtype, check_shapes
from .kernel_source import load_source, source_hash

__all__ = ["lgm_forward_cuda", "lgm_backward_cuda", "ensure_nvrtc", "launch_grids",
           "KERNEL_ENTRIES", "MAIN_LOOP_UPDATES", "NVRTC_OPTIONS"]

# The sources are C++17 with no headers; no fast-math, so expf/exp keep their documented accuracy.
NVRTC_OPTIONS = ("--std=c++17",)

# Must match kernels/lgm_common.cuh.
_THREADS = 256
_TILE = 64
_PER = 4
_STEP = {"f32": 16, "f64": 8}
# Samples per forward tile (16 x Blocking<T>::kRowsPer) and its step (kForwardStep).
_FORWARD_ROWS = {"f32": 128, "f64": 64}
_FORWARD_STEP = {"f32": 8, "f64": 8}
_ROWS_PER_WARP_BLOCK = _THREADS // 32  # lkd_rows / class_terms: one warp per row
# A split loop gives each slice at least this many classes / samples, so the partial buffers and
# the extra pass stay small next to the work they parallelise.
_MIN_SLICE = 256
# Slice counts whose wave time is within this share of the best count as equally good.
_SLICE_SLACK = 0.05
# The simulator has no multiprocessors; these nominal figures make it take the split paths on
# moderately sized test shapes, as a GPU would on large ones.
_SIM_SM_COUNT = 4
_SIM_BLOCKS_PER_SM = 2
_GRID_YZ_MAX = 65535

_T = {"f32": "float", "f64": "double"}
_L = {"f32": "float", "f64": "double", "i32": "int", "i64": "long long"}
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
           np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}

# Steps of the contracted dimension one iteration of each contraction kernel's main loop takes
# (the loop is unrolled by that much: its shared buffers' addresses are then fixed).
_STEPS_PER_ITERATION = {"forward": 1, "logits": 1, "backward_dx": 2, "backward_params": 1}
# (i, k, j) updates one thread makes per iteration of each contraction kernel's tile loop, by
# (kernel, dtype): its outputs (4 x 4; the forward's 16 x 4 of a 128- or 64-sample tile) times
# the step.
MAIN_LOOP_UPDATES = {
    **{(base, t): _FORWARD_ROWS[t] // 16 * _PER * _FORWARD_STEP[t] * _STEPS_PER_ITERATION[base]
       for base in ("forward", "logits") for t in _T},
    **{(base, t): _PER * _PER * _STEP[t] * _STEPS_PER_ITERATION[base]
       for base in ("backward_dx", "backward_params") for t in _T}}

# (source file, kernel, dtype, label dtype or None, name expression) of every kernel launched.
KERNEL_ENTRIES = tuple(
    [("lgm_class_terms.cu", "centroid", t, None, f"lgm::centroid<{_T[t]}>") for t in _T]
    + [("lgm_class_terms.cu", "class_terms", t, None, f"lgm::class_terms<{_T[t]}>") for t in _T]
    + [("lgm_class_terms.cu", "row_flags", t, None, f"lgm::row_flags<{_T[t]}>") for t in _T]
    + [("lgm_class_terms.cu", "class_ids", None, lt, f"lgm::class_ids<{_L[lt]}>") for lt in _L]
    + [("lgm_forward.cu", "forward", t, lt, f"lgm::forward<{_T[t]}, {_L[lt]}, true>")
       for t in _T for lt in _L]
    + [("lgm_forward.cu", "logits", t, None, f"lgm::forward<{_T[t]}, int, false>") for t in _T]
    + [("lgm_forward.cu", "lkd_rows", t, None, f"lgm::lkd_rows<{_T[t]}>") for t in _T]
    + [("lgm_backward.cu", base, t, None, f"lgm::{base}<{_T[t]}>")
       for base in ("backward_dx", "backward_params", "sum_partials") for t in _T])

# Below this many features, a float32 backward runs in float64 (inputs converted, gradients
# rounded once): the expanded sums lose accuracy where the features spread far beyond their
# distances to the other classes (SPEC 5's 2-D classes 1e2 to 1e4 apart), and their float32 sums
# over samples fall short of the reference's compensated ones; with few features the arithmetic
# is a small part of the cost. The CPU path has the same limit.
WIDE_BACKWARD_DIM = 32


def _name(base, t, lt=None):
    for _, b, dt, label_t, expr in KERNEL_ENTRIES:
        if (b, dt, label_t) == (base, t, lt):
            return expr
    raise KeyError((base, t, lt))


def ensure_nvrtc():
    """The NVRTC version CuPy sees, after loading ``libnvrtc`` from the pip wheel if needed.

    CuPy 13 looks for the system's libnvrtc; with only the ``nvidia-cuda-nvrtc-cu12`` wheel
    installed, loading the wheel's library globally first lets CuPy find it.
    """
    from cupy.cuda import nvrtc
    try:
        return nvrtc.getVersion()
    except Exception:  # CuPy reports a missing library as RuntimeError or CUDA errors
        spec = importlib.util.find_spec("nvidia")
        if spec is None or not spec.submodule_search_locations:
            raise
        for root in spec.submodule_search_locations:
            for path in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*"))):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return nvrtc.getVersion()


def _ceil_div(a, b):
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _source(file_name):
    """(text, digest) of kernels/<file_name> with its includes expanded."""
    text = load_source(file_name)
    return text, source_hash(text)


def _names_in(file_name):
    return tuple(e[4] for e in KERNEL_ENTRIES if e[0] == file_name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    from cupy.cuda import runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, device_id)


class _Backend:
    """Where kernels run: xp (the array module), compiled modules and the launch call."""

    # (device id or None for the simulator, source digest) -> module
    _modules = {}

    def __init__(self, x):
        if isinstance(x, np.ndarray):
            self.xp = np
            self.device_id = None
            self.sm_count = _SIM_SM_COUNT
        else:
            import cupy
            if not isinstance(x, cupy.ndarray):
                raise TypeError(f"lgm: expected CuPy or NumPy arrays, got {type(x).__name__}")
            self.xp = cupy
            self.device_id = x.device.id
            self.sm_count = _sm_count(self.device_id)

    def device(self):
        """Context making the inputs' GPU current (kernels launch on its current stream)."""
        if self.device_id is None:
            return contextlib.nullcontext()
        return self.xp.cuda.Device(self.device_id)

    def function(self, file_name, name):
        source, digest = _source(file_name)
        key = (self.device_id, digest)
        module = self._modules.get(key)
        if module is None:
            names = _names_in(file_name)
            if self.device_id is None:
                from . import cudasim
                # under the AddressSanitizer runtime every access of a kernel is checked
                module = cudasim.RawModule(code=source, name_expressions=names,
                                           sanitize=cudasim.asan_loaded())
            else:
                ensure_nvrtc()
                module = self.xp.RawModule(code=source, options=NVRTC_OPTIONS,
                                           name_expressions=names)
            self._modules[key] = module
        return module.get_function(name)

    def blocks_per_sm(self, file_name, name):
        """Resident 256-thread blocks of kernel ``name`` per multiprocessor."""
        if self.device_id is None:
            return _SIM_BLOCKS_PER_SM
        return _occupancy(self.device_id, self.function(file_name, name))

    def launch(self, file_name, name, grid, args):
        """One launch of 256-thread blocks; a grid with no blocks is skipped (empty input)."""
        if min(grid) == 0:
            return
        if max(grid[1:], default=1) > _GRID_YZ_MAX:
            raise ValueError(f"lgm: kernel {name} would need grid {grid}; the y and z extents "
                             f"are limited to {_GRID_YZ_MAX} (is N or D this large?)")
        self.function(file_name, name)(tuple(grid), (_THREADS,), tuple(args))


@functools.lru_cache(maxsize=None)
def _occupancy_cached(device_id, function_ptr):
    from cupy.cuda import driver
    return max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(function_ptr, _THREADS, 0))


def _occupancy(device_id, kernel):
    return _occupancy_cached(device_id, kernel.kernel.ptr)


def _slices(blocks, length, resident):
    """(slices, length per slice) for splitting a loop of ``length`` over gridDim.z.

    ``blocks`` output tiles, ``resident`` blocks the GPU holds at once. The time in whole waves
    per unit of work, ceil(blocks * s / resident) / s, is taken for slice counts s that keep
    every slice at least _MIN_SLICE long; the fewest slices within _SLICE_SLACK of the best win,
    since every slice adds a partial buffer and a pass over it.
    """
    if length <= 0 or blocks <= 0:  # an empty loop or an empty grid: nothing to split
        return 1, max(length, 1)
    counts = range(1, max(1, length // _MIN_SLICE) + 1)
    cost = {s: math.ceil(blocks * s / resident) / s for s in counts}
    best = min(cost.values())
    slices = min(s for s in counts if cost[s] <= best * (1 + _SLICE_SLACK))
    per_slice = _ceil_div(_ceil_div(length, slices), 16) * 16
    return _ceil_div(length, per_slice), per_slice


def launch_grids(n, k, dim, sm_count, blocks_per_sm, dtype="f32"):
    """{kernel: (grid, loop length per slice)} of the contraction kernels for (N, K, D).

    blocks_per_sm: {"forward" | "backward_dx" | "backward_params": resident blocks per SM};
    dtype: "f32" or "f64" (the forward's tile height depends on it).
    """
    dim_tiles = _ceil_div(dim, _TILE)
    row_tiles, class_tiles = _ceil_div(n, _TILE), _ceil_div(k, _TILE)
    dx = _slices(row_tiles * dim_tiles, k, blocks_per_sm["backward_dx"] * sm_count)
    params = _slices(class_tiles * dim_tiles, n, blocks_per_sm["backward_params"] * sm_count)
    return {"forward": ((class_tiles, _ceil_div(n, _FORWARD_ROWS[dtype]), 1), dim),
            "backward_dx": ((row_tiles, dim_tiles, dx[0]), dx[1]),
            "backward_params": ((class_tiles, dim_tiles, params[0]), params[1])}


class _Call:
    """The checked, contiguous operands of one forward or backward call."""

    def __init__(self, x, label, mu, log_var, opts):
        self.be = _Backend(x)
        xp = self.be.xp
        dtype = check_float_dtype("data", x.dtype)
        check_shapes(opts, x.shape, None if label is None else label.shape, mu.shape,
                     log_var.shape)
        self.dtype = dtype
        self.real = dtype.type  # kernel scalars in the compute dtype
        self.t = _SUFFIX[dtype]
        with self.be.device():  # any copy lands on the inputs' GPU
            self.x = xp.ascontiguousarray(x)
            self.mu = xp.ascontiguousarray(mu, dtype=dtype)
            self.log_var = xp.ascontiguousarray(log_var, dtype=dtype)
            self.label, self.lt = (None, None) if label is None else self._label(label)
        self.n, self.dim = x.shape
        self.k = opts.num_classes
        self.opts = opts

    def _label(self, label):
        """label (N,) of any real dtype in the nearest dtype the kernels take, and its suffix."""
        dtype = np.dtype(label.dtype)
        if dtype.kind == "f":
            kernel_dtype = np.float32 if dtype.itemsize <= 4 else np.float64
        elif dtype.kind in "iu":
            # unsigned 64-bit values above 2^63 wrap to negatives and are reported as bad
            kernel_dtype = np.int32 if dtype.itemsize < 4 or dtype == np.int32 else np.int64
        else:
            raise ValueError(f"lgm: label must have a real dtype, got {dtype.name}")
        kernel_dtype = np.dtype(kernel_dtype)
        return self.be.xp.ascontiguousarray(label, dtype=kernel_dtype), _SUFFIX[kernel_dtype]

    def array(self, value, shape_name, shape):
        """An operand in the compute dtype, C-contiguous, after checking its shape."""
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"lgm: {shape_name} must have shape {tuple(shape)}, "
                             f"got {tuple(value.shape)}")
        return self.be.xp.ascontiguousarray(value, dtype=self.dtype)

    def output(self, given, name, shape):
        """``given`` (checked: shape, dtype, C-contiguous, on the inputs' device) or a new array."""
        xp = self.be.xp
        if given is None:
            return xp.empty(shape, dtype=self.dtype)
        if not isinstance(given, type(self.x)):
            raise TypeError(f"lgm: out {name} must be a {type(self.x).__name__}, "
                            f"got {type(given).__name__}")
        if tuple(given.shape) != tuple(shape) or given.dtype != self.dtype:
            raise ValueError(f"lgm: out {name} must have shape {tuple(shape)} and dtype "
                             f"{self.dtype.name}, got {tuple(given.shape)} {given.dtype.name}")
        if not given.flags.c_contiguous:
            raise ValueError(f"lgm: out {name} must be C-contiguous")
        if self.be.device_id is not None and given.device.id != self.be.device_id:
            raise ValueError(f"lgm: out {name} must be on GPU {self.be.device_id}, "
                             f"got GPU {given.device.id}")
        return given

    def shapes(self):
        return np.int32(self.n), np.int32(self.k), np.int32(self.dim)

    def clamp(self):
        return self.real(self.opts.logvar_min), self.real(self.opts.logvar_max)

    def flag(self, value):
        return np.int32(bool(value))

    def class_terms(self, scaled):
        """The per-class operands: (mean_iv, terms, log_det, sq, shift, bad).

        mean_iv (K, D, 2) = interleaved (mu, iv); log_det (K,); shift (D,) the centroid of the
        means; terms (K, D, 2): (sqrt(iv), -(mu - shift) sqrt(iv)) when ``scaled`` (the forward),
        else (iv, (mu - shift) iv), 0 for a bad class; sq (K,) = sum_j ((mu - shift) sqrt(iv))^2
        when ``scaled``, else None; bad (K,) int32: 1 where a class's mean or log-variance is not
        finite or its terms overflow.
        """
        xp = self.be.xp
        shift = xp.empty(self.dim, dtype=self.dtype)
        mean_iv = xp.empty((self.k, self.dim, 2), dtype=self.dtype)
        terms = xp.empty((self.k, self.dim, 2), dtype=self.dtype)
        log_det = xp.empty(self.k, dtype=self.dtype)
        sq = xp.empty(self.k, dtype=self.dtype) if scaled else None
        bad = xp.empty(self.k, dtype=np.int32)
        if self.dim:
            self.be.launch("lgm_class_terms.cu", _name("centroid", self.t), (1,),
                           (self.mu, shift, np.int32(self.k), np.int32(self.dim)))
        self.be.launch("lgm_class_terms.cu", _name("class_terms", self.t),
                       (_ceil_div(self.k, _ROWS_PER_WARP_BLOCK),),
                       (self.mu, self.log_var, shift, mean_iv, terms, log_det, sq, bad,
                        np.int32(self.k), np.int32(self.dim)) + self.clamp()
                       + (self.flag(self.opts.isotropic), self.flag(scaled)))
        return mean_iv, terms, log_det, sq, shift, bad

    def row_codes(self, ids):
        """(N,) int32: each sample's class id (``ids``), or -3 - id for one with a non-finite
        feature."""
        code = self.be.xp.empty(self.n, dtype=np.int32)
        self.be.launch("lgm_class_terms.cu", _name("row_flags", self.t),
                       (_ceil_div(self.n, _ROWS_PER_WARP_BLOCK),),
                       (self.x, ids, code, np.int32(self.n), np.int32(self.dim)))
        return code

    def class_ids(self):
        """The labels as int32 class ids (N,), -1 where a value is not a class."""
        ids = self.be.xp.empty(self.n, dtype=np.int32)
        self.be.launch("lgm_class_terms.cu", _name("class_ids", None, self.lt),
                       (_ceil_div(self.n, _THREADS),),
                       (self.label, ids, np.int32(self.n), np.int32(self.k)))
        return ids


def _outputs(out, count):
    if out is None:
        return (None,) * count
    out = tuple(out)
    if len(out) != count:
        raise ValueError(f"lgm: out must hold {count} arrays (or None), got {len(out)}")
    return out


def lgm_forward_cuda(x, label, mu, log_var, opts, training, out=None, defer_check=False):
    """Forward of SPEC section 1 on the GPU (CuPy arrays) or the simulator (NumPy arrays).

    x: (N, D) float32/float64; label: (N,) integer-valued labels of any real dtype, or None for the
    label-free form (the likelihood then uses the predicted class); mu: (K, D);
    log_var: (K, D), or (K, 1) when ``opts.isotropic``; training: applies the margin.
    out: optional (logits (N, K), lkd (N,)) to write into. Returns logits: (N, K) and lkd: (N,),
    in the dtype of x, and with ``defer_check`` the label check to call after synchronising.
    """
    call = _Call(x, label, mu, log_var, opts)
    be, xp = call.be, call.be.xp
    out_logits, out_lkd = _outputs(out, 2)
    with be.device():
        logits = call.output(out_logits, "logits", (call.n, call.k))
        lkd = call.output(out_lkd, "lkd", (call.n,))
        mean_iv, terms, log_det, sq, shift, _ = call.class_terms(scaled=True)
        grid = (_ceil_div(call.k, _TILE), _ceil_div(call.n, _FORWARD_ROWS[call.t]))
        operands = (call.x, shift, terms, sq, mean_iv, log_det)
        if call.label is not None:
            first_bad = xp.full(1, call.n, dtype=np.int32)
            be.launch("lgm_forward.cu", _name("forward", call.t, call.lt), grid,
                      operands + (call.label, logits, lkd, first_bad)
                      + call.shapes() + (call.real(opts.margin(training)),
                                         call.flag(opts.logdet_logits),
                                         call.flag(opts.logdet_lkd)))
            check = functools.partial(_raise_bad_label, first_bad, label, call.n, call.k)
        else:
            be.launch("lgm_forward.cu", _name("logits", call.t), grid,
                      operands + (None, logits, None, None) + call.shapes()
                      + (call.real(0), call.flag(opts.logdet_logits), np.int32(0)))
            if call.n:
                # numpy.argmax semantics (the first of tied maxima), as the CPU path
                y = xp.ascontiguousarray(xp.argmax(logits, axis=1), dtype=np.int32)
                be.launch("lgm_forward.cu", _name("lkd_rows", call.t),
                          (_ceil_div(call.n, _ROWS_PER_WARP_BLOCK),),
                          (call.x, mean_iv, log_det, y, lkd, np.int32(call.n),
                           np.int32(call.dim), call.flag(opts.logdet_lkd)))
            check = _no_check
    if defer_check:
        return logits, lkd, check
    check()
    return logits, lkd


def _no_check():
    return None


def _raise_bad_label(first_bad, label, n, k):
    """Raise the CPU path's ValueError if the forward kernel found a label outside [0, K)."""
    bad = int(first_bad[0])
    if bad < n:
        raise ValueError(f"lgm: label must hold integers in [0, {k}), "
                         f"got {label[bad].item()!r} at index {bad}")


def lgm_backward_cuda(x, label, mu, log_var, grad_logits, grad_lkd, opts, training,
                      need=(True, True, True), out=None):
    """Backward of SPEC section 2 on the GPU (CuPy arrays) or the simulator (NumPy arrays).

    x: (N, D); label: (N,) labels the forward accepted (for the label-free form, the predicted
    classes); mu: (K, D); log_var: (K, D) or (K, 1); grad_logits: (N, K) = dL/dlogits;
    grad_lkd: (N,) = dL/dlkd. need: which of (dx, dmu, dlog_var) to compute; out: optional
    (dx, dmu, dlog_var) to write into (entries may be None). Returns dx: (N, D), dmu: (K, D),
    dlog_var: shaped like log_var, in the dtype of x; None for what was not needed.
    """
    call = _Call(x, label, mu, log_var, opts)
    be, xp = call.be, call.be.xp
    n, k, dim = call.n, call.k, call.dim
    need = tuple(bool(v) for v in need)
    if len(need) != 3:
        raise ValueError(f"lgm: need must hold 3 flags (dx, dmu, dlog_var), got {len(need)}")
    out_dx, out_dmu, out_ds = _outputs(out, 3)
    with be.device():
        dx = call.output(out_dx, "dx", (n, dim)) if need[0] else None
        dmu = call.output(out_dmu, "dmu", (k, dim)) if need[1] else None
        ds = call.output(out_ds, "dlog_var", call.log_var.shape) if need[2] else None
        if not any(need):
            return dx, dmu, ds
        gz = call.array(grad_logits, "grad_logits", (n, k))
        gl = call.array(grad_lkd, "grad_lkd", (n,))
        if call.t == "f32" and dim < WIDE_BACKWARD_DIM:
            x64, mu64, s64, gz64, gl64 = (a.astype(np.float64)
                                          for a in (call.x, call.mu, call.log_var, gz, gl))
            wide = lgm_backward_cuda(x64, label, mu64, s64, gz64, gl64, opts, training, need=need)
            for given, result in zip((dx, dmu, ds), wide):
                if given is not None:
                    given[...] = result  # rounded once to float32
            return dx, dmu, ds
        mean_iv, terms, _, _, shift, bad_class = call.class_terms(scaled=False)
        row_code = call.row_codes(call.class_ids())
        alpha = call.real(opts.margin(training))
        dx_name = _name("backward_dx", call.t)
        params_name = _name("backward_params", call.t)
        grids = launch_grids(n, k, dim, be.sm_count, {
            "backward_dx": be.blocks_per_sm("lgm_backward.cu", dx_name) if need[0] else 1,
            "backward_params": (be.blocks_per_sm("lgm_backward.cu", params_name)
                                if need[1] or need[2] else 1)})

        if need[0]:
            grid, per_slice = grids["backward_dx"]
            dx_out = dx if grid[2] == 1 else xp.empty((grid[2], n, dim), dtype=call.dtype)
            be.launch("lgm_backward.cu", dx_name, grid,
                      (call.x, shift, terms, mean_iv, row_code, bad_class, gz, gl, dx_out)
                      + call.shapes()
                      + (np.int32(per_slice), alpha))
            if dx_out is not dx:
                _sum_partials(call, dx_out, dx, apply_mask=False)

        if need[1] or need[2]:
            grid, per_slice = grids["backward_params"]
            slices, dim_tiles = grid[2], grid[1]
            dmu_out = None
            if need[1]:
                dmu_out = dmu if slices == 1 else xp.empty((slices, k, dim), dtype=call.dtype)
            ds_out = None
            if need[2] and opts.isotropic:
                ds_out = xp.empty((slices * dim_tiles, k), dtype=call.dtype)
            elif need[2]:
                ds_out = ds if slices == 1 else xp.empty((slices, k, dim), dtype=call.dtype)
            be.launch("lgm_backward.cu", params_name, grid,
                      (call.x, shift, mean_iv, call.log_var, row_code, bad_class, gz, gl,
                       dmu_out, ds_out)
                      + call.shapes() + (np.int32(per_slice), alpha) + call.clamp()
                      + (call.flag(opts.logdet_logits), call.flag(opts.logdet_lkd),
                         call.flag(opts.isotropic)))
            if dmu_out is not None and dmu_out is not dmu:
                _sum_partials(call, dmu_out, dmu, apply_mask=False)
            if ds_out is not None and ds_out is not ds:
                _sum_partials(call, ds_out, ds, apply_mask=True)
    return dx, dmu, ds


def _sum_partials(call, partial, out, apply_mask):
    """out = partial.sum(axis=0) in a fixed order, times the clamp mask of log_var if asked.

    partial: (P,) + any shape holding out.size elements per part; out: contiguous.
    """
    length = out.size
    call.be.launch("lgm_backward.cu", _name("sum_partials", call.t),
                   (_ceil_div(length, _THREADS),),
                   (partial, call.log_var, out, np.int64(length), np.int32(partial.shape[0]))
                   + call.clamp() + (call.flag(apply_mask),))
