"""PyTorch benchmark: the ``lgm_op.torch`` op against the L-GM loss written in PyTorch itself.

float32, training mode, forward+backward with random upstream gradients on logits and lkd and all
three input gradients, on identical inputs. Providers:

- ``op``: ``lgm_op.torch.lgm`` in eager mode (its autograd.Function: the compiled CPU passes and
  PyTorch's BLAS on CPU tensors, the CUDA kernels on CUDA tensors); ``op_compile``: the same call
  under ``torch.compile(fullgraph=True)`` (the custom op in the graph);
- ``broadcast``: the loss broadcasting over an N x K x D tensor, differentiated by autograd
  (``bench_gpu.make_torch_loss``, as the popular PyTorch port does); ``broadcast_compile``: under
  ``torch.compile`` (Inductor fuses the N x K x D products into the reductions);
- ``addmm``: the GEMM expansion ``2 d = (x*x) iv^T - 2 x (mu iv)^T + sum_j mu^2 iv`` with
  ``torch.addmm``, differentiated by autograd; ``addmm_compile``: under ``torch.compile``.

Compiled providers use static shapes (one compilation per size, outside the timing). Per size:
the float64 reference of ``lgm_op.reference`` (``bench_cpu.reference_results``, over row chunks
where N x K x D does not fit), every provider checked against it (a wrong provider is not timed),
``--warmup`` untimed steps, then rounds in which every provider runs once in an order drawn afresh
each round (``bench_cpu.run_rounds``). Each provider gets the median and spread of its rounds, each
peer the median of its per-round ratios peer time / op time (> 1: the op is ahead). A provider that
fails, runs out of memory or whose estimate does not fit is recorded as such and the run goes on.

PyTorch runs on every core (``torch.set_num_threads(--threads)``, default the number of cores);
the op's matrix products run on PyTorch's threads too (``torch.mm``), its compiled passes on
OpenMP's from 2^20 elements a pass. The settings are recorded in the JSON with the machine, the
versions and the git sha.

    python benchmarks/bench_torch.py                    # the issue's sizes -> benchmarks/out/
    python benchmarks/bench_torch.py --sizes 64x10x8 --repeats 3 --out /tmp/bench
    python benchmarks/bench_torch.py --device cuda      # on a GPU (synchronised after each step)
    python benchmarks/bench_torch.py --table-from benchmarks/results/torch_cpu.json   # README table

Each run writes torch_<device>.json (everything), .csv and .md (the README table, from the JSON).
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_cpu import (  # noqa: E402
    NAMES, failure_status, start_size, thread_record, time_in_rounds)
from benchmarks.bench_gpu import make_torch_loss  # noqa: E402

OP = "op"
# name -> (table label, N*K*D float32 tensors held at the peak of one forward+backward)
PROVIDERS = {
    OP: ("lgm_op.torch, eager", 0),
    "op_compile": ("lgm_op.torch, torch.compile", 0),
    "broadcast": ("broadcast N x K x D, autograd", 5),
    "broadcast_compile": ("broadcast, torch.compile", 0),
    "addmm": ("GEMM expansion (addmm), autograd", 0),
    "addmm_compile": ("GEMM expansion, torch.compile", 0),
}
DEFAULT_SIZES = "128x100x384,256x1000x128,512x10000x512"
ENV_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
             "MKL_NUM_THREADS", "TORCHINDUCTOR_CACHE_DIR", "CUDA_VISIBLE_DEVICES")
# The targets of the issue: the op at least as fast as the fastest PyTorch version.
TARGET_SIZES = ((128, 100, 384), (256, 1000, 128), (512, 10000, 512))
PEERS = [name for name in PROVIDERS if not name.startswith(OP)]
# A provider runs only when its estimate is below this share of the available memory.
FIT_SHARE = 0.7
# Beyond the N*K*D tensors, every provider keeps a handful of (N, K) float32 arrays and their
# gradients (about 64 bytes per N*K element, as measured for the op in bench_cpu).
BYTES_PER_NK = 64


def estimated_bytes(name, size):
    n, k, d = size
    return BYTES_PER_NK * n * k + 4 * PROVIDERS[name][1] * n * k * d + 8 * (n + k) * d


def fit_problem(name, size, device):
    need = estimated_bytes(name, size)
    if device == "cpu":
        available = common.memory_available_bytes()
    else:
        import torch
        available = torch.cuda.mem_get_info()[0]
    if available is not None and need > FIT_SHARE * available:
        return (f"skipped: needs ~{common.gib(need):.0f} GiB (estimated), "
                f"{common.gib(available):.0f} GiB available")
    return None


def make_addmm_loss(torch, opts, training):
    """The loss of SPEC section 1 in PyTorch by the GEMM expansion of the distances: O(N*K)
    memory. Returns lgm_loss(x: (N, D), label: (N,) int64, mean: (K, D), log_var: (K, D)) ->
    (logits: (N, K), lkd: (N,)). Diagonal covariance only."""
    if opts.isotropic:
        raise ValueError("the PyTorch baseline implements the diagonal covariance only")
    alpha = opts.margin(training)
    half_logits = 0.5 if opts.logdet_logits else 0.0
    half_lkd = 0.5 if opts.logdet_lkd else 0.0
    logvar_min, logvar_max = opts.logvar_min, opts.logvar_max

    def lgm_loss(x, label, mean, log_var):
        c = torch.clamp(log_var, logvar_min, logvar_max)
        iv = torch.exp(-c)                                                  # (K, D)
        mean_iv = mean * iv
        two_d = torch.addmm((mean * mean_iv).sum(dim=1).unsqueeze(0), x * x, iv.t())
        two_d = torch.addmm(two_d, x, mean_iv.t(), alpha=-2.0)             # (N, K)
        dist = 0.5 * two_d
        log_det = c.sum(dim=1)                                              # (K,)
        margin = torch.ones_like(dist).scatter(1, label.unsqueeze(1), 1.0 + alpha)
        logits = -margin * dist - half_logits * log_det
        lkd = dist.gather(1, label.unsqueeze(1)).squeeze(1) + half_lkd * log_det[label]
        return logits, lkd

    return lgm_loss


def make_op_loss(torch, opts, training):
    """``lgm_op.torch.lgm`` with the options of ``opts``, in the baselines' signature."""
    import lgm_op.torch as lgm_torch
    options = dict(alpha=opts.alpha, logvar_min=opts.logvar_min, logvar_max=opts.logvar_max,
                   logdet_logits=opts.logdet_logits, logdet_lkd=opts.logdet_lkd,
                   isotropic=opts.isotropic)

    def lgm_loss(x, label, mean, log_var):
        return lgm_torch.lgm(x, label, mean, log_var, opts.num_classes, training, **options)

    return lgm_loss


