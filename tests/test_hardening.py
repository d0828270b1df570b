"""SPEC sections 3-4 for the front ends: MXNet's own node attributes, partial shape inference,
the margin schedule and its counter, misspelled and mistyped options of every front end, the
simulator switch and sparse storage. Every error names the argument, the expectation and the
value, and the next valid call in the same process gives the right answer."""
import math

import mxnet as mx
import numpy as np
import pytest
from mxnet.base import MXNetError

import lgm_op
from lgm_op.options import KNOWN_ATTRIBUTES, LGMOptions
from lgm_op.reference import numpy_forward
from lgm_op.schedule import parse_schedule
from test_errors import D, K, N, assert_still_works, call_lgm, inputs  # noqa: F401 (fixture)


def _symbol_inputs():
    return mx.sym.Variable("data"), mx.sym.Variable("label")


# ------------------------------------------------------------------------------------------------
# MXNet's own node attributes (__name__) are accepted and ignored; model-parallel graphs bind
# ------------------------------------------------------------------------------------------------
def test_framework_attributes_are_ignored_by_every_front_end(inputs):
    inp, args = inputs
    want = call_lgm(args)
    got = call_lgm(args, __layout__="NC", __lr_mult__="2", __ctx_group__="dev1")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    data, label = _symbol_inputs()
    node = mx.sym.Custom(data, label, mx.sym.Variable("mean"), mx.sym.Variable("log_var"),
                         op_type="lgm", num_classes=K, attr={"__layout__": "NC"})
    assert node.infer_shape(data=(N, D), label=(N,))[1] == [(N, K), (N,)]
    logits, _ = lgm_op.lgm(data, label, K, __layout__="NC")
    assert logits.infer_shape(data=(N, D), label=(N,))[1] == [(N, K)]
    block = lgm_op.LGMLoss(K, in_units=D, __layout__="NC")
    assert "__layout__" not in block._attrs
    assert_still_works(inp, args)


def _two_group_graph():
    data, label = _symbol_inputs()
    with mx.AttrScope(ctx_group="dev1"):
        feat = mx.sym.FullyConnected(data, num_hidden=D, name="fc")
    with mx.AttrScope(ctx_group="dev2"):
        logits, lkd = lgm_op.lgm(feat, label, K, margin_policy="step", margin_step=1,
                                 margin_gamma=2.0)
    return mx.sym.Group([logits, lkd])


def _train_once(net, rng_seed, **bind):
    rng = np.random.default_rng(rng_seed)
    values = {"data": rng.normal(size=(N, 5)), "label": rng.integers(0, K, N).astype(float),
              "fc_weight": rng.normal(size=(D, 5)), "fc_bias": rng.normal(size=D),
              "lgm_mean": rng.normal(size=(K, D)), "lgm_log_var": rng.uniform(-1, 1, (K, D))}
    ex = net.simple_bind(data=(N, 5), label=(N,), grad_req={"label": "null"}, **bind)
    for name, value in values.items():
        ex.arg_dict[name][:] = value
    ex.forward(is_train=True)
    ex.backward([mx.nd.array(rng.normal(size=(N, K))), mx.nd.array(rng.normal(size=N))])
    got = {name: a.asnumpy() for name, a in ex.grad_dict.items() if a is not None}
    got.update(logits=ex.outputs[0].asnumpy(), lkd=ex.outputs[1].asnumpy(),
               margin_iter=ex.aux_dict["lgm_margin_iter"].asnumpy())
    return got, ex


def test_model_parallel_graph_binds_on_two_contexts():
    net = _two_group_graph()
    assert net.attr_dict()["lgm"]["__ctx_group__"] == "dev2"
    want, _ = _train_once(net, 1, ctx=mx.cpu(0))
    got, ex = _train_once(net, 1, ctx=mx.cpu(0),
                          group2ctx={"dev1": mx.cpu(0), "dev2": mx.cpu(1)})
    assert ex.arg_dict["lgm_mean"].context == mx.cpu(1)
    assert ex.arg_dict["fc_weight"].context == mx.cpu(0)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert got["margin_iter"][0] == 1


