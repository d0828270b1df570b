"""What the compiler makes of the kernels: a report read from the compiled instructions (no GPU).

Every kernel the launchers use (``lgm_op.cuda.KERNEL_ENTRIES``) is compiled with NVRTC, exactly as
CuPy compiles it at run time, for sm_80 (A100) and sm_90 (H100 / H200); the cubin is disassembled
with ``cuobjdump -sass`` (the ``nvidia-cuda-cuobjdump`` wheel). Per kernel:

- registers, spill stores / loads and static shared memory (the ptxas ``-v`` log);
- resident blocks per multiprocessor, from registers, shared memory and threads against the
  documented per-SM limits (CUDA occupancy calculator: registers allocated per warp in units of
  256, warps in groups of 4, 1 KiB of shared memory reserved per block);
- for the contraction kernels, the main loop: the innermost loop over tiles (a backward branch
  around a barrier and fused multiply-adds), tile loads and barriers included; a step loop the
  compiler left inside it counts once per trip. Its instructions per (i, k, j) update
  (``lgm_op.cuda.MAIN_LOOP_UPDATES`` updates per thread and iteration) and their floating-point
  share (FFMA / FADD / FMUL for float32, DFMA / DADD / DMUL for float64).

The time model, for the float32 kernels at the benchmark sizes (``bench_gpu.DEFAULT_SIZES``):
each multiprocessor issues ``ISSUE_PER_CLOCK`` = 4 warp instructions per clock (one per scheduler;
an FP32 warp instruction occupies one scheduler's 32 FP32 lanes for one clock), so a block costs
updates_per_block / 32 * instructions_per_update issue slots; the grid of the launchers
(``lgm_op.cuda.launch_grids``, split loops included) runs in ceil(blocks / (SMs * blocks_per_SM))
full waves of blocks_per_SM blocks per SM (the partial last wave costs a full one: the tail). Only
main-loop instructions count (prologue, epilogue, memory stalls and the small reduction kernels
are left out), so it is a lower bound for these kernels as compiled. The SGEMM floor is the same
model for three GEMMs of the same shapes at one FFMA per update, no tail. Constants: ``GPUS``.
The report ends with the targets it is held to (``TARGET_*``): met, or each miss.

    python benchmarks/sass_report.py                       # prints the tables
    python benchmarks/sass_report.py --out benchmarks/results/sass_report   # + .json and .md
    python benchmarks/sass_report.py --arch sm_90 --kernels forward         # one kernel, quickly
    python benchmarks/sass_report.py --readme     # README block from the recorded JSON
    python benchmarks/sass_report.py --beside benchmarks/results/gpu.json   # measured vs predicted
"""
import argparse
import ctypes
import functools
import glob
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_gpu, common  # noqa: E402
from lgm_op.cuda import (KERNEL_ENTRIES, MAIN_LOOP_UPDATES, NVRTC_OPTIONS,  # noqa: E402
                         ensure_nvrtc, launch_grids)
from lgm_op.kernel_source import load_source  # noqa: E402

ARCHS = ("sm_80", "sm_90")
# Per-SM limits of compute capability 8.0 and 9.0 (CUDA C++ Programming Guide, "Compute
# Capabilities" table; occupancy calculator granularities) and the clocks of the SXM parts.
GPUS = {
    "sm_80": dict(gpu="A100 SXM", sms=108, clock_ghz=1.41, regs=65536, threads=2048, blocks=32,
                  smem=167936, smem_reserved=1024),
    "sm_90": dict(gpu="H100 / H200 SXM", sms=132, clock_ghz=1.98, regs=65536, threads=2048,
                  blocks=32, smem=233472, smem_reserved=1024),
}
ISSUE_PER_CLOCK = 4
REG_UNIT = 256
WARP_GRANULE = 4
THREADS = 256