_LOSSES = {"op": make_op_loss, "broadcast": make_torch_loss, "addmm": make_addmm_loss}


class TorchProvider:
    """One forward+backward of a loss function on tensors of the benchmark inputs."""

    def __init__(self, name, inputs, opts, device):
        import torch
        self.torch = torch
        self.device = device
        base, compiled = name.removesuffix("_compile"), name.endswith("_compile")
        loss = _LOSSES[base](torch, opts, True)
        self.loss = torch.compile(loss, fullgraph=True, dynamic=False) if compiled else loss
        tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        self.params = [tensor(inputs[k]).requires_grad_(True) for k in ("x", "mean", "log_var")]
        self.label = tensor(inputs["label"]).long()
        self.upstream = [tensor(inputs["grad_logits"]), tensor(inputs["grad_lkd"])]
        self._outputs = None

    def step(self):
        for p in self.params:
            p.grad = None
        x, mean, log_var = self.params
        logits, lkd = self.loss(x, self.label, mean, log_var)
        self.torch.autograd.backward([logits, lkd], self.upstream)
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        self._outputs = logits, lkd

    def results(self):
        arrays = list(self._outputs) + [p.grad for p in self.params]
        return dict(zip(NAMES, [a.detach().cpu().numpy() for a in arrays]))


