"""The CPU path's compiled passes (kernels/lgm_cpu.cpp through lgm_op.cpu_kernels): the same
results as the NumPy fallback, operands kept for the backward only while the inputs are the same
bytes, sizes where the passes run on several threads, concurrent calls, bad arrays refused before
any raw memory is touched, and the choice between the two implementations."""
import threading
import warnings

import numpy as np
import pytest

from common import assert_close, cpu_kernels_env, make_inputs, option_sets
import lgm_op.cpu as cpu
from lgm_op import compile_cache, cpu_kernels
from lgm_op.cpu import CPUState, lgm_backward_cpu, lgm_forward_cpu
from lgm_op.options import LGMOptions

NAMES = ("logits", "lkd", "dx", "dmean", "dlog_var")
SHAPES = [(1, 1, 1), (7, 13, 33), (129, 10, 2), (300, 257, 40), (65, 1100, 31)]


@pytest.fixture(params=["default", "threaded"])
def threading_mode(request):
    """The passes at their default threshold (these sizes run on the calling thread), then with
    every pass on several OpenMP threads, however small."""
    lib = cpu_kernels.kernels() if request.param == "threaded" else None
    if lib is None:
        yield request.param
        return
    previous = lib.set_parallel_work(1)
    try:
        yield request.param
    finally:
        lib.set_parallel_work(previous)


def _step(inp, opts, training=True, label=True, state=None, need=(True, True, True)):
    y = inp["y"] if label else None
    logits, lkd = lgm_forward_cpu(inp["x"], y, inp["mu"], inp["s"], opts, training, state=state)
    y_used = inp["y"] if label else np.argmax(logits, axis=1)
    grads = lgm_backward_cpu(inp["x"], y_used, inp["mu"], inp["s"], inp["gz"], inp["gl"], opts,
                             training, need=need, state=state)
    return (logits, lkd) + tuple(grads)


def _both(inp, opts, **kwargs):
    with cpu_kernels_env("1"):
        compiled = _step(inp, opts, **kwargs)
    with cpu_kernels_env("0"):
        numpy_path = _step(inp, opts, **kwargs)
    return compiled, numpy_path


def _cast(inp, dtype):
    return {key: (v.astype(dtype) if key != "y" else v) for key, v in inp.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_equals_numpy_path(shape, dtype, rng, seed, threading_mode):
    n, k, d = shape
    for opts in option_sets(k):
        inp = _cast(make_inputs(rng, n, k, d, isotropic=opts.isotropic), dtype)
        for label in (True, False):
            if not label and opts.with_label is False:
                continue
            compiled, numpy_path = _both(inp, opts, label=label, state=CPUState())
            # each meets its dtype's rule against float64 (test_cpu.py, test_families.py); against
            # each other: float64 to 1e-12; float32 to a few roundings of the largest term of
            # each sum (the two sum in different orders, and a gradient entry may cancel)
            rtol, atol_scale = (1e-12, 1e-14) if dtype == np.float64 else (2e-5, 2e-5)
            for name, a, b in zip(NAMES, compiled, numpy_path):
                assert a.dtype == dtype, name
                assert_close(a, b, rtol, f"{name} {shape} {opts} label={label}", seed,
                             atol_scale=atol_scale)


@pytest.mark.parametrize("keep_bytes,owned", [(None, False), (0, False), (None, True)])
@pytest.mark.parametrize("changed", ["x", "mu", "s", "y"])
def test_backward_uses_its_own_inputs(changed, keep_bytes, owned, rng, seed, monkeypatch):
    """A backward whose inputs differ from its forward's (even by one entry) computes on its own
    inputs, whether the forward saved its operands (small inputs) or not (keep_bytes=0), and for
    an owned state (other arrays: built again)."""
    if keep_bytes is not None:
        monkeypatch.setattr(cpu, "_KEEP_BYTES", keep_bytes)
    opts = LGMOptions(num_classes=6)
    inp = make_inputs(rng, 40, 6, 9)
    other = {key: v.copy() for key, v in inp.items()}
    if changed == "y":
        other["y"][5] = (other["y"][5] + 1) % 6
    else:
        other[changed].reshape(-1)[5] += 0.25
    with cpu_kernels_env("1"):
        state = CPUState(owned=owned)
        lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True, state=state)
        got = lgm_backward_cpu(other["x"], other["y"], other["mu"], other["s"], other["gz"],
                               other["gl"], opts, True, state=state)
        want = lgm_backward_cpu(other["x"], other["y"], other["mu"], other["s"], other["gz"],
                                other["gl"], opts, True)
    for name, a, b in zip(NAMES[2:], got, want):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} after changing {changed}")


