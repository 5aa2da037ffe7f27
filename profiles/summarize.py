"""Turn profiler outputs into a markdown summary: time by range, time split by kernel and, from
Nsight Compute, per-kernel occupancy, memory throughput vs the device peak and the limiter.

    python -m profiles.summarize --device "NVIDIA H100 80GB HBM3" --workload "hybrid L=8192" \\
        --kernels prefix_cuda_gpu_kern_sum.csv --ranges prefix_nvtx_sum.csv --format nsys \\
        [--ncu kernels_raw.csv] --out profiles/<device>/summary.md
    python -m profiles.summarize --kernel-regex      # ncu -k filter matching refrag's Triton kernels

Inputs: ``--format nsys``: ``nsys stats --report cuda_gpu_kern_sum,nvtx_sum --format csv``;
``--format torch``: the CSVs of ``profiles/torch_profile.py`` (name, calls, total_us).
``--ncu``: ``ncu --import X.ncu-rep --csv --page raw`` (header row, units row, one row per launch).

Limiter rule (Nsight Compute's speed-of-light reading): the larger of memory and compute (SM)
throughput, as % of the device peak, names the bound when it reaches 60%; below that for
both, the kernel is latency-bound (too little parallelism or stalls; see its occupancy).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import pkgutil
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

BOUND_THRESHOLD_PCT = 60.0
TOP_KERNELS = 25
NCU_METRICS = {
    "duration_ns": "gpu__time_duration.sum",
    "achieved_occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "theoretical_occupancy": "sm__maximum_warps_per_active_cycle_pct",
    "memory_pct": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_bytes_per_s": "dram__bytes.sum.per_second",
    "compute_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "registers": "launch__registers_per_thread",
}
OCCUPANCY_LIMITS = {
    "registers": "launch__occupancy_limit_registers",
    "shared memory": "launch__occupancy_limit_shared_mem",
    "warps": "launch__occupancy_limit_warps",
    "blocks": "launch__occupancy_limit_blocks",
}


def triton_kernel_names() -> List[str]:
    """Names of every Triton function defined in the `kernels` package (kernels and helpers)."""
    import refrag_kernels
    from triton.runtime.jit import KernelInterface

    names = set()
    for info in pkgutil.walk_packages(refrag_kernels.__path__, prefix="refrag_kernels."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, KernelInterface):
                while not inspect.isfunction(value):
                    value = value.fn
                names.add(value.__name__)
    return sorted(names)


def kernel_regex() -> str:
    """An ``ncu -k`` filter selecting exactly refrag's Triton kernels."""
    return "regex:^(" + "|".join(triton_kernel_names()) + ")$"


def number(text: str) -> Optional[float]:
    """A float from a profiler CSV cell ('1,234.5' -> 1234.5); None for empty or 'n/a' cells."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read_csv_rows(path: Path, header_marker: str) -> List[Dict[str, str]]:
    """Rows of the CSV table whose header is the first line containing `header_marker` (nsys
    prints notices before the table)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if header_marker in line), None)
    if start is None:
        raise ValueError(f"{path} holds no CSV table with a {header_marker!r} column")
    return list(csv.DictReader(lines[start:]))


def read_totals(path: Path, fmt: str, name_column: str) -> List[Dict]:
    """(name, calls, total_us) rows from an nsys stats CSV or a torch_profile CSV."""
    if fmt not in ("nsys", "torch"):
        raise ValueError(f"unknown format {fmt!r}; use nsys or torch")
    rows = []
    for row in read_csv_rows(path, "Total Time (ns)" if fmt == "nsys" else "total_us"):
        if fmt == "nsys":
            name = row[name_column].lstrip(":")
            calls, total_us = number(row["Instances"]), number(row["Total Time (ns)"]) / 1e3
        else:
            name, calls, total_us = row["name"], number(row["calls"]), number(row["total_us"])
        rows.append({"name": name, "calls": int(calls), "total_us": total_us})
    return rows


