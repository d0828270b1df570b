"""The benchmark scripts: they run end to end on tiny sizes and write complete results; the peers
of the CPU benchmark and the Caffe-style baseline kernels of the GPU benchmark are correct; the
README's CPU table is written from the JSON; the GPU script needs no GPU to be imported or asked
for help; failures and out-of-memory are recorded, not raised."""
import copy
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import SMALL_SHAPES, assert_close, make_inputs, option_sets

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cpu, bench_gpu, write_tables  # noqa: E402
from benchmarks import common as bench_common  # noqa: E402
from benchmarks.baselines.caffe_style import CaffeStyleLGM  # noqa: E402
from lgm_op.options import LGMOptions  # noqa: E402
from lgm_op.reference import numpy_forward, numpy_grads  # noqa: E402

STATS = {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "repeats"}


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


# ---------------------------------------------------------------------------------------------
# CPU benchmark

CPU_ARGS = ["--sizes", "5x7x3,2x1x2", "--repeats", "3", "--warmup", "1",
            "--memory-sizes", "6x5x4", "--memory-providers", "op,naive"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny run of the CPU benchmark as a user starts it: (record, stdout)."""
    pytest.importorskip("mxnet")
    out = tmp_path_factory.mktemp("bench_cpu")
    # unset, so the script has to set it for MXNet and run itself again
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = _run(["benchmarks/bench_cpu.py", *CPU_ARGS, "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "cpu.json").read_text()), proc.stdout, out


def test_cpu_benchmark_records_every_provider(cpu_run):
    record, printed, out = cpu_run
    assert record["format"] == write_tables.FORMAT
    for key in ("benchmark", "date_utc", "command", "hardware", "versions", "git", "environment",
                "load_average_at_start", "settings", "threads", "results", "memory", "targets",
                "load_average_at_end"):
        assert key in record, key
    assert record["hardware"]["cpu"]["model"] and record["hardware"]["cpu"]["logical_cores"] >= 1
    for name in ("python", "numpy", "mxnet", "lgm_op"):
        assert record["versions"][name], name
    assert set(record["git"]) == {"sha", "dirty"}
    # MXNet's OpenMP on every core; the BLAS workarounds recorded as they were given
    assert record["threads"]["OMP_NUM_THREADS"] == str(os.cpu_count())
    assert record["environment"]["OMP_NUM_THREADS"] == str(os.cpu_count())
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        assert record["environment"][name] == os.environ.get(name), name
    blas = [lib for lib in record["threads"]["libraries"] if lib["user_api"] == "blas"]
    assert any(lib["file"].startswith("numpy") for lib in blas), blas
    assert all(lib["num_threads"] >= 1 for lib in blas)

    assert [r["label"] for r in record["results"]] == ["5x7x3", "2x1x2"]
    for result in record["results"]:
        assert list(result["providers"]) == list(bench_cpu.PROVIDERS)
        assert result["rounds"] == 3 and result["reference"]["dtype"] == "float64"
        for name, entry in result["providers"].items():
            assert entry["status"] == "ok", (name, entry)
            assert len(entry["times_ms"]) == 3 and all(t > 0 for t in entry["times_ms"])
            assert set(entry["stats"]) == STATS and entry["stats"]["repeats"] == 3
            if name == bench_cpu.OP:
                assert "ratio_to_op" not in entry
            else:
                assert entry["ratio_to_op"]["rounds"] == 3 and entry["ratio_to_op"]["median"] > 0
            if entry["kind"] == "floor":
                assert entry["correctness"] is None
    (memory,) = record["memory"]
    assert memory["label"] == "6x5x4" and list(memory["providers"]) == ["op", "naive"]
    for entry in memory["providers"].values():
        assert entry["status"] == "ok", entry
        assert entry["peak_rss_growth_bytes"] >= 0 and "VmHWM" in entry["method"]
        assert entry["OMP_NUM_THREADS"] == str(os.cpu_count())
    assert [t["what"] for t in record["targets"]] == [t[0] for t in bench_cpu.TARGETS]

    for name, (label, _) in bench_cpu.PROVIDERS.items():
        assert label in printed, name
    with open(out / "cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(bench_cpu.PROVIDERS) + 2
    assert all(row["status"] == "ok" for row in rows)


def test_cpu_benchmark_providers_agree_before_timing(cpu_run):
    record = cpu_run[0]
    tolerance = record["settings"]["tolerance"]
    for result in record["results"]:
        for name, entry in result["providers"].items():
            if entry["kind"] == "loss":
                check = entry["correctness"]
                assert set(check["max_rel_error"]) == set(bench_cpu.NAMES), name
                assert check["ok"] and max(check["max_rel_error"].values()) <= tolerance, (
                    name, check)


def test_cpu_benchmark_default_output_is_scratch():
    out = Path(bench_cpu.parse_args([]).out).resolve()
    assert out != (ROOT / "benchmarks" / "results").resolve()
    proc = subprocess.run(["git", "check-ignore", "-q", str(out / "cpu.json")], cwd=ROOT,
                          timeout=30)
    assert proc.returncode == 0, f"{out} is not ignored by git"


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=bench_common.size_label)
def test_cpu_benchmark_peers_match_reference(shape, rng, seed):
    """The stock-op and NumPy versions of the loss compute SPEC sections 1-2 (float64)."""
    pytest.importorskip("mxnet")
    import mxnet as mx
    from benchmarks.baselines.closed_form_numpy import NumpyGemmExpansion
    from benchmarks.baselines.stock_mxnet import GemmExpansionLGM
    n, k, d = shape
    a = make_inputs(rng, n, k, d, "float64")
    for opts in [o for o in option_sets(k) if not o.isotropic]:
        want = numpy_forward(a["x"], a["y"], a["mu"], a["s"], opts, True) + numpy_grads(
            a["x"], a["y"], a["mu"], a["s"], a["gz"], a["gl"], opts, True)
        loss = NumpyGemmExpansion(a["x"], a["y"], a["mu"], a["s"], opts)
        got = {"numpy": loss.forward() + loss.backward(a["gz"], a["gl"])}
        for gemm, hybrid in itertools.product(("dot", "fully_connected"), (False, True)):
            block = GemmExpansionLGM(opts, gemm, dtype="float64")
            if hybrid:
                block.hybridize(static_alloc=True, static_shape=True)
            args = [mx.nd.array(a[name], dtype="float64") for name in ("x", "mu", "s")]
            for arg in args:
                arg.attach_grad()
            with mx.autograd.record():
                logits, lkd = block(args[0], mx.nd.array(a["y"], dtype="float64"), *args[1:])
            mx.autograd.backward([logits, lkd], [mx.nd.array(a["gz"], dtype="float64"),
                                                 mx.nd.array(a["gl"], dtype="float64")])
            got[f"{gemm} hybrid={hybrid}"] = [logits.asnumpy(), lkd.asnumpy()] + [
                arg.grad.asnumpy() for arg in args]
        for what, values in got.items():
            for name, g, w in zip(bench_cpu.NAMES, values, want):
                assert_close(g, w, 1e-9, f"{what} {name} {shape} {opts}", seed)


def test_cpu_benchmark_floors_do_what_they_claim(rng):
    pytest.importorskip("mxnet")
    import mxnet as mx
    from benchmarks.baselines.closed_form_numpy import SixGemms
    from benchmarks.baselines.stock_mxnet import NOOP_OP_TYPE
    a = bench_common.make_inputs(6, 5, 3, seed=1)
    gemms = SixGemms(a["x"], a["mean"], a["log_var"], a["grad_logits"])
    gemms.run()
    x, iv = a["x"].astype(np.float64), np.exp(-a["log_var"].astype(np.float64))
    mean_iv, g = a["mean"] * iv, a["grad_logits"].astype(np.float64)
    for got, want in zip(gemms.out_nk + gemms.out_nd + gemms.out_kd,
                         [(x * x) @ iv.T, x @ mean_iv.T, g @ iv, g @ mean_iv, g.T @ x,
                          g.T @ (x * x)]):
        assert_close(got, want, 1e-5, "six GEMMs", 1, atol_scale=1e-6)
    # the no-op CustomOp writes zeros where req is write, and leaves an 'add' gradient alone
    nd = {name: mx.nd.array(value) for name, value in a.items()}
    nd["x"].attach_grad(grad_req="add")
    nd["x"].grad[:] = 3
    nd["mean"].attach_grad()
    nd["mean"].grad[:] = 3
    with mx.autograd.record():
        logits, lkd = mx.nd.Custom(nd["x"], nd["label"], nd["mean"], nd["log_var"],
                                   op_type=NOOP_OP_TYPE, num_classes=5)
    mx.autograd.backward([logits, lkd], [nd["grad_logits"], nd["grad_lkd"]])
    assert logits.shape == (6, 5) and lkd.shape == (6,)
    assert not logits.asnumpy().any() and not lkd.asnumpy().any()
    assert (nd["x"].grad.asnumpy() == 3).all() and not nd["mean"].grad.asnumpy().any()


def _tiny_args(providers):
    return bench_cpu.parse_args(["--sizes", "4x3x2", "--repeats", "3", "--warmup", "1",
                                 "--providers", ",".join(providers)])


def test_cpu_benchmark_records_wrong_and_failing_providers(monkeypatch):
    pytest.importorskip("mxnet")
    calls = []

    def wrong_results(self):
        good = dict(zip(bench_cpu.NAMES, self._results))
        return {**good, "grad_mean": good["grad_mean"] + 1}

    def fails_in_second_round(self):
        calls.append(1)
        if len(calls) >= 4:  # the check, one warm-up, one round
            raise MemoryError("no room")

    monkeypatch.setattr(bench_cpu.NumpyClosedForm, "results", wrong_results)
    monkeypatch.setattr(bench_cpu.Gemms, "step", fails_in_second_round)
    record = bench_cpu.bench_size((4, 3, 2), _tiny_args(["op", "numpy", "gemms"]))
    op, numpy_, gemms = (record["providers"][n] for n in ("op", "numpy", "gemms"))
    assert op["status"] == "ok" and len(op["times_ms"]) == 3
    assert numpy_["status"].startswith("incorrect") and "times_ms" not in numpy_
    assert numpy_["correctness"]["max_rel_error"]["grad_mean"] > 1e-4
    assert gemms["status"].startswith("out of memory"), gemms
    assert gemms["times_ms"][0] > 0 and gemms["times_ms"][1:] == [None, None]
    assert gemms["ratio_to_op"]["rounds"] == 1


def test_cpu_memory_guard_skips_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(bench_common, "memory_available_bytes", lambda: 8 * 2**30)
    result = bench_cpu.peak_memory(bench_cpu.NAIVE, (1024, 10000, 256), seed=0)
    assert result["status"].startswith("skipped: needs ~68 GiB"), result
    assert bench_cpu.fit_problem(bench_cpu.OP, (1024, 10000, 256)) is None


def test_cpu_memory_child_reports_out_of_memory():
    pytest.importorskip("mxnet")
    # 400 MB of address space above the interpreter's: the naive reference needs ~0.9 GB here
    result = bench_cpu.peak_memory(bench_cpu.NAIVE, (256, 1000, 128), seed=0,
                                   headroom_bytes=400 * 2**20)
    assert result["status"].startswith(("out of memory", "failed: killed")), result


# ---------------------------------------------------------------------------------------------
# the README's CPU table

def test_write_tables_round_trip(cpu_run, tmp_path):
    record, _, out = cpu_run
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text()
    readme.write_text(original)
    args = ["--json", str(out / "cpu.json"), "--readme", str(readme)]
    assert write_tables.main(args) == 0
    written = readme.read_text()
    start = written.index(write_tables.README_START) + len(write_tables.README_START)
    end = written.index(write_tables.README_END)
    block = written[start:end]
    # nothing outside the markers changes
    assert written[:start] + written[end:] == original[:original.index(
        write_tables.README_START) + len(write_tables.README_START)] + original[
        original.index(write_tables.README_END):]
    # the figures are the record's
    machine = record["hardware"]["cpu"]["model"]
    assert machine in block and record["git"]["sha"][:10] in block
    for result in record["results"]:
        for name, entry in result["providers"].items():
            cell = f"{bench_common.short_ms(entry['stats']['median_ms'])} ms"
            if name != "op":
                cell += f" ({write_tables.format_ratio(entry['ratio_to_op']['median'])})"
            assert f"| {entry['label']} |" in block and f"| {cell} |" in block, (name, cell)
    assert write_tables.main(args + ["--check"]) == 0
    assert write_tables.main(args) == 0 and readme.read_text() == written  # idempotent
    # a different record: the check sees it
    changed_record = copy.deepcopy(record)
    changed_record["results"][0]["providers"]["op"]["stats"]["median_ms"] *= 2
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(changed_record))
    assert write_tables.main(["--json", str(changed), "--readme", str(readme), "--check"]) == 1
    readme.write_text("no markers here\n")
    assert write_tables.main(args) == 2


def test_recorded_results_and_readme_table():
    path = ROOT / "benchmarks" / "results" / "cpu.json"
    record = json.loads(path.read_text())
    assert record["git"]["sha"] and record["hardware"]["cpu"]["model"]
    if record.get("format") != write_tables.FORMAT:
        pytest.skip(f"{path.name} predates the current benchmark (format "
                    f"{record.get('format')!r}); the README table is written once it is recorded")
    assert [r["label"] for r in record["results"]] == bench_cpu.DEFAULT_SIZES.split(",")
    assert [m["label"] for m in record["memory"]] == bench_cpu.DEFAULT_MEMORY_SIZES.split(",")
    assert write_tables.main(["--check"]) == 0


def test_readme_torch_table_follows_its_record(tmp_path):
    """The PyTorch block is written from its JSON too: a changed figure makes --check fail,
    writing puts it in, and a README without the block's markers is refused."""
    torch_json = ROOT / "benchmarks" / "results" / "torch_cpu.json"
    record = json.loads(torch_json.read_text())
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    base = ["--readme", str(readme)]
    assert write_tables.main(base + ["--check"]) == 0
    cell = record["results"][0]["providers"]["op"]["stats"]
    cell["median_ms"] = 123.456
    changed = tmp_path / "torch_changed.json"
    changed.write_text(json.dumps(record))
    args = base + ["--torch-json", str(changed)]
    assert write_tables.main(args + ["--check"]) == 1
    assert write_tables.main(args) == 0
    assert "| 123 (" in readme.read_text()
    assert write_tables.main(args + ["--check"]) == 0
    text = readme.read_text()
    readme.write_text(text.replace(write_tables.TORCH_END, ""))
    assert write_tables.main(args) == 2
    assert write_tables.main(base + ["--torch-json", ""]) == 0   # the CPU block alone


# ---------------------------------------------------------------------------------------------
# the Caffe-style baseline kernels, on the simulator and (when there is one) a GPU

def _sim():
    from lgm_op import cudasim
    return np, cudasim.RawModule


def _gpu():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - any import failure means no GPU backend
        pytest.skip(f"CuPy is not importable ({exc})")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no driver, a driver too old for any device, ...
        count = 0
    if count < 1:
        pytest.skip("no CUDA GPU on this machine")
    return cupy, bench_gpu.CudaBackend().raw_module_class()


@pytest.fixture(scope="module", params=["sim", "gpu"])
def caffe_kernels(request):
    xp, raw_module_class = _sim() if request.param == "sim" else _gpu()
    return xp, CaffeStyleLGM(xp, raw_module_class)


# odd sizes; several blocks along N*K (65x9), K*D (5x70x4) and N*D (300x2x1)
CAFFE_SHAPES = [(1, 1, 1), (2, 3, 2), (7, 13, 33), (65, 9, 3), (5, 70, 4), (300, 2, 1)]
CAFFE_OPTIONS = [
    dict(),
    dict(alpha=0.0, logdet_logits=False, logdet_lkd=False),
    dict(alpha=0.5, logdet_logits=False, logdet_lkd=True),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "predict"])
