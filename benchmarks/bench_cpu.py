"""CPU benchmark: the ``lgm`` operator against the strongest L-GM a user can write instead, and the
floors of its approach and of its mechanism. float32, training mode, forward+backward with random
upstream gradients on logits and lkd and all three input gradients.

Providers, on identical inputs:

- ``op``: ``mx.nd.Custom(..., op_type='lgm')`` under ``mx.autograd``;
- ``mx_dot``, ``mx_dot_hybrid``, ``mx_fc``, ``mx_fc_hybrid``: the GEMM expansion of the loss from
  stock MXNet operators as a Gluon HybridBlock (``baselines/stock_mxnet.py``), with ``F.dot`` or
  ``F.FullyConnected``, imperative or hybridized with ``static_alloc`` and ``static_shape``;
- ``numpy``: the same closed form in plain NumPy, forward and backward by hand
  (``baselines/closed_form_numpy.py``);
- ``gemms``: the six matrix products that closed form needs, alone: the floor of the approach;
- ``noop``: a Python CustomOp with the operator's signature that only writes zeros as ``req``
  says: the floor of the mechanism;
- ``naive``: ``lgm_op.reference.autograd_forward``, stock operators broadcasting over N x K x D
  (skipped, with the estimate, where that does not fit in memory).

Per size: the float64 reference of ``lgm_op.reference`` (over chunks of rows where N x K x D does
not fit), every loss provider checked against it (outputs and the three gradients, relative to
each array's largest entry; a wrong provider is not timed), ``--warmup`` untimed steps each, then
rounds in which every provider runs once, in an order drawn afresh each round. Each
provider gets the median and spread of its rounds; each peer the median of its per-round ratios
peer time / op time (> 1: the op is ahead). Then, per ``--memory-sizes`` entry, the peak RSS growth
of one forward+backward of each provider in a fresh child process (``VmHWM`` of
``/proc/self/status`` after resetting it, minus ``VmRSS`` with the inputs in place).

MXNet's operators run on every core: ``OMP_NUM_THREADS`` is set to ``--omp-threads`` (default: the
number of cores), and ``OMP_WAIT_POLICY`` to ``--omp-wait-policy`` (default PASSIVE: MXNet's idle
OpenMP threads otherwise spin on the cores that the next operator needs, which measured here
doubles the op's time between MXNet operators and leaves MXNet's own peers unchanged), before
MXNet is imported; when they are not, the script runs itself again in a child process with them
set. The setting, the BLAS and OpenMP libraries with their thread counts, the
machine, the versions and the git sha are recorded in the JSON.

    python benchmarks/bench_cpu.py                   # the issue's sizes -> benchmarks/out/cpu.json
    python benchmarks/bench_cpu.py --out benchmarks/results      # the recorded results
    python benchmarks/bench_cpu.py --sizes 8x3x2 --repeats 3 --memory-sizes ''
    python benchmarks/write_tables.py                 # README table from benchmarks/results/
"""
import argparse
import gc
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, write_tables  # noqa: E402

OP, NAIVE = "op", "naive"
# name -> (table label, kind): "loss" providers are checked against the reference, "floor"
# providers compute no loss and only bound what the op can reach.
PROVIDERS = {
    OP: ("op (mx.nd.Custom)", "loss"),
    "mx_dot": ("stock ops, dot", "loss"),
    "mx_dot_hybrid": ("stock ops, dot, hybridized", "loss"),
    "mx_fc": ("stock ops, FullyConnected", "loss"),
    "mx_fc_hybrid": ("stock ops, FullyConnected, hybridized", "loss"),
    "numpy": ("NumPy closed form", "loss"),
    "gemms": ("the six GEMMs alone", "floor"),
    "noop": ("no-op CustomOp", "floor"),
    NAIVE: ("naive broadcast reference", "loss"),
}
STOCK = ("mx_dot", "mx_dot_hybrid", "mx_fc", "mx_fc_hybrid")
DEFAULT_SIZES = "256x10x2,128x100x384,256x1000x128,512x10000x512"
DEFAULT_MEMORY_SIZES = "1024x10000x256"
# Environment variables that change CPU timings without changing code; recorded. Only
# OMP_NUM_THREADS and OMP_WAIT_POLICY are set here (MXNet's operator threads); the BLAS
# workarounds stay as given.
ENV_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
             "OMP_WAIT_POLICY",
             "MKL_NUM_THREADS", "MXNET_ENGINE_TYPE", "MXNET_CPU_WORKER_NTHREADS",
             "MXNET_OMP_MAX_THREADS")