def read_ncu(path: Path) -> List[Dict]:
    """One dict per kernel name from ncu's raw CSV page: launches, mean of each metric
    (duration-weighted for percentages) and the occupancy limiter of its launches."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path} is not an ncu --csv --page raw export (no \"ID\" header)")
    reader = csv.DictReader(lines[start:])
    launches = defaultdict(list)
    for row in reader:
        if number(row.get("ID", "")) is None:
            continue  # the units row
        launches[row["Kernel Name"]].append(row)
    return [ncu_kernel(name, rows) for name, rows in launches.items()]


def ncu_kernel(name: str, rows: List[Dict[str, str]]) -> Dict:
    """Aggregate the launches of one kernel (see `read_ncu`)."""
    durations = [number(r.get(NCU_METRICS["duration_ns"], "")) or 0.0 for r in rows]
    total = sum(durations) or 1.0
    out = {"name": name, "launches": len(rows), "mean_duration_us": sum(durations) / len(rows) / 1e3}
    for key, metric in NCU_METRICS.items():
        if key == "duration_ns":
            continue
        values = [(number(r.get(metric, "")), d) for r, d in zip(rows, durations)]
        values = [(v, d) for v, d in values if v is not None]
        out[key] = sum(v * d for v, d in values) / total if values and sum(d for _, d in values) else None
    out["occupancy_limit"] = occupancy_limiter(rows[0])
    out["limiter"] = limiter(out["memory_pct"], out["compute_pct"])
    return out


def occupancy_limiter(row: Dict[str, str]) -> Optional[str]:
    """Which resource caps blocks per SM (the smallest launch__occupancy_limit_*)."""
    limits = {name: number(row.get(metric, "")) for name, metric in OCCUPANCY_LIMITS.items()}
    limits = {name: value for name, value in limits.items() if value is not None}
    return min(limits, key=limits.get) if limits else None


def limiter(memory_pct: Optional[float], compute_pct: Optional[float]) -> str:
    """'memory', 'compute' or 'latency' by the speed-of-light rule of the module docstring."""
    if memory_pct is None or compute_pct is None:
        return "unknown"
    if max(memory_pct, compute_pct) < BOUND_THRESHOLD_PCT:
        return "latency"
    return "memory" if memory_pct >= compute_pct else "compute"


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ranges_table(ranges: List[Dict]) -> str:
    """Time per named range, as a share of the ``step`` range when present."""
    step = next((r["total_us"] for r in ranges if r["name"] == "step"), None)
    lines = ["| range | calls | total ms | share of step |", "|---|---|---|---|"]
    for r in sorted(ranges, key=lambda r: -r["total_us"]):
        share = None if not step else 100 * r["total_us"] / step
        lines.append(f"| {r['name']} | {r['calls']} | {r['total_us'] / 1e3:.2f} | {fmt(share, '.1f')}% |")
    return "\n".join(lines)


def kernels_table(kernels: List[Dict], ours: Iterable[str]) -> str:
    """Top kernels by total time, their share, and the share of refrag's Triton kernels."""
    ours = set(ours)
    total = sum(k["total_us"] for k in kernels) or 1.0
    ranked = sorted(kernels, key=lambda k: -k["total_us"])
    lines = ["| kernel | refrag Triton | calls | total ms | share | avg us |", "|---|---|---|---|---|---|"]
    for k in ranked[:TOP_KERNELS]:
        lines.append(f"| `{short_name(k['name'])}` | {'yes' if k['name'] in ours else ''} | {k['calls']} | "
                     f"{k['total_us'] / 1e3:.2f} | {100 * k['total_us'] / total:.1f}% | "
                     f"{k['total_us'] / max(k['calls'], 1):.1f} |")
    rest = ranked[TOP_KERNELS:]
    if rest:
        rest_us = sum(k["total_us"] for k in rest)
        lines.append(f"| ({len(rest)} others) | | {sum(k['calls'] for k in rest)} | {rest_us / 1e3:.2f} | "
                     f"{100 * rest_us / total:.1f}% | |")
    ours_us = sum(k["total_us"] for k in kernels if k["name"] in ours)
    return "\n".join(lines) + f"\n\nrefrag Triton kernels: {100 * ours_us / total:.1f}% of kernel time."


