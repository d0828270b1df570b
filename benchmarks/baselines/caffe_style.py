"""Launcher of the Caffe-style baseline kernels (``caffe_style.cu`` beside this file).

Framework-free and array-library agnostic: ``xp`` is ``cupy`` with ``cupy.RawModule`` on a GPU, or
``numpy`` with ``lgm_op.cudasim.RawModule`` on the CPU simulator, so the benchmark and the tests
launch the same kernels through the same code. Signatures follow ``lgm_op.cpu``.
"""
from pathlib import Path

import numpy as np

__all__ = ["CaffeStyleLGM", "SOURCE_PATH"]

SOURCE_PATH = Path(__file__).resolve().parent / "caffe_style.cu"
_THREADS = 256


def _blocks(count):
    return (-(-count // _THREADS),)


class CaffeStyleLGM:
    """The baseline's forward and backward, float32 and diagonal covariance only.

    xp: the array module of the arrays passed in; raw_module_class: a class built as
    ``raw_module_class(code=text)`` with ``get_function(name)(grid, block, args, shared_mem=0)``.
    """

    def __init__(self, xp, raw_module_class):
        self.xp = xp
        module = raw_module_class(code=SOURCE_PATH.read_text(encoding="utf-8"))
        self._forward = module.get_function("caffe_lgm_forward")
        self._backward_data = module.get_function("caffe_lgm_backward_data")
        self._backward_params = module.get_function("caffe_lgm_backward_params")

    def _operands(self, x, label, mu, log_var, opts):
        if opts.isotropic:
            raise ValueError("caffe_style baseline: only the diagonal covariance is implemented")
        xp = self.xp
        n, dim = x.shape
        k = opts.num_classes
        if tuple(mu.shape) != (k, dim) or tuple(log_var.shape) != (k, dim):
            raise ValueError(f"caffe_style baseline: mean and log_var must have shape "
                             f"(K, D) = {(k, dim)}, got {tuple(mu.shape)} and "
                             f"{tuple(log_var.shape)}")
        as32 = lambda a: xp.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return (as32(x), as32(label), as32(mu), as32(log_var)), (n, k, dim)

    @staticmethod
    def _clamp(opts):
        return np.float32(opts.logvar_min), np.float32(opts.logvar_max)

    def forward(self, x, label, mu, log_var, opts, training):
        """logits: (N, K) and lkd: (N,), float32, from x: (N, D), label: (N,), mu: (K, D) and
        log_var: (K, D)."""
        data, (n, k, dim) = self._operands(x, label, mu, log_var, opts)
        logits = self.xp.empty((n, k), dtype=np.float32)
        lkd = self.xp.zeros(n, dtype=np.float32)
        if n * k:
            self._forward(_blocks(n * k), (_THREADS,), data + (
                logits, lkd, np.int32(n), np.int32(k), np.int32(dim),
                np.float32(opts.margin(training))) + self._clamp(opts) + (
                np.int32(opts.logdet_logits), np.int32(opts.logdet_lkd)))
        return logits, lkd

    def backward(self, x, label, mu, log_var, grad_logits, grad_lkd, opts, training):
        """dx: (N, D), dmu: (K, D), dlog_var: (K, D), float32, from the upstream gradients
        grad_logits: (N, K) and grad_lkd: (N,)."""
        xp = self.xp
        data, (n, k, dim) = self._operands(x, label, mu, log_var, opts)
        grads = (xp.ascontiguousarray(grad_logits, dtype=np.float32),
                 xp.ascontiguousarray(grad_lkd, dtype=np.float32))
        shapes = (np.int32(n), np.int32(k), np.int32(dim))
        alpha = np.float32(opts.margin(training))
        dx = xp.empty((n, dim), dtype=np.float32)
        dmu = xp.empty((k, dim), dtype=np.float32)
        dlog_var = xp.empty((k, dim), dtype=np.float32)
        if n * dim:
            self._backward_data(_blocks(n * dim), (_THREADS,), data + grads + (dx,) + shapes
                                + (alpha,) + self._clamp(opts))
        self._backward_params(_blocks(k * dim), (_THREADS,), data + grads + (dmu, dlog_var)
                              + shapes + (alpha,) + self._clamp(opts)
                              + (np.int32(opts.logdet_logits), np.int32(opts.logdet_lkd)))
        return dx, dmu, dlog_var