NAMES = ("logits", "lkd", "grad_x", "grad_mean", "grad_log_var")
# What the targets are judged on: (what, size, comparison, threshold).
TARGETS = (
    ("fastest stock-op peer / op", (128, 100, 384), ">=", 1.0),
    ("fastest stock-op peer / op", (256, 1000, 128), ">=", 1.0),
    ("fastest stock-op peer / op", (512, 10000, 512), ">=", 1.0),
    ("op / the six GEMMs alone", (512, 10000, 512), "<=", 1.3),
    ("op / no-op CustomOp", (256, 10, 2), "<=", 1.5),
    ("op peak RSS growth (GiB)", (1024, 10000, 256), "<", 1.0),
)
# Memory of one forward+backward beyond the inputs, for the fit check (upper estimates, float32):
# (bytes per N*K element, bytes per N*K*D element). The naive reference holds about 7 N x K x D
# tensors at its peak (measured: 7.0 x N*K*D*4 bytes at 256x1000x128); the others a handful of
# (N, K) arrays and their gradients.
ESTIMATES = {name: (64, 0) for name in PROVIDERS}
ESTIMATES[NAIVE] = (0, 7 * 4)
# A provider runs only when its estimate is below this share of the available memory.
FIT_SHARE = 0.7
# The reference's chunks hold about this many N x K x D float64 arrays at once, within at most
# this many bytes.
REFERENCE_NKD_ARRAYS = 6
REFERENCE_CHUNK_BYTES = 2**30
# Marker of the memory child's result line on its stdout.
MEMORY_MARK = "LGM_BENCH_MEMORY "
# The statistics of common.summarize, in the order of the CSV columns.
STATS_KEYS = ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats")
# Rounds run at least this many times before --max-seconds can stop them.
MIN_ROUNDS = 3


def estimated_bytes(name, size):
    n, k, d = size
    per_nk, per_nkd = ESTIMATES[name]
    return per_nk * n * k + per_nkd * n * k * d + 8 * (n + k) * d


def fit_problem(name, size):
    """None when the provider's estimate fits in the available memory, else the reason to skip."""
    need = estimated_bytes(name, size)
    available = common.memory_available_bytes()
    if available is not None and need > FIT_SHARE * available:
        return (f"skipped: needs ~{common.gib(need):.0f} GiB (estimated), "
                f"{common.gib(available):.0f} GiB available")
    return None


def failure_status(exc):
    """'out of memory: ...' or 'failed: ...' for an exception a provider raised."""
    if isinstance(exc, MemoryError):
        return f"out of memory: MemoryError {exc}".strip()
    # MXNet's message is a C++ traceback whose last line names the error
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    oom = type(exc).__name__ == "MXNetError" and any(
        word in text.lower() for word in ("alloc", "memory"))
    return ("out of memory: " if oom else "failed: ") + text[:300]


# ---------------------------------------------------------------------------------------------
# the providers: one setup each on the same NumPy inputs; step() runs one synchronised
# forward+backward; results() returns what the last step computed, as NumPy arrays

class _Autograd:
    """A provider differentiated by ``mx.autograd``: subclasses give ``outputs()`` (logits,
    lkd) under ``autograd.record``; the gradients land in the NDArrays' ``.grad``."""

    def __init__(self, inputs, opts):
        import mxnet as mx
        self.mx = mx
        self.opts = opts
        self.nd = {name: mx.nd.array(value, dtype=value.dtype) for name, value in inputs.items()}
        for name in ("x", "mean", "log_var"):
            self.nd[name].attach_grad()
        self._outputs = None

    def args(self):
        return self.nd["x"], self.nd["label"], self.nd["mean"], self.nd["log_var"]

    def step(self):
        mx = self.mx
        with mx.autograd.record(train_mode=True):
            logits, lkd = self.outputs()
        mx.autograd.backward([logits, lkd], [self.nd["grad_logits"], self.nd["grad_lkd"]])
        mx.nd.waitall()
        self._outputs = logits, lkd

    def results(self):
        grads = [self.nd[name].grad.asnumpy() for name in ("x", "mean", "log_var")]
        return dict(zip(NAMES, [a.asnumpy() for a in self._outputs] + grads))


