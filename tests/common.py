"""Shared test material: the odd shapes, the dtypes with their tolerances, option sets, data
generation and a comparison that reports the worst element. Framework-free (no MXNet import)."""
import contextlib
import itertools
import os

import numpy as np

from lgm_op.options import LGMOptions

# (N, K, D): sizes on both sides of the usual block sizes (32, 64, 128, 256), single rows,
# single classes, single dimensions.
SHAPES = [
    (1, 1, 1),
    (2, 3, 2),
    (7, 13, 33),
    (33, 1, 5),
    (129, 10, 2),
    (65, 63, 17),
    (257, 1000, 3),
    (1000, 17, 300),
]
# Smaller subset for the slowest paths (finite differences, every option combination).
SMALL_SHAPES = [(1, 1, 1), (2, 3, 2), (7, 13, 33), (33, 1, 5)]

# float64 must agree to rtol 1e-9 (SPEC 5); float32 is judged against the float64 answer by the
# error of the same reference run in float32 (see assert_float32_rule).
DTYPES = ["float64", "float32"]
RTOL64 = 1e-9


def option_sets(num_classes):
    """Every combination of the boolean options, with alpha 0.1 and 0."""
    out = []
    for logdet_logits, logdet_lkd, isotropic, alpha in itertools.product(
            (True, False), (True, False), (False, True), (0.1, 0.0)):
        out.append(LGMOptions(num_classes=num_classes, alpha=alpha, logdet_logits=logdet_logits,
                              logdet_lkd=logdet_lkd, isotropic=isotropic))
    return out


def make_inputs(rng, n, k, d, dtype="float64", isotropic=False, clamp_some=True,
                label_dtype=np.float32):
    """Random x (N, D), labels (N,), mu (K, D), log_var (K, D or 1), upstream grads.

    With clamp_some, a few log-variances fall outside the default clamp [-6, 6] so the masked
    gradient path is exercised.
    """
    x = rng.standard_normal((n, d))
    mu = rng.standard_normal((k, d))
    s = rng.uniform(-1.5, 1.5, (k, 1 if isotropic else d))
    if clamp_some and s.size >= 3:
        flat = s.reshape(-1)
        flat[0] = 7.5
        flat[-1] = -8.0
    y = rng.integers(0, k, n).astype(label_dtype)
    gz = rng.standard_normal((n, k))
    gl = rng.standard_normal(n)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return dict(x=cast(x), y=y, mu=cast(mu), s=cast(s), gz=cast(gz), gl=cast(gl))


