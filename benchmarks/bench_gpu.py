"""GPU benchmark: the lgm CUDA kernels against cuBLAS, PyTorch and a Caffe-style baseline.

Providers, side by side on identical float32 inputs (training mode, default options):

- ``ours``: ``lgm_op.cuda.lgm_forward_cuda`` / ``lgm_backward_cuda`` (CuPy arrays in and out);
- ``cublas``: the three GEMM-shaped contractions of the same sizes through ``cupy.matmul``,
  (N,D)x(D,K) forward, (N,K)x(K,D) and (K,N)x(N,D) backward: the speed of light of a kernel that
  reads the operands once (it does not compute the loss, so it is not checked);
- ``torch_eager``: the loss written with broadcasting over an N x K x D tensor and differentiated
  by autograd, as the popular PyTorch port does; ``torch_compile``: the same function under
  ``torch.compile`` with static shapes (both skipped when PyTorch is missing);
- ``caffe_style``: the kernel design of the authors' Caffe layer (one thread per output element,
  looping over the contracted dimension), ``baselines/caffe_style.cu``.

Per size and provider: an estimate of the memory it needs (skipped when it does not fit), one
forward+backward whose outputs and gradients are checked against a float64 reference on the host
(``lgm_op.reference.numpy_*`` where N*K*D is small enough, else the O(N*K) closed form of
``lgm_op.cpu``), the peak device memory of one forward+backward beyond the inputs, outputs and
gradients (the CuPy pool's high-water mark through an allocator hook, plus
``torch.cuda.max_memory_allocated``), then forward, backward (after an untimed forward) and
forward+backward times with CUDA events after warm-up. A provider that fails or runs out of
memory is recorded as such and the run goes on; results are written after every size.

    python benchmarks/bench_gpu.py                                   # -> benchmarks/results/
    python benchmarks/bench_gpu.py --sizes 512x1000x128 --providers ours,cublas --repeats 50
    python benchmarks/bench_gpu.py --simulate --out /tmp/bench       # no GPU: checks the script

``--simulate`` runs every provider on the CPU (the kernels through ``lgm_op.cudasim``, NumPy for
cuBLAS, PyTorch on the CPU) at tiny sizes to check the script end to end; its times mean nothing.
"""
import argparse
import gc
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

PROVIDERS = ("ours", "cublas", "torch_eager", "torch_compile", "caffe_style")
DEFAULT_SIZES = "256x10x2,512x1000x128,1024x10000x512,4096x100000x128"
SIMULATE_SIZES = "8x3x2,5x70x3"
MODES = ("forward", "backward", "forward_backward")
NAMES = ("logits", "lkd", "grad_x", "grad_mean", "grad_log_var")
ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "CUPY_TF32", "CUPY_ACCELERATORS", "NVIDIA_TF32_OVERRIDE",
             "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS")
# A provider runs only when its estimated extra memory is below this share of the free memory.
FIT_SHARE = 0.9
# Above this many N*K*D elements the host reference is the closed form of lgm_op.cpu (O(N*K)
# memory) instead of lgm_op.reference.numpy_*, which holds several N x K x D float64 arrays.
NUMPY_REFERENCE_MAX_NKD = 10**8


class Unavailable(Exception):
    """A provider that cannot run here (a missing package); recorded as skipped."""


# ---------------------------------------------------------------------------------------------
# where the providers run: a GPU through CuPy, or the CPU simulator

def _torch():
    """The torch module, or raise Unavailable."""
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"PyTorch is not installed ({exc})") from None
    return torch


def _loaded_torch():
    """torch if something already imported it (memory statistics are read only then)."""
    return sys.modules.get("torch")


def nbytes(arrays):
    """Total bytes of CuPy/NumPy arrays and torch tensors."""
    total = 0
    for a in arrays:
        total += a.element_size() * a.numel() if hasattr(a, "element_size") else a.nbytes
    return total


