"""The CUDA path: launchers for the kernels in ``kernels/*.cu`` (SPEC sections 1-2).

Framework-free, with the signatures of ``cpu.py``. The array type picks where the kernels run:

- CuPy arrays: on their GPU, through ``cupy.RawModule`` (NVRTC), on the current stream. Nothing is
  synchronised here except the one 4-byte read of the label check; the caller synchronises.
- NumPy arrays: on the CPU simulator ``lgm_op.cudasim``, which runs the unmodified kernel sources.

Launches per call (N, K, D as in SPEC; 64 x 64 output tiles of 256 threads):

- labels (when given): ``lgm_labels_*`` checks and converts to int32, then one 4-byte read of the
  first bad index.
- forward: ``lgm_forward_*`` over (N, K) tiles. Label-free: ``lgm_logits_*``, an argmax by the array
  library, then ``lgm_lkd_rows_*`` for the predicted classes.
- backward: ``lgm_backward_dx_*`` over (N, D) tiles and ``lgm_backward_params_*`` over (K, D)
  tiles. When the tiles alone give too few blocks, the loop over classes (dx) or samples
  (parameters) is split over gridDim.z into partial buffers that ``lgm_sum_partials_*`` adds in a
  fixed order; the isotropic log-variance gradient always goes through one such sum (over the
  feature tiles). No atomics, so results are bitwise reproducible.

CuPy is imported lazily: ``import lgm_op.cuda`` needs neither CuPy nor a GPU.
"""
import contextlib
import ctypes
import functools
import glob
import importlib.util
import os

import numpy as np

from .checks import check_float_dtype, check_shapes
from .kernel_source import load_source, source_hash

__all__ = ["lgm_forward_cuda", "lgm_backward_cuda", "ensure_nvrtc", "launch_grids", "NVRTC_OPTIONS"]

# The sources are C++14 with no headers; no fast-math, so expf/exp keep their documented accuracy.
NVRTC_OPTIONS = ("--std=c++14",)

# Must match kernels/lgm_common.cuh.
_THREADS = 256
_TILE = 64
_STEP = 16
_LKD_ROWS_PER_BLOCK = _THREADS // 32
# A split loop gives each slice at least this many classes / samples, so the partial buffers and
# the extra pass stay small next to the work they parallelise.
_MIN_SLICE = 256
# Blocks to aim for per streaming multiprocessor before splitting a loop over gridDim.z.
_BLOCKS_PER_SM = 4
# The simulator has no multiprocessors; this nominal count makes it take the split paths on
# moderately sized test shapes, as a GPU would on large ones.
_SIM_SM_COUNT = 4
_GRID_YZ_MAX = 65535

# (i, k, j) updates one thread makes per iteration of each contraction kernel's tile loop.
MAIN_LOOP_UPDATES = {"forward": 4 * 4 * _STEP, "logits": 4 * 4 * _STEP,
                     "backward_dx": 4 * 4 * _STEP, "backward_params": 4 * 4 * _STEP}

# (source file, kernel, dtype, entry name) of every kernel the launchers use.
KERNEL_ENTRIES = tuple(
    [("lgm_labels.cu", "labels", t, f"lgm_labels_{t}") for t in ("f32", "f64", "i32", "i64")]
    + [(f, base, t, f"lgm_{base}_{t}") for f, bases in (
        ("lgm_forward.cu", ("forward", "logits", "lkd_rows")),
        ("lgm_backward.cu", ("backward_dx", "backward_params", "sum_partials")))
       for base in bases for t in ("f32", "f64")])

_LABEL_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
                 np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}


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
            if self.device_id is None:
                from . import cudasim
                module = cudasim.RawModule(code=source)
            else:
                ensure_nvrtc()
                module = self.xp.RawModule(code=source, options=NVRTC_OPTIONS)
            self._modules[key] = module
        return module.get_function(name)

    def launch(self, file_name, name, grid, args):
        """One launch of 256-thread blocks; a grid with no blocks is skipped (empty input)."""
        if min(grid) == 0:
            return
        if max(grid[1:], default=1) > _GRID_YZ_MAX:
            raise ValueError(f"lgm: kernel {name} would need grid {grid}; the y and z extents "
                             f"are limited to {_GRID_YZ_MAX} (is K or D this large?)")
        self.function(file_name, name)(tuple(grid), (_THREADS,), tuple(args))


