"""torch.profiler fallback for machines without nsys / ncu: profile HybridLM train steps with the
same named ranges as profiles/train_step.py, export a chrome trace, per-kernel and per-range
CSVs and the markdown summary, all under profiles/<device>/.

    python -m profiles.torch_profile [--pattern hybrid] [--length 8192] [--steps 5] [--warmup 3]
                                     [--smoke] [--out-root profiles]

Without CUDA it profiles the smoke model at 64 tokens, one step, unless told otherwise
(profiles.train_step.parse_args), and prints each step as it ends.

On CUDA the kernel table lists device kernels (time on the GPU); on CPU (smoke mode, Triton
interpreter) it lists CPU operators by self time, which says nothing about GPU performance.
Open the trace in chrome://tracing or https://ui.perfetto.dev.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import device_name
from bench.report import device_slug
from profiles import summarize
from profiles.train_step import parse_args, phase, prepare, run_steps

RANGE_PREFIXES = ("profile", "step", "data", "forward", "backward", "optimizer")


def kernel_totals(prof: profile, on_cuda: bool) -> List[Dict]:
    """(name, calls, total_us): device kernels on CUDA, else CPU operators by self time."""
    if on_cuda:
        totals = defaultdict(lambda: [0, 0.0])
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name][0] += 1
                totals[event.name][1] += event.time_range.elapsed_us()
        return [{"name": n, "calls": c, "total_us": t} for n, (c, t) in totals.items()]
    return [{"name": a.key, "calls": a.count, "total_us": a.self_cpu_time_total}
            for a in prof.key_averages() if a.self_cpu_time_total > 0 and not a.key.startswith(RANGE_PREFIXES)]


def range_totals(prof: profile) -> List[Dict]:
    """(name, calls, total_us) of the named ranges, host wall time (the step ends synchronized)."""
    return [{"name": a.key, "calls": a.count, "total_us": a.cpu_time_total}
            for a in prof.key_averages() if a.key.startswith(RANGE_PREFIXES)]


def write_totals(rows: List[Dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["name", "calls", "total_us"])
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out-root", type=Path, default=Path("profiles"), help="summaries go to <root>/<device>/")
    own, rest = parser.parse_known_args(argv)
    args = parse_args(rest)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    step, examples = prepare(args.pattern, args.length, args.smoke, device)
    run_steps(step, examples, args.warmup, device, label="warm-up")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        with phase("profile"):
            run_steps(step, examples, args.steps, device, label="profiled")
    print("[profile] writing the trace and summaries", flush=True)

    out_dir = own.out_root / device_slug(device_name())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"torch_{args.pattern}_L{args.length}"
    prof.export_chrome_trace(str(out_dir / f"{stem}_trace.json"))
    kernels, ranges = kernel_totals(prof, on_cuda), range_totals(prof)
    write_totals(kernels, out_dir / f"{stem}_kernels.csv")
    write_totals(ranges, out_dir / f"{stem}_ranges.csv")
    what = "device kernels" if on_cuda else "CPU operators (Triton interpreter; not GPU performance)"
    text = summarize.summary(device_name(), f"{args.pattern} L={args.length}, {args.steps} steps; {what}",
                             "torch.profiler", kernels, ranges, [], summarize.triton_kernel_names())
    (out_dir / f"{stem}_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
