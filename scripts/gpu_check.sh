#!/usr/bin/env bash
# The GPU check, one prepared run for a machine with a CUDA GPU: the kernel tests on the CuPy
# backend, the NVRTC and compiled-instruction tests, compute-sanitizer memcheck and racecheck over
# every kernel, then benchmarks/bench_gpu.py and its times beside the prediction of
# benchmarks/sass_report.py. Needs CuPy, NumPy and pytest (PyTorch for its providers); not MXNet,
# not the network. Run from anywhere, without installing the package.
#
# Everything goes to benchmarks/results/gpu_check/ (gpu_check.txt, gpu.json/csv/png,
# gpu_vs_prediction.txt) and, when $OUT is set, is copied there too. The run goes on past a failing
# step; the exit status is 1 if any step failed. BENCH_TIME_LIMIT (seconds, default 300) caps the
# benchmark; BENCH_ARGS adds arguments to it.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="$REPO/benchmarks/results/gpu_check"
mkdir -p "$RESULTS"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
FAILED=()

step() {  # step NAME COMMAND...: run it, report its status, remember a failure
    local name="$1"
    shift
    echo
    echo "== $name"
    "$@"
    local status=$?
    echo "-- $name: exit status $status"
    [ "$status" -eq 0 ] || FAILED+=("$name")
}

find_sanitizer() {  # the toolkit's compute-sanitizer, or the pip wheel's
    local p
    for p in "$(command -v compute-sanitizer)" /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda-*/bin/compute-sanitizer \
        $("$PY" -c 'import glob, nvidia; [print(p) for root in nvidia.__path__
                    for p in glob.glob(root + "/*/compute-sanitizer/compute-sanitizer")]' \
          2>/dev/null); do
        if [ -n "$p" ] && [ -x "$p" ]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# every kernel once, small and odd-sized: labelled and label-free, diagonal and isotropic, split
# loops, both dtypes; under compute-sanitizer
SANITIZE_RUN="$(mktemp "${TMPDIR:-/tmp}/lgm_sanitize.XXXXXX.py")"
trap 'rm -f "$SANITIZE_RUN"' EXIT
cat > "$SANITIZE_RUN" <<'PY'
import sys
import cupy
import numpy as np
sys.path.insert(0, "tests")
from common import make_inputs
from lgm_op.cuda import lgm_backward_cuda, lgm_forward_cuda
from lgm_op.options import LGMOptions

for (n, k, d), dtype in (((70, 66, 37), "float32"), ((257, 1000, 3), "float64"),
                         ((130, 2, 129), "float32")):
    for isotropic in (False, True):
        inp = make_inputs(np.random.default_rng(0), n, k, d, dtype=dtype, isotropic=isotropic)
        dev = {key: cupy.asarray(v) for key, v in inp.items()}
        for label in (dev["y"], None):
            opts = LGMOptions(num_classes=k, isotropic=isotropic, with_label=label is not None)
            logits, _ = lgm_forward_cuda(dev["x"], label, dev["mu"], dev["s"], opts, True)
            used = label if label is not None else cupy.argmax(logits, axis=1)
            lgm_backward_cuda(dev["x"], used, dev["mu"], dev["s"], dev["gz"], dev["gl"], opts,
                              True)
cupy.cuda.get_current_stream().synchronize()
print("sanitizer run: every kernel launched")
PY

sanitize() {  # sanitize TOOL
    local tool
    tool="$(find_sanitizer)" || { echo "compute-sanitizer not found"; return 1; }
    "$tool" --tool "$1" --error-exitcode 3 --print-limit 20 "$PY" "$SANITIZE_RUN"
}

environment() {  # fails without a GPU: the later steps then say what could not run
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader &&
    "$PY" -c 'import sys, numpy, cupy; print("python", sys.version.split()[0], "| numpy",
numpy.__version__, "| cupy", cupy.__version__, "| CUDA runtime",
cupy.cuda.runtime.runtimeGetVersion(), "| devices", cupy.cuda.runtime.getDeviceCount())'
}

{
step "environment" environment
step "kernel tests on the GPU" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py \
    -k gpu --durations=10
step "NVRTC compile and compiled-instruction tests" "$PY" -m pytest -q -s -p no:cacheprovider \
    tests/test_nvrtc.py tests/test_sass_report.py
step "compute-sanitizer memcheck" sanitize memcheck
step "compute-sanitizer racecheck" sanitize racecheck
# shellcheck disable=SC2086
step "benchmark" "$PY" benchmarks/bench_gpu.py --out "$RESULTS" \
    --time-limit "${BENCH_TIME_LIMIT:-300}" ${BENCH_ARGS:-}
step "measured beside predicted" bash -o pipefail -c \
    "'$PY' benchmarks/sass_report.py --beside '$RESULTS/gpu.json' | tee '$RESULTS/gpu_vs_prediction.txt'"
echo
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "gpu_check: every step passed"
else
    echo "gpu_check: failed steps: ${FAILED[*]}"
fi
[ "${#FAILED[@]}" -eq 0 ]
} 2>&1 | tee "$RESULTS/gpu_check.txt"
status=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_check" && cp -r "$RESULTS/." "$OUT/gpu_check/"
fi
exit "$status"
