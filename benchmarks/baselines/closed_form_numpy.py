"""The CPU benchmark's framework-free peers: the GEMM expansion of the L-GM loss in plain NumPy,
forward and backward written by hand in the input's precision, and the six matrix products that
expansion needs, alone (the floor of the approach on this machine's BLAS).

The expansion (SPEC sections 1-2, diagonal covariance), with iv = exp(-clip(s)) and
G = dL/dd (N, K):

    d    = 0.5 (x^2) iv^T - x (mu iv)^T + 0.5 sum_j mu^2 iv           forward: 2 GEMMs
    dx   = x * (G iv) - G (mu iv)                                      backward: (N,K)x(K,D) twice
    dmu  = -(G^T x) * iv + (sum_i G) mu iv                                       (K,N)x(N,D) twice
    ds   = -0.5 iv * (G^T x^2 - 2 mu * (G^T x) + mu^2 sum_i G) + gld
"""
import numpy as np

__all__ = ["NumpyGemmExpansion", "SixGemms"]


class NumpyGemmExpansion:
    """One forward+backward of the expanded loss on NumPy arrays of one float dtype.

    x: (N, D); label: (N,) integer-valued; mean: (K, D); log_var: (K, D); opts: LGMOptions
    (diagonal covariance).
    """

    def __init__(self, x, label, mean, log_var, opts, training=True):
        if opts.isotropic:
            raise ValueError("NumpyGemmExpansion: opts.isotropic must be False (diagonal "
                             "covariance), got True")
        self.x, self.mean, self.log_var, self.opts = x, mean, log_var, opts
        self.y = np.asarray(label).astype(np.intp)
        self.rows = np.arange(len(self.y))
        self.alpha = opts.margin(training)

    def forward(self):
        """logits: (N, K), lkd: (N,)."""
        o, x, mean, rows, y = self.opts, self.x, self.mean, self.rows, self.y
        real = x.dtype.type
        c = np.clip(self.log_var, real(o.logvar_min), real(o.logvar_max))
        half_ld = real(0.5) * c.sum(axis=1)
        # where the clamp passes gradient: clip(s) == s exactly there (and never for NaN)
        self.passes = c == self.log_var
        self.iv = iv = np.exp(np.negative(c, out=c), out=c)
        self.mean_iv = mean_iv = mean * iv
        self.x_sq = x_sq = x * x
        # logits = -d - [logdet_logits] half_ld, built in place in one (N, K) buffer; the -0.5
        # goes on the (N, D) operand, the smallest one
        logits = np.matmul(x_sq * real(-0.5), iv.T)
        logits += np.matmul(x, mean_iv.T)
        bias = real(-0.5) * np.einsum("kj,kj->k", mean, mean_iv)
        if o.logdet_logits:
            bias -= half_ld
        logits += bias
        d_label = -logits[rows, y]
        if o.logdet_logits:
            d_label -= half_ld[y]
        lkd = d_label + half_ld[y] if o.logdet_lkd else d_label
        logits[rows, y] -= real(self.alpha) * d_label
        return logits, lkd

    def backward(self, grad_logits, grad_lkd):
        """dx: (N, D), dmean: (K, D), dlog_var: (K, D); after :meth:`forward`.

        grad_logits: (N, K), grad_lkd: (N,), the upstream gradients.
        """
        o, x, mean, rows, y = self.opts, self.x, self.mean, self.rows, self.y
        real = x.dtype.type
        iv, mean_iv = self.iv, self.mean_iv
        g = np.negative(grad_logits)                                   # G = dL/dd: (N, K)
        g[rows, y] = g[rows, y] * real(1 + self.alpha) + grad_lkd
        k = mean.shape[0]
        g_log_det = np.zeros(k, dtype=x.dtype)
        if o.logdet_logits:
            g_log_det -= real(0.5) * grad_logits.sum(axis=0)
        if o.logdet_lkd:
            g_log_det += real(0.5) * np.bincount(y, grad_lkd, minlength=k).astype(x.dtype)
        g_sum = g.sum(axis=0)[:, None]                                  # (K, 1)
        dx = x * np.matmul(g, iv)
        dx -= np.matmul(g, mean_iv)
        g_x = np.matmul(g.T, x)                                         # (K, D)
        # dmean = iv (mean sum_i G - G^T x); the log-variance bracket
        # G^T x^2 - 2 mean G^T x + mean^2 sum_i G = G^T x^2 + mean (u - G^T x), u as below
        u = g_sum * mean
        u -= g_x
        dmean = iv * u
        u -= g_x
        u *= mean
        dlog_var = np.matmul(g.T, self.x_sq)
        dlog_var += u
        dlog_var *= iv
        dlog_var *= real(-0.5)
        dlog_var += g_log_det[:, None]
        dlog_var *= self.passes
        return dx, dmean, dlog_var


class SixGemms:
    """The six matrix products of :class:`NumpyGemmExpansion` on operands of its exact shapes,
    into preallocated outputs: forward (N,D)x(D,K) twice, backward (N,K)x(K,D) twice and
    (K,N)x(N,D) twice. Nothing else: the time no implementation of the expansion can beat.

    x: (N, D), mean: (K, D), log_var: (K, D), grad_logits: (N, K) (standing in for G).
    """

    def __init__(self, x, mean, log_var, grad_logits):
        self.x, self.x_sq = x, x * x
        self.iv = np.exp(-log_var)
        self.mean_iv = mean * self.iv
        self.g = grad_logits
        n, dim = x.shape
        k = mean.shape[0]
        self.out_nk = [np.empty((n, k), x.dtype) for _ in range(2)]
        self.out_nd = [np.empty((n, dim), x.dtype) for _ in range(2)]
        self.out_kd = [np.empty((k, dim), x.dtype) for _ in range(2)]

    def run(self):
        np.matmul(self.x_sq, self.iv.T, out=self.out_nk[0])
        np.matmul(self.x, self.mean_iv.T, out=self.out_nk[1])
        np.matmul(self.g, self.iv, out=self.out_nd[0])
        np.matmul(self.g, self.mean_iv, out=self.out_nd[1])
        np.matmul(self.g.T, self.x, out=self.out_kd[0])
        np.matmul(self.g.T, self.x_sq, out=self.out_kd[1])