@pytest.mark.parametrize("option_index", range(len(CAFFE_OPTIONS)))
@pytest.mark.parametrize("shape", CAFFE_SHAPES, ids=bench_common.size_label)
def test_caffe_style_kernels_match_reference(caffe_kernels, shape, option_index, training, rng,
                                             seed):
    xp, kernels = caffe_kernels
    n, k, d = shape
    opts = LGMOptions(num_classes=k, **CAFFE_OPTIONS[option_index])
    a = make_inputs(rng, n, k, d, "float32")
    args = [xp.asarray(a[name]) for name in ("x", "y", "mu", "s")]
    got = kernels.forward(*args, opts, training) + kernels.backward(
        *args, xp.asarray(a["gz"]), xp.asarray(a["gl"]), opts, training)
    want = numpy_forward(a["x"], a["y"], a["mu"], a["s"], opts, training) + numpy_grads(
        a["x"], a["y"], a["mu"], a["s"], a["gz"], a["gl"], opts, training)
    for name, g, w in zip(bench_gpu.NAMES, got, want):
        g = bench_gpu.to_host(g)
        assert g.dtype == np.float32
        assert_close(g, w, 3e-5, f"caffe_style {name} {shape}", seed, atol_scale=3e-5)


# ---------------------------------------------------------------------------------------------
# GPU benchmark without a GPU