def worst(actual, expected):
    """(index, actual value, expected value, abs error) of the largest absolute difference."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    err = np.abs(a - e)
    if err.size == 0:
        return None, None, None, 0.0
    idx = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
    return idx, a[idx], e[idx], err[idx]


def assert_close(actual, expected, rtol, what, seed, atol_scale=1e-12):
    """|a - e| <= rtol * |e| + atol with atol = atol_scale * max|e|, elementwise.

    The absolute floor is relative to the array's own magnitude, so entries that cancel to
    near zero (a gradient summed over samples of both signs) are judged on the array's scale.
    """
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape} (seed {seed})"
    if e.size == 0:
        return
    atol = atol_scale * float(np.max(np.abs(e)))
    ok = np.abs(a - e) <= rtol * np.abs(e) + atol
    if not ok.all():
        idx, av, ev, err = worst(a, e)
        raise AssertionError(f"{what}: worst at {idx}: got {av!r}, expected {ev!r} "
                             f"(abs err {err:.3g}, rtol {rtol}, atol {atol:.3g}, seed {seed}, "
                             f"{int((~ok).sum())} of {ok.size} off)")


def assert_float32_rule(actual32, expected64, reference32, what, seed, slack=2.0, atol_scale=1e-6):
    """SPEC 5: the float32 error vs the float64 answer is at most ``slack`` x the error of the
    float64 reference run in float32, elementwise, plus a tiny absolute floor
    (atol_scale * max|expected|, covering entries where the float32 reference happens to be exact).
    """
    a = np.asarray(actual32, np.float64)
    e = np.asarray(expected64, np.float64)
    r = np.asarray(reference32, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape} (seed {seed})"
    if e.size == 0:
        return
    floor = atol_scale * float(np.max(np.abs(e)))
    ours = np.abs(a - e)
    allowed = slack * np.abs(r - e) + floor
    ok = ours <= allowed
    if not ok.all():
        bad = np.unravel_index(np.argmax(np.where(ok, -np.inf, ours - allowed)), ours.shape)
        raise AssertionError(f"{what}: float32 rule broken at {bad}: got {a[bad]!r}, float64 "
                             f"answer {e[bad]!r}, float32 reference {r[bad]!r} "
                             f"(our err {ours[bad]:.3g} > allowed {allowed[bad]:.3g}; seed {seed})")


# SPEC section 5's input families: where training and hostile inputs put the features.
FAMILIES = ["normal", "near_mean", "offset_1e3", "offset_1e5", "classes_apart_2d", "clamp_bounds"]
# A single non-finite (or overflowing) entry in one feature row, one mean or one log-variance.
NONFINITE = [("x", np.nan), ("x", np.inf), ("mu", np.inf), ("mu", -np.inf), ("mu", np.nan),
             ("mu", "huge"), ("s", np.nan), ("s", np.inf)]


def family_inputs(family, rng, n, k, d, isotropic=False):
    """make_inputs' arrays (float64) drawn from one input family of SPEC section 5.

    normal: independent standard normals. near_mean: every feature within 1e-4 of its own class
    mean. offset_1e3 / offset_1e5: features and means offset together from the origin.
    classes_apart_2d: D = 2 (d is ignored), class means 1e2 to 1e4 apart, samples within 1e-2 of
    their own mean. clamp_bounds: log-variances exactly at and beyond both clamp bounds.
    """
    if family == "classes_apart_2d":
        d = 2
    inp = make_inputs(rng, n, k, d, isotropic=isotropic)
    y = inp["y"].astype(np.int64)
    if family == "near_mean":
        inp["x"] = inp["mu"][y] + 1e-4 * rng.uniform(-1, 1, (n, d))
    elif family.startswith("offset_"):
        offset = float(family.split("_")[1])
        inp["x"] += offset
        inp["mu"] += offset
    elif family == "classes_apart_2d":
        # means on a spiral: neighbours 1e2 apart, the far ends 1e4 apart
        radius = np.geomspace(1e2, 1e4, k)
        angle = np.arange(k) * 2.4
        inp["mu"] = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        inp["x"] = inp["mu"][y] + 1e-2 * rng.standard_normal((n, 2))
    elif family == "clamp_bounds":
        s = inp["s"].reshape(-1)
        s[0::4] = -6.0
        s[1::4] = 6.0
        s[2::4] = rng.uniform(-12, -6, s[2::4].shape)
        s[3::4] = rng.uniform(6, 12, s[3::4].shape)
    elif family != "normal":
        raise ValueError(f"unknown input family {family!r}")
    return inp


def put_nonfinite(inp, where, value, dtype):
    """Copy of inp with one non-finite entry: in feature row 1 ("x"), class 1's mean ("mu") or
    log-variance ("s"). "huge" is a finite mean whose square overflows in ``dtype``.
    Returns (inputs, row, column): the row or column of the outputs it may reach (None for the other)."""
    out = {key: v.copy() for key, v in inp.items()}
    if value == "huge":
        value = 1e160 if np.dtype(dtype) == np.float64 else 1e30
    out[where].reshape(out[where].shape[0], -1)[1, -1] = value
    return out, (1 if where == "x" else None), (None if where == "x" else 1)


@contextlib.contextmanager
def cpu_kernels_env(value):
    """LGM_OP_CPU_KERNELS set to ``value`` ("1": the compiled CPU passes, "0": the NumPy path)
    while the block runs."""
    old = os.environ.get("LGM_OP_CPU_KERNELS")
    os.environ["LGM_OP_CPU_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["LGM_OP_CPU_KERNELS"]
        else:
            os.environ["LGM_OP_CPU_KERNELS"] = old
