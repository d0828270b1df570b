"""Tables of a ``bench_cpu.py`` record: the README's CPU performance table, and the plain-text
table the benchmark prints at the end of a run; and the README's PyTorch table, from a
``bench_torch.py`` record (``bench_torch.markdown``). Every figure comes from the JSON.

Each README block lies between two marker comments (``README_START`` and ``README_END``;
``TORCH_START`` and ``TORCH_END``); running this again replaces them, and nothing outside them
changes.

    python benchmarks/write_tables.py                  # benchmarks/results/cpu.json -> README.md
    python benchmarks/write_tables.py --check          # exit 1 if README.md is not up to date
    python benchmarks/write_tables.py --json /tmp/b/cpu.json --readme /tmp/README.md
"""
import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

README_START = ("<!-- cpu-benchmark-table:start (written by benchmarks/write_tables.py from the "
                "benchmark's JSON: edit the script, not this block) -->")
README_END = "<!-- cpu-benchmark-table:end -->"
TORCH_START = ("<!-- torch-benchmark-table:start (written by benchmarks/write_tables.py from "
               "bench_torch.py's JSON: edit the scripts, not this block) -->")
TORCH_END = "<!-- torch-benchmark-table:end -->"
DEFAULT_TORCH_JSON = common.REPO_ROOT / "benchmarks" / "results" / "torch_cpu.json"
FORMAT = "lgm-op bench_cpu 2"
DEFAULT_JSON = common.REPO_ROOT / "benchmarks" / "results" / "cpu.json"
DEFAULT_README = common.REPO_ROOT / "README.md"
# the packages whose BLAS the README names (the JSON lists every library loaded)
BLAS_OWNERS = {"numpy.libs": "NumPy", "mxnet": "MXNet"}


def load(path):
    """The record at ``path``; a record of another layout is an error naming what was found."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} must be a bench_cpu.py record of format {FORMAT!r}, got "
                         f"format {record.get('format')!r}")
    return record


def _size(label):
    return label.replace("x", " x ")


def _status(text):
    """A short table cell for a provider that did not run: 'skipped (needs ~68 GiB)'."""
    need = re.match(r"skipped: (needs ~[\d.]+ GiB)", text)
    return f"skipped ({need.group(1)})" if need else text.split(":")[0]


def format_ratio(value):
    """'1.52x', or two significant digits below 0.1 ('0.0042x'), where the floors sit."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _time_cell(entry):
    if entry is None:
        return "-"
    stats = entry.get("stats")
    if not stats:
        return _status(entry["status"])
    cell = f"{common.short_ms(stats['median_ms'])} ms"
    ratio = entry.get("ratio_to_op")
    if ratio:  # every provider but the op
        cell += f" ({format_ratio(ratio['median'])})"
    if entry["status"] != "ok":  # timed, then failed in a later round
        cell += f", then {_status(entry['status'])}"
    return cell


def _memory_cell(entry):
    if entry is None:
        return "-"
    if entry["status"] != "ok":
        return _status(entry["status"])
    return f"{entry['peak_rss_growth_bytes'] / 2**20:.0f} MiB"


def cpu_rows(record):
    """(headers, rows) of the table: one row per provider, one column per timed size, one per
    memory size, and a last row with the number of rounds."""
    results, memory = record["results"], record["memory"]
    names = list(record["settings"]["providers"])
    names += [n for n in record["settings"]["memory_providers"] if n not in names]
    labels = {}
    for r in results + memory:
        for name, entry in r["providers"].items():
            labels.setdefault(name, entry.get("label", name))
    headers = (["provider \\ N x K x D"] + [_size(r["label"]) for r in results]
               + [f"peak RSS growth, {_size(m['label'])}" for m in memory])
    rows = []
    for name in names:
        rows.append([labels.get(name, name)]
                    + [_time_cell(r["providers"].get(name)) for r in results]
                    + [_memory_cell(m["providers"].get(name)) for m in memory])
    rows.append(["rounds"] + [str(r["rounds"]) for r in results]
                + ["1 per provider" for _ in memory])
    return headers, rows