_NO_CUPY = "import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None; "


def test_gpu_benchmark_help_and_import_without_cupy():
    proc = _run(["-c", _NO_CUPY + "import runpy; sys.argv = ['bench_gpu.py', '--help']; "
                 "runpy.run_path('benchmarks/bench_gpu.py', run_name='__main__')"])
    assert proc.returncode == 0, proc.stderr
    for option in ("--sizes", "--providers", "--repeats", "--out", "--simulate"):
        assert option in proc.stdout
    proc = _run(["-c", _NO_CUPY + "from benchmarks import bench_gpu; "
                 "sys.exit(bench_gpu.main(['--sizes', '8x3x2']))"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs CuPy and a CUDA GPU" in proc.stderr


def test_gpu_benchmark_simulated_end_to_end(tmp_path):
    _sim()
    # torch_compile is left out: compiling on the CPU alone takes longer than this whole file
    providers = [p for p in bench_gpu.PROVIDERS if p != "torch_compile"]
    code = bench_gpu.main(["--simulate", "--sizes", "5x70x3", "--repeats", "2", "--warmup", "1",
                           "--providers", ",".join(providers), "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "gpu_simulated.json").read_text())
    for key in ("hardware", "versions", "git", "settings", "results"):
        assert key in record, key
    assert record["hardware"]["gpu"]["name"]
    (result,) = record["results"]
    assert list(result["providers"]) == providers
    for name in ("ours", "cublas", "caffe_style"):
        entry = result["providers"][name]
        assert entry["status"] == "ok", entry
        for mode in bench_gpu.MODES:
            assert set(entry[mode]) == STATS
        assert entry["memory"]["peak_extra_bytes"] >= 0
    for name in ("ours", "caffe_style"):
        assert result["providers"][name]["correctness"]["ok"]
    status = result["providers"]["torch_eager"]["status"]
    assert status == "ok" or status.startswith("skipped: PyTorch"), status
    assert set(result["ratios_vs_ours"]["caffe_style"]) == set(bench_gpu.MODES)
    with open(tmp_path / "gpu_simulated.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(providers) * len(bench_gpu.MODES)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "gpu_simulated.png").stat().st_size > 0


class _Failing(bench_gpu.Provider):
    name = "failing"
    error = RuntimeError("boom")

    def __init__(self, backend, inputs, opts):
        raise self.error


class _TooBig(bench_gpu.Provider):
    name = "too_big"

    @staticmethod
    def extra_bytes(n, k, d):
        return 2**60


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "failed: RuntimeError: boom"),
                                           (MemoryError("no room"), "out of memory: "),
                                           (RuntimeError("CUDA out of memory."), "out of memory")])
def test_gpu_benchmark_records_failures(error, status):
    args = bench_gpu.parse_args(["--simulate"])
    failing = type("F", (_Failing,), {"error": error})
    entry = bench_gpu.run_provider(bench_gpu.SimulatedBackend(), failing, {}, {}, (2, 3, 2),
                                   LGMOptions(num_classes=3), args)
    assert entry["status"].startswith(status), entry
    entry = bench_gpu.run_provider(bench_gpu.SimulatedBackend(), _TooBig, {}, {}, (2, 3, 2),
                                   LGMOptions(num_classes=3), args)
    assert entry["status"].startswith("skipped: needs ~"), entry


def test_gpu_benchmark_torch_loss_matches_reference(rng, seed):
    torch = pytest.importorskip("torch")
    opts = LGMOptions(num_classes=13)
    a = make_inputs(rng, 7, 13, 5, "float64")
    params = [torch.tensor(a[name], requires_grad=True) for name in ("x", "mu", "s")]
    loss = bench_gpu.make_torch_loss(torch, opts, True)
    logits, lkd = loss(params[0], torch.tensor(a["y"]).long(), params[1], params[2])
    torch.autograd.backward([logits, lkd], [torch.tensor(a["gz"]), torch.tensor(a["gl"])])
    got = (logits, lkd) + tuple(p.grad for p in params)
    want = numpy_forward(a["x"], a["y"], a["mu"], a["s"], opts, True) + numpy_grads(
        a["x"], a["y"], a["mu"], a["s"], a["gz"], a["gl"], opts, True)
    for name, g, w in zip(bench_gpu.NAMES, got, want):
        assert_close(g.detach().numpy(), w, 1e-9, f"torch {name}", seed)


def test_sizes_parse_and_reject_bad_input():
    assert bench_common.parse_sizes("8x3x2, 256x10x2") == [(8, 3, 2), (256, 10, 2)]
    for bad in ("8x3", "8x0x2", "axbxc", ""):
        with pytest.raises(ValueError):
            bench_common.parse_sizes(bad)


def test_stats_and_errors():
    stats = bench_common.summarize([0.003, 0.001, 0.002])
    assert stats["median_ms"] == pytest.approx(2.0) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(3.0) and stats["repeats"] == 3
    assert bench_common.rel_error([1.0, 2.0], [1.0, 4.0]) == pytest.approx(0.5)
    assert np.isnan(bench_common.rel_error([np.nan], [1.0]))
    assert not bench_common.compare({"a": [np.nan]}, {"a": [1.0]}, 1e-4)["ok"]
