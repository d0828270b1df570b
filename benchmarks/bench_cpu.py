"""CPU benchmark: the ``lgm`` operator against the autograd reference, forward and backward.

Both providers run through MXNet on the CPU, on identical float32 inputs, under
``mx.autograd.record`` (training mode), with the same random upstream gradients:

- ``op``: ``mx.nd.Custom(..., op_type='lgm')``, the NumPy/BLAS closed form, O(N*K + N*D + K*D)
  memory;
- ``reference``: ``lgm_op.reference.autograd_forward``, stock MXNet operators over an N x K x D
  tensor, differentiated by ``mx.autograd``.

Per size, in this order:

1. correctness of the operator against the reference (outputs and the three gradients, relative to
   each array's largest entry). Where the whole batch does not fit, the reference runs over chunks
   of rows: logits, lkd and dx are per row, and the mean and log-variance gradients are sums over
   rows, so the chunks add up to the full answer;
2. forward and forward+backward times: ``time.perf_counter`` around the call and
   ``mx.nd.waitall()``, after warm-up, median and spread of the repeats;
3. peak RSS growth of one forward+backward, each provider in a fresh subprocess (``VmHWM`` after
   resetting it, minus ``VmRSS`` with the inputs in place), under an address-space limit so a
   misjudged size fails alone instead of taking the machine down.

A provider whose estimated memory does not fit is recorded as skipped, with the estimate.

    python benchmarks/bench_cpu.py                          # recorded sizes -> benchmarks/results/
    python benchmarks/bench_cpu.py --sizes 8x3x2 --repeats 2 --out /tmp/bench
"""
import argparse
import gc
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

OP = "op"
REFERENCE = "reference"
PROVIDERS = (OP, REFERENCE)
DEFAULT_SIZES = "256x10x2,256x100x64,256x1000x128,1024x10000x256"
# Environment variables that change CPU timings without changing code; recorded, never set here.
ENV_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
             "MKL_NUM_THREADS", "MXNET_ENGINE_TYPE", "MXNET_CPU_WORKER_NTHREADS")
# The reference holds about this many N x K x D float32 tensors at its peak (measured: the peak
# RSS growth of a forward+backward at 256x1000x128 is 7.0 x N*K*D*4 bytes).
REFERENCE_NKD_TENSORS = 7
# The operator computes in float64 and keeps a handful of (N, K) arrays alive (measured: about
# 46 bytes per N*K element at 1024x10000x256); rounded up for the estimate.
OP_BYTES_PER_NK = 64
# A provider runs only when its estimate is below this share of the available memory.
FIT_SHARE = 0.7
# The reference chunks of the correctness check use at most this many bytes.
CHECK_CHUNK_BYTES = 2 * 2**30
# Marker of the memory child's result line on its stdout.
MEMORY_MARK = "LGM_BENCH_MEMORY "
# What the targets below are judged on: (what, size, comparison, threshold).
TARGETS = (
    ("forward_backward_speedup", (256, 100, 64), ">=", 20.0),
    ("forward_backward_speedup", (256, 1000, 128), ">=", 50.0),
    ("op_peak_rss_growth_gib", (1024, 10000, 256), "<", 1.0),
)
NAMES = ("logits", "lkd", "grad_x", "grad_mean", "grad_log_var")


def estimated_bytes(provider, size):
    """Memory one forward+backward of ``provider`` needs beyond its inputs (an estimate)."""
    n, k, d = size
    if provider == REFERENCE:
        return REFERENCE_NKD_TENSORS * n * k * d * 4
    return OP_BYTES_PER_NK * n * k + 8 * (n + k) * d


def fit_problem(provider, size):
    """None when the provider's estimate fits the available memory, else the reason to skip."""
    need = estimated_bytes(provider, size)
    available = common.memory_available_bytes()
    if available is not None and need > FIT_SHARE * available:
        return (f"skipped: needs ~{common.gib(need):.0f} GiB (estimated), "
                f"{common.gib(available):.0f} GiB available")
    return None


# ---------------------------------------------------------------------------------------------
# the two providers

def options(num_classes):
    from lgm_op.options import LGMOptions
    return LGMOptions(num_classes=num_classes)


def to_ndarrays(inputs):
    """NumPy inputs of :func:`common.make_inputs` -> MXNet NDArrays (gradients on x, mean and
    log_var)."""
    import mxnet as mx
    nd = {name: mx.nd.array(value, dtype=value.dtype) for name, value in inputs.items()}
    for name in ("x", "mean", "log_var"):
        nd[name].attach_grad()
    return nd


