"""The PyTorch binding ``lgm_op.torch``: gradcheck on every option combination, opcheck,
torch.compile against eager, the same numbers as the MXNet operator, gradients only where needed,
bad input, the ``LGMLoss`` module, imports without MXNet / without PyTorch. CPU tensors here; the
same bodies run on CUDA tensors where a GPU and CuPy are present, and skip without them."""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import lgm_op.torch as lgm_torch
from common import (FAMILIES, NONFINITE, RTOL64, SHAPES, SMALL_SHAPES, assert_close,
                    assert_float32_rule, family_inputs, make_inputs, option_sets, put_nonfinite)
from lgm_op.options import LGMOptions
from lgm_op.reference import numpy_forward, numpy_grads

NAMES = ("logits", "lkd", "dx", "dmean", "dlog_var")


def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not _cuda_ready(), reason="needs a CUDA GPU, PyTorch with CUDA and CuPy"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=["function", "custom_op"])
def entry(request, monkeypatch):
    """Eager calls through ``_LGMFunction`` (the default) or all through the custom op."""
    monkeypatch.setattr(lgm_torch, "_EAGER_FUNCTION", request.param == "function")
    return request.param


def _kwargs(opts):
    """The options of ``lgm_torch.lgm`` for an LGMOptions (the label decides with_label)."""
    return dict(alpha=opts.alpha, logvar_min=opts.logvar_min, logvar_max=opts.logvar_max,
                logdet_logits=opts.logdet_logits, logdet_lkd=opts.logdet_lkd,
                isotropic=opts.isotropic)


def _tensors(inp, device, requires_grad=True):
    """x, y, mu, s, gz, gl of make_inputs as tensors on ``device`` (x, mu, s require grad)."""
    out = {k: torch.tensor(v, device=device) for k, v in inp.items()}
    for k in ("x", "mu", "s"):
        out[k].requires_grad_(requires_grad)
    return out


def run_torch(inp, opts, device, training=True, label=True):
    """Forward + backward through ``lgm_torch.lgm`` with inp's upstream gradients; NumPy results
    in the order of NAMES."""
    t = _tensors(inp, device)
    logits, lkd = lgm_torch.lgm(t["x"], t["y"] if label else None, t["mu"], t["s"],
                                opts.num_classes, training, **_kwargs(opts))
    torch.autograd.backward([logits, lkd], [t["gz"], t["gl"]])
    return tuple(a.detach().cpu().numpy() for a in (logits, lkd, t["x"].grad, t["mu"].grad,
                                                      t["s"].grad))


def _reference(inp, opts, training, label, dtype):
    """NAMES from lgm_op.reference.numpy_*, computed in ``dtype``."""
    logits, lkd = numpy_forward(inp["x"], inp["y"] if label else None, inp["mu"], inp["s"], opts,
                                training, dtype=dtype)
    # the label-free backward differentiates the class the forward predicted, with no margin
    y = inp["y"] if label else np.argmax(numpy_forward(inp["x"], None, inp["mu"], inp["s"], opts,
                                                       training)[0], axis=1)
    return (logits, lkd) + numpy_grads(inp["x"], y, inp["mu"], inp["s"], inp["gz"], inp["gl"],
                                       opts, training and label, dtype=dtype)


def _cast(inp, dtype):
    return {k: (v.astype(dtype) if k != "y" else v) for k, v in inp.items()}


def check_results(got, inp64, opts, seed, training=True, label=True):
    """SPEC 5: float64 to rtol 1e-9 of the float64 reference, float32 by the float32 rule."""
    if got[0].dtype == np.float64:
        for name, a, e in zip(NAMES, got, _reference(inp64, opts, training, label, np.float64)):
            assert_close(a, e, RTOL64, name, seed)
        return
    inp32 = _cast(inp64, np.float32)
    exact = _reference(_cast(inp32, np.float64), opts, training, label, np.float64)
    ref32 = _reference(inp32, opts, training, label, np.float32)
    for name, a, e, r in zip(NAMES, got, exact, ref32):
        assert a.dtype == np.float32, name
        assert_float32_rule(a, e, r, name, seed)