class Op(_Autograd):
    def __init__(self, inputs, opts):
        super().__init__(inputs, opts)
        import lgm_op  # noqa: F401  (registers op_type='lgm')
        self.attrs = opts.to_attrs()

    def outputs(self):
        return self.mx.nd.Custom(*self.args(), op_type="lgm", **self.attrs)


class StockOps(_Autograd):
    """The GEMM-expansion HybridBlock; ``gemm`` and ``hybrid`` pick the variant."""

    def __init__(self, inputs, opts, gemm, hybrid):
        super().__init__(inputs, opts)
        from benchmarks.baselines.stock_mxnet import GemmExpansionLGM
        self.block = GemmExpansionLGM(opts, gemm, dtype=inputs["x"].dtype.name)
        self.block.initialize()
        if hybrid:
            self.block.hybridize(static_alloc=True, static_shape=True)

    def outputs(self):
        return self.block(*self.args())


class NoOp(_Autograd):
    def __init__(self, inputs, opts):
        super().__init__(inputs, opts)
        from benchmarks.baselines.stock_mxnet import NOOP_OP_TYPE
        self.op_type = NOOP_OP_TYPE

    def outputs(self):
        return self.mx.nd.Custom(*self.args(), op_type=self.op_type,
                                 num_classes=self.opts.num_classes)


class Naive(_Autograd):
    def outputs(self):
        from lgm_op.reference import autograd_forward
        return autograd_forward(*self.args(), self.opts, True)


class NumpyClosedForm:
    def __init__(self, inputs, opts):
        self.inputs = inputs
        self.opts = opts
        self._results = None

    def step(self):
        from benchmarks.baselines.closed_form_numpy import NumpyGemmExpansion
        a = self.inputs
        loss = NumpyGemmExpansion(a["x"], a["label"], a["mean"], a["log_var"], self.opts)
        self._results = loss.forward() + loss.backward(a["grad_logits"], a["grad_lkd"])

    def results(self):
        return dict(zip(NAMES, self._results))


class Gemms:
    def __init__(self, inputs, opts):
        from benchmarks.baselines.closed_form_numpy import SixGemms
        self.gemms = SixGemms(inputs["x"], inputs["mean"], inputs["log_var"],
                              inputs["grad_logits"])

    def step(self):
        self.gemms.run()


def make_provider(name, inputs, opts):
    if name == OP:
        return Op(inputs, opts)
    if name in STOCK:
        return StockOps(inputs, opts, "dot" if "dot" in name else "fully_connected",
                        name.endswith("_hybrid"))
    return {"numpy": NumpyClosedForm, "gemms": Gemms, "noop": NoOp, NAIVE: Naive}[name](
        inputs, opts)


