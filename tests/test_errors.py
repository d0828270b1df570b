"""SPEC section 4: every bad input gives an error naming the argument, the expectation and the
value, as the user sees it; the process survives and the next valid call is right."""
import mxnet as mx
import numpy as np
import pytest
from mxnet.base import MXNetError

import lgm_op
from common import make_inputs
from lgm_op.options import LGMOptions
from lgm_op.reference import numpy_forward

N, K, D = 6, 4, 3


@pytest.fixture
def inputs(rng):
    inp = make_inputs(rng, N, K, D)
    return inp, [mx.nd.array(inp[k], dtype="float64") for k in ("x", "y", "mu", "s")]


def call_lgm(args, **attrs):
    attrs.setdefault("num_classes", K)
    logits, lkd = mx.nd.Custom(*args, op_type="lgm", **attrs)
    return logits.asnumpy(), lkd.asnumpy()


def assert_still_works(inp, args):
    logits, lkd = call_lgm(args)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=K), False)
    np.testing.assert_allclose(logits, want[0], rtol=1e-12)
    np.testing.assert_allclose(lkd, want[1], rtol=1e-12)


@pytest.mark.parametrize("bad, shown", [(4.0, "4.0"), (-1.0, "-1.0"), (2.5, "2.5"),
                                        (np.nan, "nan")])
def test_bad_label_value_reaches_the_user(bad, shown, inputs, capfd):
    inp, args = inputs
    y = inp["y"].copy()
    y[2] = bad
    with pytest.raises(MXNetError) as err:
        call_lgm([args[0], mx.nd.array(y, dtype="float64"), args[2], args[3]])
    text = str(err.value)
    assert f"label must hold integers in [0, {K}), got {shown}" in text and "index 2" in text
    assert "label must hold integers" in capfd.readouterr().out  # MXNet prints the original
    assert_still_works(inp, args)


def test_bad_integer_label_in_backward_path(inputs):
    inp, args = inputs
    for a in (args[0], args[2], args[3]):
        a.attach_grad()
    y = mx.nd.array(np.full(N, K + 3), dtype="int32")
    with pytest.raises(MXNetError, match=r"got 7 at index 0"):
        with mx.autograd.record():
            logits, lkd = mx.nd.Custom(args[0], y, args[2], args[3], op_type="lgm",
                                       num_classes=K)
            total = logits.sum() + lkd.sum()
        total.backward()
        args[0].grad.asnumpy()
    assert_still_works(inp, args)


@pytest.mark.parametrize("change, message", [
    (lambda a: [a[0], a[1][:3], a[2], a[3]], r"label must have shape \(N,\) = \(6,\), got \(3,\)"),
    (lambda a: [a[0], a[1], a[2][:, :2], a[3]], r"mean must have shape \(K, D\) = \(4, 3\), "
                                                r"got \(4, 2\)"),
    (lambda a: [a[0], a[1], a[2][:3], a[3]], r"mean must have shape \(K, D\) = \(4, 3\), "
                                             r"got \(3, 3\)"),
    (lambda a: [a[0], a[1], a[2], a[3][:, :2]], r"log_var must have shape \(K, D\) = \(4, 3\), "
                                                r"got \(4, 2\)"),
    (lambda a: [a[0].reshape((N, D, 1)), a[1], a[2], a[3]], r"data must be 2-D \(N, D\), "
                                                            r"got shape \(6, 3, 1\)"),
    (lambda a: [a[0].astype("int32"), a[1], a[2].astype("int32"), a[3].astype("int32")],
     r"data must be float32 or float64, got int32"),
    (lambda a: [a[0], a[1], a[2].astype("float32"), a[3]],
     r"mean must have the dtype of data \(float64\), got float32"),
])
def test_bad_argument_shapes_and_types(change, message, inputs):
    inp, args = inputs
    with pytest.raises(MXNetError, match=message):
        call_lgm(change(args))
    assert_still_works(inp, args)


def test_isotropic_log_var_shape(inputs):
    inp, args = inputs
    with pytest.raises(MXNetError, match=r"log_var must have shape \(K, 1\) with isotropic=True "
                                         r"= \(4, 1\), got \(4, 3\)"):
        call_lgm(args, isotropic=True)
    assert_still_works(inp, args)


@pytest.mark.parametrize("attrs, message", [
    ({"num_classes": 0}, r"num_classes must be an integer >= 1, got 0"),
    ({"num_classes": "2.5"}, r"num_classes must be an integer, got '2.5'"),
    ({"num_classes": "ten"}, r"num_classes must be an integer, got 'ten'"),
    ({"alpha": -0.5}, r"alpha must be a finite float >= 0, got '-0.5'"),
    ({"alpha": "nan"}, r"alpha must be a finite float >= 0, got 'nan'"),
    ({"logvar_min": 2, "logvar_max": 1}, r"logvar_min < logvar_max.*got logvar_min='2', "
                                         r"logvar_max='1'"),
    ({"logvar_min": 1, "logvar_max": 1}, r"logvar_min < logvar_max"),
    ({"temperature": 2}, r"unknown attribute\(s\) temperature"),
    ({"isotropic": "maybe"}, r"isotropic must be a boolean \(True/False/1/0\), got 'maybe'"),
    ({"logdet_lkd": "yes"}, r"logdet_lkd must be a boolean"),
    ({"alpha": "__import__('os').getcwd()"}, r"alpha must be a real number"),
    ({"margin_policy": "cosine"}, r"margin_policy must be one of const, step, add, warmup, "
                                  r"got 'cosine'"),
    ({"margin_policy": "step", "margin_step": 0}, r"margin_step must be an integer >= 1, got '0'"),
])
def test_bad_attributes(attrs, message, inputs):
    inp, args = inputs
    with pytest.raises(MXNetError, match=message):
        call_lgm(args, **attrs)
    assert_still_works(inp, args)


def test_bad_attributes_at_construction():
    data, label = mx.sym.Variable("data"), mx.sym.Variable("label")
    with pytest.raises(ValueError, match=r"alpha must be a finite float >= 0, got -1"):
        lgm_op.lgm(data, label, 3, alpha=-1)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got 0"):
        lgm_op.LGMLoss(0)
    with pytest.raises(ValueError, match=r"lambda_ must be a finite float >= 0, got -0.1"):
        lgm_op.LGMLoss(3, lambda_=-0.1)
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) beta"):
        lgm_op.LGMLoss(3, beta=1)


def test_empty_batch_is_a_clear_error(inputs):
    inp, args = inputs
    # MXNet 1.x cannot even allocate a (0, D) NDArray in its legacy shape mode; binding a
    # graph to an empty batch reaches the operator's shape inference, which says why.
    logits, _ = lgm_op.lgm(mx.sym.Variable("data"), mx.sym.Variable("label"), K)
    with pytest.raises(MXNetError, match=r"data must have a known, non-zero shape.*empty batch"):
        logits.infer_shape(data=(0, D), label=(0,))
    assert_still_works(inp, args)


def test_nan_and_inf_in_data_propagate(inputs):
    inp, args = inputs
    x = inp["x"].copy()
    x[1, 0] = np.nan
    x[3, 2] = -np.inf
    logits, lkd = call_lgm([mx.nd.array(x, dtype="float64"), args[1], args[2], args[3]])
    assert np.isnan(logits[1]).all() and np.isnan(lkd[1])
    assert not np.isfinite(logits[3]).any() and not np.isfinite(lkd[3])
    assert np.isfinite(logits[[0, 2, 4, 5]]).all()
    assert_still_works(inp, args)
