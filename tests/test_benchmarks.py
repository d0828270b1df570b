"""The benchmark scripts: they run end to end on tiny sizes and write complete results; the
Caffe-style baseline kernels of the GPU benchmark are correct; the GPU script needs no GPU to be
imported or asked for help; failures and out-of-memory are recorded, not raised."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import assert_close, make_inputs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cpu, bench_gpu  # noqa: E402
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

def test_cpu_benchmark_end_to_end(tmp_path, capsys):
    pytest.importorskip("mxnet")
    code = bench_cpu.main(["--sizes", "8x3x2", "--repeats", "2", "--warmup", "1",
                           "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "8x3x2" in printed

    record = json.loads((tmp_path / "cpu.json").read_text())
    for key in ("benchmark", "date_utc", "command", "hardware", "versions", "git", "environment",
                "load_average_at_start", "settings", "results", "targets"):
        assert key in record, key
    assert record["hardware"]["cpu"]["model"] and record["hardware"]["cpu"]["logical_cores"] >= 1
    for name in ("python", "numpy", "mxnet", "lgm_op"):
        assert record["versions"][name], name
    assert set(record["git"]) == {"sha", "dirty"}
    assert {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} <= set(record["environment"])
    assert record["settings"]["sizes"] == ["8x3x2"] and record["settings"]["repeats"] == 2

    (result,) = record["results"]
    assert result["size"] == {"n": 8, "k": 3, "d": 2}
    assert result["correctness"]["ok"]
    assert set(result["correctness"]["max_rel_error"]) == set(bench_cpu.NAMES)
    for provider in bench_cpu.PROVIDERS:
        entry = result["providers"][provider]
        assert entry["status"] == "ok", entry
        for mode in ("forward", "forward_backward"):
            assert set(entry[mode]) == STATS and entry[mode]["repeats"] == 2
            assert 0 < entry[mode]["min_ms"] <= entry[mode]["median_ms"] <= entry[mode]["max_ms"]
        assert entry["memory"]["status"] == "ok", entry["memory"]
        assert entry["memory"]["peak_rss_growth_bytes"] >= 0
    assert set(result["ratios"]) == {"forward", "forward_backward"}
    assert len(record["targets"]) == len(bench_cpu.TARGETS)

    with open(tmp_path / "cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # two providers x two modes
    for row in rows:
        assert row["status"] == "ok" and float(row["median_ms"]) > 0
        assert float(row["reference_over_op"]) > 0 and row["peak_rss_growth_mib"] != ""


def test_cpu_memory_guard_skips_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(bench_common, "memory_available_bytes", lambda: 8 * 2**30)
    result = bench_cpu.peak_memory(bench_cpu.REFERENCE, (1024, 10000, 256), seed=0)
    assert result["status"].startswith("skipped: needs ~68 GiB"), result
    assert bench_cpu.fit_problem(bench_cpu.OP, (1024, 10000, 256)) is None


def test_cpu_memory_child_reports_out_of_memory():
    pytest.importorskip("mxnet")
    # 400 MB of address space above the interpreter's: the reference needs ~0.9 GB here
    result = bench_cpu.peak_memory(bench_cpu.REFERENCE, (256, 1000, 128), seed=0,
                                   headroom_bytes=400 * 2**20)
    assert result["status"].startswith(("out of memory", "failed: killed")), result


# ---------------------------------------------------------------------------------------------
# the Caffe-style baseline kernels, on the simulator and (when there is one) a GPU

def _sim():
    from lgm_op import cudasim
    return np, cudasim.RawModule


def _gpu():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no CuPy, no driver, an old driver
        pytest.skip(f"no usable GPU ({type(exc).__name__}: {exc})")
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


def test_results_committed_with_every_field():
    path = ROOT / "benchmarks" / "results" / "cpu.json"
    record = json.loads(path.read_text())
    assert record["git"]["sha"] and record["hardware"]["cpu"]["model"]
    assert {r["label"] for r in record["results"]} >= {"256x100x64", "256x1000x128"}