def options(num_classes):
    from lgm_op.options import LGMOptions
    return LGMOptions(num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# correctness

def reference_results(inputs, opts):
    """The float64 answer of ``lgm_op.reference`` (NumPy broadcasting), over chunks of rows that
    fit in memory: logits, lkd and dx are per row, the mean and log-variance gradients sums over
    rows, so the chunks add up to the full answer. Returns (name -> array, rows per chunk)."""
    import numpy as np
    from lgm_op.reference import numpy_forward, numpy_grads
    a = inputs
    n, d = a["x"].shape
    k = a["mean"].shape[0]
    budget = REFERENCE_CHUNK_BYTES
    available = common.memory_available_bytes()
    if available is not None:
        budget = min(budget, 0.3 * available)
    rows = int(max(1, min(n, budget // (REFERENCE_NKD_ARRAYS * k * d * 8))))
    parts = []
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        args = (a["x"][part], a["label"][part], a["mean"], a["log_var"])
        parts.append(numpy_forward(*args, opts, True) + numpy_grads(
            *args, a["grad_logits"][part], a["grad_lkd"][part], opts, True))
        gc.collect()
    per_row = [np.concatenate([p[i] for p in parts]) for i in range(3)]
    summed = [np.sum([p[i] for p in parts], axis=0) for i in (3, 4)]
    return dict(zip(NAMES, per_row + summed)), rows


# ---------------------------------------------------------------------------------------------
# timing: interleaved rounds

def round_orders(names, seed):
    """An endless sequence of orders of ``names``, one per round: each a fresh permutation from a
    generator seeded with ``seed`` (reproducible). Not a rotation: rotating one order keeps
    every provider behind the same neighbour in every round (the op would always run right after
    the naive reference, whose 100 ms of MXNet operators leave every thread asleep and every
    cache cold, and each stock-op peer after its own variant), which biases the ratios; a
    permutation gives each provider every predecessor in turn."""
    generator = random.Random(seed)
    while True:
        order = list(names)
        generator.shuffle(order)
        yield order


def run_rounds(providers, repeats, warmup, max_seconds, seed=0):
    """Time ``providers`` (name -> provider, each checked and run once) in rounds.

    Every provider gets ``warmup`` untimed steps; then each round runs every provider once, in
    an order drawn afresh each round (:func:`round_orders`), until ``repeats`` rounds or, after
    ``MIN_ROUNDS``, ``max_seconds`` of rounds. Returns (name -> per-round seconds, None where it
    did not run; name -> failure status of those that failed; the orders of the rounds).
    """
    failed = {}
    for name, provider in providers.items():
        try:
            for _ in range(warmup):
                provider.step()
        except Exception as exc:  # recorded, the run goes on
            failed[name] = failure_status(exc)
    names = [name for name in providers if name not in failed]
    times = {name: [] for name in names}
    orders = []
    gc.collect()
    start = time.perf_counter()
    for r, order in zip(range(repeats), round_orders(names, seed)):
        orders.append(order)
        for name in order:
            if name in failed:
                times[name].append(None)
                continue
            try:
                times[name].append(common.perf_seconds(providers[name].step))
            except Exception as exc:  # recorded, the run goes on
                failed[name] = failure_status(exc)
                times[name].append(None)
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start >= max_seconds:
            break
    return times, failed, orders


def ratio_stats(numerator, denominator):
    """Median and quartiles of the per-round ratios numerator / denominator (rounds where both
    ran), or None."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator)
                    if a is not None and b is not None)
    if not ratios:
        return None
    q1, q3 = ratios[0], ratios[-1]
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "rounds": len(ratios)}


# ---------------------------------------------------------------------------------------------
# one size

def start_size(size, args, options):
    """(label, options, inputs, record, expected): one size's inputs, its record with the float64
    reference's provenance, and the reference's results the providers are checked against."""
    n, k, d = size
    label = common.size_label(size)
    opts = options(k)
    inputs = common.make_inputs(n, k, d, args.seed)
    record = {"size": {"n": n, "k": k, "d": d}, "label": label, "providers": {}}
    print(f"[{label}] float64 reference ...", flush=True)
    start = time.perf_counter()
    expected, rows = reference_results(inputs, opts)
    record["reference"] = {"implementation": "lgm_op.reference.numpy_forward/numpy_grads",
                           "dtype": "float64", "rows_per_chunk": rows,
                           "seconds": time.perf_counter() - start}
    return label, opts, inputs, record, expected


def bench_size(size, args):
    """Reference, checks, interleaved timings of every provider at one size: the result record."""
    label, opts, inputs, record, expected = start_size(size, args, options)
    ready = {}
    for name in args.providers:
        title, kind = PROVIDERS[name]
        entry = {"label": title, "kind": kind, "estimated_bytes": estimated_bytes(name, size),
                 "correctness": None}
        record["providers"][name] = entry
        entry["status"] = fit_problem(name, size)
        if entry["status"]:
            continue
        print(f"[{label}] {name}: check ...", flush=True)
        try:
            provider = make_provider(name, inputs, opts)
            provider.step()
            if kind == "loss":
                entry["correctness"] = common.compare(provider.results(), expected,
                                                      args.tolerance)
        except Exception as exc:  # recorded, the run goes on
            entry["status"] = failure_status(exc)
            continue
        if entry["correctness"] is not None and not entry["correctness"]["ok"]:
            entry["status"] = "incorrect: not timed (see correctness)"
            continue
        entry["status"] = "ok"
        ready[name] = provider
    del expected
    gc.collect()

    return time_in_rounds(record, ready, args, label)


def time_in_rounds(record, ready, args, label, op=OP):
    """Time the checked providers ``ready`` in interleaved rounds and fill ``record``'s entries:
    raw times, statistics, and each peer's median per-round ratio to the op."""
    print(f"[{label}] {len(ready)} providers in rounds ...", flush=True)
    times, failed, orders = run_rounds(ready, args.repeats, args.warmup, args.max_seconds,
                                       seed=args.seed)
    record["rounds"] = max((len(t) for t in times.values()), default=0)
    record["round_orders"] = orders
    op_times = times.get(op)
    for name, entry in record["providers"].items():
        if name in failed:
            entry["status"] = failed[name]
        if name not in times:
            continue
        entry["times_ms"] = [None if t is None else 1e3 * t for t in times[name]]
        done = [t for t in times[name] if t is not None]
        if done:
            entry["stats"] = common.summarize(done)
        if op_times is not None and name != op:
            entry["ratio_to_op"] = ratio_stats(times[name], op_times)
            entry["op_over_provider"] = ratio_stats(op_times, times[name])
    return record


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


def memory_child(name, size, seed, headroom_bytes=None):
    """In a fresh process: the peak RSS growth of one forward+backward; prints one result line.

    The address space is limited to what the interpreter maps after its imports plus
    ``headroom_bytes`` (default: 80% of the available memory), so a misjudged size fails alone.
    The provider has run once at a tiny size and is set up with its inputs in place before the
    baseline is read, so the growth is what the step itself needs.
    """
    import mxnet  # noqa: F401  (mapped before the limit is read)
    import lgm_op  # noqa: F401
    from benchmarks.baselines import stock_mxnet  # noqa: F401
    if headroom_bytes is None:
        headroom_bytes = 0.8 * (common.memory_available_bytes() or 0)
    limit = int(_status_bytes("VmSize") + headroom_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = {"provider": name, "size": common.size_label(size),
              "address_space_limit_bytes": limit,
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        make_provider(name, common.make_inputs(8, 3, 2, seed), options(3)).step()
        provider = make_provider(name, common.make_inputs(*size, seed), options(size[1]))
        gc.collect()
        base = _status_bytes("VmRSS")
        if _reset_peak_rss():
            method = "VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before"
        else:
            method = ("VmHWM (not resettable here: the child's lifetime peak, an upper bound), "
                      "minus VmRSS before")
        provider.step()
        peak = _status_bytes("VmHWM")
        result.update(status="ok", peak_rss_growth_bytes=max(0, peak - base),
                      baseline_rss_bytes=base, method=method)
    except Exception as exc:  # recorded in the parent, which goes on
        result.update(status=failure_status(exc))
    print(MEMORY_MARK + json.dumps(result), flush=True)


def peak_memory(name, size, seed, headroom_bytes=None, omp_threads=None):
    """Run :func:`memory_child` in a fresh interpreter with MXNet on ``omp_threads`` (default:
    every core); a crash or a kill is recorded, not raised. A provider whose estimate does not
    fit is skipped without starting one."""
    estimate = {"estimated_bytes": estimated_bytes(name, size)}
    problem = fit_problem(name, size)
    if problem:
        return {"status": problem, **estimate}
    threads = str(omp_threads or os.cpu_count())
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
               common.size_label(size), "--seed", str(seed), "--omp-threads", threads]
    if headroom_bytes is not None:
        command += ["--memory-headroom-bytes", str(int(headroom_bytes))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                              env=dict(os.environ, OMP_NUM_THREADS=threads))
    except subprocess.TimeoutExpired:
        return {"status": "failed: the memory measurement took over an hour", **estimate}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MEMORY_MARK):
            return {**json.loads(line[len(MEMORY_MARK):]), **estimate}
    if proc.returncode < 0:
        status = (f"failed: killed by {signal.Signals(-proc.returncode).name} (out of memory "
                  "under the address-space limit, or a crash)")
    else:
        tail = proc.stderr.strip().splitlines()
        status = f"failed: exit code {proc.returncode}: {tail[-1] if tail else 'no message'}"
    return {"status": status[:500], **estimate}


# ---------------------------------------------------------------------------------------------
# the record

def thread_record():
    """OMP_NUM_THREADS and every BLAS / OpenMP library loaded (MXNet's and NumPy's), with its
    thread count, from threadpoolctl."""
    record = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count()}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        record["libraries"] = None
        record["libraries_note"] = "threadpoolctl is not installed"
        return record
    record["libraries"] = [
        {"file": "/".join(Path(info["filepath"]).parts[-2:]),
         **{key: info.get(key) for key in ("user_api", "internal_api", "version", "num_threads",
                                            "threading_layer", "architecture")}}
        for info in threadpool_info()]
    return record


def evaluate_targets(record):
    """The issue's targets with the values of this run (None where not measured)."""
    results = {r["label"]: r for r in record["results"]}
    memory = {m["label"]: m for m in record["memory"]}
    out = []
    for what, size, comparison, threshold in TARGETS:
        label = common.size_label(size)
        value = None
        providers = results.get(label, {}).get("providers", {})
        if what.startswith("fastest stock-op"):
            ratios = [(providers.get(p) or {}).get("ratio_to_op") for p in STOCK]
            ratios = [r["median"] for r in ratios if r]
            value = min(ratios) if ratios else None
        elif what.startswith("op / "):
            floor = "gemms" if "GEMMs" in what else "noop"
            stats = (providers.get(floor) or {}).get("op_over_provider")
            value = stats["median"] if stats else None
        else:
            entry = memory.get(label, {}).get("providers", {}).get(OP, {})
            if entry.get("status") == "ok":
                value = common.gib(entry["peak_rss_growth_bytes"])
        met = None
        if value is not None:
            met = {">=": value >= threshold, "<=": value <= threshold,
                   "<": value < threshold}[comparison]
        out.append({"what": what, "size": label, "comparison": comparison,
                    "threshold": threshold, "value": value, "met": met})
    return out


def csv_rows(record):
    rows = []
    for r in record["results"]:
        for name, entry in r["providers"].items():
            stats = entry.get("stats") or {}
            ratio = entry.get("ratio_to_op") or {}
            rows.append({"size": r["label"], "provider": name, "status": entry["status"],
                         **{key: stats.get(key) for key in STATS_KEYS},
                         "ratio_to_op_median": ratio.get("median"),
                         "peak_rss_growth_mib": None, "correct": (entry.get("correctness")
                                                                  or {}).get("ok")})
    for m in record["memory"]:
        for name, entry in m["providers"].items():
            growth = entry.get("peak_rss_growth_bytes")
            rows.append({"size": m["label"], "provider": name, "status": entry["status"],
                         **{key: None for key in STATS_KEYS}, "ratio_to_op_median": None,
                         "peak_rss_growth_mib": None if growth is None else growth / 2**20,
                         "correct": None})
    return rows


# ---------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="CPU benchmark of the lgm operator against stock-MXNet and NumPy versions of "
                    "the same loss, the BLAS and CustomOp floors and the naive reference "
                    "(forward+backward, interleaved rounds, peak memory).")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated NxKxD sizes to time (default {DEFAULT_SIZES})")
    parser.add_argument("--memory-sizes", default=DEFAULT_MEMORY_SIZES,
                        help="comma-separated NxKxD sizes of the peak-memory children; '' for "
                             f"none (default {DEFAULT_MEMORY_SIZES})")
    parser.add_argument("--memory-providers", default=None,
                        help="comma-separated providers measured for memory (default: --providers)")
    common.add_measurement_args(
        parser, list(PROVIDERS), max_seconds=120.0, tolerance=1e-4, repeats=30,
        repeats_help="rounds per size (each runs every provider once)",
        max_seconds_help=f"stop the rounds of a size (after {MIN_ROUNDS}) once they used this long",
        tolerance_help="largest error of a provider vs the float64 reference, relative to each "
                       "array's largest entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-threads", type=int, default=os.cpu_count(),
                        help="OMP_NUM_THREADS for MXNet's operators (default: the number of "
                             "cores, %(default)s)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY for MXNet's operator threads (default %(default)s: "
                             "idle threads sleep instead of spinning on the cores that the next "
                             "operator, MXNet's or a Python one's BLAS, needs)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                        help="folder for cpu.json and cpu.csv (default benchmarks/out, "
                             "git-ignored; the recorded results are benchmarks/results)")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "SIZE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--memory-headroom-bytes", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.sizes = common.parse_sizes(args.sizes)
        args.memory_sizes = (common.parse_sizes(args.memory_sizes)
                             if args.memory_sizes.strip() else [])
    except ValueError as exc:
        parser.error(str(exc))
    if args.omp_threads < 1:
        parser.error(f"--omp-threads must be >= 1, got {args.omp_threads}")
    args = common.check_provider_args(parser, args, list(PROVIDERS))
    memory = args.memory_providers
    args.memory_providers = args.providers if memory is None else [
        p.strip() for p in memory.split(",") if p.strip()]
    unknown = sorted(set(args.memory_providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"unknown --memory-providers {', '.join(unknown)}; "
                     f"known: {', '.join(PROVIDERS)}")
    return args


def _rerun_with_threads(args, argv):
    """MXNet reads OMP_NUM_THREADS once, when it loads: unless it is set to --omp-threads and
    MXNet is not loaded yet, run this script again in a child process with it set. Returns the
    child's exit code, or None when this process can go on."""
    wanted = {"OMP_NUM_THREADS": str(args.omp_threads), "OMP_WAIT_POLICY": args.omp_wait_policy}
    if all(os.environ.get(k) == v for k, v in wanted.items()) and "mxnet" not in sys.modules:
        return None
    env = dict(os.environ, **wanted)
    argv = sys.argv[1:] if argv is None else list(argv)
    return subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv], env=env)


def main(argv=None):
    args = parse_args(argv)
    code = _rerun_with_threads(args, argv)
    if code is not None:
        return code
    if args.memory_child:
        name, size = args.memory_child
        memory_child(name, common.parse_sizes(size)[0], args.seed, args.memory_headroom_bytes)
        return 0
    import mxnet  # noqa: F401  (loaded with OMP_NUM_THREADS in place, before the record)

    settings = {
        "sizes": [common.size_label(s) for s in args.sizes],
        "memory_sizes": [common.size_label(s) for s in args.memory_sizes],
        "providers": args.providers, "memory_providers": args.memory_providers,
        "dtype": "float32", "training": True, "options": options(1).to_attrs(),
        "repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "tolerance": args.tolerance, "seed": args.seed, "omp_threads": args.omp_threads,
        "order": "rounds; each runs every provider once, in a seeded random order drawn afresh "
                 "per round (round_orders in each size's record)",
        "ratio": "median over rounds of (provider time / op time)",
        "timer": "time.perf_counter around one forward+backward, synchronised "
                 "(mx.nd.waitall() for MXNet providers)",
        "memory_method": "peak RSS growth (VmHWM) of one forward+backward in a fresh process",
    }
    del settings["options"]["num_classes"]
    record = {"format": write_tables.FORMAT,
              **common.run_record("cpu", ["numpy", "mxnet", "lgm_op", "threadpoolctl"],
                                  ENV_NAMES, settings),
              "threads": thread_record(), "results": [], "memory": []}
    out = Path(args.out)
    for size in args.sizes:
        record["results"].append(bench_size(size, args))
        common.write_json(out / "cpu.json", record)  # partial results survive a crash
    for size in args.memory_sizes:
        entry = {"size": dict(zip("nkd", size)), "label": common.size_label(size),
                 "providers": {}}
        for name in args.memory_providers:
            print(f"[{entry['label']}] {name}: peak memory (fresh process) ...", flush=True)
            entry["providers"][name] = peak_memory(name, size, args.seed,
                                                   omp_threads=args.omp_threads)
        record["memory"].append(entry)
    record["targets"] = evaluate_targets(record)
    record["load_average_at_end"] = common.load_average()

    print()
    print(write_tables.cpu_text(record))
    print(f"wrote {common.write_json(out / 'cpu.json', record)}")
    print(f"wrote {common.write_csv(out / 'cpu.csv', csv_rows(record))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
