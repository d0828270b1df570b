#!/usr/bin/env bash
# The GPU check: the kernel tests on the CuPy backend, then a first timing of forward + backward
# at (N, K, D) = (1024, 10000, 512), float32, after a correctness check against the CPU path.
# Needs CuPy and pytest, not MXNet; run from anywhere, without installing the package.
# Everything printed also goes to $OUT/gpu_check.txt (OUT defaults to the current folder).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOG="${OUT:-.}/gpu_check.txt"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

{
echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c 'import sys, numpy, cupy; print("python", sys.version.split()[0], "| numpy",
numpy.__version__, "| cupy", cupy.__version__, "| CUDA runtime",
cupy.cuda.runtime.runtimeGetVersion())'
git rev-parse --short HEAD 2>/dev/null

echo "== tests: tests/test_kernels.py -k gpu, then the NVRTC compile and resource table"
python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k gpu --durations=10
echo "pytest exit status: $?"
python -m pytest -q -s -p no:cacheprovider tests/test_nvrtc.py
echo "pytest exit status: $?"

echo "== timing"
python - <<'PY'
import numpy as np
import cupy

from lgm_op.cpu import lgm_backward_cpu, lgm_forward_cpu
from lgm_op.cuda import lgm_backward_cuda, lgm_forward_cuda
from lgm_op.options import LGMOptions

n, k, d = 1024, 10000, 512
rng = np.random.default_rng(0)
host = dict(x=rng.standard_normal((n, d)), mu=rng.standard_normal((k, d)),
            s=rng.uniform(-1.5, 1.5, (k, d)), gz=rng.standard_normal((n, k)) / n,
            gl=rng.standard_normal(n) / n)
host = {key: v.astype(np.float32) for key, v in host.items()}
host["y"] = rng.integers(0, k, n).astype(np.int32)
dev = {key: cupy.asarray(v) for key, v in host.items()}
opts = LGMOptions(num_classes=k)


def forward():
    return lgm_forward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], opts, True)


def backward():
    return lgm_backward_cuda(dev["x"], dev["y"], dev["mu"], dev["s"], dev["gz"], dev["gl"], opts,
                             True)


# correctness first: against the float64 CPU path, relative to each output's largest entry
got = [cupy.asnumpy(a) for a in forward() + backward()]
want = list(lgm_forward_cpu(*(host[key].astype(np.float64) for key in ("x", "y", "mu", "s")),
                            opts, True))
want += list(lgm_backward_cpu(*(host[key].astype(np.float64)
                                for key in ("x", "y", "mu", "s", "gz", "gl")), opts, True))
for name, a, b in zip(("logits", "lkd", "dx", "dmean", "dlog_var"), got, want):
    err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    print(f"{name:>9}: max |gpu - cpu64| / max |cpu64| = {err:.2e}", "ok" if err < 1e-5 else "BAD")


def time_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return np.median(times), np.min(times), np.max(times)


# arithmetic per (i, k, j): forward 3 (subtract, multiply, fma), dx 3, dmean/dlog_var 4
elements = float(n) * k * d
name = cupy.cuda.runtime.getDeviceProperties(dev["x"].device.id)["name"].decode()
print(f"(N, K, D) = ({n}, {k}, {d}) float32 on {name}")
for name, fn, work in (("forward", forward, 3 * elements), ("backward", backward, 7 * elements),
                       ("forward+backward", lambda: (forward(), backward()), 10 * elements)):
    med, lo, hi = time_ms(fn)
    print(f"{name:>17}: median {med:8.3f} ms  (min {lo:.3f}, max {hi:.3f}, 20 runs)  "
          f"~{work / med / 1e9:.1f} TFLOP/s")
PY
echo "timing exit status: $?"
} 2>&1 | tee "$LOG"
