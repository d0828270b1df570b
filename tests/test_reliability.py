"""Reliability of the operator inside real training: concurrency, faults in a training loop,
multi-device data parallelism, checkpoint / resume, and inputs that must never run as code.

Numbers worth reporting (largest parameter differences, call counts) are printed; run with
``-s`` to see them. See docs/reliability.md for what each test establishes.
"""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.base import MXNetError

import lgm_op

ROOT = Path(__file__).resolve().parent.parent
K, D, IN_UNITS, HIDDEN = 4, 3, 5, 8
SCHEDULE = dict(alpha=0.2, margin_policy="step", margin_gamma=1.5, margin_step=2)
LABEL_ERROR = f"lgm: label must hold integers in [0, {K}), got"


# ------------------------------------------------------------------------------------------------
# A small model shared by the training-loop tests: Dense(8, tanh) -> Dense(D) -> LGMLoss(K, D),
# with a margin schedule so the auxiliary counter margin_iter is part of every comparison.
# ------------------------------------------------------------------------------------------------
def initial_values(seed):
    """{parameter name: value} for the model, the same for every front end."""
    rng = np.random.default_rng(seed)
    return {
        "fc0_weight": rng.normal(0, 0.5, (HIDDEN, IN_UNITS)),
        "fc0_bias": rng.normal(0, 0.1, HIDDEN),
        "fc1_weight": rng.normal(0, 0.5, (D, HIDDEN)),
        "fc1_bias": rng.normal(0, 0.1, D),
        "lgm_mean": rng.normal(0, 1.0, (K, D)), "lgm_log_var": rng.uniform(-0.5, 0.5, (K, D)),
    }


def gluon_model(ctx, seed=0, **options):
    """(net, loss block, {short name: Parameter}) initialised from ``initial_values(seed)``."""
    net = gluon.nn.HybridSequential(prefix="net_")
    with net.name_scope():
        net.add(gluon.nn.Dense(HIDDEN, activation="tanh", in_units=IN_UNITS, prefix="fc0_"))
        net.add(gluon.nn.Dense(D, in_units=HIDDEN, prefix="fc1_"))
    block = lgm_op.LGMLoss(K, in_units=D, lambda_=0.1, log_var_lr_mult=0.5, prefix="lgm_",
                           **dict(SCHEDULE, **options))
    params = {}
    for p in list(net.collect_params().values()) + list(block.collect_params().values()):
        params[p.name.replace("net_", "", 1)] = p
    for p in params.values():
        p.initialize(mx.init.Zero(), ctx=ctx)
    for name, value in initial_values(seed).items():
        params[name].set_data(mx.nd.array(value))
    return net, block, params