# ---------------------------------------------------------------------------------------------
# correctness

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.usefixtures("entry")
def test_matches_reference(shape, dtype, device, rng, seed):
    n, k, d = shape
    inp = make_inputs(rng, n, k, d)
    opts = LGMOptions(num_classes=k)
    check_results(run_torch(_cast(inp, dtype), opts, device), inp, opts, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.usefixtures("entry")
def test_label_free_form_and_eval(dtype, training, device, rng, seed):
    inp = make_inputs(rng, 65, 63, 17)
    opts = LGMOptions(num_classes=63, alpha=0.3)
    for label in (True, False):
        check_results(run_torch(_cast(inp, dtype), opts, device, training, label), inp, opts,
                      seed, training, label)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.usefixtures("entry")
def test_input_families(family, dtype, device, rng, seed):
    """SPEC 5's input families (features near their means, far from the origin, classes far
    apart, log-variances at the clamp bounds) through the binding."""
    opts = LGMOptions(num_classes=11, alpha=0.3)
    inp = family_inputs(family, rng, 37, 11, 19)
    for label in (True, False):
        check_results(run_torch(_cast(inp, dtype), opts, device, True, label), inp, opts, seed,
                      True, label)


@pytest.mark.parametrize("where,value", NONFINITE)
@pytest.mark.usefixtures("entry")
def test_nonfinite_stays_in_its_row_or_column(where, value, device, rng):
    inp, row, col = put_nonfinite(make_inputs(rng, 9, 5, 4), where, value, np.float64)
    logits = run_torch(inp, LGMOptions(num_classes=5, alpha=0.2), device)[0]
    others = np.ones(logits.shape, bool)
    if row is not None:
        others[row] = False
    if col is not None:
        others[:, col] = False
    assert np.isfinite(logits[others]).all(), f"{where}={value}: reached other logits"
    if not (where == "s" and value == np.inf):  # an infinite log-variance is clamped: finite
        assert not np.isfinite(logits[~others]).all(), f"{where}={value}: not propagated"


@pytest.mark.parametrize("shape", SMALL_SHAPES)
@pytest.mark.usefixtures("entry")
def test_gradcheck_every_option(shape, device, rng):
    """torch.autograd.gradcheck in float64 on every option combination, with labels and
    label-free: the whole Jacobian on the small shapes, random directional derivatives (fast
    mode) where the whole Jacobian would take a minute."""
    n, k, d = shape
    fast = n * d + 2 * k * d > 64
    for opts in option_sets(k):
        inp = make_inputs(rng, n, k, d, isotropic=opts.isotropic)
        t = _tensors(inp, device)
        for label in (t["y"], None):
            def f(x, mu, s, label=label, opts=opts):
                return lgm_torch.lgm(x, label, mu, s, k, True, **_kwargs(opts))
            assert torch.autograd.gradcheck(f, (t["x"], t["mu"], t["s"]), fast_mode=fast), (
                opts, label is None)


@pytest.mark.parametrize("isotropic", [False, True])
def test_gradcheck_full_jacobian(isotropic, device, rng):
    """Every entry of the Jacobian against finite differences, on an odd shape."""
    inp = make_inputs(rng, 7, 5, 3, isotropic=isotropic)
    t = _tensors(inp, device)

    def f(x, mu, s):
        return lgm_torch.lgm(x, t["y"], mu, s, 5, True, isotropic=isotropic, alpha=0.2)
    assert torch.autograd.gradcheck(f, (t["x"], t["mu"], t["s"]))


@pytest.mark.parametrize("label", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_opcheck(label, dtype, device, rng):
    inp = _cast(make_inputs(rng, 7, 13, 5), dtype)
    t = _tensors(inp, device)
    args = (t["x"], t["y"] if label else None, t["mu"], t["s"], 13, 0.1, -6.0, 6.0, True, True,
            False, True)
    torch.library.opcheck(lgm_torch.lgm_forward, args)
    # the backward op alone, with every gradient and with some left out
    t = _tensors(inp, device, requires_grad=False)
    y = t["y"] if label else torch.argmax(lgm_torch.lgm(t["x"], None, t["mu"], t["s"], 13)[0], 1)
    for need in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(lgm_torch.lgm_backward, (
            t["x"], y, t["mu"], t["s"], t["gz"], t["gl"], 13, 0.1, -6.0, 6.0, True, True, False,
            label, True) + need)


def test_compile_matches_eager(device, rng, seed):
    """One training step of LGMLoss under torch.compile(fullgraph=True) (no graph break) against
    eager: float32 compiled vs the float64 eager answer, within 2x the float32 eager error."""
    n, k, d = 33, 13, 7
    inp = make_inputs(rng, n, k, d, dtype="float32")
    torch.manual_seed(seed)
    module32 = lgm_torch.LGMLoss(k, d, lambda_=0.3, alpha=0.2).to(device)
    module64 = lgm_torch.LGMLoss(k, d, lambda_=0.3, alpha=0.2).to(device).double()
    module64.load_state_dict(module32.state_dict())

    def step(module, x, y, weight):
        loss, logits = module(x, y)
        return (loss * weight).sum(), logits

    def run(module, fn, dtype):
        module.zero_grad()
        x = torch.tensor(inp["x"], device=device, dtype=dtype, requires_grad=True)
        y = torch.tensor(inp["y"], device=device).long()
        weight = torch.tensor(inp["gl"], device=device, dtype=dtype)
        total, logits = fn(module, x, y, weight)
        total.backward()
        return [a.detach().cpu().numpy() for a in (total, logits, x.grad, module.mean.grad,
                                                     module.log_var.grad)]

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got = run(module32, compiled, torch.float32)
    eager32 = run(module32, step, torch.float32)
    exact = run(module64, step, torch.float64)
    for name, a, e, r in zip(("loss", "logits", "dx", "dmean", "dlog_var"), got, exact, eager32):
        assert a.dtype == np.float32, name
        assert_float32_rule(a, e, r, name, seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_as_mxnet_operator(shape, dtype, rng, seed):
    """The PyTorch op and mx.nd.Custom(op_type='lgm') on identical inputs, to the shared
    tolerances (float64: rtol 1e-9; float32: both within the float32 rule of the answer)."""
    mx = pytest.importorskip("mxnet")
    import lgm_op  # noqa: F401  (registers op_type='lgm')
    n, k, d = shape
    inp = _cast(make_inputs(rng, n, k, d), dtype)
    opts = LGMOptions(num_classes=k)
    args = [mx.nd.array(inp[name], dtype=dtype) for name in ("x", "mu", "s")]
    for a in args:
        a.attach_grad()
    with mx.autograd.record(train_mode=True):
        logits, lkd = mx.nd.Custom(args[0], mx.nd.array(inp["y"], dtype=inp["y"].dtype), *args[1:],
                                   op_type="lgm", **{k_: v for k_, v in opts.to_attrs().items()
                                                     if k_ != "with_label"})
    mx.autograd.backward([logits, lkd], [mx.nd.array(inp["gz"], dtype=dtype),
                                         mx.nd.array(inp["gl"], dtype=dtype)])
    theirs = (logits.asnumpy(), lkd.asnumpy()) + tuple(a.grad.asnumpy() for a in args)
    ours = run_torch(inp, opts, "cpu")
    if dtype == "float64":
        for name, a, b in zip(NAMES, ours, theirs):
            assert_close(a, b, RTOL64, name, seed)
        return
    exact = _reference(_cast(inp, np.float64), opts, True, True, np.float64)
    ref32 = _reference(inp, opts, True, True, np.float32)
    for name, a, b, e, r in zip(NAMES, ours, theirs, exact, ref32):
        assert_float32_rule(a, e, r, name + " (torch)", seed)
        assert_float32_rule(b, e, r, name + " (mxnet)", seed)


@pytest.mark.usefixtures("entry")
def test_gradients_only_where_needed(monkeypatch, device, rng, seed):
    """The backward computes exactly the gradients autograd asks for, and they are right."""
    calls = []
    cpu_backward, cuda_backward = lgm_torch._BACKWARD

    def record(function):
        def wrapped(*args, need, out, **kwargs):
            calls.append(need)
            assert all((o is None) == (not wanted) for o, wanted in zip(out, need))
            return function(*args, need=need, out=out, **kwargs)
        return wrapped
    monkeypatch.setattr(lgm_torch, "_BACKWARD", (record(cpu_backward), record(cuda_backward)))
    inp = make_inputs(rng, 9, 4, 3)
    opts = LGMOptions(num_classes=4)
    expected = _reference(inp, opts, True, True, np.float64)
    for need in [(True, False, False), (False, True, False), (False, False, True),
                 (False, True, True)]:
        t = _tensors(inp, device, requires_grad=False)
        leaves = [t[name].requires_grad_(wanted) for name, wanted in zip(("x", "mu", "s"), need)]
        logits, lkd = lgm_torch.lgm(t["x"], t["y"], t["mu"], t["s"], 4)
        torch.autograd.backward([logits, lkd], [t["gz"], t["gl"]])
        assert calls.pop() == need
        for name, leaf, wanted, e in zip(NAMES[2:], leaves, need, expected[2:]):
            if wanted:
                assert_close(leaf.grad.cpu().numpy(), e, RTOL64, name, seed)
            else:
                assert leaf.grad is None, name
    assert not calls


@pytest.mark.usefixtures("entry")
def _grad_fn_name(device, x, y, mu, s):
    logits, _ = lgm_torch.lgm(x, y, mu, s, mu.shape[0])
    return type(logits.grad_fn).__name__


def test_eager_calls_take_the_function_else_the_custom_op(monkeypatch, device, rng):
    """Plain tensors in eager mode go through _LGMFunction; with it switched off, under a
    dispatch mode, and under torch.compile, the custom op runs (its trace has no graph break)."""
    t = _tensors(make_inputs(rng, 5, 3, 2), device)
    args = (t["x"], t["y"], t["mu"], t["s"])
    assert _grad_fn_name(device, *args) == "_LGMFunctionBackward"
    p = torch.nn.Parameter(t["mu"].detach().clone())
    assert _grad_fn_name(device, t["x"], t["y"], p, t["s"]) == "_LGMFunctionBackward"
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    with Record() as mode:
        lgm_torch.lgm(*args, 3)
    assert any("lgm_op.lgm_forward" in op for op in mode.ops), mode.ops
    monkeypatch.setattr(lgm_torch, "_EAGER_FUNCTION", False)
    assert _grad_fn_name(device, *args) != "_LGMFunctionBackward"
    monkeypatch.setattr(lgm_torch, "_EAGER_FUNCTION", True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(lambda *a: lgm_torch.lgm(*a, 3), backend=backend, fullgraph=True)
    logits, _ = compiled(*args)
    assert any("lgm_op.lgm_forward" in str(node.target) for g in graphs for node in g.graph.nodes)
    expected, _ = lgm_torch.lgm(*args, 3)
    assert torch.equal(logits, expected)
    traced = torch.jit.trace(lambda x, mu, s: lgm_torch.lgm(x, t["y"], mu, s, 3)[0],
                             (t["x"], t["mu"], t["s"]), check_trace=False)
    assert "lgm_op::lgm_forward" in str(traced.graph)
    assert torch.equal(traced(t["x"], t["mu"], t["s"]), expected)


@pytest.mark.parametrize("label", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_function_and_custom_op_give_the_same_bits(label, dtype, monkeypatch, device, rng):
    """The two eager entry points run the same code: identical outputs and gradients, with
    every gradient and with some left out, on odd shapes and every option set."""
    for n, k, d in [(1, 1, 1), (37, 11, 19), (130, 7, 33)]:
        for opts in option_sets(k):
            inp = _cast(make_inputs(rng, n, k, d, isotropic=opts.isotropic), dtype)
            results = []
            for use_function in (True, False):
                monkeypatch.setattr(lgm_torch, "_EAGER_FUNCTION", use_function)
                t = _tensors(inp, device, requires_grad=False)
                t["mu"].requires_grad_(True)
                t["s"].requires_grad_(True)
                logits, lkd = lgm_torch.lgm(t["x"], t["y"] if label else None, t["mu"], t["s"],
                                            k, True, **_kwargs(opts))
                torch.autograd.backward([logits, lkd], [t["gz"], t["gl"]])
                assert t["x"].grad is None
                results.append([a.detach().cpu().numpy() for a in (
                    logits, lkd, t["mu"].grad, t["s"].grad)])
            for name, a, b in zip(("logits", "lkd", "dmean", "dlog_var"), *results):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} {(n, k, d)} {opts}")


def test_function_backward_guards(device, rng, seed):
    """The eager Function's backward: an input changed in place after the forward is refused
    (autograd's version check, which the reuse of the forward's operands relies on); a second
    backward with retain_graph gives the same gradients; differentiating twice is refused."""
    inp = make_inputs(rng, 9, 4, 3)
    t = _tensors(inp, device)
    logits, lkd = lgm_torch.lgm(t["x"], t["y"], t["mu"], t["s"], 4)
    with torch.no_grad():
        t["mu"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.backward([logits, lkd], [t["gz"], t["gl"]])

    t = _tensors(inp, device)
    logits, lkd = lgm_torch.lgm(t["x"], t["y"], t["mu"], t["s"], 4)
    first = torch.autograd.grad([logits, lkd], [t["x"], t["mu"], t["s"]], [t["gz"], t["gl"]],
                                retain_graph=True)
    second = torch.autograd.grad([logits, lkd], [t["x"], t["mu"], t["s"]], [t["gz"], t["gl"]])
    expected = _reference(inp, LGMOptions(num_classes=4), True, True, np.float64)[2:]
    for name, a, b, e in zip(NAMES[2:], first, second, expected):
        assert torch.equal(a, b), name
        assert_close(a.cpu().numpy(), e, RTOL64, name, seed)

    # a gradient penalty needs second derivatives, which are not implemented: refused (not
    # computed as if the first derivatives were constants)
    logits, lkd = lgm_torch.lgm(t["x"], t["y"], t["mu"], t["s"], 4)
    (dx,) = torch.autograd.grad([logits, lkd], [t["x"]], [t["gz"], t["gl"]], create_graph=True)
    assert torch.equal(dx.detach(), first[0])
    with pytest.raises(RuntimeError, match="no autograd formula"):
        (dx.square().sum() + t["x"].sum()).backward()


def test_empty_batch(device):
    x = torch.zeros((0, 3), dtype=torch.float64, device=device, requires_grad=True)
    mu = torch.zeros((4, 3), dtype=torch.float64, device=device, requires_grad=True)
    s = torch.zeros((4, 3), dtype=torch.float64, device=device, requires_grad=True)
    logits, lkd = lgm_torch.lgm(x, torch.zeros(0, device=device), mu, s, 4)
    assert logits.shape == (0, 4) and lkd.shape == (0,)
    (logits.sum() + lkd.sum()).backward()
    assert x.grad.shape == (0, 3)
    assert float(mu.grad.abs().sum()) == 0 and float(s.grad.abs().sum()) == 0


@pytest.mark.usefixtures("entry")
def test_non_contiguous_inputs_and_upstream(device, rng, seed):
    """Strided views in, and the stride-0 upstream gradient of ``.sum()``."""
    inp = make_inputs(rng, 7, 5, 3)
    t = _tensors(inp, device)
    x_t = t["x"].detach().t().contiguous().t().requires_grad_(True)   # column-major (N, D)
    logits, lkd = lgm_torch.lgm(x_t, t["y"], t["mu"], t["s"], 5)
    (logits.sum() + lkd.sum()).backward()
    ones = dict(inp, gz=np.ones_like(inp["gz"]), gl=np.ones_like(inp["gl"]))
    expected = _reference(ones, LGMOptions(num_classes=5), True, True, np.float64)
    for name, a, e in zip(NAMES, (logits, lkd, x_t.grad, t["mu"].grad, t["s"].grad), expected):
        assert_close(a.detach().cpu().numpy(), e, RTOL64, name, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_launchers_on_the_simulator(monkeypatch, dtype, rng, seed):
    """The binding's calls of the CUDA launchers (outputs written in place, only the needed
    gradients), with CPU tensors routed to them: the kernels run on the CPU simulator."""
    from lgm_op.cuda import lgm_backward_cuda, lgm_forward_cuda

    def as_cpu_function(launcher):  # the CPU slot's interface: a CPUState argument, unused here
        return lambda *args, state=None, **kwargs: launcher(*args, **kwargs)
    monkeypatch.setattr(lgm_torch, "_FORWARD", (as_cpu_function(lgm_forward_cuda),
                                                lgm_forward_cuda))
    monkeypatch.setattr(lgm_torch, "_BACKWARD", (as_cpu_function(lgm_backward_cuda),
                                                 lgm_backward_cuda))
    inp = make_inputs(rng, 33, 13, 7)
    opts = LGMOptions(num_classes=13, alpha=0.2)
    for label in (True, False):
        check_results(run_torch(_cast(inp, dtype), opts, "cpu", True, label), inp, opts, seed,
                      True, label)
    t = _tensors(_cast(inp, dtype), "cpu", requires_grad=False)
    t["s"].requires_grad_(True)
    logits, lkd = lgm_torch.lgm(t["x"], t["y"], t["mu"], t["s"], 13, True, alpha=0.2)
    torch.autograd.backward([logits, lkd], [t["gz"], t["gl"]])
    expected = _reference(inp, opts, True, True, np.float64)[4]
    if dtype == "float64":
        assert_close(t["s"].grad.numpy(), expected, RTOL64, "dlog_var", seed)
    else:
        reference32 = _reference(_cast(inp, np.float32), opts, True, True, np.float32)[4]
        exact = _reference(_cast(_cast(inp, np.float32), np.float64), opts, True, True,
                           np.float64)[4]
        assert_float32_rule(t["s"].grad.numpy(), exact, reference32, "dlog_var", seed)


@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU, PyTorch with CUDA and CuPy")
def test_cuda_side_stream(rng, seed):
    """On a side stream, the op's kernels are ordered after that stream's earlier work."""
    inp = make_inputs(rng, 257, 1000, 3)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run_torch(inp, LGMOptions(num_classes=1000), "cuda")
    stream.synchronize()
    check_results(got, inp, LGMOptions(num_classes=1000), seed)


# ---------------------------------------------------------------------------------------------
# bad input (SPEC section 4)

def _valid(device="cpu"):
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    y = torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.float32, device=device)
    mu = torch.randn(4, 3, dtype=torch.float64, device=device)
    s = torch.zeros(4, 3, dtype=torch.float64, device=device)
    return x, y, mu, s


def _with(**changes):
    x, y, mu, s = _valid()
    args = dict(data=x, label=y, mean=mu, log_var=s, num_classes=4)
    args.update(changes)
    return args


BAD_CALLS = [
    (dict(label=torch.tensor([0., 1, 2, 4, 0, 1])), ValueError, ["label", "[0, 4)", "4.0"]),
    (dict(label=torch.tensor([0., 1, 2.5, 3, 0, 1])), ValueError, ["label", "integers", "2.5"]),
    (dict(label=torch.tensor([0., 1, math.nan, 3, 0, 1])), ValueError, ["label", "nan"]),
    (dict(label=torch.tensor([0, 1, -1, 3, 0, 1])), ValueError, ["label", "[0, 4)", "-1"]),
    (dict(label=torch.zeros(5)), ValueError, ["label", "(N,) = (6,)", "(5,)"]),
    (dict(label=torch.zeros(6, dtype=torch.bool)), ValueError, ["label", "real dtype", "bool"]),
    (dict(mean=torch.zeros(4, 2, dtype=torch.float64)), ValueError,
     ["mean", "(K, D) = (4, 3)", "(4, 2)"]),
    (dict(log_var=torch.zeros(4, 2, dtype=torch.float64)), ValueError,
     ["log_var", "(4, 3)", "(4, 2)"]),
    (dict(log_var=torch.zeros(4, 3, dtype=torch.float64), isotropic=True), ValueError,
     ["log_var", "(K, 1)", "(4, 1)", "(4, 3)"]),
    (dict(data=torch.zeros(6, dtype=torch.float64)), ValueError, ["data", "2-D", "(6,)"]),
    (dict(data=torch.zeros(6, 3, dtype=torch.int64)), ValueError,
     ["data", "float32 or float64", "int64"]),
    (dict(data=torch.zeros(6, 3, dtype=torch.bfloat16)), ValueError,
     ["data", "float32 or float64", "bfloat16"]),
    (dict(mean=torch.zeros(4, 3, dtype=torch.float32)), ValueError,
     ["mean", "dtype of data", "float64", "float32"]),
    (dict(data=torch.zeros(6, 3, dtype=torch.float64).to_sparse()), ValueError,
     ["data", "dense", "sparse_coo"]),
    (dict(data=[[0.0] * 3] * 6), TypeError, ["data", "torch.Tensor", "list"]),
    (dict(num_classes=0), ValueError, ["num_classes", "integer", "got 0"]),
    (dict(num_classes=2.5), ValueError, ["num_classes", "integer", "2.5"]),
    (dict(alpha=-0.5), ValueError, ["alpha", ">= 0", "-0.5"]),
    (dict(alpha=math.nan), ValueError, ["alpha", ">= 0", "nan"]),
    (dict(logvar_min=2.0, logvar_max=1.0), ValueError, ["logvar_min", "logvar_max", "2.0"]),
    (dict(margin=0.1), ValueError, ["unknown", "margin"]),
    (dict(logdet_lkd="maybe"), ValueError, ["logdet_lkd", "boolean", "maybe"]),
    (dict(with_label=False), ValueError, ["label-free", "label=None", "with_label"]),
    (dict(training="yes"), TypeError, ["training", "bool", "str"]),
]


@pytest.mark.parametrize("changes,error,words", BAD_CALLS,
                         ids=[",".join(c) for c, _, _ in BAD_CALLS])
def test_bad_input_is_a_clear_error(changes, error, words):
    args = _with(**changes)
    with pytest.raises(error) as info:
        lgm_torch.lgm(args.pop("data"), args.pop("label"), args.pop("mean"), args.pop("log_var"),
                      **args)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    # nothing is left behind: the next valid call gives the right answer
    x, y, mu, s = _valid()
    logits, lkd = lgm_torch.lgm(x, y, mu, s, 4)
    expected = numpy_forward(x.numpy(), y.numpy(), mu.numpy(), s.numpy(), LGMOptions(4), True)
    assert_close(logits.numpy(), expected[0], RTOL64, "logits", 0)
    assert_close(lkd.numpy(), expected[1], RTOL64, "lkd", 0)


def test_cached_options_keep_their_types():
    """The options of a call are parsed once per value and type: a value accepted before does not
    let an equal one of a wrong type through (True == 1), and every option error still raises."""
    x, y, mu, s = torch.randn(3, 2), torch.tensor([0, 1, 2]), torch.randn(4, 2), torch.zeros(4, 2)
    for _ in range(2):
        lgm_torch.lgm(x, y, mu, s, 4, alpha=1)
        lgm_torch.lgm(x, y, mu, s, 1 + 3, alpha=1.0, logdet_lkd=1)
        with pytest.raises(ValueError, match="alpha must be a real number, got True"):
            lgm_torch.lgm(x, y, mu, s, 4, alpha=True)
        with pytest.raises(ValueError, match="num_classes must be an integer, got True"):
            lgm_torch.lgm(x, y, mu, s[:1], True, alpha=1)
        with pytest.raises(ValueError, match=r"alpha must be a real number, got \[1\]"):
            lgm_torch.lgm(x, y, mu, s, 4, alpha=[1])
        with pytest.raises(ValueError, match="alpha"):
            lgm_torch.lgm(x, y, mu, s, 4, alpha=math.nan)


def test_bad_input_on_another_device():
    x, y, mu, s = _valid()
    with pytest.raises(ValueError, match=r"mean must be on the device of data \(cpu\), got meta"):
        lgm_torch.lgm(x, y, mu.to("meta"), s, 4)


BAD_MODULES = [
    (dict(in_units=0), ["in_units", ">= 1", "0"]),
    (dict(in_units=2.0), ["in_units", "integer", "2.0"]),
    (dict(lambda_=-1.0), ["lambda_", ">= 0", "-1.0"]),
    (dict(log_var_lr_mult=math.inf), ["log_var_lr_mult", "finite", "inf"]),
    (dict(num_classes=0), ["num_classes", "integer", "got 0"]),
    (dict(margin_polcy="step"), ["unknown", "margin_polcy"]),
    (dict(margin_policy="sometimes"), ["margin_policy", "const", "sometimes"]),
    (dict(margin_policy="step", margin_step=0), ["margin_step", ">= 1", "0"]),
    (dict(with_label=False), ["with_label"]),
]


@pytest.mark.parametrize("changes,words", BAD_MODULES, ids=[",".join(c) for c, _ in BAD_MODULES])
def test_bad_module_arguments(changes, words):
    args = dict(num_classes=4, in_units=3)
    args.update(changes)
    with pytest.raises(ValueError) as info:
        lgm_torch.LGMLoss(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, 2.5])
def test_damaged_schedule_counter_is_refused(value):
    module = lgm_torch.LGMLoss(4, 3, margin_policy="add", margin_gamma=0.1, margin_step=1)
    state = dict(module.state_dict(), margin_iter=torch.tensor(value, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"margin_iter .*must be an integer in \[0, 2\^53\], got"):
        module.load_state_dict(state)
    assert module.margin() == 0.1  # the counter is unchanged


# ---------------------------------------------------------------------------------------------
# the module

def test_module_parameters_and_loss(rng, seed):
    k, d = 10, 6
    module = lgm_torch.LGMLoss(k, d, lambda_=0.25, alpha=0.3).double()
    assert module.mean.shape == (k, d) and module.log_var.shape == (k, d)
    assert float(module.log_var.detach().abs().max()) == 0
    # Xavier-uniform as mx.init.Xavier(): U(-a, a) with a = sqrt(6 / (K + D))
    bound = math.sqrt(6.0 / (k + d))
    assert float(module.mean.detach().abs().max()) <= bound
    assert float(module.mean.detach().abs().max()) > 0.5 * bound
    assert lgm_torch.LGMLoss(k, d, isotropic=True).log_var.shape == (k, 1)

    x = torch.tensor(rng.standard_normal((33, d)))
    y = torch.tensor(rng.integers(0, k, 33))
    for training, alpha in ((True, 0.3), (False, 0.0)):
        module.train(training)
        loss, logits = module(x, y)
        ref_logits, ref_lkd = numpy_forward(x.numpy(), y.numpy(), module.mean.detach().numpy(),
                                            module.log_var.detach().numpy(),
                                            LGMOptions(k, alpha=alpha), True)
        log_softmax = ref_logits - np.log(np.exp(ref_logits - ref_logits.max(1, keepdims=True)
                                                 ).sum(1, keepdims=True)) - ref_logits.max(
            1, keepdims=True)
        ce = -log_softmax[np.arange(33), y.numpy()]
        assert_close(logits.detach().numpy(), ref_logits, RTOL64, f"logits {training}", seed)
        assert_close(loss.detach().numpy(), ce + 0.25 * ref_lkd, 1e-12, f"loss {training}", seed)


def test_parameter_groups():
    module = lgm_torch.LGMLoss(4, 3, log_var_lr_mult=0.05)
    net = torch.nn.Linear(5, 3)
    groups = [{"params": net.parameters()}] + module.parameter_groups(lr=0.2)
    optimizer = torch.optim.SGD(groups, lr=0.2, weight_decay=1e-3)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [0.2, 0.2, pytest.approx(0.01)]
    assert optimizer.param_groups[2]["params"] == [module.log_var]
    assert optimizer.param_groups[2]["weight_decay"] == 0.0
    assert optimizer.param_groups[1]["weight_decay"] == 1e-3
    with pytest.raises(ValueError, match="lr must be a finite float >= 0, got -1"):
        module.parameter_groups(lr=-1)


def test_margin_schedule_state(rng):
    """The schedule advances on training steps only, lives in the state_dict and resumes."""
    x = torch.tensor(rng.standard_normal((8, 3)))
    y = torch.tensor(rng.integers(0, 4, 8))
    options = dict(alpha=0.1, margin_policy="step", margin_gamma=2.0, margin_step=2)
    module = lgm_torch.LGMLoss(4, 3, **options).double()
    margins = []
    for _ in range(5):
        margins.append(module.margin())
        module(x, y)
    assert margins == [0.1, 0.1, 0.2, 0.2, 0.4]
    module.eval()
    eval_logits = module(x, y)[1]
    assert int(module.margin_iter) == 5
    expected = numpy_forward(x.numpy(), y.numpy(), module.mean.detach().numpy(),
                             module.log_var.detach().numpy(), LGMOptions(4), False)[0]
    assert_close(eval_logits.detach().numpy(), expected, RTOL64, "eval logits", 0)
    with pytest.raises(ValueError, match="label must hold integers in"):
        module.train()(x, y + 4)   # a rejected batch does not move the schedule
    assert int(module.margin_iter) == 5

    resumed = lgm_torch.LGMLoss(4, 3, **options).double()
    resumed.load_state_dict(module.state_dict())
    assert resumed.margin() == module.margin() == 0.4
    train_logits = resumed(x, y)[1]
    expected = numpy_forward(x.numpy(), y.numpy(), module.mean.detach().numpy(),
                             module.log_var.detach().numpy(), LGMOptions(4, alpha=0.4), True)[0]
    assert_close(train_logits.detach().numpy(), expected, RTOL64, "resumed logits", 0)
    assert "margin_iter" not in lgm_torch.LGMLoss(4, 3).state_dict()


def test_module_trains(rng):
    """A few SGD steps on separable 2-D data lower the loss and put the means near the data."""
    torch.manual_seed(0)
    centres = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = rng.integers(0, 3, 96)
    x = torch.tensor(centres[y] + 0.3 * rng.standard_normal((96, 2)), dtype=torch.float32)
    y = torch.tensor(y)
    module = lgm_torch.LGMLoss(3, 2, lambda_=0.5)
    optimizer = torch.optim.SGD(module.parameter_groups(lr=0.5), lr=0.5)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = module(x, y)[0].mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    accuracy = float((module.eval()(x, y)[1].argmax(1) == y).float().mean())
    assert accuracy == 1.0


def test_readme_quick_start_runs():
    """The README's PyTorch quick start, as written."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text[text.index("PyTorch (`pip install"):].split("```python\n", 1)[1].split("```")[0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["loss"].shape == (64,) and scope["logits"].shape == (64, 10)
    assert scope["loss_module"].mean.grad is not None


# ---------------------------------------------------------------------------------------------
# imports

def _python(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_works_without_mxnet():
    out = _python("""
        import sys
        sys.modules["mxnet"] = None          # as if MXNet were not installed
        import torch
        import lgm_op.torch as lgm_torch
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        s = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
        logits, lkd = lgm_torch.lgm(x, torch.tensor([0, 1, 2, 3, 0]), mu, s, 4)
        (logits.sum() + lkd.sum()).backward()
        assert "mxnet" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
        print("ok", tuple(x.grad.shape))
    """)
    assert out.split() == ["ok", "(5,", "3)"]


def test_lgm_op_imports_without_torch():
    out = _python("""
        import sys
        sys.modules["torch"] = None          # as if PyTorch were not installed
        import lgm_op
        print("ok", lgm_op.lgm_forward_cpu.__name__)
        try:
            import lgm_op.torch
        except ImportError as exc:
            print("ImportError")
    """)
    assert out.split() == ["ok", "lgm_forward_cpu", "ImportError"]


def test_benchmark_script_runs(tmp_path):
    """benchmarks/bench_torch.py end to end at a tiny size (its timings mean nothing here)."""
    import json
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_torch.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "9x4x3", "--repeats", "2",
                           "--warmup", "0", "--providers", "op,broadcast,addmm",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "torch_cpu.json").read_text())
    providers = record["results"][0]["providers"]
    for name in ("op", "broadcast", "addmm"):
        assert providers[name]["status"] == "ok", (name, providers[name]["status"])
        assert providers[name]["correctness"]["ok"], name
        assert len(providers[name]["times_ms"]) == 2
    assert providers["addmm"]["ratio_to_op"]["rounds"] == 2
    assert "sha" in record["git"] and record["versions"]["torch"] == torch.__version__
    assert (tmp_path / "torch_cpu.csv").read_text().startswith("size,provider,status")
    assert "GEMM expansion (addmm), autograd" in proc.stdout
    table = (tmp_path / "torch_cpu.md").read_text()
    assert "| 9 x 4 x 3 | " in table and "[" in table.splitlines()[-2 - len(record["targets"])]