def options(num_classes):
    from lgm_op.options import LGMOptions
    return LGMOptions(num_classes=num_classes)


def bench_size(size, args):
    """Reference, checks, compile times and interleaved timings at one size: the result record."""
    label, opts, inputs, record, expected = start_size(size, args, options)
    ready = {}
    for name in args.providers:
        entry = {"label": PROVIDERS[name][0], "estimated_bytes": estimated_bytes(name, size),
                 "correctness": None}
        record["providers"][name] = entry
        entry["status"] = fit_problem(name, size, args.device)
        if entry["status"]:
            continue
        print(f"[{label}] {name}: first step and check ...", flush=True)
        try:
            start = time.perf_counter()
            provider = TorchProvider(name, inputs, opts, args.device)
            provider.step()  # compiles, for the compiled providers
            entry["first_step_s"] = time.perf_counter() - start
            entry["correctness"] = common.compare(provider.results(), expected, args.tolerance)
        except Exception as exc:  # recorded, the run goes on
            entry["status"] = failure_status(exc)
            continue
        if not entry["correctness"]["ok"]:
            entry["status"] = "incorrect: not timed (see correctness)"
            continue
        entry["status"] = "ok"
        ready[name] = provider
    del expected
    gc.collect()

    return time_in_rounds(record, ready, args, label, op=OP)


def evaluate_targets(record):
    """Per target size: the fastest PyTorch version's time over the op's (>= 1: target met)."""
    results = {r["label"]: r for r in record["results"]}
    out = []
    for size in TARGET_SIZES:
        label = common.size_label(size)
        providers = results.get(label, {}).get("providers", {})
        ratios = {p: providers[p]["ratio_to_op"]["median"] for p in PEERS
                  if (providers.get(p) or {}).get("ratio_to_op")}
        fastest = min(ratios, key=ratios.get) if ratios else None
        value = ratios.get(fastest)
        out.append({"what": "fastest PyTorch version / op", "size": label, "fastest": fastest,
                    "comparison": ">=", "threshold": 1.0, "value": value,
                    "met": None if value is None else value >= 1.0})
    return out


def _cell(entry):
    if entry is None:
        return "-"
    if not entry.get("stats"):
        return entry["status"].split(":")[0]
    text = common.format_ms(entry["stats"])
    ratio = entry.get("ratio_to_op")
    return f"{text} [{ratio['median']:.2f}x]" if ratio else text


def _rows(record):
    providers = record["settings"]["providers"]
    headers = ["N x K x D"] + [PROVIDERS[p][0] for p in providers]
    return headers, [[_size_text(r["label"])] + [_cell(r["providers"].get(p)) for p in providers]
                     for r in record["results"]]


def _size_text(label):
    return label.replace("x", " x ")


def table(record):
    """Side by side: one row per size, one column per provider; median (min-max) ms of a
    forward+backward, and in brackets the median per-round ratio provider / op."""
    return common.format_table(*_rows(record))


