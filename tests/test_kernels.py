"""The CUDA kernels, through ``lgm_forward_cuda`` / ``lgm_backward_cuda``, against the float64
NumPy reference (SPEC section 5). Framework-free: no MXNet.

Every test body runs on two backends: ``sim`` (NumPy arrays on the CPU simulator, always) and
``gpu`` (CuPy arrays, skipped without a usable GPU). float64 must agree to rtol 1e-9; float32 is
judged by the float32 rule against the float64 answer for the same float32-rounded inputs, with
the reference's broadcasting formula evaluated in float32 as the yardstick.
"""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common import (DTYPES, RTOL64, SHAPES, SMALL_SHAPES, assert_close, assert_float32_rule,
                    make_inputs, option_sets)
from lgm_op.cuda import ensure_nvrtc, lgm_backward_cuda, lgm_forward_cuda
from lgm_op.options import LGMOptions
from lgm_op.reference import numpy_forward, numpy_grads

NAMES = ("logits", "lkd", "dx", "dmean", "dlog_var")
ROOT = Path(__file__).resolve().parent.parent

# Sizes on both sides of the 64-wide tiles and the 16-long steps, with several blocks per grid
# in each direction; (N, K, D).
TILE_SHAPES = [(16, 16, 16), (64, 64, 64), (63, 65, 15), (1, 129, 65), (130, 2, 129)]
# Large enough that the backward kernels split their loops over gridDim.z on the simulator.
SPLIT_SHAPES = [(257, 1000, 3), (1000, 17, 300)]


def shape_id(shape):
    return "x".join(map(str, shape))


def _gpu_skip_reason():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - any import failure means no GPU backend
        return f"CuPy is not importable ({exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, a driver too old for any device, ...
        count = 0
    if count == 0:
        return "no CUDA GPU on this machine"
    try:
        ensure_nvrtc()
    except Exception as exc:  # noqa: BLE001
        return f"NVRTC is not loadable ({exc})"
    return None


@pytest.fixture(scope="session", params=["sim", "gpu"])
def backend(request):
    """to_device / to_host move NumPy arrays to the backend's arrays and back."""
    if request.param == "sim":
        return SimpleNamespace(name="sim", to_device=np.asarray, to_host=np.asarray)
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    import cupy
    return SimpleNamespace(name="gpu", to_device=cupy.asarray, to_host=cupy.asnumpy)


def run_kernels(backend, inp, opts, training, with_label=True):
    """(logits, lkd, dx, dmean, dlog_var) as NumPy arrays from the kernels. The label-free form
    differentiates with the classes it predicted, as the operator does."""
    dev = {key: backend.to_device(v) for key, v in inp.items()}
    label = dev["y"] if with_label else None
    logits, lkd = lgm_forward_cuda(dev["x"], label, dev["mu"], dev["s"], opts, training)
    used = label if with_label else backend.to_device(np.argmax(backend.to_host(logits), axis=1))
    grads = lgm_backward_cuda(dev["x"], used, dev["mu"], dev["s"], dev["gz"], dev["gl"], opts,
                              training)
    out = tuple(backend.to_host(a) for a in (logits, lkd) + tuple(grads))
    for name, a in zip(NAMES, out):
        assert a.dtype == inp["x"].dtype, f"{name}: dtype {a.dtype} != {inp['x'].dtype}"
    return out


def broadcast_reference(inp, opts, training, with_label=True, dtype=None):
    """SPEC 1-2 by broadcasting, in ``dtype`` (default: the inputs' own, the float32 yardstick)."""
    dtype = inp["x"].dtype if dtype is None else dtype
    x, mu, s, gz, gl = (inp[key] for key in ("x", "mu", "s", "gz", "gl"))
    logits, lkd = numpy_forward(x, inp["y"] if with_label else None, mu, s, opts, training,
                                dtype=dtype)
    y = inp["y"] if with_label else np.argmax(logits, axis=1)
    return (logits, lkd) + numpy_grads(x, y, mu, s, gz, gl, opts, training, dtype=dtype)