def test_saved_operands_give_the_same_bits(rng, monkeypatch):
    opts = LGMOptions(num_classes=9)
    inp = make_inputs(rng, 50, 9, 17)
    builds = []
    build = cpu._CompiledOperands.build.__func__
    monkeypatch.setattr(cpu._CompiledOperands, "build", classmethod(
        lambda cls, *args: builds.append(1) or build(cls, *args)))

    def counted(**kwargs):
        builds.clear()
        return _step(inp, opts, **kwargs), len(builds)
    with cpu_kernels_env("1"):
        (kept, kept_builds), (owned, owned_builds) = (
            counted(state=CPUState()), counted(state=CPUState(owned=True)))
        plain, plain_builds = counted()
        # an owned state keeps its operands at any size, without copies of the inputs
        monkeypatch.setattr(cpu, "_KEEP_BYTES", 0)
        (rebuilt, rebuilt_builds), (owned_big, owned_big_builds) = (
            counted(state=CPUState()), counted(state=CPUState(owned=True)))
    assert (kept_builds, owned_builds, plain_builds, rebuilt_builds, owned_big_builds) == (
        1, 1, 2, 2, 1)
    for name, *results in zip(NAMES, kept, rebuilt, plain, owned, owned_big):
        for other in results[1:]:
            np.testing.assert_array_equal(results[0], other, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_products_give_the_same_answer(dtype, rng, seed):
    """A matmul that takes the forward's two products as one batch (``batched = True``, as the
    PyTorch binding's torch.bmm) gives what the two products one after the other give, and the
    backward reusing the batch's buffer is unchanged, on odd shapes and every option set."""
    calls = []

    def batched(a, b, out):
        calls.append(a.ndim)
        return np.matmul(a, b, out=out)
    batched.batched = True
    for n, k, d in [(1, 1, 1), (7, 13, 33), (65, 11, 40)]:
        for opts in option_sets(k):
            inp = _cast(make_inputs(rng, n, k, d, isotropic=opts.isotropic), dtype)
            with cpu_kernels_env("1"):
                results = []
                for matmul in (None, batched):
                    logits, lkd = lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], opts,
                                                  True, matmul=matmul)
                    grads = lgm_backward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"],
                                             inp["gl"], opts, True, matmul=matmul)
                    results.append((logits, lkd) + tuple(grads))
            rtol, atol_scale = (1e-12, 1e-14) if dtype == np.float64 else (2e-5, 2e-5)
            for name, a, b in zip(NAMES, *results):
                assert_close(a, b, rtol, f"{name} {(n, k, d)} {opts}", seed,
                             atol_scale=atol_scale)
    assert 3 in calls