def markdown(record, source):
    """The README block for a recorded run: machine and versions, the table, the targets."""
    cpu, v = record["hardware"]["cpu"], record["versions"]
    where = record["hardware"].get("gpu") or (f"{cpu['model']} ({cpu['logical_cores']} cores)")
    settings = record["settings"]
    headers, rows = _rows(record)
    lines = [f"`benchmarks/bench_torch.py` on {where}, PyTorch {v['torch']} on "
             f"{settings['torch_threads']} threads, NumPy {v['numpy']}, Python {v['python']}; "
             f"git {str(record['git']['sha'])[:10]}; `{source}`.", "",
             f"float32, training mode, forward+backward; median (min-max) ms over up to "
             f"{settings['repeats']} interleaved rounds, in brackets the median per-round ratio "
             "provider time / op time (> 1: the op is ahead).", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {_target_text(t)}" for t in record.get("targets", [])]
    return "\n".join(lines)


def _target_text(target):
    value = "-" if target["value"] is None else f"{target['value']:.2f}x ({target['fastest']})"
    return f"{target['what']} at {target['size']}: {value}, target >= {target['threshold']}"


def csv_rows(record):
    rows = []
    for r in record["results"]:
        for name, entry in r["providers"].items():
            stats = entry.get("stats") or {}
            rows.append({"size": r["label"], "provider": name, "status": entry["status"],
                         **{key: stats.get(key) for key in ("median_ms", "q1_ms", "q3_ms",
                                                            "min_ms", "max_ms", "repeats")},
                         "ratio_to_op_median": (entry.get("ratio_to_op") or {}).get("median"),
                         "first_step_s": entry.get("first_step_s"),
                         "correct": (entry.get("correctness") or {}).get("ok")})
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The lgm_op.torch custom op against the L-GM loss in PyTorch (broadcasting, "
                    "GEMM expansion, eager and torch.compile), forward+backward, interleaved "
                    "rounds.")
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"comma-separated NxKxD sizes (default {DEFAULT_SIZES})")
    common.add_measurement_args(
        parser, list(PROVIDERS), max_seconds=120.0, tolerance=1e-4, repeats=30,
        repeats_help="rounds per size (each runs every provider once)",
        max_seconds_help="stop the rounds of a size (after 3) once they used this long",
        tolerance_help="largest error of a provider vs the float64 reference, relative to each "
                       "array's largest entry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: the number of cores, %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"),
                        help="folder for torch_<device>.json and .csv (default benchmarks/out, "
                             "git-ignored)")
    parser.add_argument("--table-from", metavar="JSON",
                        help="run nothing: write the README table of a recorded torch_*.json "
                             "beside it (.md)")
    args = parser.parse_args(argv)
    try:
        args.sizes = common.parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return common.check_provider_args(parser, args, list(PROVIDERS))


def main(argv=None):
    args = parse_args(argv)
    if args.table_from:
        print(f"wrote {_write_markdown(args.table_from)}")
        return 0
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: PyTorch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    settings = {
        "sizes": [common.size_label(s) for s in args.sizes], "providers": args.providers,
        "device": args.device, "dtype": "float32", "training": True,
        "options": {k: v for k, v in options(1).to_attrs().items() if k != "num_classes"},
        "repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "tolerance": args.tolerance, "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "compile": "torch.compile(fullgraph=True, dynamic=False), compiled in the first step",
        "order": "rounds; each runs every provider once, in a seeded random order drawn afresh "
                 "per round (round_orders in each size's record)",
        "ratio": "median over rounds of (provider time / op time)",
        "timer": "time.perf_counter around one forward+backward"
                 + (", torch.cuda.synchronize() at its end" if args.device == "cuda" else ""),
    }
    record = {**common.run_record("torch", ["numpy", "torch", "cupy", "lgm_op"], ENV_NAMES,
                                  settings),
              "threads": thread_record(), "results": []}
    if args.device == "cuda":
        record["hardware"]["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out)
    stem = f"torch_{args.device}"
    for size in args.sizes:
        record["results"].append(bench_size(size, args))
        common.write_json(out / f"{stem}.json", record)  # partial results survive a crash
    record["targets"] = evaluate_targets(record)
    record["load_average_at_end"] = common.load_average()
    print()
    print(table(record))
    for target in record["targets"]:
        print(_target_text(target))
    json_path = common.write_json(out / f"{stem}.json", record)
    print(f"wrote {json_path}")
    print(f"wrote {common.write_csv(out / f'{stem}.csv', csv_rows(record))}")
    print(f"wrote {_write_markdown(json_path)}")
    return 0


def _write_markdown(json_path):
    """<stem>.md beside the JSON: the README block, written from the JSON alone."""
    json_path = Path(json_path)
    record = json.loads(json_path.read_text(encoding="utf-8"))
    try:
        source = json_path.resolve().relative_to(common.REPO_ROOT)
    except ValueError:
        source = json_path
    path = json_path.with_suffix(".md")
    path.write_text(markdown(record, source) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
