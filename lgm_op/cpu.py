"""The CPU path: forward and backward of SPEC sections 1-2 as BLAS closed forms, framework-free.

Every N x K x D contraction is expanded into matrix products, so memory is O(N*K + N*D + K*D):

    2 d[i,k] = sum_j (x_ij - mu_kj)^2 iv_kj = A[i,k] + B[k] + C[i,k]
    A = (x^2) iv^T,   B[k] = sum_j mu_kj^2 iv_kj,   C = -2 x (mu*iv)^T

The products run in the input's precision (float32 inputs in float32 BLAS, float64 in float64).
Accuracy comes by construction, not from a wider type:

- Features and means are shifted by a centroid of the class means (the median over finite class
  means, so a non-finite or huge mean cannot move it). Distances do not change; the terms shrink.
- The expansion tells where it may have cancelled: its rounding error is a few ulps of A + B, so
  an entry whose distance is small against A + B (``2d * tau < A + B``) is recomputed directly,
  ``sum_j (x_ij - mu_kj)^2 iv_kj`` in float64, from the unshifted inputs. So is every entry of the
  label column (``lkd`` and the margin logit: where training puts the features, the distance to the
  own class is tiny), every entry of a sample with a non-finite feature, and every entry of a class
  with a non-finite mean or log-variance (or whose terms overflow): non-finite values reach only
  their own row or column, as the math says (SPEC section 4).
- In backward the same label column, rows and columns enter directly (their upstream gradient is
  taken out of the matrix products), so gradients near the class means do not cancel either.

Two implementations of the same math: the compiled passes (``kernels/lgm_cpu.cpp``, built with
g++ and OpenMP by :mod:`lgm_op.cpu_kernels`), which fuse every pass outside the matrix products and
run it on every core (from 2^20 elements; below, on the calling thread), and NumPy alone, where no
compiler is present (``LGM_OP_CPU_KERNELS`` chooses; see that module). Both run the matrix
products through NumPy's BLAS, unless the caller of the compiled path gives its own (``matmul``:
the PyTorch binding passes ``torch.mm``).

Framework-free: NumPy arrays in, NumPy arrays out, optionally written into caller-given buffers
(``out``); the launchers in ``cuda.py`` share these signatures.
"""
import ctypes
import functools
import threading

import numpy as np

from . import cpu_kernels
from .checks import check_float_dtype, validate_labels_numpy

__all__ = ["lgm_forward_cpu", "lgm_backward_cpu", "CPUState", "clamp_log_var", "numpy_matmul"]

# An expanded entry is kept when 2d * tau >= A + B. Its rounding error is then at most a few ulps
# of tau * d: float32 keeps only entries that did not cancel at all (the error of the float32
# direct form is itself a few ulps of d); float64 has room to spare against SPEC's 1e-9.
_TAU = {np.dtype(np.float32): 2.0, np.dtype(np.float64): 1e3}
# Classes sampled for the centroid: a median over this many means is as good a shift as any.
_CENTROID_ROWS = 63
# Entries computed directly per chunk (times D float64 values in flight).
_DIRECT_CHUNK = 1 << 21
# Sums over direct entries by row: through a one-hot matrix product up to this many one-hot
# entries (rows x entries), by sorting and reduceat beyond.
_ONE_HOT_LIMIT = 1 << 16
# Below this many features, float32 backward products run in float64. Their sums over samples
# (parameters) and classes (features) accumulate rounding with the length of the sum, and where
# the features spread far beyond their distances to a class mean (2-D classes 1e2 to 1e4 apart)
# that exceeds what the reference's compensated sums give; with few features the products are a
# small part of the cost (the passes over N x K dominate), so they are computed exactly enough.
_WIDE_BACKWARD_DIM = 32
# The compiled path saves its operands for the backward (and copies the inputs to check them
# against the backward's) up to this many input bytes; beyond, building them again costs less
# than the copy and the byte-wise comparison.
_KEEP_BYTES = 4 << 20


class _FreeBuffers:
    """Arrays no pool holds any more, kept by (shape, dtype) for the next pool that asks: an
    operator created per call (imperative MXNet) then still finds warm memory. At most
    ``per_key`` arrays of each kind are kept."""

    def __init__(self, per_key=4):
        self.per_key = per_key
        self.free = {}
        # reentrant: the garbage collector may run while the lock is held (any allocation can
        # start it) and collect a pool, whose __del__ gives its buffers back on the same thread
        self.lock = threading.RLock()

    def take(self, shape, dtype):
        with self.lock:
            stack = self.free.get((shape, np.dtype(dtype)))
            if stack:
                return stack.pop()
        return np.empty(shape, dtype)

    def give(self, array):
        with self.lock:
            stack = self.free.setdefault((array.shape, array.dtype), [])
            if len(stack) < self.per_key:
                stack.append(array)


_FREE = _FreeBuffers()