def test_a_threads_own_parallel_threshold():
    """set_thread_parallel_work lowers the threshold for the calling thread only (the lower of
    it and the process-wide one applies), and 0 takes it back."""
    lib = cpu_kernels.kernels()
    if lib is None:
        pytest.skip("the compiled passes are not available")
    seen = {}

    def in_thread(function):    # fresh threads: no threshold of their own yet
        t = threading.Thread(target=lambda: seen.setdefault(function.__name__, function()))
        t.start()
        t.join()
        return seen[function.__name__]

    def other_thread():
        return lib.threads_for(1 << 12)

    def own_thread():
        many = lib.threads_for(1 << 40)   # above any threshold: this thread's OpenMP count
        got = [many, lib.threads_for(1 << 12), lib.set_thread_parallel_work(1 << 12)]
        got += [lib.threads_for(1 << 12), lib.threads_for((1 << 12) - 1), in_thread(other_thread)]
        previous = lib.set_parallel_work(1 << 10)   # lower still: the process-wide one applies
        try:
            got.append(lib.threads_for(1 << 10))
        finally:
            lib.set_parallel_work(previous)
        got += [lib.set_thread_parallel_work(0), lib.threads_for(1 << 12)]
        return got
    many, *got = in_thread(own_thread)
    assert got == [1, 0, many, 1, 1, many, 1 << 12, 1]


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)])
def test_only_needed_gradients(need, rng, seed):
    opts = LGMOptions(num_classes=7)
    inp = make_inputs(rng, 30, 7, 40)
    with cpu_kernels_env("1"):
        full = _step(inp, opts)[2:]
        part = _step(inp, opts, need=need)[2:]
    for name, wanted, a, b in zip(NAMES[2:], need, part, full):
        if wanted:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a is None, name


def test_concurrent_calls_from_threads(rng, threading_mode):
    """Calls on several threads at once (each with its own OpenMP team) give each its own answer."""
    opts = LGMOptions(num_classes=300)
    inputs = [make_inputs(np.random.default_rng(i), 200, 300, 24) for i in range(4)]
    with cpu_kernels_env("1"):
        want = [_step(inp, opts) for inp in inputs]
        got = [None] * len(inputs)

        def work(i):
            for _ in range(3):
                got[i] = _step(inputs[i], opts, state=CPUState())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # the BLAS may split a product differently while other threads use it: equal to rounding
    for w, g in zip(want, got):
        for name, a, b in zip(NAMES, g, w):
            assert_close(a, b, 1e-12, name, 0, atol_scale=1e-13)


def test_bad_arrays_are_refused_before_the_passes(rng):
    opts = LGMOptions(num_classes=4)
    inp = make_inputs(rng, 6, 4, 3)
    with cpu_kernels_env("1"):
        with pytest.raises(ValueError, match=r"lgm: out logits must have shape \(6, 4\), got \(6, 5\)"):
            lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True,
                            out=(np.empty((6, 5)), None))
        with pytest.raises(ValueError, match="lgm: out lkd must be a writeable C-contiguous float64"):
            lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True,
                            out=(None, np.empty(12)[::2]))
        with pytest.raises(ValueError, match=r"lgm: mean must have shape \(4, 3\), got \(3, 3\)"):
            lgm_forward_cpu(inp["x"], inp["y"], inp["mu"][:3], inp["s"], opts, True)
        with pytest.raises(ValueError, match=r"lgm: grad_logits must have shape \(6, 4\), got \(6, 3\)"):
            lgm_backward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"][:, :3], inp["gl"],
                             opts, True)
        with pytest.raises(ValueError, match="lgm: data must be float32 or float64, got float16"):
            lgm_forward_cpu(inp["x"].astype(np.float16), inp["y"], inp["mu"], inp["s"], opts, True)


def test_mixed_dtypes_are_computed_in_the_data_dtype(rng):
    opts = LGMOptions(num_classes=5)
    inp = make_inputs(rng, 8, 5, 4)
    x32 = inp["x"].astype(np.float32)
    with cpu_kernels_env("1"):
        logits, lkd = lgm_forward_cpu(x32, inp["y"], inp["mu"], inp["s"], opts, True)
        want, _ = lgm_forward_cpu(x32, inp["y"], inp["mu"].astype(np.float32),
                                  inp["s"].astype(np.float32), opts, True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits, want)


