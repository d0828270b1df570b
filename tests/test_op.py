"""The ``lgm`` MXNet operator end to end: finite differences, the autograd reference, req
handling, the three front ends (imperative, hybridized Gluon, symbolic executors), the isotropic and
label-free forms, symbol JSON round trips; on the NumPy backend and on the CUDA kernels run by the
CPU simulator (``LGM_OP_CUDASIM=1``)."""
import mxnet as mx
import numpy as np
import pytest

import lgm_op
from common import (RTOL64, SHAPES, SMALL_SHAPES, assert_close, assert_float32_rule, make_inputs,
                    option_sets)
from lgm_op.op import SIMULATOR_ENV
from lgm_op.options import LGMOptions
from lgm_op.reference import autograd_grads

NAMES = ("logits", "lkd", "dx", "dmean", "dlog_var")


BACKENDS = ["cpu", "sim"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the operator on the NumPy path, or on the CUDA kernels through the CPU simulator."""
    if request.param == "sim":
        monkeypatch.setenv(SIMULATOR_ENV, "1")
    else:
        monkeypatch.delenv(SIMULATOR_ENV, raising=False)
    return request.param


def _attrs(opts):
    return {k: v for k, v in opts.to_attrs().items() if k != "with_label"}


def run_op(inp, opts, training=True, grad_req="write", label=True):
    """Forward + backward of mx.nd.Custom with inp's upstream gradients; NumPy results."""
    dtype = inp["x"].dtype
    args = [mx.nd.array(inp[k], dtype=dtype) for k in ("x", "mu", "s")]
    for a in args:
        a.attach_grad(grad_req=grad_req)
    inputs = [args[0]] + ([mx.nd.array(inp["y"], dtype=inp["y"].dtype)] if label else []) + args[1:]
    with mx.autograd.record(train_mode=training):
        logits, lkd = mx.nd.Custom(*inputs, op_type="lgm", with_label=label, **_attrs(opts))
    mx.autograd.backward([logits, lkd], [mx.nd.array(inp["gz"], dtype=dtype),
                                         mx.nd.array(inp["gl"], dtype=dtype)])
    return (logits.asnumpy(), lkd.asnumpy()) + tuple(a.grad.asnumpy() for a in args)


def _cast(inp, dtype):
    return {k: (v.astype(dtype) if k != "y" else v) for k, v in inp.items()}


def _reference(inp, opts, training=True, label=True):
    return autograd_grads(inp["x"], inp["y"] if label else None, inp["mu"], inp["s"], inp["gz"],
                          inp["gl"], opts, training)


def _check_against_reference(inp64, got, opts, seed, training=True, label=True):
    dtype = got[0].dtype
    if dtype == np.float64:
        for name, a, b in zip(NAMES, got, _reference(inp64, opts, training, label)):
            assert_close(a, b, RTOL64, name, seed)
        return
    inp32 = _cast(inp64, np.float32)
    exact = _reference(_cast(inp32, np.float64), opts, training, label)
    ref32 = _reference(inp32, opts, training, label)
    for name, a, e, r in zip(NAMES, got, exact, ref32):
        assert a.dtype == np.float32, name
        assert_float32_rule(a, e, r, name, seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_op_matches_autograd_reference(shape, dtype, backend, rng, seed):
    n, k, d = shape
    inp = make_inputs(rng, n, k, d)
    opts = LGMOptions(num_classes=k)
    _check_against_reference(inp, run_op(_cast(inp, dtype), opts), opts, seed)


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_op_every_option(shape, backend, rng, seed):
    n, k, d = shape
    for opts in option_sets(k):
        inp = make_inputs(rng, n, k, d, isotropic=opts.isotropic)
        for training in (True, False):
            got = run_op(inp, opts, training)
            _check_against_reference(inp, got, opts, seed, training)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_label_free_form(dtype, backend, rng, seed):
    inp = make_inputs(rng, 23, 6, 5)
    opts = LGMOptions(num_classes=6)
    got = run_op(_cast(inp, dtype), opts, training=True, label=False)
    _check_against_reference(inp, got, opts, seed, label=False)


def test_finite_differences(backend, rng):
    """Every gradient against float64 central differences: relative error <= 1e-6."""
    for (n, k, d), isotropic in [((5, 3, 4), False), ((4, 3, 3), True), ((1, 1, 1), False)]:
        inp = make_inputs(rng, n, k, d, isotropic=isotropic, clamp_some=True)
        data, label, mean, log_var = (mx.sym.Variable(v) for v in
                                      ("data", "label", "mean", "log_var"))
        gz, gl = mx.sym.Variable("gz"), mx.sym.Variable("gl")
        # check_numeric_gradient nudges every input, the label too: round it back to its class
        logits, lkd = lgm_op.lgm(data, mx.sym.round(label), k, mean=mean, log_var=log_var,
                                 isotropic=isotropic)
        # a random projection of both outputs: the upstream gradients are gz and gl
        loss = mx.sym.sum(logits * gz) + mx.sym.sum(lkd * gl)
        location = {"data": inp["x"], "label": inp["y"].astype(np.float64), "mean": inp["mu"],
                    "log_var": inp["s"], "gz": inp["gz"], "gl": inp["gl"]}
        opts = LGMOptions(num_classes=k, isotropic=isotropic)
        analytic = dict(zip(("data", "mean", "log_var"), _reference(inp, opts)[2:]))
        for node, grad in analytic.items():
            # Central differences with eps 1e-5 carry a truncation error of eps^2 times the third
            # derivative and a rounding error of 1e-16 |f| / eps; exp(-log_var) makes the third
            # derivative large, so an entry whose gradient nearly cancels is judged with an
            # absolute floor of 1e-7 x the node's largest gradient, on top of the relative 1e-6.
            mx.test_utils.check_numeric_gradient(
                loss, location, numeric_eps=1e-5, rtol=1e-6,
                atol=1e-7 * float(np.abs(grad).max()), grad_nodes=[node],
                use_forward_train=True, dtype=np.float64)


def test_grad_req_add_accumulates(backend, rng, seed):
    inp = make_inputs(rng, 9, 4, 3)
    opts = LGMOptions(num_classes=4)
    dtype = np.float64
    args = [mx.nd.array(inp[k], dtype=dtype) for k in ("x", "mu", "s")]
    for a in args:
        a.attach_grad(grad_req="add")
    for _ in range(2):
        with mx.autograd.record():
            logits, lkd = mx.nd.Custom(args[0], mx.nd.array(inp["y"]), args[1], args[2],
                                       op_type="lgm", **_attrs(opts))
        mx.autograd.backward([logits, lkd], [mx.nd.array(inp["gz"], dtype=dtype),
                                             mx.nd.array(inp["gl"], dtype=dtype)])
    once = _reference(inp, opts)[2:]
    for name, a, b in zip(NAMES[2:], args, once):
        assert_close(a.grad.asnumpy(), 2 * b, RTOL64, name, seed)


def _executor(opts, inp, grad_req):
    data, label, mean, log_var = (mx.sym.Variable(v) for v in ("data", "label", "mean", "log_var"))
    logits, lkd = lgm_op.lgm(data, label, opts.num_classes, mean=mean, log_var=log_var,
                             alpha=opts.alpha)
    net = mx.sym.Group([logits, lkd])
    args = {"data": mx.nd.array(inp["x"], dtype="float64"), "label": mx.nd.array(inp["y"]),
            "mean": mx.nd.array(inp["mu"], dtype="float64"),
            "log_var": mx.nd.array(inp["s"], dtype="float64")}
    grads = {k: mx.nd.ones(v.shape, dtype=v.dtype) for k, v in args.items() if k != "label"}
    reqs = {k: grad_req for k in grads}
    reqs["label"] = "null"
    return net, net.bind(mx.cpu(), args, args_grad=grads, grad_req=reqs)


@pytest.mark.parametrize("grad_req", ["write", "add", "null"])
def test_symbolic_executor_honours_req(grad_req, backend, rng, seed):
    inp = make_inputs(rng, 12, 5, 4)
    opts = LGMOptions(num_classes=5)
    _, exe = _executor(opts, inp, grad_req)
    exe.forward(is_train=True)
    exe.backward([mx.nd.array(inp["gz"], dtype="float64"), mx.nd.array(inp["gl"], dtype="float64")])
    want = _reference(inp, opts)
    assert_close(exe.outputs[0].asnumpy(), want[0], RTOL64, "logits", seed)
    for name, key, ref in zip(NAMES[2:], ("data", "mean", "log_var"), want[2:]):
        got = exe.grad_dict[key].asnumpy()
        expected = {"write": ref, "add": ref + 1, "null": np.ones_like(ref)}[grad_req]
        assert_close(got, expected, RTOL64, f"{name} req={grad_req}", seed)


def test_symbol_json_round_trip(backend, rng):
    inp = make_inputs(rng, 8, 3, 2)
    opts = LGMOptions(num_classes=3, alpha=0.3)
    net, exe = _executor(opts, inp, "write")
    loaded = mx.sym.load_json(net.tojson())
    assert loaded.list_arguments() == net.list_arguments()
    exe2 = loaded.bind(mx.cpu(), exe.arg_dict)
    for e in (exe, exe2):
        e.forward(is_train=True)
    for a, b in zip(exe.outputs, exe2.outputs):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


def test_front_ends_agree(backend, rng):
    """Imperative Gluon, hybridized Gluon and a symbolic executor give the same numbers."""
    n, k, d = 10, 4, 3
    inp = make_inputs(rng, n, k, d, clamp_some=False)
    results = []
    for hybrid in (False, True):
        block = lgm_op.LGMLoss(k, in_units=d, lambda_=0.3, alpha=0.2)
        block.initialize()
        block.cast("float64")
        block.mean.set_data(mx.nd.array(inp["mu"], dtype="float64"))
        block.log_var.set_data(mx.nd.array(inp["s"], dtype="float64"))
        if hybrid:
            block.hybridize()
        x = mx.nd.array(inp["x"], dtype="float64")
        x.attach_grad()
        with mx.autograd.record():
            loss, logits = block(x, mx.nd.array(inp["y"], dtype="float64"))
        loss.backward()
        results.append([loss.asnumpy(), logits.asnumpy(), x.grad.asnumpy(),
                        block.mean.grad().asnumpy(), block.log_var.grad().asnumpy()])
    # the same loss as a symbol
    data, label = mx.sym.Variable("data"), mx.sym.Variable("label")
    logits, lkd = lgm_op.lgm(data, label, k, name="lgm", alpha=0.2)
    ce = -mx.sym.pick(mx.sym.log_softmax(logits, axis=1), label, axis=1)
    net = mx.sym.Group([mx.sym.MakeLoss(ce + 0.3 * lkd), mx.sym.BlockGrad(logits)])
    args = {"data": mx.nd.array(inp["x"], dtype="float64"),
            "label": mx.nd.array(inp["y"], dtype="float64"),
            "lgm_mean": mx.nd.array(inp["mu"], dtype="float64"),
            "lgm_log_var": mx.nd.array(inp["s"], dtype="float64")}
    grads = {key: mx.nd.zeros(v.shape, dtype="float64") for key, v in args.items()}
    exe = net.bind(mx.cpu(), args, args_grad=grads,
                   grad_req={key: ("null" if key == "label" else "write") for key in args})
    exe.forward(is_train=True)
    exe.backward()
    results.append([exe.outputs[0].asnumpy(), exe.outputs[1].asnumpy(),
                    grads["data"].asnumpy(), grads["lgm_mean"].asnumpy(),
                    grads["lgm_log_var"].asnumpy()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_isotropic_gluon_and_int_labels(backend, rng, seed):
    n, k, d = 11, 3, 4
    inp = make_inputs(rng, n, k, d, isotropic=True)
    opts = LGMOptions(num_classes=k, isotropic=True)
    for label_dtype in ("int32", "int64", "float32"):
        inp["y"] = inp["y"].astype(label_dtype)
        _check_against_reference(inp, run_op(inp, opts), opts, seed)


def test_margin_only_while_training(backend, rng):
    inp = make_inputs(rng, 6, 3, 2)
    args = [mx.nd.array(inp[k], dtype="float64") for k in ("x", "y", "mu", "s")]
    train = mx.nd.Custom(*args, op_type="lgm", num_classes=3, alpha=0.5)
    with mx.autograd.record(train_mode=True):
        trained = mx.nd.Custom(*args, op_type="lgm", num_classes=3, alpha=0.5)
    plain = mx.nd.Custom(*args, op_type="lgm", num_classes=3, alpha=0.0)
    np.testing.assert_array_equal(train[0].asnumpy(), plain[0].asnumpy())
    rows = np.arange(6)
    y = inp["y"].astype(int)
    t, p = trained[0].asnumpy(), plain[0].asnumpy()
    assert np.all(t[rows, y] < p[rows, y])
    mask = np.ones_like(t, bool)
    mask[rows, y] = False
    np.testing.assert_array_equal(t[mask], p[mask])


def test_margin_schedule_advances_in_training_only(backend, rng):
    inp = make_inputs(rng, 6, 3, 2)
    block = lgm_op.LGMLoss(3, in_units=2, alpha=0.1, margin_policy="step", margin_gamma=2.0,
                           margin_step=2, margin_max=0.35)
    block.initialize()
    x = mx.nd.array(inp["x"])
    y = mx.nd.array(inp["y"])
    block(x, y)  # inference: the counter does not move
    assert block.margin_iter.data().asscalar() == 0
    for _ in range(5):
        with mx.autograd.record():
            loss, _ = block(x, y)
        loss.backward()
    assert block.margin_iter.data().asscalar() == 5
    sched = block.schedule
    assert [sched.value(0.1, t) for t in range(7)] == [0.1, 0.1, 0.2, 0.2, 0.35, 0.35, 0.35]


@pytest.mark.parametrize("label", [True, False])
def test_callbacks_with_and_without_known_layouts(label, rng, seed):
    """The callbacks view MXNet's buffers through the shapes and dtypes the operator was created
    with (MXNet's type codes), or ask MXNet when those are unknown (a -1 type code): the same
    outputs and gradients, bitwise, on an odd shape."""
    from lgm_op.op import LGMOpProp
    n, k, d = 7, 5, 3
    inp = make_inputs(rng, n, k, d, np.float64)
    opts = LGMOptions(num_classes=k, alpha=0.3, with_label=label)
    prop = LGMOpProp(**{key: str(v) for key, v in opts.to_attrs().items()})
    ins = [mx.nd.array(inp["x"], dtype=np.float64)] + (
        [mx.nd.array(inp["y"], dtype=inp["y"].dtype)] if label else []) + [
        mx.nd.array(inp[key], dtype=np.float64) for key in ("mu", "s")]
    shapes = [list(a.shape) for a in ins]
    codes = [mx.ndarray.ndarray._DTYPE_NP_TO_MX[np.dtype(a.dtype).type] for a in ins]
    gz, gl = (mx.nd.array(inp[key], dtype=np.float64) for key in ("gz", "gl"))
    results = []
    for layout in ((shapes, codes), (shapes, [-1] * len(ins)), (None, None)):
        op = prop.create_operator(mx.cpu(), *layout)
        outs = [mx.nd.zeros((n, k), dtype=np.float64), mx.nd.zeros((n,), dtype=np.float64)]
        grads = [mx.nd.ones(a.shape, dtype=a.dtype) for a in ins]
        mx.nd.waitall()
        op.forward(True, ["write"] * 2, ins, outs, [])
        op.backward(["write"] * len(ins), [gz, gl], ins, outs, grads, [])
        results.append([a.asnumpy() for a in outs + grads])
    assert op._inputs[0] is None  # the last layout was unknown
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    if label:
        np.testing.assert_array_equal(results[0][3], 0)  # no gradient to the label