def run_step(provider, nd, opts, backward):
    """One forward (and backward) of ``provider`` in training mode, synchronised.

    Returns logits: (N, K) and lkd: (N,); the gradients land in ``nd[...].grad``.
    """
    import mxnet as mx
    import lgm_op  # noqa: F401  (registers op_type='lgm')
    from lgm_op.reference import autograd_forward
    with mx.autograd.record(train_mode=True):
        if provider == OP:
            logits, lkd = mx.nd.Custom(nd["x"], nd["label"], nd["mean"], nd["log_var"],
                                       op_type="lgm", **opts.to_attrs())
        else:
            logits, lkd = autograd_forward(nd["x"], nd["label"], nd["mean"], nd["log_var"],
                                           opts, True)
    if backward:
        mx.autograd.backward([logits, lkd], [nd["grad_logits"], nd["grad_lkd"]])
    mx.nd.waitall()
    return logits, lkd


def op_results(inputs, opts):
    """Outputs and gradients of one forward+backward of the operator, as NumPy arrays."""
    nd = to_ndarrays(inputs)
    logits, lkd = run_step(OP, nd, opts, backward=True)
    return dict(zip(NAMES, (logits.asnumpy(), lkd.asnumpy(), nd["x"].grad.asnumpy(),
                            nd["mean"].grad.asnumpy(), nd["log_var"].grad.asnumpy())))