@pytest.mark.parametrize("value", ["", "2", "yes", "auto"])
def test_bad_environment_value_is_an_error(value, monkeypatch, rng):
    monkeypatch.setenv("LGM_OP_CPU_KERNELS", value)
    inp = make_inputs(rng, 3, 2, 2)
    with pytest.raises(ValueError, match=f"lgm: environment variable LGM_OP_CPU_KERNELS must be "
                                         f"unset, 1 .* or 0 .*, got {value!r}"):
        lgm_forward_cpu(inp["x"], inp["y"], inp["mu"], inp["s"], LGMOptions(num_classes=2), True)


def test_without_a_compiler(monkeypatch, rng, seed):
    """No compiler: unset gives the NumPy path with one warning naming the cause; =1 is an error."""
    def fail(*args, **kwargs):
        raise compile_cache.CompileError("cpu: the compiler 'g++' was not found")

    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(compile_cache, "build_shared_object", fail)
    monkeypatch.delenv("LGM_OP_CPU_KERNELS", raising=False)
    opts = LGMOptions(num_classes=3)
    inp = make_inputs(rng, 5, 3, 4)
    with pytest.warns(RuntimeWarning, match="compiled CPU passes are unavailable .*'g\\+\\+' was "
                                            "not found.*NumPy alone"):
        got = _step(inp, opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(inp, opts)                      # warned once per process
    with cpu_kernels_env("0"):
        want = _step(inp, opts)
    for name, a, b in zip(NAMES, got, want):
        np.testing.assert_array_equal(a, b, err_msg=name)
    with cpu_kernels_env("1"):
        with pytest.raises(RuntimeError, match="LGM_OP_CPU_KERNELS=1 asks for the compiled CPU "
                                               "passes, which are unavailable: .*not found"):
            _step(inp, opts)


def test_buffers_given_back_by_the_garbage_collector_inside_a_take():
    """A pool collected by the cycle collector while another pool takes a buffer (the collector
    can run at any allocation, with the free list's lock held) gives its buffers back on the
    same thread: no deadlock. The collection is made to happen at that moment by a shape whose
    hash (taken under the lock) runs the collector."""
    import gc

    class CollectingShape(tuple):
        def __hash__(self):
            gc.collect()
            return tuple.__hash__(self)

    done = threading.Event()

    def work():
        pool = cpu._Pool()
        pool.get("a", (3, 4), np.float32)
        pool.cycle = pool                 # only the cycle collector frees it
        del pool
        cpu._FREE.take(CollectingShape((5, 6)), np.float64)
        done.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert done.is_set(), "taking a buffer deadlocked against a pool's __del__"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.int16,
                                   np.uint8, np.float16])
def test_compiled_label_check_agrees_with_numpy(dtype):
    """One pass converts and checks the labels: the same ids, and for a bad value the same
    error, as checks.validate_labels_numpy (other dtypes go to it directly)."""
    from lgm_op.checks import validate_labels_numpy
    lib = cpu_kernels.kernels()
    k = 7
    good = np.array([0, 6, 3, 3, 1, 0, 5], dtype)
    np.testing.assert_array_equal(lib.labels(good, k), validate_labels_numpy(good, k))
    assert lib.labels(good, k).dtype == np.int64
    assert lib.labels(good[:0], k).shape == (0,)
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    bad_values = [7, int(info.max)] + ([-1, int(info.min)] if info.min < 0 else [])
    if np.dtype(dtype).kind == "f":
        bad_values += [np.nan, np.inf, -np.inf, 2.5, -0.5, 6.999]
    for value in bad_values:
        for where in (0, 3, 6):
            labels = good.copy()
            labels[where] = value
            with pytest.raises(ValueError) as want:
                validate_labels_numpy(labels, k)
            with pytest.raises(ValueError) as got:
                lib.labels(labels, k)
            assert str(got.value) == str(want.value)
            assert f"at index {where}" in str(got.value)
    # a strided view is checked as well
    view = np.repeat(good, 2)[::2]
    np.testing.assert_array_equal(lib.labels(view, k), good.astype(np.int64))