# Fused multiply-adds per (i, k, j) update in the main loop of each contraction kernel (see the
# kernels' inner loops): the scaled distance (forward) and the expanded backward forms have two
# (two products per output).
FMA_PER_UPDATE = {"forward": 2, "logits": 2, "backward_dx": 2, "backward_params": 2}
# The kernels that make up one training step, in the time model.
STEP_KERNELS = ("forward", "backward_dx", "backward_params")
FP_OPS = {"f32": ("FFMA", "FADD", "FMUL"), "f64": ("DFMA", "DADD", "DMUL")}
# The targets the report is held to (README): forward+backward in float32 predicted within
# TARGET_MS at TARGET_SIZE on TARGET_ARCH's GPU (about 2x the three SGEMMs there), and on every
# arch reported each float32 contraction kernel with TARGET_MIN_BLOCKS resident blocks per SM, no
# spills and a main-loop FP32 share of TARGET_MIN_FP_SHARE.
TARGET_ARCH = "sm_90"
TARGET_SIZE = "1024x10000x512"
TARGET_MS = 1.3
TARGET_MIN_BLOCKS = 2
TARGET_MIN_FP_SHARE = 0.80

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


# ---------------------------------------------------------------------------------------------
# compiling and disassembling

def _nvrtc_library():
    """ctypes handle of the libnvrtc CuPy uses (for the cubin size, which CuPy's getCUBIN
    gets wrong by one byte)."""
    ensure_nvrtc()
    for name in ("libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so.11.2", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("sass_report: libnvrtc is loaded by CuPy but not found by name")


def compile_cubin(file_name, arch, names):
    """(ptxas log, cubin bytes, {name: lowered name}) of kernels/<file_name> for ``arch``.

    names: entry names or template name expressions (added to the program, so templates are
    instantiated as CuPy's ``RawModule(name_expressions=...)`` does); options as the launchers
    give CuPy, plus the -ftz=true CuPy adds. Kept per process (the sources do not change while
    it runs, and a file takes NVRTC tens of seconds an architecture on two cores): the returned
    values are shared, not to be changed.
    """
    return _compile_cubin(file_name, arch, tuple(names))


@functools.lru_cache(maxsize=None)
def _compile_cubin(file_name, arch, names):
    from cupy.cuda import nvrtc
    lib = _nvrtc_library()
    prog = nvrtc.createProgram(load_source(file_name), file_name, [], [])
    try:
        templates = [n for n in names if "<" in n]
        for name in templates:
            nvrtc.addNameExpression(prog, name)
        options = list(NVRTC_OPTIONS) + ["-ftz=true", f"-arch={arch}", "-Xptxas=-v"]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"{file_name} for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog).replace("\x00", "")
        lowered = {n: (nvrtc.getLoweredName(prog, n) if n in templates else n) for n in names}
        size = ctypes.c_size_t()
        handle = ctypes.c_void_p(prog)
        if lib.nvrtcGetCUBINSize(handle, ctypes.byref(size)) != 0:
            raise RuntimeError(f"{file_name} for {arch}: nvrtcGetCUBINSize failed")
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(handle, buf) != 0:
            raise RuntimeError(f"{file_name} for {arch}: nvrtcGetCUBIN failed")
        return log, buf.raw, lowered
    finally:
        nvrtc.destroyProgram(prog)


def resource_table(log):
    """{kernel: dict(registers, stack, spill_stores, spill_loads, smem)} from a ptxas -v log."""
    table = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = table.setdefault(entry.group(1), {})
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                           spill_loads=int(frame.group(3)))
        used = _USED.search(line)
        if used:
            current.update(registers=int(used.group(1)), smem=int(used.group(2) or 0))
    return table


def cuobjdump():
    """Path of cuobjdump: the nvidia-cuda-cuobjdump wheel's, else one on PATH."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []) or []:
        for path in sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump"))):
            if os.access(path, os.X_OK):
                return path
    path = shutil.which("cuobjdump")
    if path is None:
        raise RuntimeError("sass_report: cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    return path


def disassemble(cubin):
    """{function: [(address, opcode, operands)]} from ``cuobjdump -sass`` of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True,
                              timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr.strip()}")
    functions = {}
    current = None
    for line in proc.stdout.splitlines():
        head = _FUNCTION.match(line)
        if head:
            current = functions.setdefault(head.group(1), [])
            continue
        instr = _INSTR.match(line)
        if instr and current is not None:
            current.append((int(instr.group(1), 16), instr.group(3), instr.group(4).strip()))
    if not functions:
        raise RuntimeError("cuobjdump printed no functions:\n" + proc.stdout[:2000])
    return functions


# ---------------------------------------------------------------------------------------------
# reading the instructions