def launch_grids(n, k, dim, sm_count, blocks_per_sm=None):
    """{kernel: (grid, loop length per slice)} of the contraction kernels for (N, K, D).

    blocks_per_sm: {kernel: resident blocks per multiprocessor}; the split loops aim at filling
    that many blocks on each of the ``sm_count`` multiprocessors.
    """
    target = _BLOCKS_PER_SM * sm_count
    dim_tiles = _ceil_div(dim, _TILE)
    row_tiles, class_tiles = _ceil_div(n, _TILE), _ceil_div(k, _TILE)
    dx_slices, dx_per = _slices(row_tiles * dim_tiles, k, target)
    p_slices, p_per = _slices(class_tiles * dim_tiles, n, target)
    return {"forward": ((row_tiles, class_tiles, 1), dim),
            "backward_dx": ((row_tiles, dim_tiles, dx_slices), dx_per),
            "backward_params": ((class_tiles, dim_tiles, p_slices), p_per)}


def _slices(blocks, length, target_blocks):
    """(slices, length per slice) for splitting a loop of ``length`` over gridDim.z.

    Enough slices to bring ``blocks`` up to ``target_blocks``, but none shorter than _MIN_SLICE;
    the length per slice is a multiple of the kernels' step.
    """
    if length <= 0 or blocks <= 0:  # an empty loop or an empty grid: nothing to split
        return 1, _STEP
    wanted = _ceil_div(target_blocks, blocks)
    slices = max(1, min(wanted, length // _MIN_SLICE))
    per_slice = _ceil_div(_ceil_div(length, slices), _STEP) * _STEP
    return _ceil_div(length, per_slice), per_slice


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
        self.suffix = "f32" if dtype == np.float32 else "f64"
        with self.be.device():  # any copy lands on the inputs' GPU
            self.x = xp.ascontiguousarray(x)
            self.mu = xp.ascontiguousarray(mu, dtype=dtype)
            self.log_var = xp.ascontiguousarray(log_var, dtype=dtype)
        self.n, self.dim = x.shape
        self.k = opts.num_classes
        self.opts = opts

    def array(self, value, shape_name, shape):
        """An operand in the compute dtype, C-contiguous, after checking its shape."""
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"lgm: {shape_name} must have shape {tuple(shape)}, "
                             f"got {tuple(value.shape)}")
        return self.be.xp.ascontiguousarray(value, dtype=self.dtype)

    def shapes(self):
        return np.int32(self.n), np.int32(self.k), np.int32(self.dim)

    def clamp(self):
        return self.real(self.opts.logvar_min), self.real(self.opts.logvar_max)

    def labels(self, label):
        """label (N,) of any real dtype -> int32 (N,), raising ValueError on a bad value."""
        xp = self.be.xp
        dtype = np.dtype(label.dtype)
        if dtype.kind == "f":
            kernel_dtype = np.float32 if dtype.itemsize <= 4 else np.float64
        elif dtype.kind in "iu":
            # unsigned 64-bit values above 2^63 wrap to negatives and are reported as bad
            kernel_dtype = np.int32 if dtype.itemsize < 4 or dtype == np.int32 else np.int64
        else:
            raise ValueError(f"lgm: label must have a real dtype, got {dtype.name}")
        converted = xp.ascontiguousarray(label, dtype=kernel_dtype)
        label_int = xp.empty(self.n, dtype=np.int32)
        first_bad = xp.full(1, self.n, dtype=np.int32)
        self.be.launch("lgm_labels.cu", f"lgm_labels_{_LABEL_SUFFIX[np.dtype(kernel_dtype)]}",
                       (_ceil_div(self.n, _THREADS),),
                       (converted, label_int, first_bad, np.int32(self.n), np.int32(self.k)))
        bad = int(first_bad[0])
        if bad < self.n:
            raise ValueError(f"lgm: label must hold integers in [0, {self.k}), "
                             f"got {label[bad].item()!r} at index {bad}")
        return label_int

    def flag(self, value):
        return np.int32(bool(value))


def lgm_forward_cuda(x, label, mu, log_var, opts, training):
    """Forward of SPEC section 1 on the GPU (CuPy arrays) or the simulator (NumPy arrays).

    x: (N, D) float32/float64; label: (N,) integer-valued labels of any real dtype, or None for the
    label-free form (the likelihood then uses the predicted class); mu: (K, D);
    log_var: (K, D), or (K, 1) when ``opts.isotropic``; training: applies the margin.
    Returns logits: (N, K) and lkd: (N,), in the dtype of x.
    """
    call = _Call(x, label, mu, log_var, opts)
    be, xp = call.be, call.be.xp
    with be.device():
        logits = xp.empty((call.n, call.k), dtype=call.dtype)
        lkd = xp.empty(call.n, dtype=call.dtype)
        grid = (_ceil_div(call.n, _TILE), _ceil_div(call.k, _TILE))
        data = (call.x, call.mu, call.log_var)
        if label is not None:
            y = call.labels(label)
            be.launch("lgm_forward.cu", f"lgm_forward_{call.suffix}", grid,
                      data + (y, logits, lkd) + call.shapes()
                      + (call.real(opts.margin(training)),) + call.clamp()
                      + (call.flag(opts.logdet_logits), call.flag(opts.logdet_lkd),
                         call.flag(opts.isotropic)))
        else:
            be.launch("lgm_forward.cu", f"lgm_logits_{call.suffix}", grid,
                      data + (logits,) + call.shapes() + call.clamp()
                      + (call.flag(opts.logdet_logits), call.flag(opts.isotropic)))
            if call.n:
                # numpy.argmax semantics (the first of tied maxima), as the CPU path
                y = xp.ascontiguousarray(xp.argmax(logits, axis=1), dtype=np.int32)
                be.launch("lgm_forward.cu", f"lgm_lkd_rows_{call.suffix}",
                          (_ceil_div(call.n, _LKD_ROWS_PER_BLOCK),),
                          data + (y, lkd, np.int32(call.n), np.int32(call.dim)) + call.clamp()
                          + (call.flag(opts.logdet_lkd), call.flag(opts.isotropic)))
    return logits, lkd


def lgm_backward_cuda(x, label, mu, log_var, grad_logits, grad_lkd, opts, training):
    """Backward of SPEC section 2 on the GPU (CuPy arrays) or the simulator (NumPy arrays).

    x: (N, D); label: (N,) labels (for the label-free form, the predicted classes); mu: (K, D);
    log_var: (K, D) or (K, 1); grad_logits: (N, K) = dL/dlogits; grad_lkd: (N,) = dL/dlkd.
    Returns dx: (N, D), dmu: (K, D), dlog_var: shaped like log_var, in the dtype of x.
    """
    call = _Call(x, label, mu, log_var, opts)
    be, xp = call.be, call.be.xp
    n, k, dim = call.n, call.k, call.dim
    with be.device():
        gz = call.array(grad_logits, "grad_logits", (n, k))
        gl = call.array(grad_lkd, "grad_lkd", (n,))
        y = call.labels(label)
        dx = xp.empty((n, dim), dtype=call.dtype)
        dmu = xp.empty((k, dim), dtype=call.dtype)
        ds = xp.empty(call.log_var.shape, dtype=call.dtype)
        inputs = (call.x, call.mu, call.log_var, y, gz, gl)
        alpha = call.real(opts.margin(training))
        target = _BLOCKS_PER_SM * be.sm_count
        dim_tiles = _ceil_div(dim, _TILE)

        # dx: (N, D) tiles, the class loop split into slices when the tiles are few.
        row_tiles = _ceil_div(n, _TILE)
        slices, per_slice = _slices(row_tiles * dim_tiles, k, target)
        dx_out = dx if slices == 1 else xp.empty((slices, n, dim), dtype=call.dtype)
        be.launch("lgm_backward.cu", f"lgm_backward_dx_{call.suffix}",
                  (row_tiles, dim_tiles, slices),
                  inputs + (dx_out,) + call.shapes() + (np.int32(per_slice), alpha)
                  + call.clamp() + (call.flag(opts.isotropic),))
        if slices > 1:
            _sum_partials(call, dx_out, dx, apply_mask=False)

        # dmean, dlog_var: (K, D) tiles, the sample loop split into slices when the tiles are few.
        class_tiles = _ceil_div(k, _TILE)
        slices, per_slice = _slices(class_tiles * dim_tiles, n, target)
        dmu_out = dmu if slices == 1 else xp.empty((slices, k, dim), dtype=call.dtype)
        if opts.isotropic:
            ds_out = xp.empty((slices * dim_tiles, k), dtype=call.dtype)
        else:
            ds_out = ds if slices == 1 else xp.empty((slices, k, dim), dtype=call.dtype)
        be.launch("lgm_backward.cu", f"lgm_backward_params_{call.suffix}",
                  (class_tiles, dim_tiles, slices),
                  inputs + (dmu_out, ds_out) + call.shapes() + (np.int32(per_slice), alpha)
                  + call.clamp() + (call.flag(opts.logdet_logits), call.flag(opts.logdet_lkd),
                                    call.flag(opts.isotropic)))
        if dmu_out is not dmu:
            _sum_partials(call, dmu_out, dmu, apply_mask=False)
        if ds_out is not ds:
            _sum_partials(call, ds_out, ds, apply_mask=True)
    return dx, dmu, ds


def _sum_partials(call, partial, out, apply_mask):
    """out = partial.sum(axis=0) in a fixed order, times the clamp mask of log_var if asked.

    partial: (P,) + any shape holding out.size elements per part; out: contiguous.
    """
    length = out.size
    call.be.launch("lgm_backward.cu", f"lgm_sum_partials_{call.suffix}",
                   (_ceil_div(length, _THREADS),),
                   (partial, call.log_var, out, np.int64(length), np.int32(partial.shape[0]))
                   + call.clamp() + (call.flag(apply_mask),))
