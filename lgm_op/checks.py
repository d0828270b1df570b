"""Validation of shapes, dtypes and label values, shared by every backend; framework-free.

Each function raises ``ValueError`` whose message names the argument, what was expected and what
was given (SPEC section 4). The operator turns these into ``MXNetError`` at the MXNet boundary.
"""
import math

import numpy as np

__all__ = ["check_shapes", "check_sizes", "check_float_dtype", "validate_labels_numpy",
           "param_shapes"]


def param_shapes(num_classes, dim, isotropic):
    """Shapes of ``mean`` (K, D) and ``log_var`` ((K, D), or (K, 1) when isotropic)."""
    return (num_classes, dim), (num_classes, 1 if isotropic else dim)


def _matches(given, wanted):
    """Whether a possibly partly-known shape (unknown dims <= 0, as MXNet reports them) fits."""
    return len(given) == len(wanted) and all(g <= 0 or g == w for g, w in zip(given, wanted))


def check_shapes(opts, data_shape, label_shape=None, mean_shape=None, log_var_shape=None):
    """Check the argument shapes against each other and ``opts``; unknown shapes may be None,
    unknown dimensions of the others may be 0 or -1.

    data_shape: (N, D); label_shape: (N,); mean_shape: (K, D); log_var_shape: (K, D) or (K, 1).
    Returns (N, D).
    """
    data_shape = tuple(data_shape)
    if len(data_shape) != 2:
        raise ValueError(f"lgm: data must be 2-D (N, D), got shape {data_shape}")
    n, d = data_shape
    if d < 1:
        raise ValueError(f"lgm: data must have at least one feature column, got shape {data_shape}")
    k = opts.num_classes
    if label_shape is not None and not _matches(tuple(label_shape), (n,)):
        raise ValueError(f"lgm: label must have shape (N,) = ({n},), got {tuple(label_shape)}")
    want_mean, want_log_var = param_shapes(k, d, opts.isotropic)
    if mean_shape is not None and not _matches(tuple(mean_shape), want_mean):
        raise ValueError(f"lgm: mean must have shape (K, D) = {want_mean}, got {tuple(mean_shape)}")
    if log_var_shape is not None and not _matches(tuple(log_var_shape), want_log_var):
        form = "(K, 1) with isotropic=True" if opts.isotropic else "(K, D)"
        raise ValueError(f"lgm: log_var must have shape {form} = {want_log_var}, "
                         f"got {tuple(log_var_shape)}")
    return n, d


def check_sizes(shapes, max_elements, why):
    """Every array of ``shapes`` (name -> shape) has at most ``max_elements`` elements; ``why``
    says where the limit comes from."""
    for name, shape in shapes.items():
        size = math.prod(int(e) for e in shape)   # Python integers: exact at any size
        if size > max_elements:
            raise ValueError(f"lgm: {name} of shape {tuple(shape)} would have {size} elements, "
                             f"more than the {max_elements} {why}")


def check_float_dtype(name, dtype):
    """``data``, ``mean`` and ``log_var`` must be float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"lgm: {name} must be float32 or float64, got {dtype.name}")
    return dtype


def validate_labels_numpy(label, num_classes):
    """Labels as int64 after checking every value is an integer in [0, K).

    label: (N,) of any real dtype (MXNet iterators give float32).
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        bad = ~np.isfinite(label)
        bad |= np.floor(np.where(bad, 0, label)) != np.where(bad, 0, label)
        bad |= ~bad & ((label < 0) | (label >= num_classes))
    elif label.dtype.kind in "iu":
        bad = (label < 0) | (label >= num_classes)
    else:
        raise ValueError(f"lgm: label must have a real dtype, got {label.dtype.name}")
    if bad.any():
        where = int(np.flatnonzero(bad)[0])
        raise ValueError(f"lgm: label must hold integers in [0, {num_classes}), "
                         f"got {label[where]!r} at index {where}")
    return label.astype(np.int64)