def reference_results(inputs, opts):
    """Outputs and gradients of the autograd reference, over row chunks that fit in memory.

    Returns (results as NumPy arrays, rows per chunk).
    """
    import numpy as np
    from lgm_op.reference import autograd_grads
    n, d = inputs["x"].shape
    k = inputs["mean"].shape[0]
    budget = CHECK_CHUNK_BYTES
    available = common.memory_available_bytes()
    if available is not None:
        budget = min(budget, 0.4 * available)
    rows = int(max(1, min(n, budget // (REFERENCE_NKD_TENSORS * k * d * 4))))
    parts = []
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        parts.append(autograd_grads(inputs["x"][part], inputs["label"][part], inputs["mean"],
                                    inputs["log_var"], inputs["grad_logits"][part],
                                    inputs["grad_lkd"][part], opts, True))
        gc.collect()
    logits, lkd, dx = (np.concatenate([p[i] for p in parts]) for i in range(3))
    dmean, dlog_var = (np.sum([p[i].astype(np.float64) for p in parts], axis=0) for i in (3, 4))
    return dict(zip(NAMES, (logits, lkd, dx, dmean, dlog_var))), rows


# ---------------------------------------------------------------------------------------------
# peak memory, one provider and size per fresh process

def _status_bytes(field):
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(provider, size, seed, headroom_bytes=None):
    """In a fresh process: the peak RSS growth of one forward+backward; prints one result line.

    The address space is limited to what the interpreter maps after its imports plus
    ``headroom_bytes`` (default: 80% of the available memory). The inputs are in place and the
    engine and the operator have run once at a tiny size before the baseline is read, so the
    growth is what the step itself needs.
    """
    import mxnet as mx
    import lgm_op  # noqa: F401
    if headroom_bytes is None:
        headroom_bytes = 0.8 * (common.memory_available_bytes() or 0)
    limit = int(_status_bytes("VmSize") + headroom_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = {"provider": provider, "size": common.size_label(size),
              "address_space_limit_bytes": limit}
    try:
        run_step(provider, to_ndarrays(common.make_inputs(8, 3, 2, seed)), options(3), True)
        nd = to_ndarrays(common.make_inputs(*size, seed))
        mx.nd.waitall()
        gc.collect()
        base = _status_bytes("VmRSS")
        if _reset_peak_rss():
            method = "VmHWM reset through /proc/self/clear_refs"
            run_step(provider, nd, options(size[1]), True)
            peak = _status_bytes("VmHWM")
        else:
            method = "ru_maxrss (lifetime peak; may include earlier peaks)"
            run_step(provider, nd, options(size[1]), True)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(status="ok", peak_rss_growth_bytes=max(0, peak - base),
                      baseline_rss_bytes=base, method=method)
    except MemoryError as exc:
        result.update(status=f"out of memory: MemoryError {exc}".strip())
    except mx.base.MXNetError as exc:
        # MXNet's message is a C++ traceback whose last line names the error
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[-1] if lines else type(exc).__name__
        oom = any(word in text.lower() for word in ("alloc", "memory"))
        result.update(status=("out of memory: " if oom else "failed: ") + text[:300])
    print(MEMORY_MARK + json.dumps(result), flush=True)


def peak_memory(provider, size, seed, headroom_bytes=None):
    """Run :func:`memory_child` in a fresh interpreter; a crash or a kill is recorded, not
    raised. A provider whose estimate does not fit is skipped without starting one."""
    problem = fit_problem(provider, size)
    if problem:
        return {"status": problem, "estimated_bytes": estimated_bytes(provider, size)}
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", provider,
               common.size_label(size), "--seed", str(seed)]
    if headroom_bytes is not None:
        command += ["--memory-headroom-bytes", str(int(headroom_bytes))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"status": "failed: the memory measurement took over an hour"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_MARK):
            result = json.loads(line[len(MEMORY_MARK):])
            result["estimated_bytes"] = estimated_bytes(provider, size)
            return result
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        status = (f"failed: killed by {name} (out of memory under the address-space limit, "
                  "or a crash)")
    else:
        tail = proc.stderr.strip().splitlines()
        status = f"failed: exit code {proc.returncode}: {tail[-1] if tail else 'no message'}"
    return {"status": status[:500], "estimated_bytes": estimated_bytes(provider, size)}


# ---------------------------------------------------------------------------------------------
# one size

def bench_size(size, args):
    """Correctness, timings and memory of both providers at one size: the result record."""
    n, k, d = size
    label = common.size_label(size)
    opts = options(k)
    inputs = common.make_inputs(n, k, d, args.seed)
    record = {"size": {"n": n, "k": k, "d": d}, "label": label, "providers": {}}

    print(f"[{label}] correctness ...", flush=True)
    expected, rows = reference_results(inputs, opts)
    check = common.compare(op_results(inputs, opts), expected, args.tolerance)
    check["reference_rows_per_chunk"] = rows
    record["correctness"] = check
    del expected
    gc.collect()

    nd = to_ndarrays(inputs)
    for provider in args.providers:
        entry = {"estimated_bytes": estimated_bytes(provider, size)}
        problem = fit_problem(provider, size)
        if provider == OP and not check["ok"]:
            problem = "incorrect: not timed (see correctness)"
        if problem:
            entry["status"] = problem
        else:
            entry["status"] = "ok"
            for mode, backward in (("forward", False), ("forward_backward", True)):
                print(f"[{label}] {provider} {mode} ...", flush=True)
                entry[mode] = common.measure(
                    lambda: common.perf_seconds(lambda: run_step(provider, nd, opts, backward)),
                    args.repeats, args.warmup, args.max_seconds)
        if args.memory:
            print(f"[{label}] {provider} peak memory (subprocess) ...", flush=True)
            entry["memory"] = peak_memory(provider, size, args.seed)
        record["providers"][provider] = entry
        gc.collect()

    record["ratios"] = {}
    both = [record["providers"].get(p, {}) for p in (REFERENCE, OP)]
    for mode in ("forward", "forward_backward"):
        if all(mode in entry for entry in both):
            record["ratios"][mode] = both[0][mode]["median_ms"] / both[1][mode]["median_ms"]
    return record


# ---------------------------------------------------------------------------------------------
# report

def _memory_text(entry):
    memory = (entry or {}).get("memory")
    if not memory:
        return "-"
    if memory.get("status") != "ok":
        return memory["status"].split(":")[0]
    return f"{memory['peak_rss_growth_bytes'] / 2**20:.0f} MiB"


def _time_text(entry, mode):
    entry = entry or {}
    if mode in entry:
        return common.format_ms(entry[mode])
    return entry.get("status", "-").split(":")[0]


def table(results):
    headers = ["N x K x D", "op fwd ms", "ref fwd ms", "ratio", "op fwd+bwd ms",
               "ref fwd+bwd ms", "ratio", "op peak RSS", "ref peak RSS", "max rel err"]
    rows = []
    for r in results:
        op, ref = r["providers"].get(OP), r["providers"].get(REFERENCE)
        ratios = r["ratios"]
        rows.append([
            r["label"], _time_text(op, "forward"), _time_text(ref, "forward"),
            f"{ratios['forward']:.1f}x" if "forward" in ratios else "-",
            _time_text(op, "forward_backward"), _time_text(ref, "forward_backward"),
            f"{ratios['forward_backward']:.1f}x" if "forward_backward" in ratios else "-",
            _memory_text(op), _memory_text(ref),
            f"{max(r['correctness']['max_rel_error'].values()):.1e}",
        ])
    return common.format_table(headers, rows)


def evaluate_targets(results):
    by_size = {(r["size"]["n"], r["size"]["k"], r["size"]["d"]): r for r in results}
    out = []
    for what, size, comparison, threshold in TARGETS:
        target = {"what": what, "size": common.size_label(size), "comparison": comparison,
                  "threshold": threshold, "value": None, "met": None}
        r = by_size.get(size)
        if r is not None:
            if what == "forward_backward_speedup":
                target["value"] = r["ratios"].get("forward_backward")
            else:
                memory = r["providers"].get(OP, {}).get("memory", {})
                if memory.get("status") == "ok":
                    target["value"] = common.gib(memory["peak_rss_growth_bytes"])
            if target["value"] is not None:
                v = target["value"]
                target["met"] = v >= threshold if comparison == ">=" else v < threshold
        out.append(target)
    return out


def csv_rows(results):
    rows = []
    for r in results:
        for provider, entry in r["providers"].items():
            memory = entry.get("memory", {})
            for mode in ("forward", "forward_backward"):
                stats = entry.get(mode, {})
                rows.append({
                    "size": r["label"], "n": r["size"]["n"], "k": r["size"]["k"],
                    "d": r["size"]["d"], "provider": provider, "mode": mode,
                    "status": entry["status"], "median_ms": stats.get("median_ms"),
                    "min_ms": stats.get("min_ms"), "max_ms": stats.get("max_ms"),
                    "q1_ms": stats.get("q1_ms"), "q3_ms": stats.get("q3_ms"),
                    "repeats": stats.get("repeats"),
                    "reference_over_op": r["ratios"].get(mode),
                    "peak_rss_growth_mib": (memory["peak_rss_growth_bytes"] / 2**20
                                            if memory.get("status") == "ok" else None),
                    "memory_status": memory.get("status"),
                    "correct": r["correctness"]["ok"],
                })
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="CPU benchmark of the lgm operator against the autograd reference "
                    "(forward, forward+backward, peak memory).")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated NxKxD sizes (default {DEFAULT_SIZES})")
    common.add_measurement_args(
        parser, PROVIDERS, max_seconds=20.0, tolerance=1e-4,
        tolerance_help="largest error of the operator vs the reference, relative to each "
                       "array's largest entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for cpu.json and cpu.csv")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "SIZE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--memory-headroom-bytes", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = common.parse_sizes(args.sizes)
    return common.check_provider_args(parser, args, PROVIDERS)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        provider, size = args.memory_child
        memory_child(provider, common.parse_sizes(size)[0], args.seed,
                     args.memory_headroom_bytes)
        return 0

    settings = {
        "sizes": [common.size_label(s) for s in args.sizes], "providers": args.providers,
        "dtype": "float32", "training": True, "options": options(1).to_attrs(),
        "repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "tolerance": args.tolerance, "seed": args.seed, "memory": args.memory,
        "timer": "time.perf_counter around the call and mx.nd.waitall()",
        "memory_method": "peak RSS growth of one forward+backward in a fresh subprocess",
    }
    del settings["options"]["num_classes"]
    record = common.run_record("cpu", ["numpy", "mxnet", "lgm_op"], ENV_NAMES, settings)
    record["results"] = []
    for size in args.sizes:
        record["results"].append(bench_size(size, args))
    record["targets"] = evaluate_targets(record["results"])
    record["load_average_at_end"] = common.load_average()

    print()
    print(f"CPU: {record['hardware']['cpu']['model']}, "
          f"{record['hardware']['cpu']['logical_cores']} cores; float32, training mode; "
          "times in ms as median (min-max); ratio = reference / op")
    print(table(record["results"]))
    for t in record["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"target {t['what']} at {t['size']} {t['comparison']} {t['threshold']:g}: "
              f"{value} ({verdict})")
    out = Path(args.out)
    print(f"wrote {common.write_json(out / 'cpu.json', record)}")
    print(f"wrote {common.write_csv(out / 'cpu.csv', csv_rows(record['results']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