# ------------------------------------------------------------------------------------------------
# infer_shape_partial returns what is known
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_schedule", [False, True])
def test_infer_shape_partial_returns_the_unknown_shapes(with_schedule):
    data, label = _symbol_inputs()
    schedule = dict(margin_policy="add") if with_schedule else {}
    logits, lkd = lgm_op.lgm(data, label, K, **schedule)
    net = mx.sym.Group([logits, lkd])
    aux = [(1,)] if with_schedule else []
    assert net.infer_shape_partial() == ([(), (), (), ()], [(), ()], aux)
    assert net.infer_shape_partial(label=(N,)) == ([(), (N,), (), ()], [(N, K), (N,)], aux)
    complete = ([(N, D), (N,), (K, D), (K, D)], [(N, K), (N,)], aux)
    assert net.infer_shape_partial(label=(N,), lgm_mean=(K, D)) == complete
    assert net.infer_shape_partial(data=(N, D)) == complete
    with pytest.raises(MXNetError, match=r"data must be 2-D \(N, D\), got shape \(6, 3, 1\)"):
        net.infer_shape_partial(data=(N, D, 1))
    free, _ = lgm_op.lgm(data, None, K)
    assert free.infer_shape_partial() == ([(), (), ()], [()], [])


# ------------------------------------------------------------------------------------------------
# The margin schedule: no overflow, a counter exact past 2^24, a damaged counter is an error
# ------------------------------------------------------------------------------------------------
BIG_T = (2000, 10 ** 6, 2 ** 40, 2 ** 53)


def test_step_schedule_holds_at_the_cap_for_any_iteration():
    capped = parse_schedule(dict(margin_policy="step", margin_gamma=2, margin_step=1, margin_max=1.0))
    assert [capped.value(0.1, t) for t in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert all(capped.value(0.1, t) == 1.0 for t in BIG_T)
    uncapped = parse_schedule(dict(margin_policy="step", margin_gamma=1.5, margin_step=3))
    assert uncapped.value(0.2, 31) == 0.2 * 1.5 ** 10
    assert all(uncapped.value(0.2, t) == math.inf for t in BIG_T[1:])
    decaying = parse_schedule(dict(margin_policy="step", margin_gamma=0.5, margin_step=1))
    assert all(decaying.value(0.3, t) == 0.0 for t in BIG_T)
    tiny = parse_schedule(dict(margin_policy="step", margin_gamma=2, margin_step=1, margin_max=1e20))
    assert tiny.value(1e-300, 990) == 1e-300 * 2.0 ** 990
    assert tiny.value(1e-300, 1030) == pytest.approx(1.15e10, rel=1e-3)  # 2^1030 alone overflows
    assert tiny.value(1e-300, 1100) == 1e20
    for policy in ("add", "warmup", "const"):
        schedule = parse_schedule(dict(margin_policy=policy, margin_gamma=0.5, margin_max=3.0))
        assert all(math.isfinite(schedule.value(0.1, t)) for t in BIG_T)


def _counter_call(args, counter, train=True, **schedule):
    schedule = schedule or dict(margin_policy="add", margin_gamma=0.5, margin_step=4)
    with mx.autograd.train_mode() if train else mx.autograd.predict_mode():
        out = mx.nd.Custom(*args, counter, op_type="lgm", num_classes=K, **schedule)
    return out[0].asnumpy(), out[1].asnumpy()


def test_counter_counts_exactly_past_2_to_the_24(inputs):
    inp, args = inputs
    start = 2 ** 24 + 10
    counter = mx.nd.array([start], dtype="float64")
    logits, _ = _counter_call(args, counter)
    assert counter.asnumpy()[0] == start + 1
    alpha = 0.1 + 0.5 * (start // 4)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"],
                         LGMOptions(num_classes=K, alpha=alpha), True)
    np.testing.assert_allclose(logits, want[0], rtol=1e-12)
    block = lgm_op.LGMLoss(K, in_units=D, margin_policy="add")
    block.initialize()
    assert block.margin_iter.dtype == np.float64
    block.margin_iter.set_data(mx.nd.array([start], dtype="float64"))
    with mx.autograd.record():
        block(mx.nd.array(inp["x"], dtype="float32"), mx.nd.array(inp["y"]))[0].asnumpy()
    assert block.margin_iter.data().asnumpy()[0] == start + 1


def test_counter_stays_float64_when_the_block_is_cast(inputs):
    inp, _ = inputs
    net = mx.gluon.nn.HybridSequential()
    net.add(lgm_op.LGMLoss(K, in_units=D, margin_policy="add"))
    net.initialize()
    for dtype in ("float64", "float32"):  # a cast to float32 would narrow the counter too
        net.cast(dtype)
        block = net[0]
        assert np.dtype(block.mean.dtype) == dtype
        assert np.dtype(block.margin_iter.dtype) == np.float64
    block.mean.set_data(mx.nd.array(inp["mu"]))
    block.log_var.set_data(mx.nd.array(inp["s"]))
    with mx.autograd.record():
        _, logits = block(mx.nd.array(inp["x"]), mx.nd.array(inp["y"]))
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=K), True)
    # float32 computation of float32-rounded inputs against the float64 reference
    np.testing.assert_allclose(logits.asnumpy(), want[0], rtol=1e-5, atol=1e-5)
    assert block.margin_iter.data().asnumpy()[0] == 1


