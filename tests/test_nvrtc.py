"""Every kernel source compiles with NVRTC (no GPU needed) for the architectures we ship for, and
no kernel spills registers. Prints a registers / spills / shared-memory table per kernel (shown
with ``pytest -s``)."""
import re

import pytest

from lgm_op.kernel_source import KERNEL_FILES, load_source

nvrtc = None
try:
    from cupy.cuda import nvrtc
    from lgm_op.cuda import NVRTC_OPTIONS, ensure_nvrtc
    ensure_nvrtc()
except Exception as exc:  # noqa: BLE001 - CuPy or libnvrtc missing: nothing to compile with
    pytestmark = pytest.mark.skip(reason=f"NVRTC is not available through CuPy ({exc})")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")

# Both dtypes of every entry point must be in the sources (the launchers look them up by name).
EXPECTED_KERNELS = {
    "lgm_labels.cu": ["lgm_labels_f32", "lgm_labels_f64", "lgm_labels_i32", "lgm_labels_i64"],
    "lgm_forward.cu": [f"{base}_{t}" for base in ("lgm_forward", "lgm_logits", "lgm_lkd_rows")
                       for t in ("f32", "f64")],
    "lgm_backward.cu": [f"{base}_{t}" for base in ("lgm_backward_dx", "lgm_backward_params",
                                                   "lgm_sum_partials") for t in ("f32", "f64")],
}


def _compile(file_name, arch, extra=()):
    """(log, program) after compiling kernels/<file_name> for ``arch`` (compute_XX or sm_XX),
    with the options the launchers give ``cupy.RawModule`` and the -ftz=true CuPy adds."""
    prog = nvrtc.createProgram(load_source(file_name), file_name, [], [])
    options = list(NVRTC_OPTIONS) + ["-ftz=true", f"-arch={arch}"] + list(extra)
    try:
        nvrtc.compileProgram(prog, options)
    except nvrtc.NVRTCError as exc:
        raise AssertionError(f"{file_name} for {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
    return nvrtc.getProgramLog(prog).replace("\x00", ""), prog


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


@pytest.mark.parametrize("file_name", KERNEL_FILES)
def test_ptx_for_compute_75(file_name):
    _, prog = _compile(file_name, "compute_75")
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name in EXPECTED_KERNELS[file_name]:
        assert f".entry {name}(" in ptx, f"{name} missing from the PTX of {file_name}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cubin_resources(arch):
    rows = []
    for file_name in KERNEL_FILES:
        log, _ = _compile(file_name, arch, ("-Xptxas=-v",))
        table = resource_table(log)
        assert sorted(table) == sorted(EXPECTED_KERNELS[file_name]), log
        rows += [(name, table[name]) for name in sorted(table)]
    print(f"\n{arch}: {'kernel':<26}{'regs':>6}{'stack':>7}{'spill st':>10}{'spill ld':>10}"
          f"{'smem':>8}")
    for name, res in rows:
        print(f"{arch}: {name:<26}{res['registers']:>6}{res['stack']:>7}{res['spill_stores']:>10}"
              f"{res['spill_loads']:>10}{res['smem']:>8}")
    spilling = [name for name, res in rows if res["spill_stores"] or res["spill_loads"]]
    assert not spilling, f"{arch}: register spills in {spilling}"
