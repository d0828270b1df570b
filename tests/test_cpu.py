"""The CPU path against the references (SPEC section 5), framework calls excluded: every test
runs on the compiled passes and on the NumPy fallback (the ``cpu_path`` fixture)."""
import numpy as np
import pytest

from common import (DTYPES, RTOL64, SHAPES, SMALL_SHAPES, assert_close, assert_float32_rule,
                    make_inputs, option_sets)
from lgm_op.cpu import lgm_backward_cpu, lgm_forward_cpu
from lgm_op.options import LGMOptions
from lgm_op.reference import autograd_grads, numpy_forward, numpy_grads

pytestmark = pytest.mark.usefixtures("cpu_path")


def _run_cpu(inp, opts, training, label="y"):
    y = inp[label] if label else None
    logits, lkd = lgm_forward_cpu(inp["x"], y, inp["mu"], inp["s"], opts, training)
    y_used = inp["y"] if label else np.argmax(logits, axis=1)
    grads = lgm_backward_cpu(inp["x"], y_used, inp["mu"], inp["s"], inp["gz"], inp["gl"], opts,
                             training)
    return (logits, lkd) + grads


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_matches_autograd_reference(shape, dtype, rng, seed):
    n, k, d = shape
    opts = LGMOptions(num_classes=k)
    inp64 = make_inputs(rng, n, k, d)
    expected = autograd_grads(inp64["x"], inp64["y"], inp64["mu"], inp64["s"], inp64["gz"],
                              inp64["gl"], opts, True)
    names = ("logits", "lkd", "dx", "dmean", "dlog_var")
    if dtype == "float64":
        for name, got, want in zip(names, _run_cpu(inp64, opts, True), expected):
            assert_close(got, want, RTOL64, name, seed)
        return
    inp32 = {key: (v.astype(np.float32) if key != "y" else v) for key, v in inp64.items()}
    ref32 = autograd_grads(inp32["x"], inp32["y"], inp32["mu"], inp32["s"], inp32["gz"],
                           inp32["gl"], opts, True)
    ours = _run_cpu(inp32, opts, True)
    exact = autograd_grads(*(inp32[key].astype(np.float64) if key != "y" else inp32[key]
                             for key in ("x", "y", "mu", "s", "gz", "gl")), opts, True)
    for name, got, want, ref in zip(names, ours, exact, ref32):
        assert got.dtype == np.float32, name
        assert_float32_rule(got, want, ref, name, seed)


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_cpu_every_option(shape, training, rng, seed):
    n, k, d = shape
    for opts in option_sets(k):
        inp = make_inputs(rng, n, k, d, isotropic=opts.isotropic)
        for label in ("y", None):
            got = _run_cpu(inp, opts, training, label)
            want = numpy_forward(inp["x"], inp[label] if label else None, inp["mu"], inp["s"],
                                 opts, training)
            y_used = inp["y"] if label else np.argmax(want[0], axis=1)
            want = want + numpy_grads(inp["x"], y_used, inp["mu"], inp["s"], inp["gz"], inp["gl"],
                                      opts, training)
            for name, a, b in zip(("logits", "lkd", "dx", "dmean", "dlog_var"), got, want):
                assert_close(a, b, RTOL64, f"{name} {opts} label={label}", seed)


def test_label_dtypes_agree(rng):
    inp = make_inputs(rng, 9, 4, 3)
    opts = LGMOptions(num_classes=4)
    outs = [lgm_forward_cpu(inp["x"], inp["y"].astype(t), inp["mu"], inp["s"], opts, True)
            for t in (np.float32, np.float64, np.int32, np.int64, np.uint8)]
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0][0], other[0])
        np.testing.assert_array_equal(outs[0][1], other[1])


def test_one_class_only_and_empty_class(rng, seed):
    n, k, d = 40, 5, 3
    inp = make_inputs(rng, n, k, d)
    inp["y"][:] = 2  # every sample in class 2; classes 0, 1, 3, 4 have none
    opts = LGMOptions(num_classes=k)
    got = _run_cpu(inp, opts, True)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True) + numpy_grads(
        inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"], inp["gl"], opts, True)
    for name, a, b in zip(("logits", "lkd", "dx", "dmean", "dlog_var"), got, want):
        assert_close(a, b, RTOL64, name, seed)


def test_clamp_blocks_gradient_outside_and_passes_on_boundary(rng):
    k, d = 3, 4
    inp = make_inputs(rng, 6, k, d, clamp_some=False)
    opts = LGMOptions(num_classes=k)
    inp["s"][0, 0] = 9.0            # above: no gradient
    inp["s"][1, 1] = -9.0           # below: no gradient
    inp["s"][2, 2] = opts.logvar_max  # on the boundary: gradient passes
    inp["s"][2, 3] = opts.logvar_min
    ds = lgm_backward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"], inp["gl"], opts,
                          True)[2]
    assert ds[0, 0] == 0 and ds[1, 1] == 0
    assert ds[2, 2] != 0 and ds[2, 3] != 0


def test_far_from_origin_is_accurate(rng, seed):
    """Features and means far from the origin: the shifted expansion keeps full precision."""
    n, k, d = 50, 7, 16
    inp = make_inputs(rng, n, k, d)
    inp["x"] += 1e4
    inp["mu"] += 1e4
    opts = LGMOptions(num_classes=k)
    got = _run_cpu(inp, opts, True)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True) + numpy_grads(
        inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"], inp["gl"], opts, True)
    # Inputs of magnitude 1e4 carry an absolute rounding of ~1e-12 per coordinate before any
    # arithmetic, so the reference itself is only good to ~1e-12 / |x - mu| relative.
    for name, a, b in zip(("logits", "lkd", "dx", "dmean", "dlog_var"), got, want):
        assert_close(a, b, 1e-7, name, seed)


def test_nan_and_inf_propagate(rng):
    inp = make_inputs(rng, 4, 3, 2)
    inp["x"][1, 0] = np.nan
    inp["x"][2, 1] = np.inf
    opts = LGMOptions(num_classes=3)
    logits, lkd = lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True)
    assert np.isnan(logits[1]).all() and np.isnan(lkd[1])
    assert not np.isfinite(logits[2]).any()
    assert np.isfinite(logits[[0, 3]]).all()


def test_empty_batch():
    opts = LGMOptions(num_classes=3)
    x = np.zeros((0, 2))
    mu = np.ones((3, 2))
    s = np.zeros((3, 2))
    logits, lkd = lgm_forward_cpu(x, np.zeros(0), mu, s, opts, True)
    assert logits.shape == (0, 3) and lkd.shape == (0,)
    dx, dmu, ds = lgm_backward_cpu(x, np.zeros(0), mu, s, np.zeros((0, 3)), np.zeros(0), opts,
                                   True)
    assert dx.shape == (0, 2) and not dmu.any() and not ds.any()


@pytest.mark.parametrize("bad", [2.5, -1.0, 3.0, np.nan, np.inf])
def test_bad_labels_name_the_value(bad, rng):
    inp = make_inputs(rng, 5, 3, 2)
    inp["y"][3] = bad
    with pytest.raises(ValueError, match=r"label must hold integers in \[0, 3\).*index 3"):
        lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=3), True)