def test_counter_is_float64_for_float32_data():
    data, label = _symbol_inputs()
    logits, _ = lgm_op.lgm(data, label, K, margin_policy="warmup")
    _, _, aux = logits.infer_type(data=np.float32, label=np.float32)
    assert aux == [np.float64]


def test_float32_counters_of_older_checkpoints_still_load(tmp_path, inputs):
    inp, _ = inputs
    block = lgm_op.LGMLoss(K, in_units=D, margin_policy="step", margin_step=2, prefix="lgm_")
    block.initialize()
    path = str(tmp_path / "block.params")
    block.save_parameters(path)
    saved = mx.nd.load(path)
    saved["margin_iter"] = mx.nd.array([12], dtype="float32")  # as written before float64
    mx.nd.save(path, saved)
    fresh = lgm_op.LGMLoss(K, in_units=D, margin_policy="step", margin_step=2, prefix="lgm_")
    fresh.load_parameters(path)
    assert fresh.margin_iter.data().dtype == np.float64
    assert fresh.margin_iter.data().asnumpy()[0] == 12
    # Module: a float32 auxiliary state of an older checkpoint goes into the float64 counter
    data, label = _symbol_inputs()
    logits, lkd = lgm_op.lgm(data, label, K, margin_policy="step", margin_step=2)
    mod = mx.mod.Module(mx.sym.Group([logits, lkd]), data_names=["data"], label_names=["label"])
    mod.bind(data_shapes=[("data", (N, D))], label_shapes=[("label", (N,))])
    args = {"lgm_mean": mx.nd.array(inp["mu"]), "lgm_log_var": mx.nd.array(inp["s"])}
    mod.set_params(args, {"lgm_margin_iter": mx.nd.array([12], dtype="float32")})
    mod.init_optimizer(optimizer="sgd")
    mod.forward(mx.io.DataBatch([mx.nd.array(inp["x"])], [mx.nd.array(inp["y"])]), is_train=True)
    mod.backward([mx.nd.array(inp["gz"]), mx.nd.array(inp["gl"])])
    mod.update()
    mx.nd.waitall()
    aux = mod.get_params()[1]["lgm_margin_iter"]
    assert aux.dtype == np.float64 and aux.asnumpy()[0] == 13


@pytest.mark.parametrize("bad", [-5.0, np.nan, np.inf, -np.inf, 2.5, 2.0 ** 60])
def test_damaged_counter_is_a_clear_error(bad, inputs):
    inp, args = inputs
    counter = mx.nd.array([bad], dtype="float64")
    with pytest.raises(MXNetError) as err:
        _counter_call(args, counter)
    assert (f"margin_iter (the margin schedule's iteration counter) must be an integer in "
            f"[0, 2^53], got {bad!r}") in str(err.value)
    np.testing.assert_array_equal(counter.asnumpy(), [bad])  # a failed step does not move it
    # not a training step: the counter is not read, and no margin applies
    got = _counter_call(args, counter, train=False)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=K), False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    good = mx.nd.array([3], dtype="float64")
    logits, _ = _counter_call(args, good)
    want = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=K), True)
    np.testing.assert_allclose(logits, want[0], rtol=1e-12)  # add-up: 0.1 + 0.5 * (3 // 4)
    assert good.asnumpy()[0] == 4
    assert_still_works(inp, args)


# ------------------------------------------------------------------------------------------------
# One attribute parser: misspelled margin_* names are errors in every front end
# ------------------------------------------------------------------------------------------------
KNOWN = ", ".join(KNOWN_ATTRIBUTES)


@pytest.mark.parametrize("name", ["margin_polcy", "margin_steps", "margin", "Alpha", "_layout_",
                                  "__"])
def test_unknown_attribute_is_an_error_in_every_front_end(name, inputs):
    inp, args = inputs
    message = f"lgm: unknown attribute(s) {name}; known: {KNOWN}"
    assert "margin_policy, margin_gamma, margin_step, margin_max" in KNOWN
    data, label = _symbol_inputs()
    with pytest.raises(ValueError) as err:
        lgm_op.LGMLoss(10, **{name: "warmup"})
    assert message in str(err.value)
    with pytest.raises(ValueError) as err:
        lgm_op.lgm(data, label, 10, **{name: "warmup"})
    assert message in str(err.value)
    with pytest.raises(MXNetError) as err:
        call_lgm(args, **{name: "warmup"})
    assert message in str(err.value)
    assert_still_works(inp, args)