def batches(seed, steps, batch_size=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        y = rng.integers(0, K, batch_size).astype(np.float32)
        x = (rng.normal(0, 1, (batch_size, IN_UNITS)) + y[:, None]).astype(np.float32)
        out.append((x, y))
    return out


def snapshot(params, ctx=None):
    """{name: NumPy copy} of every parameter (on ``ctx``, default the first context)."""
    mx.nd.waitall()
    return {name: p.data(ctx).asnumpy().copy() for name, p in params.items()}


def max_difference(a, b):
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def gluon_step(net, block, trainer, x, y, ctxs):
    """One data-parallel step; the loss is summed over devices and normalised by the full batch."""
    xs = gluon.utils.split_and_load(mx.nd.array(x), ctxs)
    ys = gluon.utils.split_and_load(mx.nd.array(y), ctxs)
    with autograd.record():
        losses = [block(net(a), b)[0] for a, b in zip(xs, ys)]
    autograd.backward(losses)
    trainer.step(x.shape[0])
    return losses


def lgm_symbol(**options):
    """The same model as a Module graph: softmax cross-entropy + 0.1 * lkd."""
    data, label = mx.sym.Variable("data"), mx.sym.Variable("label")
    hidden = mx.sym.Activation(mx.sym.FullyConnected(data, num_hidden=HIDDEN, name="fc0"), "tanh")
    feat = mx.sym.FullyConnected(hidden, num_hidden=D, name="fc1")
    logits, lkd = lgm_op.lgm(feat, label, num_classes=K, name="lgm", log_var_lr_mult=0.5,
                             **dict(SCHEDULE, **options))
    return mx.sym.Group([mx.sym.SoftmaxOutput(logits, label, name="softmax"),
                         mx.sym.MakeLoss(0.1 * lkd, name="lkd_loss")])


def module(ctxs, batch_size, seed=0, **options):
    mod = mx.mod.Module(lgm_symbol(**options), data_names=["data"], label_names=["label"],
                        context=ctxs)
    mod.bind(data_shapes=[("data", (batch_size, IN_UNITS))],
             label_shapes=[("label", (batch_size,))])
    aux = {name: mx.nd.zeros(1) for name in mod.symbol.list_auxiliary_states()}
    mod.init_params(arg_params={k: mx.nd.array(v) for k, v in initial_values(seed).items()},
                    aux_params=aux)
    return mod


def module_params(mod):
    # The graph executor does not order reads of an auxiliary state after the operator that
    # writes it (the same holds for BatchNorm's moving statistics): synchronise first.
    mx.nd.waitall()
    arg, aux = mod.get_params()
    out = {k: v.asnumpy() for k, v in arg.items()}
    out.update({k: v.asnumpy() for k, v in aux.items()})
    return out


SGD_MOMENTUM = {"learning_rate": 0.2, "momentum": 0.9}


# ------------------------------------------------------------------------------------------------
# 2. Concurrency
# ------------------------------------------------------------------------------------------------
JOB_OPTIONS = [dict(), dict(alpha=0.0), dict(isotropic=True), dict(logdet_logits=False),
               dict(logdet_lkd=False, alpha=1.0), dict(margin_policy="warmup", margin_step=3)]


def _job_inputs(seed, dtype):
    rng = np.random.default_rng(seed)
    n, d = 5 + seed % 29, 1 + seed % 7
    opts = JOB_OPTIONS[seed % len(JOB_OPTIONS)]
    return dict(opts=opts, x=rng.normal(size=(n, d)), y=rng.integers(0, K, n).astype(np.float32),
                mu=rng.normal(size=(K, d)),
                s=rng.uniform(-1, 1, (K, 1 if opts.get("isotropic") else d)),
                gz=rng.normal(size=(n, K)), gl=rng.normal(size=n), dtype=dtype)


def _issue_job(job, rounds):
    """Issue ``rounds`` forward+backward calls without waiting; returns the pending results."""
    opts = dict(job["opts"])
    args = [mx.nd.array(job[k], dtype=job["dtype"]) for k in ("x", "mu", "s")]
    label = mx.nd.array(job["y"])
    heads = [mx.nd.array(job["gz"], dtype=job["dtype"]), mx.nd.array(job["gl"], dtype=job["dtype"])]
    aux = [mx.nd.zeros(1, dtype="float64")] if opts.get("margin_policy") else []
    pending = []
    for r in range(rounds):
        x, mu, s = (a.copy() for a in args)
        for a in (x, mu, s):
            a.attach_grad()
        with autograd.record():
            logits, lkd = mx.nd.Custom(x, label, mu, s, *aux, op_type="lgm", num_classes=K,
                                       **dict(opts, alpha=opts.get("alpha", 0.1) + 0.1 * r))
        autograd.backward([logits, lkd], heads)
        pending.append([logits, lkd, x.grad, mu.grad, s.grad])
    return pending


def _collect(pending):
    return [[a.asnumpy() for a in arrays] for arrays in pending]


@pytest.mark.timeout(120)
def test_eight_threads_match_sequential_bitwise():
    rounds, jobs_per_thread, threads = 3, 6, 8
    jobs = [_job_inputs(seed, ("float32", "float64")[seed // 6 % 2])
            for seed in range(threads * jobs_per_thread)]
    expected = [_collect(_issue_job(job, rounds)) for job in jobs]
    results, failures = {}, []

    def worker(t):
        try:
            mine = range(t, len(jobs), threads)
            pending = {i: _issue_job(jobs[i], rounds) for i in mine}  # all in flight at once
            for i in mine:
                results[i] = _collect(pending[i])
        except Exception as exc:  # reported by the main thread
            failures.append((t, repr(exc)))

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=90)
    assert not any(th.is_alive() for th in pool), "a thread did not finish: deadlock"
    assert not failures, failures
    calls = 0
    for i, want in enumerate(expected):
        for r, (got_round, want_round) in enumerate(zip(results[i], want)):
            for name, got, ref in zip(("logits", "lkd", "dx", "dmu", "dlog_var"), got_round,
                                      want_round):
                np.testing.assert_array_equal(got, ref, err_msg=f"job {i} round {r} {name}")
            calls += 1
    print(f"\n{calls} concurrent forward+backward calls from {threads} threads: bitwise equal")


def concurrent_fault_scenario(threads=8, bad_threads=(2, 5)):
    """8 threads, some with a bad label; run in a child process by the test below.

    Returns {"errors": {thread: text}, "mismatched": [good threads whose results differ],
    "unraised": [bad threads that got no error]}.
    """
    jobs = [_job_inputs(100 + t, "float64") for t in range(threads)]
    for t in bad_threads:
        jobs[t]["y"][1] = K + 10 + t  # each bad thread has its own message
    expected = {t: _collect(_issue_job(jobs[t], 2)) for t in range(threads) if t not in bad_threads}
    results, errors = {}, {}

    def worker(t):
        try:
            results[t] = _collect(_issue_job(jobs[t], 2))
        except MXNetError as exc:
            errors[t] = str(exc)

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    if any(th.is_alive() for th in pool):
        return {"deadlock": True}
    mismatched = [t for t, want in expected.items() if t in results and not all(
        np.array_equal(g, w) for gr, wr in zip(results[t], want) for g, w in zip(gr, wr))]
    return {"deadlock": False, "errors": {str(t): e for t, e in errors.items()},
            "mismatched": mismatched, "unraised": [t for t in bad_threads if t not in errors]}


@pytest.mark.timeout(120)
def test_concurrent_faults_never_corrupt_good_results():
    """Faults in some threads while others train: no deadlock, no good result silently wrong.

    Runs in a child process: MXNet 1.9.1 keeps a single exception slot for every custom operator
    (``CustomOperator::exception_`` in src/operator/custom/custom-inl.h), so under concurrency a
    failure may be delivered to another call, and a failure nobody collected would surface in an
    unrelated later call of this test session.
    """
    code = ("import json, test_reliability as t\n"
            "print('RESULT ' + json.dumps(t.concurrent_fault_scenario()))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", env=env,
                         capture_output=True, text=True, timeout=100)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"no result (exit status {out.returncode}):\n{out.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert not result["deadlock"], "a thread did not finish: deadlock"
    assert result["errors"], "no thread saw an error"
    assert not result["mismatched"], f"good threads returned wrong numbers: {result}"
    text = "\n".join(result["errors"].values())
    wrong = sorted(set(result["errors"]) - {"2", "5"}) + result["unraised"]
    missing = [t for t in (2, 5) if f"{LABEL_ERROR} {float(K + 10 + t)} at index 1" not in text]
    if wrong or missing:
        pytest.xfail(f"MXNet delivered the failures to other calls (errors in threads "
                     f"{sorted(result['errors'])}, bad threads without error {result['unraised']}, "
                     f"messages missing for {missing})")


def _bind(config):
    data, label = mx.sym.Variable("data"), mx.sym.Variable("label")
    logits, lkd = lgm_op.lgm(data, label, num_classes=K, **config["opts"])
    ex = mx.sym.Group([logits, lkd]).simple_bind(
        mx.cpu(), data=config["x"].shape, label=config["y"].shape,
        grad_req={"data": "write", "label": "null", "lgm_mean": "write", "lgm_log_var": "write"})
    for name, key in (("data", "x"), ("label", "y"), ("lgm_mean", "mu"), ("lgm_log_var", "s")):
        ex.arg_dict[name][:] = config[key]
    heads = [mx.nd.array(config["gz"]), mx.nd.array(config["gl"])]
    return ex, heads


def _run_executor(ex, heads, rounds):
    """Snapshots (asynchronous copies) of outputs and gradients after each training round."""
    snaps = []
    for _ in range(rounds):
        ex.forward(is_train=True)
        ex.backward(heads)
        snaps.append([a.copy() for a in ex.outputs + [ex.grad_dict[n] for n in
                                                       ("data", "lgm_mean", "lgm_log_var")]])
    return snaps


@pytest.mark.timeout(120)
def test_many_executors_in_flight_match_sequential_bitwise():
    configs = []
    for seed in range(8):
        job = _job_inputs(200 + seed, "float32")
        job["opts"] = dict(job["opts"], alpha=job["opts"].get("alpha") or 0.3,
                           margin_policy="step", margin_step=2, margin_gamma=2.0)
        configs.append(job)
    rounds = 4
    expected = []
    for config in configs:  # one executor at a time, each result waited for
        ex, heads = _bind(config)
        expected.append(_collect(_run_executor(ex, heads, rounds)))
        mx.nd.waitall()  # auxiliary states are read only after a full synchronisation
        assert ex.aux_dict["lgm_margin_iter"].asscalar() == rounds
    bound = [_bind(config) for config in configs]
    pending = [None] * len(bound)
    for r in range(rounds):  # every executor's rounds interleaved, nothing waited for
        for i, (ex, heads) in enumerate(bound):
            snaps = _run_executor(ex, heads, 1)
            pending[i] = (pending[i] or []) + snaps
    mx.nd.waitall()
    for i, want in enumerate(expected):
        assert bound[i][0].aux_dict["lgm_margin_iter"].asscalar() == rounds
        got = _collect(pending[i])
        assert len(got) == len(want)
        for g_arrays, w_arrays in zip(got, want):
            for g, w in zip(g_arrays, w_arrays):
                np.testing.assert_array_equal(g, w, err_msg=f"executor {i}")
    print(f"\n{len(bound)} executors x {rounds} rounds in flight: bitwise equal")


# ------------------------------------------------------------------------------------------------
# 3. Faults inside the operator during training
# ------------------------------------------------------------------------------------------------
BAD_LABELS = {2: float(K + 8), 4: -1.0, 5: 1.5, 7: np.nan}  # step -> injected label value


def _with_fault(y, value):
    y = y.copy()
    y[3] = value
    return y


def _drain():
    """Wait for everything in flight, collecting failures still on their way (at most a few)."""
    for _ in range(10):
        try:
            mx.nd.waitall()
            return
        except MXNetError:
            continue
    raise AssertionError("the engine keeps raising")


def _gluon_loop(data, faults, hybridize, policy, sync_before_backward=True):
    """Train on ``data``; a step whose loss raises is skipped. Returns (params, losses, errors).

    The recommended loop synchronises on the loss before queueing the backward pass. The other
    loop queues the backward first; then the failed step's backward is still queued when the
    error is caught, and since catching an MXNet error clears it on every array it reached, that
    backward may run later on unwritten inputs and fail in turn: such a loop must drain the engine
    (``_drain``) before the next step.
    """
    net, block, params = gluon_model(mx.cpu(), margin_policy=policy)
    if hybridize:
        net.hybridize()
        block.hybridize()
    trainer = gluon.Trainer(params, "sgd", dict(SGD_MOMENTUM))
    losses, errors = [], {}
    for step, (x, y) in enumerate(data):
        if step in faults:
            y = _with_fault(y, faults[step])
        with autograd.record():
            loss, _ = block(net(mx.nd.array(x)), mx.nd.array(y))
        try:
            if sync_before_backward:
                value = loss.asnumpy()  # the synchronisation point
                loss.backward()
            else:
                loss.backward()
                value = loss.asnumpy()
        except MXNetError as err:
            errors[step] = str(err)
            if not sync_before_backward:
                _drain()
            continue  # no optimizer step for a batch that failed
        trainer.step(x.shape[0])
        losses.append(value)
    return snapshot(params), losses, errors


def _check_fault_run(data, hybridize, policy, **loop):
    clean = [b for step, b in enumerate(data) if step not in BAD_LABELS]
    want_params, want_losses, no_errors = _gluon_loop(clean, {}, hybridize, policy, **loop)
    assert not no_errors
    got_params, got_losses, errors = _gluon_loop(data, BAD_LABELS, hybridize, policy, **loop)
    assert sorted(errors) == sorted(BAD_LABELS), {k: v[-200:] for k, v in errors.items()}
    for step, value in BAD_LABELS.items():
        text = errors[step]
        assert "lgm forward: ValueError" in text, text
        assert f"{LABEL_ERROR} {value} at index 3" in text, text
    mx.nd.waitall()  # the engine holds no stale failure
    assert len(got_losses) == len(want_losses)
    for got, want in zip(got_losses, want_losses):
        np.testing.assert_array_equal(got, want)
    for name in want_params:
        np.testing.assert_array_equal(got_params[name], want_params[name], err_msg=name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("policy", ["const", "step"])
def test_bad_batches_are_reported_and_leave_training_intact(hybridize, policy):
    """A bad label in the middle of training: an MXNetError with the operator's message at the
    loss, the step skipped, and afterwards the same losses and parameters as a run that never saw
    the bad batches (the margin schedule's counter included)."""
    _check_fault_run(batches(seed=3, steps=10), hybridize, policy)
    print(f"\n{len(BAD_LABELS)} faults injected ({'hybridized' if hybridize else 'imperative'}, "
          f"margin {policy}): parameters bitwise equal to the clean run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_bad_batches_with_backward_queued_need_a_drain(hybridize):
    _check_fault_run(batches(seed=9, steps=10), hybridize, "const", sync_before_backward=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["const", "step"])
def test_module_loop_skips_a_failing_batch(policy):
    data = batches(seed=4, steps=6)
    bad_step = 2

    def loop(skip_bad_entirely):
        mod = module([mx.cpu()], batch_size=12, margin_policy=policy)
        mod.init_optimizer(optimizer="sgd", optimizer_params=dict(SGD_MOMENTUM))
        errors = []
        for step, (x, y) in enumerate(data):
            if step == bad_step:
                if skip_bad_entirely:
                    continue
                y = _with_fault(y, float(K))
            mod.forward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]), is_train=True)
            try:
                mod.get_outputs()[1].wait_to_read()  # synchronise before backward and update
            except MXNetError as err:
                errors.append(str(err))
                continue
            mod.backward()
            mod.update()
        return module_params(mod), errors

    want, none = loop(True)
    got, errors = loop(False)
    assert not none and len(errors) == 1 and f"{LABEL_ERROR} {float(K)} at index 3" in errors[0]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ------------------------------------------------------------------------------------------------
# 4. Data parallelism over two devices
# ------------------------------------------------------------------------------------------------
TWO_CPUS = [mx.cpu(0), mx.cpu(1)]


@pytest.mark.timeout(120)
def test_gluon_two_devices_equal_one_device():
    data = batches(seed=5, steps=6, batch_size=16)
    runs = {}
    for ctxs in ([mx.cpu(0)], TWO_CPUS):
        net, block, params = gluon_model(ctxs)
        trainer = gluon.Trainer(params, "sgd", dict(SGD_MOMENTUM), kvstore="device")
        for x, y in data:
            gluon_step(net, block, trainer, x, y, ctxs)
        runs[len(ctxs)] = [snapshot(params, c) for c in ctxs]
    one, (first, second) = runs[1][0], runs[2]
    for name in first:  # the devices hold identical copies
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert first["lgm_margin_iter"][0] == len(data)
    for name in one:
        np.testing.assert_allclose(first[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    print(f"\nGluon, 2 devices vs 1: largest parameter difference "
          f"{max_difference(first, one):.3g}")


@pytest.mark.timeout(120)
def test_module_two_devices_equal_one_device():
    data = batches(seed=6, steps=6, batch_size=16)
    runs = {}
    for ctxs in ([mx.cpu(0)], TWO_CPUS):
        mod = module(ctxs, batch_size=16)
        mod.init_optimizer(kvstore="device", optimizer="sgd",
                           optimizer_params=dict(SGD_MOMENTUM))
        for x, y in data:
            mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
            mod.update()
        runs[len(ctxs)] = module_params(mod)
    one, two = runs[1], runs[2]
    assert one["lgm_margin_iter"][0] == two["lgm_margin_iter"][0] == len(data)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    print(f"\nModule, 2 devices vs 1: largest parameter difference {max_difference(two, one):.3g}")


# ------------------------------------------------------------------------------------------------
# 6. Checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_gluon_checkpoint_resumes_exactly(tmp_path):
    data = batches(seed=7, steps=8)
    half = len(data) // 2

    def train(net, block, trainer, part):
        losses = []
        for x, y in part:
            losses += [l.asnumpy() for l in gluon_step(net, block, trainer, x, y, [mx.cpu()])]
        return losses

    net, block, params = gluon_model(mx.cpu())
    trainer = gluon.Trainer(params, "sgd", dict(SGD_MOMENTUM))
    want_losses = train(net, block, trainer, data)
    want = snapshot(params)

    net, block, params = gluon_model(mx.cpu())
    trainer = gluon.Trainer(params, "sgd", dict(SGD_MOMENTUM))
    losses = train(net, block, trainer, data[:half])
    saved = snapshot(params)
    net.save_parameters(str(tmp_path / "net.params"))
    block.save_parameters(str(tmp_path / "lgm.params"))
    trainer.save_states(str(tmp_path / "trainer.states"))

    net, block, params = gluon_model(mx.cpu(), seed=99)  # other values, overwritten by the load
    net.load_parameters(str(tmp_path / "net.params"))
    block.load_parameters(str(tmp_path / "lgm.params"))
    loaded = snapshot(params)
    for name in saved:
        np.testing.assert_array_equal(loaded[name], saved[name], err_msg=name)
    assert loaded["lgm_margin_iter"][0] == half
    trainer = gluon.Trainer(params, "sgd", dict(SGD_MOMENTUM))
    trainer.load_states(str(tmp_path / "trainer.states"))
    losses += train(net, block, trainer, data[half:])
    got = snapshot(params)
    for g, w in zip(losses, want_losses):
        np.testing.assert_array_equal(g, w)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    print(f"\nGluon resume: largest parameter difference {max_difference(got, want):.3g}")


@pytest.mark.timeout(120)
def test_module_checkpoint_resumes_exactly(tmp_path):
    data = batches(seed=8, steps=8)
    half = len(data) // 2
    prefix = str(tmp_path / "lgm")

    def train(mod, part):
        for x, y in part:
            mod.forward_backward(mx.io.DataBatch([mx.nd.array(x)], [mx.nd.array(y)]))
            mod.update()

    mod = module([mx.cpu()], batch_size=12)
    mod.init_optimizer(optimizer="sgd", optimizer_params=dict(SGD_MOMENTUM))
    train(mod, data)
    want = module_params(mod)

    mod = module([mx.cpu()], batch_size=12)
    mod.init_optimizer(optimizer="sgd", optimizer_params=dict(SGD_MOMENTUM))
    train(mod, data[:half])
    saved = module_params(mod)
    mod.save_checkpoint(prefix, half, save_optimizer_states=True)

    sym, arg, aux = mx.model.load_checkpoint(prefix, half)
    assert sym.tojson() == mod.symbol.tojson()
    node = sym.attr_dict()["lgm"]
    assert node["op_type"] == "lgm" and node["margin_policy"] == "step", node
    for name, value in list(arg.items()) + list(aux.items()):
        np.testing.assert_array_equal(value.asnumpy(), saved[name], err_msg=name)
    assert aux["lgm_margin_iter"].asscalar() == half

    resumed = mx.mod.Module.load(prefix, half, load_optimizer_states=True, data_names=["data"],
                                 label_names=["label"], context=[mx.cpu()])
    resumed.bind(data_shapes=[("data", (12, IN_UNITS))], label_shapes=[("label", (12,))])
    resumed.init_optimizer(optimizer="sgd", optimizer_params=dict(SGD_MOMENTUM))
    train(resumed, data[half:])
    got = module_params(resumed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    print(f"\nModule resume: largest parameter difference {max_difference(got, want):.3g}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_add_up_schedule_advances_from_any_base(alpha):
    """margin_policy='add': alpha(t) = alpha + gamma * (t // step), also from a base of 0 (a
    margin that grows from nothing); the counter in margin_iter advances at every training
    forward so a checkpoint resumes the schedule."""
    gamma, steps = 0.5, 4
    block = lgm_op.LGMLoss(K, in_units=D, alpha=alpha, margin_policy="add", margin_gamma=gamma,
                           margin_step=1)
    block.initialize()
    rng = np.random.default_rng(11)
    x = mx.nd.array(rng.normal(size=(6, D)))
    y = mx.nd.array(rng.integers(0, K, 6))
    with autograd.predict_mode():
        plain = block(x, y)[1].asnumpy()  # no margin outside training
    rows = np.arange(6)
    labels = y.asnumpy().astype(int)
    for t in range(steps):
        with autograd.record():
            logits = block(x, y)[1].asnumpy()
        margin = block.schedule.value(alpha, t)
        assert margin == alpha + gamma * t
        # logits[i, y_i] = -(1 + margin) d = (1 + margin) * (plain + half log-det) - half log-det
        half_ld = 0.5 * np.clip(block.log_var.data().asnumpy(), -6, 6).sum(axis=1)[labels]
        want = (1 + margin) * (plain[rows, labels] + half_ld) - half_ld
        np.testing.assert_allclose(logits[rows, labels], want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"iteration {t}")
    assert block.margin_iter.data().asscalar() == steps


# ------------------------------------------------------------------------------------------------
# 7. Inputs that must never be run as code, and files that must come from the package
# ------------------------------------------------------------------------------------------------
ATTRIBUTES = ["num_classes", "alpha", "logvar_min", "logvar_max", "logdet_logits", "logdet_lkd",
              "isotropic", "with_label", "margin_policy", "margin_gamma", "margin_step",
              "margin_max"]


def _payload(marker):
    return f"__import__('os').system('touch {marker}')"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ATTRIBUTES)
def test_attribute_is_never_evaluated(name, tmp_path):
    marker = tmp_path / "pwned"
    payload = _payload(marker)
    attrs = {"num_classes": K, name: payload}
    names_it = rf"lgm: attributes? (\w+ and )?{name}\b"
    with pytest.raises(ValueError, match=names_it):
        lgm_op.LGMLoss(**attrs)
    x, y = mx.nd.ones((3, 2)), mx.nd.array([0, 1, 2])
    with pytest.raises(MXNetError, match=names_it):
        out = mx.nd.Custom(x, y, mx.nd.zeros((K, 2)), mx.nd.zeros((K, 2)), op_type="lgm",
                           **{k: str(v) for k, v in attrs.items()})
        out[0].asnumpy()
    sym = mx.sym.Custom(mx.sym.Variable("data"), mx.sym.Variable("label"),
                        mx.sym.Variable("mean"), mx.sym.Variable("log_var"), op_type="lgm",
                        name="lgm", **{k: str(v) for k, v in attrs.items()})
    loaded = mx.sym.load_json(sym.tojson())  # a saved graph carrying the payload
    with pytest.raises(MXNetError, match=names_it):
        loaded.infer_shape(data=(3, 2), label=(3,))
    mx.nd.waitall()
    assert not marker.exists()


def test_package_source_has_no_code_evaluation():
    pattern = re.compile(r"(?<![\w.])(eval|exec)\s*\(|\bpickle\.loads?\b|\bmarshal\.loads?\b|"
                         r"\byaml\.load\b|\bshelve\b")
    hits = []
    for path in sorted((ROOT / "lgm_op").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.timeout(60)
def test_kernel_sources_come_from_the_package(tmp_path):
    """A ``kernels/`` folder in the working directory or named by the environment is ignored."""
    decoy = tmp_path / "kernels"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    marker = "DECOY_KERNEL_SOURCE"
    for name in ("lgm_forward.cu", "lgm_backward.cu", "lgm_labels.cu", "lgm_common.cuh"):
        (decoy / name).write_text(f"// {marker}\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("LGM_OP_KERNELS", "LGM_OP_KERNELS_DIR", "LGM_KERNELS_DIR", "KERNELS_DIR"):
        env[var] = str(decoy)
    script = (
        "import json, pathlib, lgm_op, lgm_op.kernel_source as ks\n"
        "folder = ks.kernels_dir()\n"
        "package = pathlib.Path(lgm_op.__file__).resolve().parent\n"
        "texts = {p.name: ks.load_source(p.name) for p in sorted(folder.iterdir())\n"
        "         if p.suffix in ('.cu', '.cuh')}\n"
        "print(json.dumps({'folder': str(folder.resolve()), 'package': str(package),\n"
        "                  'texts': texts}))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    folder, package = Path(result["folder"]), Path(result["package"])
    # installed: lgm_op/kernels; source checkout: kernels/ beside lgm_op/
    assert folder in (package / "kernels", package.parent / "kernels"), folder
    assert package.parent != tmp_path.resolve()
    assert tmp_path.resolve() not in folder.parents and folder != decoy.resolve()
    assert result["texts"], "no kernel sources found"
    assert all(marker not in text for text in result["texts"].values())


@pytest.mark.parametrize("name", ["../kernels/lgm_forward.cu", "/etc/passwd", ".hidden.cu",
                                  "..\\lgm_forward.cu"])
def test_kernel_source_names_cannot_leave_the_folder(name):
    from lgm_op.kernel_source import load_source
    with pytest.raises(ValueError, match="plain file name"):
        load_source(name)


@pytest.fixture
def cudasim():
    import lgm_op.cudasim as module
    return module


def test_simulator_cache_is_private_to_the_user(cudasim, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = Path(cudasim.cache_dir())
    assert path == tmp_path / "cache" / "lgm_op" / "cudasim"
    st = path.stat()
    assert st.st_uid == os.getuid() and st.st_mode & 0o077 == 0, oct(st.st_mode)

    path.chmod(0o777)  # another user could plant compiled modules here: refused
    with pytest.raises(RuntimeError, match="writable by other users"):
        cudasim.cache_dir()
    path.chmod(0o700)
    if os.getuid() == 0:  # as root, also a folder that belongs to someone else
        os.chown(path, 4321, -1)
        with pytest.raises(RuntimeError, match="owned by uid 4321"):
            cudasim.cache_dir()


def test_simulator_cache_defaults_to_the_home_folder(cudasim, tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    path = Path(cudasim.cache_dir())
    assert path == tmp_path / "home" / ".cache" / "lgm_op" / "cudasim"
    assert (tmp_path / "work") not in path.parents