def loops(instrs):
    """[(first address, last address)] of every backward branch (a loop's back edge)."""
    out = []
    for addr, op, args in instrs:
        if op.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) <= addr:
                out.append((int(target.group(1), 16), addr))
    return out


def _inside(inner, outer):
    return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]


def main_loop(instrs, fma_op, updates_per_iteration, fma_per_update):
    """The main loop's figures: the innermost loop over tiles (a backward branch whose body
    holds a barrier and fused multiply-adds; of several, the one with the most), per tile
    iteration of one thread.

    A loop nested in it (a step loop the compiler did not unroll) is counted as many times as
    it runs: (updates_per_iteration * fma_per_update - the FMAs outside it) / its FMAs.
    """
    def body(span):
        return [i for i in instrs if span[0] <= i[0] <= span[1]]

    def count(items, prefix):
        return sum(1 for i in items if i[1].split(".")[0] == prefix)

    spans = loops(instrs)
    tiles = [s for s in spans if count(body(s), fma_op) and count(body(s), "BAR")]
    tiles = [s for s in tiles if not any(_inside(o, s) for o in tiles)]
    if not tiles:
        raise RuntimeError(f"expected a tile loop with {fma_op} and a barrier, found none")
    # Epilogue loops over rare entries (bad classes, labelled samples) also hold a barrier and
    # a few FMAs; the main loop is the one with the most.
    tile = max(tiles, key=lambda s: count(body(s), fma_op))
    nested = [s for s in spans if _inside(s, tile) and count(body(s), fma_op)]
    nested = [s for s in nested if not any(_inside(s, o) for o in nested)]
    if len(nested) > 1:
        raise RuntimeError(f"more than one step loop inside the tile loop {tile}: {nested}")
    weights = {}
    for span in nested:
        inner = body(span)
        outside = count(body(tile), fma_op) - count(inner, fma_op)
        trips = (updates_per_iteration * fma_per_update - outside) / count(inner, fma_op)
        for i in inner:
            weights[i[0]] = trips
    return tile, [(i, weights.get(i[0], 1.0)) for i in body(tile)], nested


def loop_figures(weighted, dtype, updates):
    """Instructions, instructions per update and FP share of one tile iteration."""
    fp_ops = FP_OPS[dtype]
    fp_names = set(fp_ops) | {f + "32I" for f in fp_ops}

    def total(pred):
        return sum(w for i, w in weighted if pred(i))

    instructions = total(lambda i: True)
    fp = total(lambda i: i[1].split(".")[0] in fp_names)
    return dict(instructions=instructions, fp=fp, fma=total(lambda i: i[1].split(".")[0] ==
                                                                fp_ops[0]),
                updates=updates, per_update=instructions / updates, fp_share=fp / instructions,
                shared_loads=total(lambda i: i[1].startswith("LDS")),
                barriers=total(lambda i: i[1].startswith("BAR")))