# ------------------------------------------------------------------------------------------------
# Builder and block arguments of the wrong type or range
# ------------------------------------------------------------------------------------------------
BAD_NUMBERS = [math.inf, math.nan, -1, "0.1", None, True]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
@pytest.mark.parametrize("name", ["lambda_", "log_var_lr_mult"])
def test_block_float_arguments(name, value):
    with pytest.raises(ValueError) as err:
        lgm_op.LGMLoss(K, **{name: value})
    assert f"LGMLoss: {name} must be a finite float >= 0, got {value!r}" in str(err.value)


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_builder_log_var_lr_mult(value):
    data, label = _symbol_inputs()
    with pytest.raises(ValueError) as err:
        lgm_op.lgm(data, label, K, log_var_lr_mult=value)
    assert f"lgm: log_var_lr_mult must be a finite float >= 0, got {value!r}" in str(err.value)


@pytest.mark.parametrize("value", [-2, 2.5, "3", None, True], ids=repr)
def test_block_in_units(value):
    with pytest.raises(ValueError) as err:
        lgm_op.LGMLoss(K, in_units=value)
    assert f"LGMLoss: in_units must be an integer >= 0, got {value!r}" in str(err.value)


@pytest.mark.parametrize("value, message", [
    ("5", "num_classes must be an integer, got '5'"),
    (5.0, "num_classes must be an integer, got 5.0"),
    (None, "num_classes must be an integer, got None"),
    (True, "num_classes must be an integer, got True"),
    (0, "num_classes must be an integer >= 1, got 0"),
    (2 ** 31, "num_classes must be at most 2147483647 (MXNet's shapes are int32), got 2147483648"),
], ids=repr)
def test_num_classes_in_every_front_end(value, message):
    data, label = _symbol_inputs()
    for build in (lambda: lgm_op.LGMLoss(value), lambda: lgm_op.lgm(data, label, value)):
        with pytest.raises(ValueError) as err:
            build()
        assert message in str(err.value)


def test_num_classes_beyond_int32_in_the_raw_node(inputs):
    inp, args = inputs
    with pytest.raises(MXNetError) as err:
        call_lgm(args, num_classes=str(2 ** 31))
    assert "num_classes must be at most 2147483647 (MXNet's shapes are int32), got 2147483648" in \
        str(err.value)
    assert_still_works(inp, args)


@pytest.mark.parametrize("name, value", [("alpha", "0.1"), ("isotropic", "True"),
                                         ("margin_step", 2.0), ("margin_gamma", "2"),
                                         ("margin_policy", 1)])
def test_python_front_ends_take_python_values(name, value):
    with pytest.raises(ValueError) as err:
        lgm_op.LGMLoss(K, **{name: value})
    assert f"lgm: attribute {name} must be" in str(err.value) and repr(value) in str(err.value)


def test_label_and_label_free_form_must_agree(inputs):
    inp, _ = inputs
    data, label = _symbol_inputs()
    with pytest.raises(ValueError, match=r"lgm: the label-free form \(with_label=False\) takes no "
                                         r"label, got label 'label'; pass label=None"):
        lgm_op.lgm(data, label, K, with_label=False)
    with pytest.raises(ValueError, match=r"lgm: with_label=True needs a label symbol, got "
                                         r"label=None"):
        lgm_op.lgm(data, None, K, with_label=True)
    with pytest.raises(ValueError, match=r"LGMLoss: with_label must be True"):
        lgm_op.LGMLoss(K, with_label=False)
    # the valid forms of both, and their numbers
    logits, _ = lgm_op.lgm(data, None, K)
    ex = logits.bind(mx.cpu(), {"data": mx.nd.array(inp["x"]), "lgm_mean": mx.nd.array(inp["mu"]),
                                "lgm_log_var": mx.nd.array(inp["s"])})
    got = ex.forward(is_train=False)[0].asnumpy()
    want = numpy_forward(inp["x"], None, inp["mu"], inp["s"],
                         LGMOptions(num_classes=K, with_label=False), False)
    np.testing.assert_allclose(got, want[0], rtol=1e-5)


def test_raw_label_free_node_given_a_label(inputs):
    """The raw node's argument count is checked by MXNet before any lgm callback runs: its own
    message, which names the count."""
    inp, args = inputs
    with pytest.raises(MXNetError, match=r"Operator Custom expects 3 inputs, but got 4 instead"):
        call_lgm(args, with_label=False)
    assert_still_works(inp, args)