def to_host(a):
    """A CuPy array, a torch tensor or a NumPy array as a NumPy array."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


class CudaBackend:
    """The current GPU through CuPy: CUDA events, device memory statistics, OOM errors."""

    simulated = False
    torch_device = "cuda"

    def __init__(self):
        import cupy
        self.xp = cupy
        cupy.cuda.runtime.getDeviceCount()  # raises here, with CUDA's message, without a GPU
        self.device_id = cupy.cuda.Device().id

    def raw_module_class(self):
        try:  # the pip NVRTC wheel, where CuPy does not find the library by itself
            from lgm_op.cuda import ensure_nvrtc
            ensure_nvrtc()
        except Exception:  # compiling will report a missing NVRTC with CuPy's own message
            pass
        return self.xp.RawModule

    def synchronize(self):
        self.xp.cuda.runtime.deviceSynchronize()

    def seconds(self, run, prepare=None, stream_ptr=None):
        """GPU time of ``run(prepare())`` between two CUDA events, ``prepare`` untimed.

        stream_ptr: the stream the provider launches on (torch's), else CuPy's current stream.
        """
        cupy = self.xp
        arg = prepare() if prepare else None
        # torch's default stream is the legacy default stream (0), as is CuPy's null stream
        stream = (cupy.cuda.ExternalStream(stream_ptr) if stream_ptr
                  else cupy.cuda.get_current_stream())
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        self.synchronize()
        start.record(stream)
        run(arg)
        end.record(stream)
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3

    def tracked(self, fn):
        """(fn(), peak growth in bytes of the device memory allocated while it ran)."""
        cupy = self.xp
        pool = cupy.get_default_memory_pool()
        torch = _loaded_torch()
        use_torch = torch is not None and torch.cuda.is_initialized()
        self.synchronize()
        base = pool.used_bytes()
        peak = [base]

        def malloc(size):
            memory = pool.malloc(size)
            peak[0] = max(peak[0], pool.used_bytes())
            return memory

        if use_torch:
            torch.cuda.reset_peak_memory_stats()
            torch_base = torch.cuda.memory_allocated()
        with cupy.cuda.using_allocator(malloc):
            result = fn()
            self.synchronize()
        growth = peak[0] - base
        if use_torch:
            growth += torch.cuda.max_memory_allocated() - torch_base
        return result, growth

    def release(self):
        """Give cached device memory back, so the next provider starts from the same state."""
        gc.collect()
        self.xp.get_default_memory_pool().free_all_blocks()
        torch = _loaded_torch()
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def free_bytes(self):
        self.release()
        return self.xp.cuda.runtime.memGetInfo()[0]

    def oom_errors(self):
        errors = (self.xp.cuda.memory.OutOfMemoryError, MemoryError)
        torch = _loaded_torch()
        if torch is not None and hasattr(torch.cuda, "OutOfMemoryError"):
            errors += (torch.cuda.OutOfMemoryError,)
        return errors

    def record(self):
        """GPU name, memory, driver and CUDA versions."""
        runtime = self.xp.cuda.runtime
        props = runtime.getDeviceProperties(self.device_id)
        name = props["name"]
        record = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": props["multiProcessorCount"],
            "memory_gib": round(common.gib(props["totalGlobalMem"]), 1),
            "cuda_driver_api_version": runtime.driverGetVersion(),
            "cuda_runtime_version": runtime.runtimeGetVersion(),
            "driver_version": _nvidia_smi_driver(self.device_id),
        }
        try:
            from cupy.cuda import nvrtc
            record["nvrtc_version"] = ".".join(map(str, nvrtc.getVersion()))
        except Exception:  # recorded as unknown; compiling reports the real problem
            record["nvrtc_version"] = None
        torch = _loaded_torch()
        record["torch_cuda_version"] = getattr(getattr(torch, "version", None), "cuda", None)
        return record


def _nvidia_smi_driver(device_id):
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              "-i", str(device_id)], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class SimulatedBackend:
    """The CPU: NumPy arrays, the kernels on ``lgm_op.cudasim``, wall-clock times and
    tracemalloc peaks (NumPy allocations only). Checks the script; measures nothing useful."""

    simulated = True
    torch_device = "cpu"
    xp = np

    def raw_module_class(self):
        from lgm_op import cudasim
        return cudasim.RawModule

    def synchronize(self):
        pass

    def seconds(self, run, prepare=None, stream_ptr=None):
        arg = prepare() if prepare else None
        start = time.perf_counter()
        run(arg)
        return time.perf_counter() - start

    def tracked(self, fn):
        import tracemalloc
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            result = fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            if started:
                tracemalloc.stop()
        return result, peak - base

    def release(self):
        gc.collect()

    def free_bytes(self):
        return common.memory_available_bytes()

    def oom_errors(self):
        return (MemoryError,)

    def record(self):
        return {"name": "CPU simulator (lgm_op.cudasim); times are not GPU times"}


# ---------------------------------------------------------------------------------------------
# providers: setup (untimed) in the constructor, then forward() -> state, backward(state) -> grads

class Provider:
    name = ""
    checked = True  # computes the loss, so its results are compared with the reference
    stream_ptr = None

    @staticmethod
    def extra_bytes(n, k, d):
        """Estimated device memory beyond inputs, outputs and gradients."""
        return 0

    def results(self, state, grads):
        """name -> NumPy array of the outputs (logits, lkd) and gradients (x, mean, log_var)."""
        return {name: to_host(a) for name, a in zip(NAMES, tuple(state) + tuple(grads))}

    def close(self):
        self.__dict__.clear()


class _Kernels(Provider):
    """A pair of framework-free launchers with the signatures of ``lgm_op.cpu``."""

    def _bind(self, forward, backward, inputs, opts):
        self._forward, self._backward = forward, backward
        self.args = (inputs["x"], inputs["label"], inputs["mean"], inputs["log_var"])
        self.upstream = (inputs["grad_logits"], inputs["grad_lkd"])
        self.opts = opts

    def forward(self):
        return self._forward(*self.args, self.opts, True)

    def backward(self, state):
        return self._backward(*self.args, *self.upstream, self.opts, True)


class Ours(_Kernels):
    name = "ours"

    @staticmethod
    def extra_bytes(n, k, d):
        return 4 * n + 8 * (n + k) * d  # int32 labels, split-loop partial sums

    def __init__(self, backend, inputs, opts):
        from lgm_op.cuda import lgm_backward_cuda, lgm_forward_cuda
        self._bind(lgm_forward_cuda, lgm_backward_cuda, inputs, opts)


class CaffeStyle(_Kernels):
    name = "caffe_style"

    def __init__(self, backend, inputs, opts):
        from benchmarks.baselines.caffe_style import CaffeStyleLGM
        kernels = CaffeStyleLGM(backend.xp, backend.raw_module_class())
        self._bind(kernels.forward, kernels.backward, inputs, opts)


class CuBLAS(Provider):
    name = "cublas"
    checked = False

    def __init__(self, backend, inputs, opts):
        self.xp = backend.xp
        self.x, self.mean, self.grad = inputs["x"], inputs["mean"], inputs["grad_logits"]

    def forward(self):
        return (self.xp.matmul(self.x, self.mean.T),)              # (N, D) x (D, K)

    def backward(self, state):
        return (self.xp.matmul(self.grad, self.mean),              # (N, K) x (K, D)
                self.xp.matmul(self.grad.T, self.x))               # (K, N) x (N, D)


def make_torch_loss(torch, opts, training):
    """The loss of SPEC section 1 in PyTorch, broadcasting over an N x K x D tensor.

    Returns lgm_loss(x: (N, D), label: (N,) int64, mean: (K, D), log_var: (K, D)) ->
    (logits: (N, K), lkd: (N,)). Diagonal covariance only.
    """
    if opts.isotropic:
        raise ValueError("the PyTorch baseline implements the diagonal covariance only")
    alpha = opts.margin(training)
    half_logits = 0.5 if opts.logdet_logits else 0.0
    half_lkd = 0.5 if opts.logdet_lkd else 0.0
    logvar_min, logvar_max = opts.logvar_min, opts.logvar_max

    def lgm_loss(x, label, mean, log_var):
        c = torch.clamp(log_var, logvar_min, logvar_max)
        diff = x.unsqueeze(1) - mean.unsqueeze(0)                           # (N, K, D)
        dist = 0.5 * (diff * diff * torch.exp(-c).unsqueeze(0)).sum(dim=2)  # (N, K)
        log_det = c.sum(dim=1)                                              # (K,)
        margin = torch.ones_like(dist).scatter(1, label.unsqueeze(1), 1.0 + alpha)
        logits = -margin * dist - half_logits * log_det
        lkd = dist.gather(1, label.unsqueeze(1)).squeeze(1) + half_lkd * log_det[label]
        return logits, lkd

    return lgm_loss


# One compiled function per (options, device) for the whole run. Static shapes: each size gets
# its own compiled kernels, as a training loop with a fixed batch does (with dynamic shapes the
# compiled forward was two orders of magnitude slower per call on small CPU inputs).
_COMPILED = {}


class TorchEager(Provider):
    name = "torch_eager"

    @staticmethod
    def extra_bytes(n, k, d):
        # diff, diff^2 and their products live as N x K x D float32 tensors in forward and
        # backward: about five at the peak
        return 5 * n * k * d * 4

    def __init__(self, backend, inputs, opts):
        torch = self.torch = _torch()
        self.device = backend.torch_device
        as_tensor = lambda a: torch.from_dlpack(a)  # noqa: E731  (zero-copy)
        self.params = [as_tensor(inputs[name]).detach().clone().requires_grad_(True)
                       for name in ("x", "mean", "log_var")]
        self.label = as_tensor(inputs["label"]).long()
        self.upstream = [as_tensor(inputs["grad_logits"]), as_tensor(inputs["grad_lkd"])]
        self.loss = self._loss(opts)
        if self.device == "cuda":
            self.stream_ptr = torch.cuda.current_stream().cuda_stream

    def _loss(self, opts):
        return make_torch_loss(self.torch, opts, True)

    def forward(self):
        for p in self.params:
            p.grad = None
        x, mean, log_var = self.params
        return self.loss(x, self.label, mean, log_var)

    def backward(self, state):
        self.torch.autograd.backward(list(state), self.upstream)
        return tuple(p.grad for p in self.params)


class TorchCompile(TorchEager):
    name = "torch_compile"

    @staticmethod
    def extra_bytes(n, k, d):
        return 4 * n * k * 4  # fused reductions: a few (N, K) temporaries

    def _loss(self, opts):
        key = (opts, self.device)
        if key not in _COMPILED:
            _COMPILED[key] = self.torch.compile(make_torch_loss(self.torch, opts, True),
                                                dynamic=False)
        return _COMPILED[key]


PROVIDER_CLASSES = {cls.name: cls for cls in (Ours, CuBLAS, TorchEager, TorchCompile, CaffeStyle)}


# ---------------------------------------------------------------------------------------------
# one provider at one size

def host_reference(inputs, opts):
    """Float64 outputs and gradients on the host: (name -> array, which reference)."""
    n, d = inputs["x"].shape
    k = inputs["mean"].shape[0]
    f64 = {name: np.asarray(a, dtype=np.float64) for name, a in inputs.items()}
    args = (f64["x"], inputs["label"], f64["mean"], f64["log_var"])
    upstream = (f64["grad_logits"], f64["grad_lkd"])
    if n * k * d <= NUMPY_REFERENCE_MAX_NKD:
        from lgm_op.reference import numpy_forward, numpy_grads
        which = "lgm_op.reference.numpy_forward/numpy_grads (float64)"
        outputs = numpy_forward(*args, opts, True) + numpy_grads(*args, *upstream, opts, True)
    else:
        from lgm_op.cpu import lgm_backward_cpu, lgm_forward_cpu
        which = "lgm_op.cpu closed form (float64; N*K*D too large for the broadcasting reference)"
        outputs = lgm_forward_cpu(*args, opts, True) + lgm_backward_cpu(*args, *upstream, opts,
                                                                        True)
    return dict(zip(NAMES, outputs)), which


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def run_provider(backend, cls, inputs, expected, size, opts, args):
    """The record of one provider at one size; failures and OOM are recorded, never raised."""
    entry = {"estimated_extra_bytes": cls.extra_bytes(*size)}
    free = backend.free_bytes()
    if free is not None and entry["estimated_extra_bytes"] > FIT_SHARE * free:
        entry["status"] = (f"skipped: needs ~{common.gib(entry['estimated_extra_bytes']):.0f} GiB "
                           f"beyond inputs and outputs (estimated), {common.gib(free):.0f} GiB "
                           "free")
        return entry
    provider = None
    try:
        provider = cls(backend, inputs, opts)
        _measure(backend, provider, expected, args, entry)
    except Unavailable as exc:
        entry["status"] = f"skipped: {exc}"
    except backend.oom_errors() as exc:
        entry["status"] = f"out of memory: {_first_line(exc)}"
    except Exception as exc:  # any failure is part of the results
        oom = "out of memory" in str(exc).lower()
        entry["status"] = ("out of memory: " if oom else "failed: ") + _first_line(exc)
        entry["traceback"] = traceback.format_exc(limit=8)[-3000:]
    finally:
        if provider is not None:
            provider.close()
        backend.release()
    return entry


def _measure(backend, provider, expected, args, entry):
    # 1. first call: compiles (NVRTC, torch.compile) and gives the results to check
    start = time.perf_counter()
    state = provider.forward()
    grads = provider.backward(state)
    backend.synchronize()
    entry["first_call_s"] = time.perf_counter() - start
    if provider.checked:
        entry["correctness"] = common.compare(provider.results(state, grads), expected,
                                              args.tolerance)
        if not entry["correctness"]["ok"]:
            entry["status"] = "incorrect: not timed (see correctness)"
            return
    del state, grads

    # 2. peak memory of one forward+backward, holding its outputs and gradients
    def step():
        state = provider.forward()
        return nbytes(tuple(state) + tuple(provider.backward(state)))
    kept, growth = backend.tracked(step)
    entry["memory"] = {"peak_growth_bytes": growth, "outputs_and_grads_bytes": kept,
                       "peak_extra_bytes": max(0, growth - kept)}

    # 3. times
    ptr = provider.stream_ptr
    timed = {
        "forward": lambda: backend.seconds(lambda _: provider.forward(), stream_ptr=ptr),
        "backward": lambda: backend.seconds(provider.backward, prepare=provider.forward,
                                            stream_ptr=ptr),
        "forward_backward": lambda: backend.seconds(
            lambda _: provider.backward(provider.forward()), stream_ptr=ptr),
    }
    for mode in MODES:
        entry[mode] = common.measure(timed[mode], args.repeats, args.warmup, args.max_seconds)
    entry["status"] = "ok"


def bench_size(backend, size, args, deadline):
    n, k, d = size
    from lgm_op.options import LGMOptions
    opts = LGMOptions(num_classes=k)
    label = common.size_label(size)
    record = {"size": {"n": n, "k": k, "d": d}, "label": label, "providers": {},
              "ratios_vs_ours": {}}
    if time.monotonic() > deadline:
        for name in args.providers:
            record["providers"][name] = {"status": "skipped: run time limit reached"}
        return record
    host = common.make_inputs(n, k, d, args.seed)
    if any(PROVIDER_CLASSES[p].checked for p in args.providers):
        print(f"[{label}] host reference ...", flush=True)
        expected, record["reference"] = host_reference(host, opts)
    else:
        expected = {}
    inputs = {name: backend.xp.asarray(a) for name, a in host.items()}
    del host
    for name in args.providers:
        if time.monotonic() > deadline:
            record["providers"][name] = {"status": "skipped: run time limit reached"}
            continue
        print(f"[{label}] {name} ...", flush=True)
        entry = run_provider(backend, PROVIDER_CLASSES[name], inputs, expected, size, opts, args)
        print(f"[{label}] {name}: {entry['status']}", flush=True)
        record["providers"][name] = entry
    del inputs, expected
    backend.release()
    ours = record["providers"].get("ours", {})
    record["ratios_vs_ours"] = {
        name: {mode: entry[mode]["median_ms"] / ours[mode]["median_ms"]
               for mode in MODES if mode in entry and mode in ours}
        for name, entry in record["providers"].items() if name != "ours"}
    return record


# ---------------------------------------------------------------------------------------------
# report

def _short_status(entry):
    return entry.get("status", "-").split(":")[0]


def table(results):
    headers = ["N x K x D", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd / ours",
               "extra mem MiB", "max rel err", "first call s"]
    rows = []
    for r in results:
        for name, entry in r["providers"].items():
            ok = entry.get("status") == "ok"
            ratio = r["ratios_vs_ours"].get(name, {}).get("forward_backward")
            errors = entry.get("correctness", {}).get("max_rel_error")
            rows.append([
                r["label"], name,
                *(common.format_ms(entry[m]) if ok else _short_status(entry)
                  for m in MODES),
                "1" if name == "ours" and ok else (f"{ratio:.2f}" if ratio else "-"),
                f"{entry['memory']['peak_extra_bytes'] / 2**20:.1f}" if "memory" in entry
                else "-",
                f"{max(errors.values()):.1e}" if errors else "-",
                f"{entry['first_call_s']:.2f}" if "first_call_s" in entry else "-",
            ])
    return common.format_table(headers, rows)


def csv_rows(results):
    rows = []
    for r in results:
        for name, entry in r["providers"].items():
            for mode in MODES:
                stats = entry.get(mode, {})
                errors = entry.get("correctness", {}).get("max_rel_error")
                rows.append({
                    "size": r["label"], "n": r["size"]["n"], "k": r["size"]["k"],
                    "d": r["size"]["d"], "provider": name, "mode": mode,
                    "status": entry.get("status"), "median_ms": stats.get("median_ms"),
                    "min_ms": stats.get("min_ms"), "max_ms": stats.get("max_ms"),
                    "q1_ms": stats.get("q1_ms"), "q3_ms": stats.get("q3_ms"),
                    "repeats": stats.get("repeats"),
                    "over_ours": r["ratios_vs_ours"].get(name, {}).get(mode),
                    "peak_extra_mib": (entry["memory"]["peak_extra_bytes"] / 2**20
                                       if "memory" in entry else None),
                    "max_rel_error": max(errors.values()) if errors else None,
                })
    return rows


def draw_chart(results, path):
    """Grouped bars of the median times per size and provider, one panel per mode (log scale).
    Returns the path, or None where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    names = [p for p in PROVIDERS if any(p in r["providers"] for r in results)]
    width = 0.8 / max(1, len(names))
    fig, axes = plt.subplots(1, len(MODES), figsize=(6 * len(MODES), 4.8), squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        for j, name in enumerate(names):
            xs, heights, notes = [], [], []
            for i, r in enumerate(results):
                entry = r["providers"].get(name)
                if entry is None:
                    continue
                x = i + (j - (len(names) - 1) / 2) * width
                if mode in entry:
                    xs.append(x)
                    heights.append(entry[mode]["median_ms"])
                else:
                    notes.append((x, _short_status(entry)))
            ax.bar(xs, heights, width, color=f"C{j}")
            for x, note in notes:
                ax.text(x, 0.02, note, rotation=90, ha="center", va="bottom", fontsize=7,
                        color=f"C{j}", transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([r["label"] for r in results], rotation=15)
        ax.set_title(mode.replace("_", "+"))
        ax.set_ylabel("median time, ms (log)")
    # handles of their own: a provider with no bar (skipped everywhere) keeps its colour
    axes[0][0].legend(handles=[Patch(color=f"C{j}", label=name) for j, name in enumerate(names)],
                      fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="GPU benchmark of the lgm CUDA kernels against cuBLAS GEMMs, PyTorch "
                    "(eager, torch.compile) and a Caffe-style baseline.")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated NxKxD sizes (default {DEFAULT_SIZES}; with "
                             f"--simulate {SIMULATE_SIZES})")
    common.add_measurement_args(
        parser, PROVIDERS, max_seconds=1.0, tolerance=1e-3,
        tolerance_help="largest error vs the float64 reference, relative to each array's "
                       "largest entry (float32, sums over up to 1e5 terms)")
    parser.add_argument("--time-limit", type=float, default=900.0,
                        help="seconds after which the remaining providers are recorded as "
                             "skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", action="store_true",
                        help="run on the CPU (kernels through lgm_op.cudasim) to check the script")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for gpu.json, gpu.csv and gpu.png")
    args = parser.parse_args(argv)
    args.sizes = common.parse_sizes(args.sizes or (SIMULATE_SIZES if args.simulate
                                                   else DEFAULT_SIZES))
    return common.check_provider_args(parser, args, PROVIDERS)


def main(argv=None):
    args = parse_args(argv)
    if args.simulate:
        backend = SimulatedBackend()
    else:
        try:
            backend = CudaBackend()
        except Exception as exc:  # no CuPy, no driver, no device
            print(f"bench_gpu: needs CuPy and a CUDA GPU ({_first_line(exc)}); "
                  "--simulate checks the script on the CPU", file=sys.stderr)
            return 2
    stem = "gpu_simulated" if args.simulate else "gpu"
    out = Path(args.out)
    settings = {
        "sizes": [common.size_label(s) for s in args.sizes], "providers": args.providers,
        "dtype": "float32", "training": True, "options": "LGMOptions defaults",
        "repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "tolerance": args.tolerance, "seed": args.seed, "simulated": args.simulate,
        "timer": "wall clock (simulated)" if args.simulate else "CUDA events",
        "torch_compile": "torch.compile(dynamic=False): compiled once per size (first_call_s)",
        "memory": "peak allocated device memory of one forward+backward beyond inputs, outputs "
                  "and gradients (CuPy pool high-water mark + torch.cuda.max_memory_allocated)",
    }
    record = common.run_record(stem, ["numpy", "cupy", "torch", "triton", "matplotlib",
                                      "lgm_op"], ENV_NAMES, settings)
    record["hardware"]["gpu"] = backend.record()
    record["results"] = []
    deadline = time.monotonic() + args.time_limit
    for size in args.sizes:
        record["results"].append(bench_size(backend, size, args, deadline))
        common.write_json(out / f"{stem}.json", record)  # partial results survive a crash
    record["load_average_at_end"] = common.load_average()
    print()
    gpu = record["hardware"]["gpu"]
    print(f"GPU: {gpu['name']}; float32, training mode; times in ms as median (min-max); "
          "fwd+bwd / ours > 1 means ours is faster")
    print(table(record["results"]))
    print(f"wrote {common.write_json(out / f'{stem}.json', record)}")
    print(f"wrote {common.write_csv(out / f'{stem}.csv', csv_rows(record['results']))}")
    chart = draw_chart(record["results"], out / f"{stem}.png")
    print(f"wrote {chart}" if chart else "matplotlib is missing: no chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
