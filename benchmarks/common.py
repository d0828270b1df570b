"""Pieces both benchmark scripts share: sizes, inputs, timing statistics, error measure, the record
of the machine and the code (hardware, versions, git sha, environment), the table and the files.

Framework-free: NumPy and the standard library only, so the GPU script runs where MXNet is absent.
"""
import csv
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = [
    "REPO_ROOT", "parse_sizes", "size_label", "make_inputs", "summarize", "measure",
    "rel_error", "compare", "run_record", "cpu_record", "versions", "git_record",
    "environment_record", "memory_available_bytes", "gib", "format_ms", "short_ms", "format_table",
    "write_json", "write_csv", "perf_seconds", "load_average",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# sizes and inputs

def parse_sizes(text):
    """'256x10x2,512x1000x128' -> [(256, 10, 2), (512, 1000, 128)] as (N, K, D)."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            size = ()
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"a size must be NxKxD with three positive integers, got {item!r}")
        sizes.append(size)
    if not sizes:
        raise ValueError(f"no sizes in {text!r}")
    return sizes


def add_measurement_args(parser, providers, max_seconds, tolerance, tolerance_help, repeats=20,
                         repeats_help="timed calls per measurement",
                         max_seconds_help="stop repeating (after 3 calls) once a measurement "
                                          "used this long"):
    """The options both benchmark scripts share: providers, repeats, warm-up, time cap, tolerance."""
    parser.add_argument("--providers", default=",".join(providers),
                        help="comma-separated subset of: " + ", ".join(providers))
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--max-seconds", type=float, default=max_seconds, help=max_seconds_help)
    parser.add_argument("--tolerance", type=float, default=tolerance, help=tolerance_help)


def check_provider_args(parser, args, known):
    """Split ``args.providers`` (a comma list) and check it and the repeat counts."""
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(args.providers) - set(known))
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def size_label(size):
    """(256, 10, 2) -> '256x10x2'."""
    return "x".join(str(v) for v in size)


def make_inputs(n, k, d, seed):
    """Random float32 inputs of one benchmark size, identical for every provider.

    x: (N, D) and mean: (K, D) standard normal; log_var: (K, D) uniform in [-1.5, 1.5], with the
    first and the last entry outside the default clamp [-6, 6] so the masked gradient path is part
    of the correctness check; label: (N,) float32 class ids, as MXNet iterators give them;
    grad_logits: (N, K) and grad_lkd: (N,) standard normal upstream gradients.
    """
    rng = np.random.default_rng(seed)
    log_var = rng.uniform(-1.5, 1.5, (k, d)).astype(np.float32)
    if log_var.size >= 2:
        log_var.flat[0] = 7.5
        log_var.flat[-1] = -8.0
    return {
        "x": rng.standard_normal((n, d), dtype=np.float32),
        "label": rng.integers(0, k, n).astype(np.float32),
        "mean": rng.standard_normal((k, d), dtype=np.float32),
        "log_var": log_var,
        "grad_logits": rng.standard_normal((n, k), dtype=np.float32),
        "grad_lkd": rng.standard_normal(n, dtype=np.float32),
    }


# ---------------------------------------------------------------------------------------------
# timing

def summarize(seconds):
    """Median and spread of a list of durations in seconds, as milliseconds."""
    ms = sorted(1e3 * s for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1],
            "q1_ms": q1, "q3_ms": q3, "repeats": len(ms)}


def measure(run_once, repeats, warmup, max_seconds, min_repeats=3):
    """Time ``run_once`` (which runs the measured thing once and returns its duration in seconds).

    ``warmup`` untimed calls first; then ``repeats`` timed calls, or fewer (but at least
    ``min_repeats``) once the timed calls have used ``max_seconds``, so slow providers at large
    sizes stay within the run's time budget. Returns :func:`summarize` of the timed calls.
    """
    for _ in range(warmup):
        run_once()
    times = []
    while len(times) < repeats:
        times.append(run_once())
        if len(times) >= min(min_repeats, repeats) and sum(times) >= max_seconds:
            break
    return summarize(times)


# ---------------------------------------------------------------------------------------------
# correctness

def rel_error(actual, expected):
    """max |actual - expected| / max |expected|: the error on the scale of the whole array, so
    entries that cancel to near zero are not judged alone. NaN where either side is not finite."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape {a.shape} does not match the reference's {e.shape}")
    if e.size == 0:
        return 0.0
    scale = float(np.max(np.abs(e)))
    err = float(np.max(np.abs(a - e)))
    if not (math.isfinite(scale) and math.isfinite(err)):
        return float("nan")
    return err / scale if scale > 0 else err


def compare(actual, expected, tolerance):
    """Errors of every named array of ``expected`` and whether all are below ``tolerance``.

    actual, expected: name -> array. Returns {"max_rel_error": {name: err}, "tolerance", "ok"}.
    """
    errors = {name: rel_error(actual[name], ref) for name, ref in expected.items()}
    ok = all(err <= tolerance for err in errors.values())  # NaN compares False: not ok
    return {"max_rel_error": errors, "tolerance": tolerance, "ok": ok}


# ---------------------------------------------------------------------------------------------
# the record of machine, code and environment

def cpu_record():
    """CPU model, logical cores and memory, from /proc where it exists."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    record = {"model": model, "logical_cores": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        record["usable_cores"] = len(os.sched_getaffinity(0))
    total = _meminfo("MemTotal")
    if total is not None:
        record["memory_gib"] = round(gib(total), 1)
    return record


def _meminfo(field):
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_available_bytes():
    """MemAvailable from /proc/meminfo (bytes), or None where there is no /proc."""
    return _meminfo("MemAvailable")


def versions(modules):
    """Python, the platform and ``module.__version__`` of each named module (None if absent).

    Modules are imported here, so pass only those the script uses anyway.
    """
    record = {"python": platform.python_version(), "platform": platform.platform()}
    for name in modules:
        try:
            record[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception:  # a missing or broken optional package is recorded, not fatal
            record[name] = None
    return record


def git_record(root=REPO_ROOT):
    """Commit sha of the checkout and whether its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": dirty}


def environment_record(names):
    """Values of the named environment variables (None when unset): thread counts, BLAS
    workarounds and the like, which change timings without changing code."""
    return {name: os.environ.get(name) for name in names}


def run_record(benchmark, modules, env_names, settings):
    """The header of a results file: what ran, where, with which code and settings."""
    return {
        "benchmark": benchmark,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "hardware": {"cpu": cpu_record()},
        "versions": versions(modules),
        "git": git_record(),
        "environment": environment_record(env_names),
        # other processes on the machine change the times: the 1, 5 and 15 minute load
        "load_average_at_start": load_average(),
        "settings": settings,
    }


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# output

def gib(n_bytes):
    return n_bytes / 2**30


def format_ms(stats):
    """'12.3 (11.9-13.0)': median (min-max) in milliseconds, or '-' without a measurement."""
    if not stats:
        return "-"
    return (f"{short_ms(stats['median_ms'])} ({short_ms(stats['min_ms'])}-"
            f"{short_ms(stats['max_ms'])})")


def short_ms(ms):
    """Milliseconds rounded for a table: '1737', '15.8', '2.16', '0.512'."""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_table(headers, rows):
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plain(value):
    """JSON-safe: NumPy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, record):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(record), indent=2, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


def write_csv(path, rows):
    """rows: dicts with the same keys, written in the order of the first row's keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(_plain(row))
    return path


def perf_seconds(fn):
    """Wall-clock seconds of one call of ``fn`` (time.perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