def test_next_valid_block_after_bad_arguments_is_right(inputs):
    inp, _ = inputs
    for bad in (dict(lambda_=math.inf), dict(in_units=2.5), dict(margin_polcy="warmup")):
        with pytest.raises(ValueError):
            lgm_op.LGMLoss(K, **dict(dict(in_units=D), **bad))
    block = lgm_op.LGMLoss(K, in_units=D, lambda_=0.5)
    block.initialize()
    block.mean.set_data(mx.nd.array(inp["mu"]))
    block.log_var.set_data(mx.nd.array(inp["s"]))
    loss, logits = block(mx.nd.array(inp["x"]), mx.nd.array(inp["y"]))
    want_logits, want_lkd = numpy_forward(inp["x"], inp["y"], inp["mu"], inp["s"],
                                          LGMOptions(num_classes=K), False)
    np.testing.assert_allclose(logits.asnumpy(), want_logits, rtol=1e-5, atol=1e-6)
    shifted = want_logits - want_logits.max(axis=1, keepdims=True)
    ce = -(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))[
        np.arange(N), inp["y"].astype(int)]
    np.testing.assert_allclose(loss.asnumpy(), ce + 0.5 * want_lkd, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# LGM_OP_CUDASIM: unset, 0 or 1
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["true", "2", "yes", " 1", "1 ", ""])
def test_simulator_switch_takes_only_0_or_1(value, inputs, monkeypatch):
    inp, args = inputs
    monkeypatch.setenv("LGM_OP_CUDASIM", value)
    with pytest.raises(MXNetError) as err:
        call_lgm(args)
    assert (f"lgm: environment variable LGM_OP_CUDASIM must be unset, 0 (NumPy path) or 1 "
            f"(CUDA kernels on the CPU simulator), got {value!r}") in str(err.value)
    monkeypatch.setenv("LGM_OP_CUDASIM", "0")
    assert_still_works(inp, args)
    monkeypatch.delenv("LGM_OP_CUDASIM")
    assert_still_works(inp, args)


# ------------------------------------------------------------------------------------------------
# Sparse storage
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index, name, stype", [(0, "data", "csr"), (0, "data", "row_sparse"),
                                                (2, "mean", "row_sparse"),
                                                (3, "log_var", "csr")])
def test_sparse_input_is_a_clear_error(index, name, stype, inputs):
    inp, args = inputs
    sparse = list(args)
    sparse[index] = args[index].tostype(stype)
    with pytest.raises(MXNetError) as err:
        call_lgm(sparse)
    assert (f"lgm: {name} must have default (dense) storage, got {stype} storage"
            in str(err.value))
    assert_still_works(inp, args)


def test_sparse_gradient_is_a_clear_error(inputs):
    inp, args = inputs
    data, label = _symbol_inputs()
    net = mx.sym.Group(list(lgm_op.lgm(data, label, K)))
    values = {"data": args[0], "label": args[1], "lgm_mean": args[2], "lgm_log_var": args[3]}
    grads = {"data": mx.nd.zeros((N, D)), "lgm_mean": mx.nd.zeros((K, D)).tostype("row_sparse"),
             "lgm_log_var": mx.nd.zeros((K, D))}
    with pytest.raises(MXNetError) as err:
        ex = net.bind(mx.cpu(), values, args_grad=grads, grad_req=dict(
            data="write", label="null", lgm_mean="write", lgm_log_var="write"))
        ex.forward(is_train=True)
        ex.backward([mx.nd.array(inp["gz"]), mx.nd.array(inp["gl"])])
        ex.grad_dict["lgm_mean"].asnumpy()
    assert ("lgm: the gradient of mean must have default (dense) storage, got row_sparse "
            "storage") in str(err.value)
    assert_still_works(inp, args)


@pytest.mark.skipif(mx.runtime.Features().is_enabled("INT64_TENSOR_SIZE"),
                    reason="this MXNet build indexes arrays with int64")
def test_arrays_beyond_int32_sizes_are_refused_before_allocation(inputs):
    inp, args = inputs
    logits, _ = lgm_op.lgm(*_symbol_inputs(), 2 ** 30)
    with pytest.raises(MXNetError) as err:
        logits.infer_shape(data=(N, D), label=(N,))
    assert ("lgm: mean of shape (1073741824, 3) would have 3221225472 elements, more than the "
            "2147483647 this MXNet build holds (built without INT64_TENSOR_SIZE)") in str(err.value)
    assert_still_works(inp, args)