def _machine(record):
    cpu = record["hardware"]["cpu"]
    v = record["versions"]
    text = (f"{cpu['model']} ({cpu['logical_cores']} cores"
            + (f", {cpu['memory_gib']:g} GiB" if cpu.get("memory_gib") else "") + ")")
    text += f", Python {v['python']}, MXNet {v['mxnet']}, NumPy {v['numpy']}"
    threads = record["threads"]
    text += f"; OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}"
    if threads.get("OMP_WAIT_POLICY"):
        text += f", OMP_WAIT_POLICY={threads['OMP_WAIT_POLICY']}"
    blas = []
    for lib in threads.get("libraries") or []:
        owner = BLAS_OWNERS.get(lib["file"].split("/")[0])
        if lib["user_api"] == "blas" and owner:
            blas.append(f"{owner}'s {lib['internal_api']} {lib['version']} on "
                        f"{lib['num_threads']} threads")
    if blas:
        text += "; " + ", ".join(blas)
    env = record["environment"]
    given = [f"{name}={env[name]}" for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
             if env.get(name)]
    if given:
        text += " (" + ", ".join(given) + ")"
    return text


def _provenance(record):
    git = record["git"]
    sha = (git["sha"] or "unknown")[:10] + (" with local changes" if git["dirty"] else "")
    return f"commit {sha}, {record['date_utc']}"


def _targets(record):
    lines = []
    for t in record["targets"]:
        verdict = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"{t['what']} at {_size(t['size'])} {t['comparison']} "
                     f"{t['threshold']:g}: {value} ({verdict})")
    return lines


def _explanation():
    return ("Float32, training mode, forward+backward with random upstream gradients and all "
            "three input gradients; time = median over the rounds, each round running every "
            "provider once in an order drawn afresh per round; in parentheses the median over "
            "rounds of "
            "provider time / op time (> 1: the op is ahead); peak RSS growth of one "
            "forward+backward in a fresh process")


def cpu_markdown(record, source):
    """The README block (markers excluded): what ran where, the table, the targets."""
    headers, rows = cpu_rows(record)
    lines = [f"`benchmarks/bench_cpu.py` on {_machine(record)}; {_provenance(record)}; "
             f"`{source}`.", "", f"{_explanation()}.", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Targets:", ""] + [f"- {line}" for line in _targets(record)]
    return "\n".join(lines)


def cpu_text(record):
    """The side-by-side table printed at the end of a run."""
    headers, rows = cpu_rows(record)
    return "\n".join([f"CPU: {_machine(record)}", _explanation(), "",
                      common.format_table(headers, rows), ""] + _targets(record))


def replace_block(text, block, where="README", markers=(README_START, README_END)):
    """``text`` with what lies between the markers replaced by ``block``."""
    first, last = markers
    start, end = text.find(first), text.find(last)
    if start < 0 or end < start:
        raise ValueError(f"{where} must contain the markers {first!r} and then "
                         f"{last!r}; found start at {start}, end at {end}")
    return text[:start + len(first)] + "\n" + block + "\n" + text[end:]


def torch_markdown(path):
    """The README's PyTorch block from a bench_torch.py record."""
    from benchmarks import bench_torch   # imports this module: not at the top
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    return bench_torch.markdown(record, _source_name(path))


def _source_name(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(common.REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the README's CPU performance table "
                                                 "from a bench_cpu.py record.")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="the record (default benchmarks/results/cpu.json)")
    parser.add_argument("--readme", default=str(DEFAULT_README),
                        help="the file with the markers (default README.md)")
    parser.add_argument("--torch-json", default=str(DEFAULT_TORCH_JSON),
                        help="the bench_torch.py record of the PyTorch table (default "
                             "benchmarks/results/torch_cpu.json; '' for none)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the file's table differs from the "
                             "record's")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    try:
        text = readme.read_text(encoding="utf-8")
        new = replace_block(text, cpu_markdown(load(args.json), _source_name(args.json)),
                            str(readme))
        if args.torch_json:
            new = replace_block(new, torch_markdown(args.torch_json), str(readme),
                                (TORCH_START, TORCH_END))
    except (OSError, ValueError, KeyError) as exc:
        print(f"write_tables: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"write_tables: the table in {readme} differs from {args.json}; run "
                  f"python benchmarks/write_tables.py --json {args.json} --readme {readme}",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    print(f"wrote the CPU table of {args.json}"
          + (f" and the PyTorch table of {args.torch_json}" if args.torch_json else "")
          + f" into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
