"""The CPU path: forward and backward of SPEC sections 1-2 as NumPy/BLAS closed forms.

Every N x K x D contraction is expanded into matrix products, so memory is O(N*K + N*D + K*D):
    sum_j (x_ij - mu_kj)^2 iv_kj = (x^2) iv^T - 2 x (mu*iv)^T + sum_j mu_kj^2 iv_kj
Two numerical choices keep the expansion as accurate as the direct form:
- everything is computed in float64 and rounded once at the end, so float32 callers get results
  within half an ulp of the float64 answer;
- features and means are first shifted by the mean of the class means. Distances do not change,
  but the three terms of the expansion shrink, and so does their cancellation when the features sit
  far from the origin (the error of the expansion scales with |x|^2 / d, not with d).

Framework-free: NumPy arrays in, NumPy arrays out; the launchers in ``cuda.py`` share these
signatures.
"""
import numpy as np

from .checks import validate_labels_numpy

__all__ = ["lgm_forward_cpu", "lgm_backward_cpu", "clamp_log_var"]


def clamp_log_var(log_var, opts):
    """c = clip(s, logvar_min, logvar_max) in float64 and the mask where gradient passes."""
    s = np.asarray(log_var, dtype=np.float64)
    c = np.clip(s, opts.logvar_min, opts.logvar_max)
    passes = (s >= opts.logvar_min) & (s <= opts.logvar_max)
    return c, passes


class _Prepared:
    """Float64 operands shared by forward and backward.

    xc: (N, D) shifted features; mc: (K, D) shifted means; iv: (K, D) inverse variances;
    log_det: (K,) log |Sigma_k|; passes: like log_var, where the clamp passes gradient.
    """

    def __init__(self, x, mu, s, opts):
        x = np.asarray(x, dtype=np.float64)
        mu = np.asarray(mu, dtype=np.float64)
        dim = x.shape[1]
        c, self.passes = clamp_log_var(s, opts)
        self.iv = np.broadcast_to(np.exp(-c), mu.shape)
        self.log_det = c[:, 0] * dim if opts.isotropic else c.sum(axis=1)
        shift = mu.mean(axis=0) if mu.shape[0] else np.zeros(dim)
        self.xc = x - shift
        self.mc = mu - shift
        self.mciv = self.mc * self.iv

    def half_mahalanobis(self):
        """d: (N, K), 0.5 * sum_j (x_ij - mu_kj)^2 iv_kj, by three matrix products."""
        d = (self.xc * self.xc) @ self.iv.T
        d -= 2.0 * (self.xc @ self.mciv.T)
        d += np.einsum("kj,kj->k", self.mc, self.mciv)[None, :]
        d *= 0.5
        # Rounding can leave a tiny negative where x equals a mean; a distance is never negative.
        np.maximum(d, 0.0, out=d)
        return d


def lgm_forward_cpu(x, label, mu, log_var, opts, training):
    """Forward of SPEC section 1.

    x: (N, D) float32/float64; label: (N,) integer-valued labels of any real dtype, or None for the
    label-free form (the likelihood then uses the predicted class); mu: (K, D);
    log_var: (K, D), or (K, 1) when ``opts.isotropic``; training: applies the margin.
    Returns logits: (N, K) and lkd: (N,), in the dtype of x.
    """
    out_dtype = np.asarray(x).dtype
    prep = _Prepared(x, mu, log_var, opts)
    d = prep.half_mahalanobis()
    n = d.shape[0]
    rows = np.arange(n)
    logits = -d
    if opts.logdet_logits:
        logits -= 0.5 * prep.log_det[None, :]
    if label is None:
        y = np.argmax(logits, axis=1) if n else np.zeros(0, dtype=np.int64)
    else:
        y = validate_labels_numpy(label, opts.num_classes)
        alpha = opts.margin(training)
        if alpha:
            logits[rows, y] -= alpha * d[rows, y]
    lkd = d[rows, y]
    if opts.logdet_lkd:
        lkd = lkd + 0.5 * prep.log_det[y]
    return logits.astype(out_dtype, copy=False), lkd.astype(out_dtype, copy=False)


def lgm_backward_cpu(x, label, mu, log_var, grad_logits, grad_lkd, opts, training):
    """Backward of SPEC section 2.

    x: (N, D); label: (N,) labels (for the label-free form, the predicted classes); mu: (K, D);
    log_var: (K, D) or (K, 1); grad_logits: (N, K) = dL/dlogits; grad_lkd: (N,) = dL/dlkd.
    Returns dx: (N, D), dmu: (K, D), dlog_var: shaped like log_var, in the dtype of x.
    """
    out_dtype = np.asarray(x).dtype
    prep = _Prepared(x, mu, log_var, opts)
    y = validate_labels_numpy(label, opts.num_classes)
    n = y.shape[0]
    rows = np.arange(n)
    gz = np.asarray(grad_logits, dtype=np.float64)
    gl = np.asarray(grad_lkd, dtype=np.float64)

    # G = dL/dd: (N, K)
    g = -gz
    alpha = opts.margin(training)
    if alpha:
        g[rows, y] *= 1.0 + alpha
    g[rows, y] += gl

    # dL/dlog|Sigma_k|: (K,)
    g_log_det = np.zeros(opts.num_classes)
    if opts.logdet_logits:
        g_log_det -= 0.5 * gz.sum(axis=0)
    if opts.logdet_lkd:
        g_log_det += 0.5 * np.bincount(y, weights=gl, minlength=opts.num_classes)

    g_col = g.sum(axis=0)[:, None]                     # (K, 1)
    gx = g.T @ prep.xc                                  # (K, D): sum_i G_ik xc_ij
    gx2 = g.T @ (prep.xc * prep.xc)                     # (K, D): sum_i G_ik xc_ij^2
    dx = prep.xc * (g @ prep.iv) - g @ prep.mciv        # sum_k G_ik (x_ij - mu_kj) iv_kj
    dmu = -prep.iv * (gx - prep.mc * g_col)
    # sum_i G_ik (x_ij - mu_kj)^2 expanded around the shifted origin
    sq = gx2 - 2.0 * prep.mc * gx + prep.mc * prep.mc * g_col
    ds = -0.5 * prep.iv * sq + g_log_det[:, None]
    if opts.isotropic:
        ds = ds.sum(axis=1, keepdims=True)
    ds *= prep.passes
    return (dx.astype(out_dtype, copy=False), dmu.astype(out_dtype, copy=False),
            ds.astype(out_dtype, copy=False))