def ncu_table(kernels: List[Dict]) -> str:
    head = ["kernel", "launches", "mean us", "achieved occupancy %", "theoretical %", "occupancy limited by",
            "memory % of peak", "DRAM % of peak", "DRAM GB/s", "compute % of peak", "registers", "limiter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(kernels, key=lambda k: -k["mean_duration_us"] * k["launches"]):
        gbps = None if k["dram_bytes_per_s"] is None else k["dram_bytes_per_s"] / 1e9
        cells = [f"`{short_name(k['name'])}`", str(k["launches"]), f"{k['mean_duration_us']:.1f}",
                 fmt(k["achieved_occupancy"], ".1f"), fmt(k["theoretical_occupancy"], ".1f"),
                 k["occupancy_limit"] or "–", fmt(k["memory_pct"], ".1f"), fmt(k["dram_pct"], ".1f"),
                 fmt(gbps, ".0f"), fmt(k["compute_pct"], ".1f"), fmt(k["registers"], ".0f"), k["limiter"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_name(name: str, width: int = 80) -> str:
    """A kernel name without its template arguments, cut to `width` characters."""
    name = re.sub(r"<.*>", "<…>", name).replace("|", "/")
    return name if len(name) <= width else name[: width - 1] + "…"


def summary(device: str, workload: str, source: str, kernels: List[Dict], ranges: List[Dict],
            ncu: List[Dict], ours: Iterable[str]) -> str:
    """The markdown summary (sections for the inputs given)."""
    parts = [f"# Profile summary: {device}", "", f"Workload: {workload}. Source: {source}.", ""]
    if ranges:
        parts += ["## Time by range", "", ranges_table(ranges), ""]
    if kernels:
        parts += ["## Time split by kernel", "", kernels_table(kernels, ours), ""]
    if ncu:
        parts += ["## Nsight Compute, per kernel", "",
                  f"Limiter: memory or compute when that throughput reaches {BOUND_THRESHOLD_PCT:.0f}% of the "
                  "device peak, else latency. Percentages are means over launches weighted by duration.", "",
                  ncu_table(ncu), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel-regex", action="store_true", help="print the ncu -k filter and exit")
    parser.add_argument("--device", default="unknown device", help="device name for the title")
    parser.add_argument("--workload", default="HybridLM train step", help="what was profiled")
    parser.add_argument("--format", choices=("nsys", "torch"), default="nsys", help="format of --kernels/--ranges")
    parser.add_argument("--kernels", type=Path, help="per-kernel totals CSV")
    parser.add_argument("--ranges", type=Path, help="per-range totals CSV (NVTX / record_function)")
    parser.add_argument("--ncu", type=Path, help="ncu raw-page CSV")
    parser.add_argument("--out", type=Path, help="markdown file to write (printed as well)")
    args = parser.parse_args(argv)
    if args.kernel_regex:
        print(kernel_regex())
        return
    if not (args.kernels or args.ranges or args.ncu):
        parser.error("give at least one of --kernels, --ranges, --ncu")
    timeline = {"nsys": "Nsight Systems", "torch": "torch.profiler"}[args.format]
    sources = [timeline] if args.kernels or args.ranges else []
    sources += ["Nsight Compute"] if args.ncu else []
    text = summary(
        args.device, args.workload, " + ".join(sources),
        read_totals(args.kernels, args.format, "Name") if args.kernels else [],
        read_totals(args.ranges, args.format, "Range") if args.ranges else [],
        read_ncu(args.ncu) if args.ncu else [],
        triton_kernel_names(),
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