def float64_answer(inp, opts, training, with_label=True):
    """The float64 reference for the given (possibly float32-rounded) inputs."""
    return broadcast_reference(inp, opts, training, with_label, dtype=np.float64)


def check_against_reference(backend, inp, opts, training, seed, with_label=True):
    got = run_kernels(backend, inp, opts, training, with_label)
    want = float64_answer(inp, opts, training, with_label)
    context = f"{opts} training={training} label={with_label}"
    if inp["x"].dtype == np.float64:
        for name, a, b in zip(NAMES, got, want):
            assert_close(a, b, RTOL64, f"{name} {context}", seed)
    else:
        yardstick = broadcast_reference(inp, opts, training, with_label)
        for name, a, b, r in zip(NAMES, got, want, yardstick):
            assert_float32_rule(a, b, r, f"{name} {context}", seed)
    return got


def inputs(rng, shape, dtype, isotropic=False, **kwargs):
    n, k, d = shape
    return make_inputs(rng, n, k, d, dtype=dtype, isotropic=isotropic, **kwargs)


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_option(backend, shape, dtype, training, rng, seed):
    for opts in option_sets(shape[1]):
        inp = inputs(rng, shape, dtype, opts.isotropic)
        for with_label in (True, False):
            check_against_reference(backend, inp, opts, training, seed, with_label)


@pytest.mark.parametrize("shape", SHAPES + TILE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
def test_shapes(backend, shape, dtype, isotropic, rng, seed):
    opts = LGMOptions(num_classes=shape[1], isotropic=isotropic)
    check_against_reference(backend, inputs(rng, shape, dtype, isotropic), opts, True, seed)


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=shape_id)
def test_label_free_large(backend, shape, rng, seed):
    opts = LGMOptions(num_classes=shape[1], with_label=False, logdet_lkd=False)
    check_against_reference(backend, inputs(rng, shape, "float64"), opts, True, seed,
                            with_label=False)


@pytest.mark.parametrize("label_dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_label_dtypes(backend, label_dtype, rng, seed):
    inp = inputs(rng, (33, 7, 5), "float64", label_dtype=label_dtype)
    check_against_reference(backend, inp, LGMOptions(num_classes=7), True, seed)


@pytest.mark.parametrize("bad, label_dtype", [
    (2.5, np.float32), (-1.0, np.float32), (7.0, np.float64), (np.nan, np.float32),
    (np.inf, np.float64), (-1, np.int32), (7, np.int64)])
def test_bad_labels(backend, bad, label_dtype, rng):
    """The forward kernel checks the labels; the first bad index is reported, at once or by the
    deferred check. The backward does not check again and stays in bounds."""
    n, k, d = 300, 7, 3
    inp = inputs(rng, (n, k, d), "float32", label_dtype=label_dtype)
    where = 260  # in the fifth row tile, with a later bad label that must not win
    inp["y"][where] = bad
    inp["y"][n - 1] = bad
    dev = {key: backend.to_device(v) for key, v in inp.items()}
    opts = LGMOptions(num_classes=k)
    message = re.escape(f"lgm: label must hold integers in [0, {k}), got ") + r".+" + re.escape(
        f" at index {where}")
    with pytest.raises(ValueError, match=message):
        lgm_forward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], opts, True)
    *_, check = lgm_forward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], opts, True,
                                 defer_check=True)
    with pytest.raises(ValueError, match=message):
        check()
    grads = lgm_backward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], dev["gz"], dev["gl"],
                              opts, True)
    assert all(np.isfinite(backend.to_host(g)).all() for g in grads)
    # the next valid call gives the right answer
    inp["y"][[where, n - 1]] = 0
    check_against_reference(backend, inp, opts, True, 0)


def test_deferred_check_of_good_labels_passes(backend, rng):
    inp = inputs(rng, (33, 7, 5), "float64")
    dev = {key: backend.to_device(v) for key, v in inp.items()}
    logits, lkd, check = lgm_forward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"],
                                          LGMOptions(num_classes=7), True, defer_check=True)
    assert check() is None and logits.shape == (33, 7) and lkd.shape == (33,)


@pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
def test_out_buffers_and_needed_gradients(backend, isotropic, rng, seed):
    """Results land in the given buffers; gradients not needed are None and not computed (their
    buffers stay untouched), the others equal the full call's."""
    shape = (257, 1000, 3)  # large enough for the split loops
    inp = inputs(rng, shape, "float64", isotropic)
    opts = LGMOptions(num_classes=shape[1], isotropic=isotropic)
    dev = {key: backend.to_device(v) for key, v in inp.items()}
    args = (dev["x"], dev["y"], dev["mu"], dev["s"])
    full = run_kernels(backend, inp, opts, True)
    xp = np if backend.name == "sim" else __import__("cupy")
    out = (xp.full(full[0].shape, 7.0), xp.full(full[1].shape, 7.0))
    got = lgm_forward_cuda(*args, opts, True, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    for name, a, b in zip(NAMES[:2], got, full[:2]):
        assert np.array_equal(backend.to_host(a), b), name
    for need in [(True, False, False), (False, True, False), (False, False, True),
                 (False, True, True), (False, False, False)]:
        bufs = tuple(xp.full(a.shape, 7.0) for a in full[2:])
        grads = lgm_backward_cuda(*args, dev["gz"], dev["gl"], opts, True, need=need, out=bufs)
        for wanted, name, g, buf, ref in zip(need, NAMES[2:], grads, bufs, full[2:]):
            if wanted:
                assert g is buf and np.array_equal(backend.to_host(g), ref), (name, need)
            else:
                assert g is None and np.all(backend.to_host(buf) == 7.0), (name, need)


def test_out_buffers_are_checked(backend, rng):
    inp = inputs(rng, (5, 3, 4), "float64")
    dev = {key: backend.to_device(v) for key, v in inp.items()}
    xp = np if backend.name == "sim" else __import__("cupy")
    opts = LGMOptions(num_classes=3)
    with pytest.raises(ValueError, match=r"out logits must have shape \(5, 3\) and dtype "
                                         r"float64, got \(5, 4\) float64"):
        lgm_forward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], opts, True,
                         out=(xp.empty((5, 4)), None))
    with pytest.raises(ValueError, match="out dx must be C-contiguous"):
        lgm_backward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], dev["gz"], dev["gl"], opts,
                          True, out=(xp.empty((4, 5)).T, None, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_class_only_and_empty_classes(backend, dtype, rng, seed):
    n, k, d = 70, 70, 9
    inp = inputs(rng, (n, k, d), dtype)
    inp["y"][:] = 3  # every sample in class 3; the other 69 classes have none
    for opts in (LGMOptions(num_classes=k), LGMOptions(num_classes=k, isotropic=True)):
        inp_opts = dict(inp, s=inputs(rng, (n, k, d), dtype, opts.isotropic)["s"])
        check_against_reference(backend, inp_opts, opts, True, seed)


@pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
def test_clamp_boundaries(backend, isotropic, rng, seed):
    """Gradient passes on the closed interval [logvar_min, logvar_max] and nowhere outside."""
    n, k, d = 20, 6, 4
    inp = inputs(rng, (n, k, d), "float64", isotropic, clamp_some=False)
    flat = inp["s"].reshape(-1)
    flat[:4] = [-2.0, 2.0, -2.0 - 1e-12, 2.0 + 1e-12]
    opts = LGMOptions(num_classes=k, logvar_min=-2.0, logvar_max=2.0, isotropic=isotropic)
    ds = check_against_reference(backend, inp, opts, True, seed)[4].reshape(-1)
    assert np.all(ds[:2] != 0) and np.all(ds[2:4] == 0), ds[:4]


def test_empty_batch(backend):
    opts = LGMOptions(num_classes=3)
    rng = np.random.default_rng(0)
    inp = inputs(rng, (0, 3, 5), "float32")
    got = run_kernels(backend, inp, opts, True)
    assert [a.shape for a in got] == [(0, 3), (0,), (0, 5), (3, 5), (3, 5)]
    assert all(np.all(a == 0) for a in got[3:])


@pytest.mark.parametrize("isotropic", [False, True], ids=["diag", "iso"])
def test_bitwise_reproducible(backend, isotropic, rng):
    """The split loops and the isotropic reduction add partials in a fixed order."""
    inp = inputs(rng, (1000, 17, 300), "float32", isotropic)
    opts = LGMOptions(num_classes=17, isotropic=isotropic)
    first = run_kernels(backend, inp, opts, True)
    second = run_kernels(backend, inp, opts, True)
    for name, a, b in zip(NAMES, first, second):
        assert np.array_equal(a, b, equal_nan=True), name


def test_nan_in_data_propagates(backend, rng):
    inp = inputs(rng, (5, 3, 4), "float64")
    inp["x"][2, 1] = np.nan
    logits, lkd, dx, dmu, _ = run_kernels(backend, inp, LGMOptions(num_classes=3), True)
    assert np.isnan(logits[2]).all() and np.isnan(lkd[2]) and np.isnan(dx[2, 1])
    assert np.isnan(dmu[:, 1]).all()
    rows = [0, 1, 3, 4]
    assert np.isfinite(logits[rows]).all() and np.isfinite(dx[rows]).all()


# SPEC 5 input families beyond standard normals, (N, K, D) each: features within 1e-4 of their
# class mean, features and means offset together, 2-D classes far apart with samples close to
# their mean, log-variances at and beyond both clamp bounds.
def family_inputs(rng, family, dtype):
    if family == "classes_apart":
        n, k, d = 130, 17, 2
    else:
        n, k, d = 70, 65, 33
    inp = inputs(rng, (n, k, d), "float64", clamp_some=False)
    y = inp["y"].astype(int)
    if family == "near_mean":
        inp["x"] = inp["mu"][y] + 1e-4 * rng.standard_normal((n, d))
    elif family.startswith("offset"):
        offset = float(family.split("_")[1])
        inp["x"] += offset
        inp["mu"] += offset
    elif family == "classes_apart":
        spacing = np.logspace(2, 4, k)[:, None]  # 1e2 to 1e4 apart
        inp["mu"] = np.cumsum(spacing, axis=0) * np.array([1.0, -0.5]) + inp["mu"]
        inp["x"] = inp["mu"][y] + 0.1 * rng.standard_normal((n, d))
    elif family == "clamp":
        flat = inp["s"].reshape(-1)
        flat[::5] = -6.0
        flat[1::5] = 6.0
        flat[2::5] = -9.5
        flat[3::5] = 20.0
    return {key: (v.astype(dtype) if key != "y" else v) for key, v in inp.items()}


FAMILIES = ["near_mean", "offset_1e3", "offset_1e5", "classes_apart", "clamp"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_families(backend, family, dtype, rng, seed):
    inp = family_inputs(rng, family, dtype)
    opts = LGMOptions(num_classes=inp["mu"].shape[0])
    check_against_reference(backend, inp, opts, True, seed)


@pytest.mark.parametrize("where", ["x", "mu", "s"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_entry_stays_in_its_row_or_column(backend, where, value, rng):
    """A NaN / Inf in sample i reaches row i only; in class k's mean or log-variance (NaN: an
    infinite one is clamped), column k and the parameter gradients of class k only."""
    n, k, d = 70, 66, 5
    inp = inputs(rng, (n, k, d), "float64", clamp_some=False)
    row, cls = 65, 64  # in the second row tile / class tile
    if where == "x":
        inp["x"][row, 3] = value
    else:
        inp[where][cls, 3] = value
    logits, lkd, dx, dmu, ds = run_kernels(backend, inp, LGMOptions(num_classes=k), True)
    if where == "s" and np.isinf(value):  # the clamp bounds it and passes no gradient
        assert all(np.isfinite(a).all() for a in (logits, lkd, dx, dmu, ds))
        assert ds[cls, 3] == 0
    elif where == "x":
        others = np.arange(n) != row
        assert not np.isfinite(logits[row]).any() and not np.isfinite(lkd[row])
        assert np.isfinite(logits[others]).all() and np.isfinite(lkd[others]).all()
        assert np.isfinite(dx[others]).all()
    else:
        others = np.arange(k) != cls
        assert not np.isfinite(logits[:, cls]).any()
        assert np.isfinite(logits[:, others]).all()
        assert np.isfinite(dmu[others]).all() and np.isfinite(ds[others]).all()
        labelled = inp["y"].astype(int) != cls
        assert np.isfinite(lkd[labelled]).all()


# ---------------------------------------------------------------------------------------------
# AddressSanitizer: the simulator tests above, with every kernel access checked; and kernels with
# a bounds guard removed, which it must catch.

def _asan_run(args, timeout):
    from lgm_op import cudasim
    try:
        env = {**os.environ, **cudasim.asan_env()}
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_simulator_tests_pass_under_address_sanitizer():
    from lgm_op import cudasim
    if cudasim.asan_loaded():
        pytest.skip("this process already runs under AddressSanitizer")
    proc = _asan_run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                      "-k", "sim and not address_sanitizer and not guard_removed"],
                     timeout=840)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "AddressSanitizer" not in proc.stderr, tail


# Every bounds guard of the kernels: (test id, file, guard as written, the same without the
# bound, the kernel AddressSanitizer names). The forward's loads of the x tile past row N (rows
# past N read row N - 1), of the class terms past class K (read as class K - 1), of the last
# step's x and terms past feature D (read as feature D - 1, then 0), of the labels past row N and
# of the per-class sums past class K, and its stores past row N and class K; dx's loads of G and
# the row codes past row N, of x past row N or column D, and its store past column D; the
# parameter kernel's loads of grad_logits past class K, of the last tile past the slice's rows and
# of the means past class K or feature D, and its stores past them; the per-class, per-row and
# label kernels past K and N; the sum of the split loops' partial results past its length; lkd
# of the label-free form past row N; the scan for the entries taken in the direct form past the
# end of its range (lgm::for_each_marked, whose first caller is dx's scan of the bad classes).
GUARDS = [
    ("forward_store", "lgm_forward.cu",
     "        if (i >= n) continue;  // rows past N: nothing to store\n", "", "lgm::forward"),
    ("forward_class_store", "lgm_forward.cu", "            if (k >= num_classes) continue;\n", "",
     "lgm::forward"),
    ("forward_row_load", "lgm_forward.cu", "(long long)min(row0 + x_row, n - 1) * dim",
     "(long long)(row0 + x_row) * dim", "lgm::forward"),
    ("forward_class_load", "lgm_forward.cu",
     "(long long)min(class0 + t_row, num_classes - 1) * dim", "(long long)(class0 + t_row) * dim",
     "lgm::forward"),
    ("forward_feature_tail_x", "lgm_forward.cu", "const int at = min(j, dim - 1) - (j0 + x_col);",
     "const int at = j - (j0 + x_col);", "lgm::forward"),
    ("forward_feature_tail_terms", "lgm_forward.cu", "t_src[min(j, dim - 1) - (j0 + t_col)]",
     "t_src[j - (j0 + t_col)]", "lgm::forward"),
    ("forward_label_load", "lgm_forward.cu", "if (kWithLabel && i < n) {", "if (kWithLabel) {",
     "lgm::forward"),
    ("forward_sq_load", "lgm_forward.cu", "b[c] = k < num_classes ? sq[k] : T(0);", "b[c] = sq[k];",
     "lgm::forward"),
    ("forward_log_det_load", "lgm_forward.cu", "ld[c] = k < num_classes ? log_det[k] : T(0);",
     "ld[c] = log_det[k];", "lgm::forward"),
    ("lkd_rows_row", "lgm_forward.cu",
     "    if (i >= n) return;  // the whole warp leaves together, so the shuffles below stay full\n",
     "", "lgm::lkd_rows"),
    ("dx_row_load", "lgm_backward.cu", "const int g_read = min(row0 + g_row, n - 1);",
     "const int g_read = row0 + g_row;", "lgm::backward_dx"),
    ("dx_code_load", "lgm_backward.cu", "const int code = i < n ? row_code[i] : -1;",
     "const int code = row_code[i];", "lgm::backward_dx"),
    ("dx_x_load", "lgm_backward.cu", "            if (i >= n || j >= dim) continue;\n", "",
     "lgm::backward_dx"),
    ("dx_store", "lgm_backward.cu", "            if (j < dim) out[(long long)i * dim + j] = value;",
     "            out[(long long)i * dim + j] = value;", "lgm::backward_dx"),
    ("params_class_load", "lgm_backward.cu", "const int k_read = min(k_load, num_classes - 1);",
     "const int k_read = k_load;", "lgm::backward_params"),
    ("params_row_load", "lgm_backward.cu", "const int rr = min(kRows * e, avail - 1);",
     "const int rr = kRows * e;", "lgm::backward_params"),
    ("params_mean_load", "lgm_backward.cu", "mv[r][c] = (k < num_classes && j < dim) ?",
     "mv[r][c] = true ?", "lgm::backward_params"),
    ("params_store", "lgm_backward.cu",
     "            if (k >= num_classes || j >= dim) continue;\n", "", "lgm::backward_params"),
    ("sum_partials_end", "lgm_backward.cu", "    if (e >= len) return;\n", "",
     "lgm::sum_partials"),
    ("class_terms_class", "lgm_class_terms.cu", "    if (k >= num_classes) return;", "",
     "lgm::class_terms"),
    ("row_flags_row", "lgm_class_terms.cu",
     "    if (i >= n) return;  // the whole warp leaves together\n", "", "lgm::row_flags"),
    ("class_ids_row", "lgm_class_terms.cu",
     "    if (i < n) ids[i] = class_of(label[i], num_classes);",
     "    ids[i] = class_of(label[i], num_classes);", "lgm::class_ids"),
    ("marked_scan", "lgm_backward.cu", "__ballot_sync(0xffffffffu, e < end && marked(e))",
     "__ballot_sync(0xffffffffu, marked(e))", "lgm::backward_dx"),
]

_FAULTY_RUN = r"""
import dataclasses
import sys
import numpy as np
sys.path.insert(0, "tests")
from common import make_inputs
from lgm_op import cuda
from lgm_op.kernel_source import load_source, source_hash
from lgm_op.options import LGMOptions
file_name, guard, unguarded = sys.argv[1:4]
text = load_source(file_name)
assert text.count(guard) == 1, "the guard is not in the source"
faulty = text.replace(guard, unguarded)
real_source = cuda._source
cuda._source = lambda name: (faulty, source_hash(faulty)) if name == file_name else real_source(name)
# none a multiple of the 64-wide tiles; the second splits the parameters' loop over samples
for n, k, d in [(70, 66, 37), (700, 5, 37)]:
    inp = make_inputs(np.random.default_rng(0), n, k, d)
    opts = LGMOptions(num_classes=k)
    cuda.lgm_forward_cuda(inp["x"], inp["y"], inp["mu"], inp["s"], opts, True)
    cuda.lgm_backward_cuda(inp["x"], inp["y"], inp["mu"], inp["s"], inp["gz"], inp["gl"], opts,
                           True)
    cuda.lgm_forward_cuda(inp["x"], None, inp["mu"], inp["s"],
                          dataclasses.replace(opts, with_label=False), True)
print("no fault found")
"""


@pytest.fixture(scope="module")
def guard_runs():
    """The faulty runs of every guard, side by side on the machine's cores (each compiles its
    kernel file under AddressSanitizer): {test id: completed process}."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, min(len(GUARDS), os.cpu_count() or 1))) as pool:
        runs = {gid: pool.submit(_asan_run, ["-c", _FAULTY_RUN, f, guard, unguarded], 840)
                for gid, f, guard, unguarded, _ in GUARDS}
        return {gid: run.result() for gid, run in runs.items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("gid, file_name, guard, unguarded, kernel", GUARDS,
                         ids=[g[0] for g in GUARDS])
def test_kernel_with_a_bounds_guard_removed_fails(guard_runs, gid, file_name, guard, unguarded,
                                                  kernel):
    proc = guard_runs[gid]
    assert proc.returncode != 0 and "no fault found" not in proc.stdout, proc.stdout[-2000:]
    # a heap overflow, or a use after free where the stray access lands in freed memory, reported
    # inside the kernel that lost its guard
    assert "ERROR: AddressSanitizer:" in proc.stderr and kernel in proc.stderr, (
        proc.stderr[-3000:])
