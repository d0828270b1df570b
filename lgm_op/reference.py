"""Reference implementations of SPEC sections 1-2: the oracles tests and benchmarks compare against.

Both materialise N x K x D and are meant to be obviously right, not fast:

- ``autograd_*``: the loss composed from stock MXNet operators and differentiated by
  ``mx.autograd`` (MXNet is imported on first use, so this module loads without it);
- ``numpy_*``: the same equations written with NumPy broadcasting, gradients written out term by
  term from SPEC section 2. It needs no framework, so GPU tests run on machines without MXNet.
"""
import numpy as np

__all__ = ["autograd_forward", "autograd_grads", "numpy_forward", "numpy_grads"]


def _clamped(F, s, opts):
    # clip() with the gradient passing on the closed interval [min, max] and nowhere else,
    # written out so the reference does not depend on how a framework treats the boundary.
    # (where, not a blend by multiplication: 0 * inf would turn a clamped infinity into NaN)
    lo, hi = opts.logvar_min, opts.logvar_max
    inside = F.stop_gradient(F.broadcast_logical_and(s >= lo, s <= hi))
    return F.where(inside, s, F.clip(F.stop_gradient(s), lo, hi))


def autograd_forward(x, label, mu, log_var, opts, training):
    """logits: (N, K), lkd: (N,) as MXNet NDArrays, from stock ops (differentiable by autograd).

    x: (N, D); label: (N,) or None (label-free: the predicted class); mu: (K, D);
    log_var: (K, D) or (K, 1). All NDArrays of one float dtype.
    """
    import mxnet as mx
    F = mx.nd
    k = opts.num_classes
    dim = x.shape[1]
    c = _clamped(F, log_var, opts)
    iv = F.exp(-c)                                                      # (K, D) or (K, 1)
    diff = F.broadcast_sub(x.expand_dims(1), mu.expand_dims(0))        # (N, K, D)
    d = 0.5 * F.sum(F.broadcast_mul(diff * diff, iv.expand_dims(0)), axis=2)  # (N, K)
    log_det = F.sum(c, axis=1) * (dim if opts.isotropic else 1)        # (K,)
    half_ld = 0.5 * log_det.expand_dims(0)
    plain = -d - half_ld * float(opts.logdet_logits)
    alpha = opts.margin(training)
    if label is None:  # label-free form: the predicted class, and no margin
        label = F.stop_gradient(F.argmax(plain, axis=1))
        alpha = 0.0
    onehot = F.one_hot(label, k, dtype=x.dtype)
    margin = 1 + alpha * onehot
    logits = -margin * d - half_ld * float(opts.logdet_logits)
    # picked, not summed against the one-hot: 0 * inf would spread another class's inf as NaN
    lkd = F.pick(d, label, axis=1) + F.take(half_ld[0], label) * float(opts.logdet_lkd)
    return logits, lkd


def autograd_grads(x, label, mu, log_var, grad_logits, grad_lkd, opts, training):
    """(logits, lkd, dx, dmu, dlog_var) as NumPy arrays, by ``mx.autograd`` through the reference.

    Inputs are NumPy arrays; the computation runs in their dtype. grad_logits: (N, K) and
    grad_lkd: (N,) are the upstream gradients.
    """
    import mxnet as mx
    dtype = np.asarray(x).dtype
    args = [mx.nd.array(a, dtype=dtype) for a in (x, mu, log_var)]
    for a in args:
        a.attach_grad()
    y = None if label is None else mx.nd.array(label, dtype=dtype)
    with mx.autograd.record(train_mode=training):
        logits, lkd = autograd_forward(args[0], y, args[1], args[2], opts, training)
    mx.autograd.backward([logits, lkd], [mx.nd.array(grad_logits, dtype=dtype),
                                         mx.nd.array(grad_lkd, dtype=dtype)])
    return (logits.asnumpy(), lkd.asnumpy()) + tuple(a.grad.asnumpy() for a in args)


def _numpy_parts(x, mu, log_var, opts, dtype):
    real = np.dtype(dtype).type
    s = np.asarray(log_var, dtype=dtype)
    c = np.clip(s, real(opts.logvar_min), real(opts.logvar_max))
    iv = np.broadcast_to(np.exp(-c), np.shape(mu))
    diff = np.asarray(x, dtype)[:, None, :] - np.asarray(mu, dtype)[None, :, :]
    d = real(0.5) * np.sum(diff * diff * iv[None], axis=2)
    log_det = c[:, 0] * real(np.shape(x)[1]) if opts.isotropic else c.sum(axis=1)
    return real, s, iv, diff, d, real(0.5) * log_det


def _margin(y, opts, training, real):
    return real(1) + real(opts.margin(training)) * (np.arange(opts.num_classes)[None, :] == y[:, None])


def numpy_forward(x, label, mu, log_var, opts, training, dtype=np.float64):
    """logits: (N, K), lkd: (N,) by broadcasting, computed in ``dtype`` throughout (float64 for
    the answer; float32 gives the yardstick of the float32 rule). label: (N,) ints, or None."""
    real, _, _, _, d, half_ld = _numpy_parts(x, mu, log_var, opts, dtype)
    plain = -d - half_ld[None] * real(opts.logdet_logits)
    y = np.argmax(plain, axis=1) if label is None else np.asarray(label).astype(np.int64)
    # the label-free form has no margin
    margin = _margin(y, opts, training and label is not None, real)
    logits = -margin * d - half_ld[None] * real(opts.logdet_logits)
    rows = np.arange(len(y))
    lkd = d[rows, y] + half_ld[y] * real(opts.logdet_lkd)
    return logits, lkd


def numpy_grads(x, label, mu, log_var, grad_logits, grad_lkd, opts, training, dtype=np.float64):
    """dx: (N, D), dmu: (K, D), dlog_var: like log_var, term by term from SPEC 2, in ``dtype``.

    label: (N,) ints (for the label-free form, the predicted classes).
    """
    real, s, iv, diff, _, _ = _numpy_parts(x, mu, log_var, opts, dtype)
    y = np.asarray(label).astype(np.int64)
    gz = np.asarray(grad_logits, dtype)
    gl = np.asarray(grad_lkd, dtype)
    onehot = np.arange(opts.num_classes)[None, :] == y[:, None]
    g = -gz * _margin(y, opts, training, real) + gl[:, None] * onehot
    g_log_det = (real(-0.5 * opts.logdet_logits) * gz.sum(axis=0)
                 + real(0.5 * opts.logdet_lkd) * (gl[:, None] * onehot).sum(axis=0))
    weighted = g[:, :, None] * diff * iv[None]
    dx = weighted.sum(axis=1)
    dmu = -weighted.sum(axis=0)
    ds = real(-0.5) * iv * np.sum(g[:, :, None] * diff * diff, axis=0) + g_log_det[:, None]
    if opts.isotropic:
        ds = ds.sum(axis=1, keepdims=True)
    ds = ds * ((s >= opts.logvar_min) & (s <= opts.logvar_max))
    return dx, dmu, ds