class _Pool:
    """Work buffers kept between calls, by name: fresh pages for every N x K or K x D array
    would cost more than the pass that fills them. A pool that is released (or collected) hands
    its buffers back for other pools; :func:`_take_pool` and :func:`_give_pool` keep whole pools
    for the next call (so a call finds its buffers, their addresses and its operands as the last
    call of that shape left them)."""

    # the free list, held by the class: pools collected at interpreter exit still find it
    free = _FREE

    def __init__(self):
        self.buffers = {}
        self.addresses = {}
        # the compiled path's operands built in this pool's buffers, and the key they were built
        # for (one at a time: they are the only user of their buffers' names)
        self.operands = None
        self.operands_key = None

    def get(self, name, shape, dtype):
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            if buf is not None:
                self.free.give(buf)
            buf = self.buffers[name] = self.free.take(shape, dtype)
            self.addresses[name] = buf.ctypes.data
        return buf

    def pointer(self, name, shape, dtype):
        """(buffer, its address) as ``get`` gives the buffer."""
        buf = self.get(name, shape, dtype)
        return buf, self.addresses[name]

    def vector(self, name, count, dtype):
        """A 1-D buffer of ``count`` elements (a view of one kept with room to spare, so a count
        that changes from call to call does not replace it each time), and its address."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < count or buf.dtype != dtype:
            self.get(name, (max(16, 1 << max(0, count - 1).bit_length()),), dtype)
        return self.buffers[name][:count], self.addresses[name]

    def copy(self, name, array):
        buf = self.get(name, array.shape, array.dtype)
        np.copyto(buf, array)
        return buf

    def release(self):
        for buf in self.buffers.values():
            self.free.give(buf)
        self.buffers = {}
        self.addresses = {}
        self.operands = self.operands_key = None

    def __del__(self):
        self.release()


# Whole pools kept for the next call (at most this many; beyond, their buffers go to _FREE).
_POOLS_KEPT = 4
_pools = []
_pools_lock = threading.RLock()  # reentrant for the same reason as _FreeBuffers.lock


def _take_pool():
    with _pools_lock:
        if _pools:
            return _pools.pop()
    return _Pool()


def _give_pool(pool):
    with _pools_lock:
        if len(_pools) < _POOLS_KEPT:
            _pools.append(pool)
            return
    pool.release()


def clamp_log_var(log_var, opts, dtype=np.float64, out=None):
    """c = clip(s, logvar_min, logvar_max) in ``dtype`` (NaN stays NaN), into ``out`` if given."""
    real = np.dtype(dtype).type
    return np.clip(np.asarray(log_var).astype(dtype, copy=False), real(opts.logvar_min),
                   real(opts.logvar_max), out=out)




def _centroid(mu):
    """(D,) a centroid of the class means: the mean of an even sample of them, leaving out means
    that are not finite or lie far beyond the typical one (so an Inf, NaN or 1e160 cannot move
    it); zeros if nothing is left. Any shift is exact; a central one keeps the terms small."""
    k = mu.shape[0]
    sample = mu if k <= _CENTROID_ROWS else mu[np.linspace(0, k - 1, _CENTROID_ROWS).astype(
        np.int64)]
    size = np.abs(sample).max(axis=1)                      # NaN for a row holding one
    finite = np.isfinite(size)
    if not finite.any():
        return np.zeros(mu.shape[1], mu.dtype)
    keep = finite & (size <= 16 * np.median(size[finite]))
    return sample[keep].mean(axis=0, dtype=np.float64).astype(mu.dtype)


class _Classes:
    """Per-class operands in the input's precision, shared by forward and backward.

    iv: (K, D) or (K, 1) inverse variances; mc: (K, D) shifted means; mciv: (K, D) mc * iv;
    sq: (K,) B = sum_j mc^2 iv; bad: indices of the classes whose mean or log-variance is not
    finite or whose terms overflow (B is then not finite, since its terms are mc^2 iv >= 0); they
    are zeroed in iv, mc, mciv and sq so the matrix products stay finite, and computed directly;
    shift: (D,) the centroid.
    """

    def __init__(self, mu, log_var, opts, dtype, pool):
        self.mu = mu
        self.log_var = log_var
        self.opts = opts
        self.shift = _centroid(mu)
        self.c = clamp_log_var(log_var, opts, dtype, out=pool.get("c", log_var.shape, dtype))
        self.iv = np.negative(self.c, out=pool.get("iv", log_var.shape, dtype))
        np.exp(self.iv, out=self.iv)
        self.mc = np.subtract(mu, self.shift, out=pool.get("mc", mu.shape, dtype))
        self.mciv = np.multiply(self.mc, self.iv, out=pool.get("mciv", mu.shape, dtype))
        self.sq = np.einsum("kj,kj->k", self.mc, self.mciv)
        self._iv64 = None
        # float64 inputs: the inverse variances before bad classes are zeroed, for direct entries
        self._iv_exact = self.iv
        self.bad = np.flatnonzero(~np.isfinite(self.sq))
        if self.bad.size:
            self._iv_exact = self.iv.copy()
            for a in (self.iv, self.mc, self.mciv, self.sq):
                a[self.bad] = 0

    def blocked(self):
        """Flat indices of log-variances outside [logvar_min, logvar_max] (or NaN): the clamp
        passes no gradient there (the clamped value differs from the input exactly there)."""
        return np.flatnonzero(self.c != self.log_var)

    def half_log_det(self):
        """(K,) 0.5 log|Sigma_k| in the input's dtype, summed in float64."""
        c = self.c
        dim = self.mu.shape[1]
        log_det = c[:, 0].astype(np.float64) * dim if self.opts.isotropic else c.sum(
            axis=1, dtype=np.float64)
        return (0.5 * log_det).astype(c.dtype)

    def direct(self, x, rows, cols):
        """(M,) float64 half distances 0.5 * sum_j (x_ij - mu_kj)^2 iv_kj for entries (rows, cols),
        from the unshifted inputs, in chunks."""
        out = np.empty(rows.size, np.float64)
        for part, _, _, diff, iv in self.direct_chunks(x, rows, cols):
            diff *= diff
            if iv.shape[1] == 1:
                out[part] = 0.5 * diff.sum(axis=1) * iv[:, 0]
            else:
                out[part] = 0.5 * np.einsum("mj,mj->m", diff, iv)
        return out

    def direct_chunks(self, x, rows, cols):
        """Chunks of entries (rows, cols): (slice of the entries, rows, cols, (M, D) float64
        x_i - mu_k from the unshifted inputs, (M, D) or (M, 1) float64 inverse variances)."""
        step = max(1, _DIRECT_CHUNK // x.shape[1])
        for lo in range(0, rows.size, step):
            part = slice(lo, lo + step)
            r, k = rows[part], cols[part]
            yield part, r, k, x[r].astype(np.float64) - self.mu[k].astype(np.float64), self.iv64(k)

    def iv64(self, cols):
        """(M, D) or (M, 1) float64 inverse variances of the classes ``cols`` (exp in float64
        of the clamped log-variances, as the float64 answer has them)."""
        if self.iv.dtype == np.float64:
            return self._iv_exact[cols]
        if cols.size >= self.mu.shape[0]:  # every class at once is cheaper than one per entry
            return self.iv_all64()[cols]
        c = clamp_log_var(self.log_var[cols], self.opts, np.float64)
        return np.exp(np.negative(c, out=c), out=c)

    def iv_all64(self):
        if self._iv64 is None:
            c = clamp_log_var(self.log_var, self.opts, np.float64)
            self._iv64 = np.exp(np.negative(c, out=c), out=c)
        return self._iv64


def _shifted_features(x, classes, pool):
    """xc: (N, D) features minus the centroid, with the rows that are not finite (or whose squares
    overflow) zeroed; and the indices of those rows."""
    xc = np.subtract(x, classes.shift, out=pool.get("xc", x.shape, x.dtype))
    norm = np.einsum("ij,ij->i", xc, xc)
    # no inverse variance exceeds exp(-logvar_min): a row whose norm times that is finite cannot
    # overflow in the products
    bad = np.flatnonzero(~np.isfinite(norm * np.exp(-classes.opts.logvar_min)))
    if bad.size:
        xc[bad] = 0
        norm[bad] = 0
    return xc, norm, bad


def _entries(rows, cols, num_classes, extra_rows, extra_cols, n):
    """Unique (rows, cols) of the given entries plus whole rows ``extra_rows`` and whole columns
    ``extra_cols``, sorted by row."""
    parts_r, parts_c = [rows], [cols]
    if extra_rows.size:
        parts_r.append(np.repeat(extra_rows, num_classes))
        parts_c.append(np.tile(np.arange(num_classes), extra_rows.size))
    if extra_cols.size:
        parts_r.append(np.tile(np.arange(n), extra_cols.size))
        parts_c.append(np.repeat(extra_cols, n))
    flat = np.unique(np.concatenate(parts_r) * num_classes + np.concatenate(parts_c))
    return flat // num_classes, flat % num_classes


class CPUState:
    """What a forward keeps for the backward of the same inputs (as autograd keeps saved tensors):
    the per-class operands and the shifted features. Pass one object to ``lgm_forward_cpu`` and
    then to ``lgm_backward_cpu``. The backward reuses them only if its inputs hold exactly the
    bytes the forward saw (same shapes and dtypes, same clamp, a byte-wise comparison against
    copies of the inputs), and recomputes them otherwise, so reuse can never change a result.

    ``owned=True``: the state serves one forward and the backwards of that forward only, and the
    caller guarantees that memory the forward read still holds the same values at the backward
    (autograd's saved-tensor version checks do: an in-place change of a saved input makes the
    backward raise). Then nothing is copied or compared byte by byte: the backward reuses the
    operands when its inputs are the same arrays (address, shape, strides and dtype), and the
    operands are kept at any size."""

    def __init__(self, owned=False):
        self.key = None
        self.inputs = None
        self.saved = None
        self.owned = owned
        # an owned state's forward: (identity of its label argument, the validated labels)
        self.labels = None
        self.pool = _take_pool()

    def __del__(self):
        pool, self.pool = self.pool, None
        if pool is not None:
            _give_pool(pool)


_memcmp = ctypes.CDLL(None).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _same_bytes(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and (a.nbytes == 0 or _memcmp(
        a.ctypes.data, b.ctypes.data, a.nbytes) == 0)


def _identity(a):
    """Which memory an array views, and how: equal identities hold equal values for an owned
    state (``CPUState``)."""
    a = np.asarray(a)
    return a.ctypes.data, a.shape, a.strides, a.dtype


def _prepare(x, mu, log_var, opts, tmp, state=None, reuse=False, build=None, keep_bytes=None):
    """x, mu, log_var as C-contiguous arrays of x's dtype, and the operands ``build(x, mu,
    log_var, opts, pool)`` makes of them (a tuple). With ``state``: saved for a backward
    (``reuse=False``, forward), or taken from it when the inputs are byte-for-byte those of its
    forward (for an owned state: the same arrays) and it was built the same way (``reuse=True``);
    else built in the call's buffers ``tmp``. ``keep_bytes``: save nothing for inputs larger than
    this (checking them would cost more than building again; an owned state checks nothing)."""
    dtype = check_float_dtype("data", np.asarray(x).dtype)
    owned = state is not None and state.owned
    given = tuple(map(_identity, (x, mu, log_var))) if owned else None
    x, mu, log_var = (np.ascontiguousarray(a, dtype=dtype) for a in (x, mu, log_var))
    key = (build, opts.logvar_min, opts.logvar_max, opts.isotropic)
    if reuse and state is not None and state.key == key and (
            given == state.inputs if owned else
            all(_same_bytes(a, b) for a, b in zip((x, mu, log_var), state.inputs))):
        saved = state.saved
        if isinstance(saved[0], _Classes):   # the same bytes, in this call's arrays
            saved[0].mu, saved[0].log_var = mu, log_var
        return (x, mu, log_var) + saved
    # a forward keeps its operands in the state's own buffers (they must outlive the call)
    keep = state is not None and not reuse and (
        owned or keep_bytes is None or x.nbytes + mu.nbytes + log_var.nbytes <= keep_bytes)
    if state is not None and not reuse and not keep:
        state.key = state.inputs = state.saved = None
        state.pool.release()
    pool = state.pool if keep else tmp
    saved = build(x, mu, log_var, opts, pool)
    if keep:
        state.key, state.saved = key, saved
        state.inputs = given if owned else tuple(
            pool.copy(name, a) for name, a in zip(("in_x", "in_mu", "in_s"), (x, mu, log_var)))
    return (x, mu, log_var) + saved


def _numpy_operands(x, mu, log_var, opts, pool):
    """The NumPy path's operands: (classes, shifted features, their norms, rows not finite)."""
    classes = _Classes(mu, log_var, opts, x.dtype, pool)
    return (classes,) + _shifted_features(x, classes, pool)


def _expanded_distances(xc, norm, classes, tau, out, tmp):
    """out <- -d by the expansion; returns the flat indices of entries that may have cancelled."""
    scratch = tmp.get("nk", out.shape, out.dtype)
    keep = tmp.get("nk_bool", out.shape, np.bool_)
    if classes.opts.isotropic:
        np.multiply(norm[:, None], classes.iv[:, 0][None, :], out=out)    # A
    else:
        np.matmul(xc * xc, classes.iv.T, out=out)                           # A
    np.matmul(xc, classes.mciv.T, out=scratch)                              # -C / 2
    out += classes.sq[None, :]                                              # A + B
    scratch *= -2
    scratch += out                                                          # 2d = A + B + C
    out *= 1.0 / tau
    np.greater_equal(scratch, out, out=keep)                                # False for NaN
    np.logical_not(keep, out=keep)
    suspect = np.flatnonzero(keep)
    np.multiply(scratch, -0.5, out=out)                                     # -d
    return suspect


def _entry_point(function):
    """Gives the function its call's work buffers (``tmp``, handed back for the next call on any
    thread when it returns) and silences NumPy's warnings about non-finite values: those reach
    the outputs only where the math puts them (SPEC section 4), and the warnings are noise."""
    @functools.wraps(function)
    def entry(*args, **kwargs):
        tmp = _take_pool()
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return function(*args, tmp=tmp, **kwargs)
        finally:
            _give_pool(tmp)
    return entry


def numpy_matmul(a, b, out):
    """out = a @ b through NumPy's BLAS: the compiled path's matrix products unless the caller
    gives its own (``matmul=``)."""
    return np.matmul(a, b, out=out)


@_entry_point
def lgm_forward_cpu(x, label, mu, log_var, opts, training, out=None, state=None, tmp=None,
                    matmul=None):
    """Forward of SPEC section 1.

    x: (N, D) float32/float64; label: (N,) integer-valued labels of any real dtype, or None for the
    label-free form (the likelihood then uses the predicted class); mu: (K, D);
    log_var: (K, D), or (K, 1) when ``opts.isotropic``; training: applies the margin;
    out: optional (logits (N, K), lkd (N,)) C-contiguous arrays of x's dtype to write into
    (entries may be None);
    state: optional :class:`CPUState` that keeps operands for the backward of these inputs;
    tmp: the call's work buffers, supplied by the entry point (not an argument for callers);
    matmul: optional ``f(a, b, out) -> out`` for the compiled path's matrix products (2-D arrays
    of one dtype, ``a`` or ``b`` possibly strided or transposed views; with an attribute
    ``batched = True`` also 3-D: a batch of two such products): a framework's own BLAS, whose
    threads then share the cores with its other operators (default :func:`numpy_matmul`).
    Returns logits: (N, K) and lkd: (N,), in the dtype of x.
    """
    lib = cpu_kernels.kernels()
    if lib is None:
        return _forward_numpy(x, label, mu, log_var, opts, training, out, state, tmp)
    return _forward_compiled(lib, x, label, mu, log_var, opts, training, out, state, tmp,
                             matmul or numpy_matmul)


def _forward_numpy(x, label, mu, log_var, opts, training, out, state, tmp):
    x, mu, log_var, classes, xc, norm, bad_rows = _prepare(x, mu, log_var, opts, tmp, state,
                                                           build=_numpy_operands)
    dtype = x.dtype
    n, k = x.shape[0], opts.num_classes
    y = None if label is None else validate_labels_numpy(label, k)
    logits, lkd = (None, None) if out is None else out
    logits = np.empty((n, k), dtype) if logits is None else logits
    lkd = np.empty(n, dtype) if lkd is None else lkd
    rows_all = np.arange(n)

    # 1. logits <- -d - 0.5 log|Sigma| on the expansion
    suspect = _expanded_distances(xc, norm, classes, _TAU[dtype], logits, tmp)
    half_log_det = classes.half_log_det()
    if opts.logdet_logits:
        logits -= half_log_det[None, :]

    # 2. the entries that may have cancelled, the label column, bad rows and classes: directly
    label_cols = y if y is not None else np.zeros(0, np.int64)
    rows, cols = _entries(np.concatenate([suspect // k, rows_all[:label_cols.size]]),
                          np.concatenate([suspect % k, label_cols]), k, bad_rows, classes.bad, n)
    alpha = opts.margin(training) if y is not None else 0.0
    d = classes.direct(x, rows, cols)
    margin = 1.0 + alpha * (cols == y[rows]) if alpha else 1.0
    value = -margin * d
    if opts.logdet_logits:
        value -= half_log_det[cols]
    logits[rows, cols] = value

    # 3. lkd: the half distance to the label (or predicted) class, computed directly
    if y is None:
        y = np.argmax(logits, axis=1) if n else np.zeros(0, np.int64)
        d_label = classes.direct(x, rows_all, y)
    else:
        d_label = d[cols == y[rows]]                  # one entry per row, in row order
    if opts.logdet_lkd:
        d_label += half_log_det[y]
    lkd[...] = d_label
    return logits, lkd


def _add_segments(index, *pairs):
    """acc[index[m]] += values[m] for every m and every (acc, values) pair, duplicates summed
    (one sort and reduceat for all pairs)."""
    if index.size == 0 or not pairs:
        return
    if index.size == 1 or (index[1:] > index[:-1]).all():    # distinct and sorted: no sums
        for acc, values in pairs:
            acc[index] += values
        return
    rows = pairs[0][0].shape[0]
    # few rows: one matrix product beats a sort (not for non-finite values: 0 * inf is NaN)
    if rows * index.size <= _ONE_HOT_LIMIT and all(np.isfinite(v).all() for _, v in pairs):
        one_hot = np.zeros((rows, index.size))
        one_hot[index, np.arange(index.size)] = 1
        for acc, values in pairs:
            acc += one_hot @ values
        return
    order = np.argsort(index, kind="stable")
    idx = index[order]
    starts = np.flatnonzero(np.concatenate([[True], idx[1:] != idx[:-1]]))
    for acc, values in pairs:
        acc[idx[starts]] += np.add.reduceat(values[order], starts, axis=0)


@_entry_point
def lgm_backward_cpu(x, label, mu, log_var, grad_logits, grad_lkd, opts, training,
                     need=(True, True, True), out=None, state=None, tmp=None, matmul=None):
    """Backward of SPEC section 2.

    x: (N, D); label: (N,) labels (for the label-free form, the predicted classes); mu: (K, D);
    log_var: (K, D) or (K, 1); grad_logits: (N, K) = dL/dlogits; grad_lkd: (N,) = dL/dlkd;
    need: which of (dx, dmu, dlog_var) to compute; out: optional (dx, dmu, dlog_var) arrays
    (entries may be None) to write into; state: the :class:`CPUState` given to the forward of
    these inputs, if any; tmp, matmul: as for :func:`lgm_forward_cpu`.
    Returns dx: (N, D), dmu: (K, D), dlog_var: shaped like log_var, in the dtype of x (None for
    a gradient that is not needed).
    """
    out = (None, None, None) if out is None else out
    if not any(need):
        return None, None, None
    lib = cpu_kernels.kernels()
    if lib is None:
        return _backward_numpy(x, label, mu, log_var, grad_logits, grad_lkd, opts, training,
                               tuple(need), out, state, tmp)
    return _backward_compiled(lib, x, label, mu, log_var, grad_logits, grad_lkd, opts, training,
                              tuple(need), out, state, tmp, matmul or numpy_matmul)


def _backward_numpy(x, label, mu, log_var, grad_logits, grad_lkd, opts, training, need, out,
                    state, tmp):
    need_dx, need_dmu, need_ds = need
    x, mu, log_var, classes, xc, norm, bad_rows = _prepare(x, mu, log_var, opts, tmp, state,
                                                           reuse=True, build=_numpy_operands)
    dtype = x.dtype
    k = opts.num_classes
    y = validate_labels_numpy(label, k)
    n, dim = x.shape
    rows_all = np.arange(n)
    gz = np.asarray(grad_logits)
    gl = np.asarray(grad_lkd)

    # 1. G = dL/dd: (N, K), with the directly computed entries taken out of it
    alpha = opts.margin(training)
    work = np.float64 if dim < _WIDE_BACKWARD_DIM else dtype
    g = np.negative(gz, out=tmp.get("nk", gz.shape, work), dtype=work)
    rows, cols = _entries(rows_all, y, k, bad_rows, classes.bad, n)
    g_direct = g[rows, cols].astype(np.float64)
    on_label = cols == y[rows]
    g_direct[on_label] *= 1.0 + alpha
    g_direct[on_label] += gl[rows[on_label]]
    g[rows, cols] = 0

    iv, mc, mciv = (a.astype(work, copy=False) for a in (classes.iv, classes.mc, classes.mciv))
    xc, norm = xc.astype(work, copy=False), norm.astype(work, copy=False)
    dx = _buffer(out[0], (n, dim), dtype) if need_dx else None
    dmu = _buffer(out[1], (k, dim), dtype) if need_dmu else None
    ds = _buffer(out[2], classes.log_var.shape, dtype) if need_ds else None

    # 2. dx = x * (G iv) - G (mu iv), on the shifted operands
    if need_dx:
        np.multiply(xc, g @ iv, out=dx)                           # isotropic: (N, 1) broadcast
        dx -= g @ mciv

    # 3. parameter gradients from sum_i G_ik x_ij (and sum_i G_ik x_ij^2 for the log-variance)
    if need_dmu or need_ds:
        # sum_i G_ik in float64, and mc * it - gx rounded once: the column sums multiply the
        # means where the expansion cancels, so their float32 rounding would dominate
        g_col = g.sum(axis=0, dtype=np.float64)                   # (K,)
        gx = np.matmul(g.T, xc, out=tmp.get("kd_gx", mc.shape, work))
        neg_resid = tmp.get("kd_resid", mc.shape, work)
        np.subtract(mc * g_col[:, None], gx, out=neg_resid, casting="same_kind")
        # neg_resid: -sum_i G_ik (xc_i - mc_k)
        if need_dmu:
            np.multiply(neg_resid, iv, out=dmu)
        if need_ds:
            # sum_i G_ik (xc - mc)^2 = sum_i G_ik xc^2 - mc (2 gx - mc g_col)
            gx -= neg_resid
            gx *= mc
            if opts.isotropic:
                ssq = (g.T @ norm)[:, None] - gx.sum(axis=1, keepdims=True)
            else:
                ssq = np.matmul(g.T, xc * xc, out=neg_resid)
                ssq -= gx
            # dL/dlog|Sigma_k|; the column sums of grad_logits from those of G and the entries
            # taken out of it (G = -grad_logits elsewhere)
            g_log_det = np.zeros(k)
            if opts.logdet_logits:
                gz_col = np.bincount(cols, weights=gz[rows, cols], minlength=k) - g_col
                g_log_det -= 0.5 * gz_col
            if opts.logdet_lkd:
                g_log_det += 0.5 * np.bincount(y, weights=gl, minlength=k)
            if opts.isotropic:
                g_log_det *= dim
            np.multiply(ssq, iv, out=ds)
            ds *= -0.5
            ds += g_log_det[:, None].astype(dtype)

    # 4. the direct entries' contributions, in float64, added once per output row
    for part, r, c, diff, iv_direct in classes.direct_chunks(x, rows, cols):
        w = g_direct[part, None] * iv_direct * diff
        if need_dx:
            _add_segments(r, (dx, w))
        by_class = []
        if need_dmu:
            by_class.append((dmu, -w))
        if need_ds:
            q = -0.5 * w * diff
            by_class.append((ds, q.sum(axis=1, keepdims=True) if opts.isotropic else q))
        _add_segments(c, *by_class)
    if need_ds:
        ds.reshape(-1)[classes.blocked()] = 0          # no gradient passes, not even a NaN
    return dx, dmu, ds


def _buffer(given, shape, dtype):
    return np.empty(shape, dtype) if given is None else given


# ---------------------------------------------------------------------------------------------
# the compiled passes (kernels/lgm_cpu.cpp): the same math as the NumPy path above, with every
# pass outside the matrix products fused and run on every core

def _address(a):
    return None if a is None else a.ctypes.data


def _check_arrays(opts, x, label, mu, log_var, **others):
    """The compiled passes index raw memory: every array must have exactly its shape."""
    n, d = x.shape if x.ndim == 2 else (None, None)
    k = opts.num_classes
    wanted = {"mean": (mu, (k, d)),
              "log_var": (log_var, (k, 1 if opts.isotropic else d)),
              "label": (label, (n,)), "grad_logits": (others.get("grad_logits"), (n, k)),
              "grad_lkd": (others.get("grad_lkd"), (n,)), "out logits": (others.get("logits"), (n, k)),
              "out lkd": (others.get("lkd"), (n,)), "out dx": (others.get("dx"), (n, d)),
              "out dmu": (others.get("dmu"), (k, d)),
              "out dlog_var": (others.get("ds"), (k, 1 if opts.isotropic else d))}
    if x.ndim != 2:
        raise ValueError(f"lgm: data must be 2-D (N, D), got shape {x.shape}")
    for name, (array, shape) in wanted.items():
        if array is not None and array.shape != shape:
            raise ValueError(f"lgm: {name} must have shape {shape}, got {array.shape}")
    for key, name in (("logits", "logits"), ("lkd", "lkd"), ("dx", "dx"), ("dmu", "dmu"),
                      ("ds", "dlog_var")):
        array = others.get(key)
        if array is not None and (array.dtype != x.dtype or not array.flags.c_contiguous or
                                  not array.flags.writeable):
            raise ValueError(f"lgm: out {name} must be a writeable C-contiguous {x.dtype.name} "
                             f"array")


class _CompiledOperands:
    """The compiled passes' operands of one (x, mu, log_var), shared by forward and backward.

    shift: (D,) the centroid; xcx: (N, D + sd) [xc | xc^2] (isotropic: [xc | |xc|^2]) of the
    shifted features, bad rows zeroed; norm: (N,) |xc|^2; bad_row: (N,) uint8;
    ivm: (K, D + sd) [mc iv | iv] in the input's dtype, bad classes zeroed (the halves pair
    with xcx's: one batched product gives S = xc (mc iv)^T and A = xc^2 iv^T); sq: (K,)
    sum_j mc^2 iv; half_log_det: (K,); bad_class: (K,) uint8; iv_cache: (K, sd) float64 and
    iv_ready: (K,) the direct entries' inverse variances, computed by the passes per class on
    first use. sd is D, or 1 when isotropic.
    """

    def __init__(self, lib, dtype, n, k, d, sd, bounds, pool):
        get = pool.get
        self.shift, self.xcx = get("shift", (d,), dtype), get("xcx", (n, d + sd), dtype)
        self.norm, self.bad_row = get("norm", (n,), dtype), get("bad_row", (n,), np.uint8)
        self.ivm, self.sq = get("ivm", (k, d + sd), dtype), get("sq", (k,), dtype)
        self.half_log_det = get("half_log_det", (k,), dtype)
        self.bad_class = get("bad_class", (k,), np.uint8)
        self.iv_cache = get("iv_cache", (k, sd), np.float64)
        self.iv_ready = get("iv_ready", (k,), np.uint8)
        # the buffers' addresses, once (a forward's operands serve its backward too, and a pool
        # kept for the next call keeps its operands)
        for name in self._BUFFERS:
            setattr(self, "a_" + name, pool.addresses[name])
        self._iv_tail = bounds + (self.a_iv_cache, self.a_iv_ready)
        self._prepare_tail = (n, k, d, sd) + bounds + tuple(
            getattr(self, "a_" + name) for name in self._BUFFERS[:-2]) + (self.a_iv_ready,)

    _BUFFERS = ("shift", "xcx", "norm", "bad_row", "ivm", "sq", "half_log_det", "bad_class",
                "iv_cache", "iv_ready")

    @classmethod
    def build(cls, lib, x, mu, log_var, opts, pool):
        """The operands of (x, mu, log_var) in ``pool``'s buffers (the object the pool holds
        when it was built for these shapes and bounds: only the passes run again)."""
        (n, d), k, sd = x.shape, mu.shape[0], log_var.shape[1]
        bounds = (opts.logvar_min, opts.logvar_max)
        key = (lib, x.dtype, n, k, d, sd, bounds)
        ops = pool.operands
        if pool.operands_key != key:
            ops = pool.operands = cls(lib, x.dtype, n, k, d, sd, bounds, pool)
            pool.operands_key = key
        lib.call("prepare", x.dtype, x.ctypes.data, mu.ctypes.data, log_var.ctypes.data,
                 *ops._prepare_tail)
        return ops

    def inverse_variances(self, log_var):
        return (_address(log_var),) + self._iv_tail


@functools.lru_cache(maxsize=None)
def _builder(lib):
    """One builder per module, so a state's key tells which operands it holds."""
    def build(x, mu, log_var, opts, pool):
        return (_CompiledOperands.build(lib, x, mu, log_var, opts, pool),)
    return build


def _forward_compiled(lib, x, label, mu, log_var, opts, training, out, state, tmp, matmul):
    x, mu, log_var, ops = _prepare(x, mu, log_var, opts, tmp, state, build=_builder(lib),
                                   keep_bytes=_KEEP_BYTES)
    dtype = x.dtype
    (n, d), k, sd = x.shape, opts.num_classes, log_var.shape[1]
    y = None if label is None else lib.labels(label, k)
    if state is not None and state.owned:
        state.labels = None if y is None else (_identity(label), y)
    logits, lkd = (None, None) if out is None else out
    _check_arrays(opts, x, y, mu, log_var, logits=logits, lkd=lkd)
    logits = np.empty((n, k), dtype) if logits is None else logits
    lkd = np.empty(n, dtype) if lkd is None else lkd
    # 1. S = xc (mc iv)^T and A = (xc^2) iv^T from the paired halves of [xc | xc^2] and
    # [mc iv | iv] (isotropic: S only; A = |xc|^2 iv, in the pass). A matmul that takes a batch
    # (``matmul.batched``) gets both as one product into one (2, N, K) buffer; otherwise A goes
    # into the logits, which the epilogue then overwrites (no second N x K buffer)
    if opts.isotropic or not getattr(matmul, "batched", False):
        s_mciv, a_s_mciv = tmp.pointer("nk", (n, k), dtype)
        matmul(ops.xcx[:, :d], ops.ivm[:, :d].T, s_mciv)
        a_part = None
        if not opts.isotropic:
            matmul(ops.xcx[:, d:], ops.ivm[:, d:].T, logits)
            a_part = logits.ctypes.data
    else:
        sa, a_s_mciv = tmp.pointer("nk2", (2, n, k), dtype)
        matmul(_halves(ops.xcx, d), _halves(ops.ivm, d).transpose(0, 2, 1), sa)
        a_part = a_s_mciv + sa[0].nbytes
    # 2. the logits from the expansion, the entries it cannot give directly, lkd
    alpha = opts.margin(training) if y is not None else 0.0
    lib.call("forward_epilogue", dtype, x.ctypes.data, _address(y), mu.ctypes.data,
             *ops.inverse_variances(log_var), n, k, d, sd, a_part, a_s_mciv, ops.a_norm,
             ops.a_ivm, ops.a_sq, ops.a_half_log_det,
             ops.a_bad_row, ops.a_bad_class, alpha, 1.0 / _TAU[dtype],
             int(opts.logdet_logits), int(opts.logdet_lkd), logits.ctypes.data, lkd.ctypes.data)
    return logits, lkd


def _halves(a, d):
    """(2, rows, d) view of the two halves a[:, :d] and a[:, d:] of a C-contiguous (rows, 2d)."""
    return a.reshape(a.shape[0], 2, d).transpose(1, 0, 2)


def _backward_compiled(lib, x, label, mu, log_var, grad_logits, grad_lkd, opts, training, need,
                       out, state, tmp, matmul):
    need_dx, need_dmu, need_ds = need
    x, mu, log_var, ops = _prepare(x, mu, log_var, opts, tmp, state, reuse=True,
                                   build=_builder(lib))
    dtype = x.dtype
    (n, d), k, sd = x.shape, opts.num_classes, log_var.shape[1]
    if state is not None and state.owned and state.labels is not None and (
            state.labels[0] == _identity(label)):
        y = state.labels[1]     # the forward's labels, checked there
    else:
        y = lib.labels(label, k)
    gz = np.ascontiguousarray(grad_logits, dtype=dtype)
    gl = np.ascontiguousarray(grad_lkd, dtype=dtype)
    dx = _buffer(out[0], (n, d), dtype) if need_dx else None
    dmu = _buffer(out[1], (k, d), dtype) if need_dmu else None
    ds = _buffer(out[2], log_var.shape, dtype) if need_ds else None
    _check_arrays(opts, x, y, mu, log_var, grad_logits=gz, grad_lkd=gl, dx=dx, dmu=dmu, ds=ds)
    work = np.dtype(np.float64) if d < _WIDE_BACKWARD_DIM else dtype
    a_x, a_y, a_mu = x.ctypes.data, y.ctypes.data, mu.ctypes.data
    ivs = ops.inverse_variances(log_var)

    # 1. G = dL/dd with the direct entries (label column, bad rows and classes) taken out
    row_start, a_row_start = tmp.pointer("row_start", (n + 1,), np.int64)
    lib.row_starts(a_y, ops.a_bad_row, ops.a_bad_class, n, k, a_row_start)
    entries = int(row_start[n])
    _, a_entry_class = tmp.vector("entry_class", entries, np.int64)
    _, a_entry_weight = tmp.vector("entry_weight", entries, np.float64)
    both = tmp.buffers.get("nk2")
    if both is not None and both.shape == (2, n, k) and both.dtype == work:
        g, a_g = both[0], tmp.addresses["nk2"]    # the forward's (2, N, K) buffer, not another
    else:
        g, a_g = tmp.pointer("nk", (n, k), work)
    _, a_g_col = tmp.pointer("g_col", (k,), np.float64)
    _, a_gz_col = tmp.pointer("gz_col", (k,), np.float64)
    lib.call("backward_weights", (dtype, work), gz.ctypes.data, gl.ctypes.data, a_y, n, k, d,
             sd, ops.a_bad_row, ops.a_bad_class, opts.margin(training),
             a_row_start, a_g, a_entry_class, a_entry_weight, a_g_col, a_gz_col)

    # 2. dx = xc * (G iv) - G (mc iv) + the direct entries, from one product G [mc iv | iv]
    if need_dx:
        pq, a_pq = tmp.pointer("pq", (n, d + sd), work)
        matmul(g, ops.ivm.astype(work, copy=False), pq)
        lib.call("backward_features", (dtype, work), a_x, a_mu, *ivs, n, k, d, sd, ops.a_xcx,
                 a_pq, a_row_start, a_entry_class, a_entry_weight, dx.ctypes.data)

    # 3. dmu and dlog_var from one product G^T [xc | xc^2] (its second half only for dlog_var)
    if need_dmu or need_ds:
        width = d + sd if need_ds else d
        gx, a_gx = tmp.pointer("gx", (k, width), work)
        matmul(g.T, ops.xcx[:, :width].astype(work, copy=False), gx)
        lib.call("backward_classes", (dtype, work), a_x, a_y, a_mu, *ivs, gl.ctypes.data,
                 n, k, d, sd, ops.a_shift, ops.a_ivm, a_gx, width, a_g_col, a_gz_col,
                 a_row_start, a_entry_class, a_entry_weight, int(opts.logdet_logits),
                 int(opts.logdet_lkd), int(need_dmu), int(need_ds), _address(dmu), _address(ds))
    return dx, dmu, ds