def blocks_per_sm(arch, registers, smem, threads=THREADS):
    """(resident blocks per SM, what limits it) for one kernel on ``arch``."""
    lim = GPUS[arch]
    warps = math.ceil(threads / 32)
    reg_warp = math.ceil(max(registers, 1) * 32 / REG_UNIT) * REG_UNIT
    warps_by_regs = (lim["regs"] // reg_warp) // WARP_GRANULE * WARP_GRANULE
    limits = {
        "registers": warps_by_regs // warps,
        "shared memory": lim["smem"] // (smem + lim["smem_reserved"]),
        "threads": lim["threads"] // threads,
        "blocks": lim["blocks"],
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# ---------------------------------------------------------------------------------------------
# the report

def kernel_rows(archs, only=None):
    rows = []
    by_file = {}
    for file_name, base, dtype, label, name in KERNEL_ENTRIES:
        if only and base not in only:
            continue
        by_file.setdefault(file_name, []).append((base, dtype, label, name))
    for arch in archs:
        for file_name, entries in by_file.items():
            # every entry of the file, whichever are reported: one compilation per file serves
            # every report of it (and the tests' resource checks)
            log, cubin, lowered = compile_cubin(file_name, arch, [
                e[4] for e in KERNEL_ENTRIES if e[0] == file_name])
            resources = resource_table(log)
            sass = disassemble(cubin)
            for base, dtype, label, name in entries:
                symbol = lowered[name]
                res = resources[symbol]
                blocks, limiter = blocks_per_sm(arch, res["registers"], res["smem"])
                row = dict(arch=arch, kernel=base, dtype=dtype, label=label, entry=name, **res,
                           blocks_per_sm=blocks, limiter=limiter,
                           occupancy=blocks * THREADS / GPUS[arch]["threads"])
                if base in FMA_PER_UPDATE:
                    updates = MAIN_LOOP_UPDATES[(base, dtype)]
                    try:
                        tile, weighted, nested = main_loop(sass[symbol], FP_OPS[dtype][0],
                                                           updates, FMA_PER_UPDATE[base])
                    except RuntimeError as exc:
                        raise RuntimeError(f"{arch} {name}: {exc}") from None
                    row["main_loop"] = dict(span=[hex(a) for a in tile],
                                            nested=[[hex(a) for a in s] for s in nested],
                                            **loop_figures(weighted, dtype, updates))
                rows.append(row)
    return rows


def predict(rows, sizes):
    """Model times (ms) of the float32 step kernels at ``sizes`` on each arch's GPU."""
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        lim = GPUS[arch]
        kernels = {r["kernel"]: r for r in rows if r["arch"] == arch and r["dtype"] == "f32"
                   and r["label"] in (None, "f32")}
        if not all(k in kernels for k in STEP_KERNELS):
            continue
        issue = ISSUE_PER_CLOCK * lim["clock_ghz"] * 1e9  # warp instructions per SM per second
        for n, k, d in sizes:
            grids = launch_grids(n, k, d, lim["sms"],
                                 {b: kernels[b]["blocks_per_sm"] for b in STEP_KERNELS})
            entry = dict(arch=arch, gpu=lim["gpu"], size=common.size_label((n, k, d)),
                         kernels={})
            total = 0.0
            for base in STEP_KERNELS:
                grid, _ = grids[base]
                blocks = grid[0] * grid[1] * grid[2]
                per_sm = kernels[base]["blocks_per_sm"]
                waves = blocks / (lim["sms"] * per_sm)
                block_instr = n * k * d / blocks / 32 * kernels[base]["main_loop"]["per_update"]
                ms = math.ceil(waves) * per_sm * block_instr / issue * 1e3
                entry["kernels"][base] = dict(grid=grid, blocks=blocks, waves=waves, ms=ms)
                total += ms
            sgemm = 3 * n * k * d / 32 / (lim["sms"] * issue) * 1e3
            entry.update(total_ms=total, sgemm_floor_ms=sgemm, ratio=total / sgemm)
            out.append(entry)
    return out


def target_misses(rows, predictions):
    """The targets this report misses, one line each (empty: every one is met). A report without
    the target prediction (other sizes, or some kernels only) misses that one."""
    misses = []
    for r in rows:
        loop = r.get("main_loop")
        if not loop or r["dtype"] != "f32":
            continue
        what = f"{r['arch']} {r['kernel']}" + (f" (label {r['label']})" if r["label"] else "")
        if r["blocks_per_sm"] < TARGET_MIN_BLOCKS:
            misses.append(f"{what}: {r['blocks_per_sm']} blocks per SM < {TARGET_MIN_BLOCKS}")
        if r["spill_stores"] or r["spill_loads"]:
            misses.append(f"{what}: spills {r['spill_stores']}/{r['spill_loads']} bytes")
        if loop["fp_share"] < TARGET_MIN_FP_SHARE:
            misses.append(f"{what}: FP32 share {loop['fp_share']:.1%} < "
                          f"{TARGET_MIN_FP_SHARE:.0%}")
    target = [p for p in predictions if p["arch"] == TARGET_ARCH and p["size"] == TARGET_SIZE]
    if not target:
        misses.append(f"no prediction for {TARGET_SIZE} on {TARGET_ARCH}")
    elif target[0]["total_ms"] > TARGET_MS:
        misses.append(f"{TARGET_SIZE} on {GPUS[TARGET_ARCH]['gpu']}: predicted "
                      f"{target[0]['total_ms']:.3f} ms > {TARGET_MS} ms")
    return misses


def targets_line(rows, predictions):
    """One sentence on the targets: met, or what is missed."""
    rule = (f"forward+backward at {TARGET_SIZE} on {GPUS[TARGET_ARCH]['gpu']} <= {TARGET_MS} ms; "
            f"every float32 contraction kernel >= {TARGET_MIN_BLOCKS} blocks/SM, 0 spills, "
            f"FP32 share >= {TARGET_MIN_FP_SHARE:.0%}")
    misses = target_misses(rows, predictions)
    return f"Targets ({rule}): " + ("met." if not misses else "missed: " + "; ".join(misses) + ".")


def format_report(rows, predictions):
    lines = []
    head = ["arch", "kernel", "dtype", "label", "regs", "spill st/ld", "smem", "blocks/SM (limit)",
            "loop instr", "per update", "FP share", "LDS/iter"]
    table = []
    for r in rows:
        loop = r.get("main_loop")
        table.append([r["arch"], r["kernel"], r["dtype"], r["label"] or "-", r["registers"],
                      f"{r['spill_stores']}/{r['spill_loads']}", r["smem"],
                      f"{r['blocks_per_sm']} ({r['limiter']})",
                      f"{loop['instructions']:.0f}" if loop else "-",
                      f"{loop['per_update']:.2f}" if loop else "-",
                      f"{loop['fp_share']:.0%}" if loop else "-",
                      f"{loop['shared_loads']:.0f}" if loop else "-"])
    lines.append(common.format_table(head, table))
    if predictions:
        lines.append("")
        lines.append(f"Model time (ms), float32, training step; issue {ISSUE_PER_CLOCK} warp "
                     f"instructions / SM / clock, full waves")
        head = ["gpu", "size"] + [f"{b} (waves)" for b in STEP_KERNELS] + [
            "total", "3 SGEMM floor", "ratio"]
        table = []
        for p in predictions:
            lim = GPUS[p["arch"]]
            table.append([f"{p['gpu']} ({lim['sms']} SMs, {lim['clock_ghz']} GHz)", p["size"]]
                         + [f"{p['kernels'][b]['ms']:.3f} ({p['kernels'][b]['waves']:.2f})"
                            for b in STEP_KERNELS]
                         + [f"{p['total_ms']:.3f}", f"{p['sgemm_floor_ms']:.3f}",
                            f"{p['ratio']:.2f}x"])
        lines.append(common.format_table(head, table))
    lines += ["", targets_line(rows, predictions)]
    return "\n".join(lines)


README_START = ("<!-- sass-report:start (written by benchmarks/sass_report.py --readme from "
                "benchmarks/results/sass_report.json: edit the script, not this block) -->")
README_END = "<!-- sass-report:end -->"
README_MIN_UPDATES = 10**8  # sizes with fewer (i, k, j) updates are left out of the README


def markdown(record):
    """The README's tables from a recorded report: the float32 step kernels, and the model times."""
    lines = ["| arch | kernel | registers | spills | blocks / SM | instructions per update | "
             "FP32 share |", "|---|---|---|---|---|---|---|"]
    for r in record["kernels"]:
        if r["kernel"] in STEP_KERNELS and r["dtype"] == "f32" and r["label"] in (None, "f32"):
            loop = r["main_loop"]
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['registers']} | "
                         f"{r['spill_stores'] + r['spill_loads']} | {r['blocks_per_sm']} | "
                         f"{loop['per_update']:.2f} | {loop['fp_share']:.0%} |")
    lines += ["", "| GPU (model) | N x K x D | forward | backward dx | backward mean, log-var | "
              "total | 3 SGEMMs (same model) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for p in record["predictions"]:
        if math.prod(common.parse_sizes(p["size"])[0]) < README_MIN_UPDATES:
            continue  # launch-bound: the main-loop model says nothing there
        ms = [p["kernels"][b]["ms"] for b in STEP_KERNELS]
        lines.append(f"| {p['gpu']} | {p['size']} | " + " | ".join(f"{m:.3f} ms" for m in ms)
                     + f" | {p['total_ms']:.3f} ms | {p['sgemm_floor_ms']:.3f} ms | "
                     f"{p['ratio']:.1f}x |")
    sha = (record["git"]["sha"] or "unknown")[:10]
    lines += ["", targets_line(record["kernels"], record["predictions"])]
    lines += ["", f"From `{record['command']}` (NVRTC {record['versions']['nvrtc']}, git {sha}, "
              f"{record['date_utc'][:10]}); predicted, not measured."]
    return "\n".join(lines)


def beside_measured(record, bench, arch="sm_90"):
    """A table of measured times (a bench_gpu.py record) beside this report's prediction for
    ``arch`` at the same sizes; sizes the report did not model show '-'."""
    predicted = {p["size"]: p for p in record["predictions"] if p["arch"] == arch}
    head = ["size", "measured fwd", "measured bwd", "measured fwd+bwd", "cuBLAS 3 GEMMs",
            "predicted fwd+bwd", "measured / predicted"]
    rows = []
    for result in bench["results"]:
        size = common.size_label((result["size"]["n"], result["size"]["k"], result["size"]["d"]))
        ours = result["providers"].get("ours", {})
        cublas = result["providers"].get("cublas", {})
        measured = {m: (ours.get(m) or {}).get("median_ms") for m in bench_gpu.MODES}
        floor = (cublas.get("forward_backward") or {}).get("median_ms")
        pred = predicted.get(size, {}).get("total_ms")
        both = measured["forward_backward"] is not None and pred
        rows.append([size] + [f"{measured[m]:.3f}" if measured[m] is not None else "-"
                              for m in bench_gpu.MODES]
                    + [f"{floor:.3f}" if floor is not None else "-",
                       f"{pred:.3f}" if pred else "-",
                       f"{measured['forward_backward'] / pred:.2f}" if both else "-"])
    gpu = bench["hardware"].get("gpu", {}).get("name", "unknown GPU")
    return (f"Measured on {gpu} (ms, median) beside the {GPUS[arch]['gpu']} prediction of "
            f"benchmarks/sass_report.py\n" + common.format_table(head, rows))


def write_readme(json_path, readme):
    import json
    record = json.loads(Path(json_path).read_text(encoding="utf-8"))
    text = Path(readme).read_text(encoding="utf-8")
    start, end = text.index(README_START), text.index(README_END)
    Path(readme).write_text(text[:start] + README_START + "\n" + markdown(record) + "\n"
                            + text[end:], encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--kernels", nargs="+", default=None,
                        choices=sorted({e[1] for e in KERNEL_ENTRIES}),
                        help="kernels to report (default: every kernel)")
    parser.add_argument("--sizes", default=bench_gpu.DEFAULT_SIZES,
                        help="comma-separated NxKxD sizes of the time model")
    parser.add_argument("--out", default=None,
                        help="write <out>.json and <out>.md as well (default: print only)")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite the README's report block from the recorded "
                             "benchmarks/results/sass_report.json")
    parser.add_argument("--beside", metavar="GPU_JSON", default=None,
                        help="only print the measured times of a bench_gpu.py record beside the "
                             "recorded prediction (benchmarks/results/sass_report.json)")
    args = parser.parse_args(argv)
    if args.beside:
        import json
        record = json.loads((common.REPO_ROOT / "benchmarks" / "results" / "sass_report.json")
                            .read_text(encoding="utf-8"))
        print(beside_measured(record, json.loads(Path(args.beside).read_text(encoding="utf-8"))))
        return 0
    if args.readme:
        write_readme(common.REPO_ROOT / "benchmarks" / "results" / "sass_report.json",
                     common.REPO_ROOT / "README.md")
        return 0
    rows = kernel_rows(args.arch, args.kernels)
    predictions = predict(rows, common.parse_sizes(args.sizes))
    text = format_report(rows, predictions)
    print(text)
    if args.out:
        record = common.run_record("sass_report", ["cupy"], [], dict(
            archs=args.arch, kernels=args.kernels, sizes=args.sizes, gpus=GPUS,
            issue_per_clock=ISSUE_PER_CLOCK, fma_per_update=FMA_PER_UPDATE))
        from cupy.cuda import nvrtc
        record["versions"]["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
        record.update(kernels=rows, predictions=predictions)
        common.write_json(args.out + ".json", record)
        sha = record["git"]["sha"] or "unknown"
        Path(args.out + ".md").write_text(
            f"# Compiled-instruction report (a prediction, not a measurement)\n\n"
            f"`{record['command']}`, {record['date_utc']}, git {sha[:10]}"
            f"{' (dirty)' if record['git']['dirty'] else ''}, NVRTC "
            f"{record['versions']['nvrtc']}\n\n```\n{text}\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
