"""Turn saved pytest-benchmark JSON into CSV, PNG plots and a markdown performance table.

    python -m bench.report bench/results/latest.json [--out bench/results]

Rows are keyed by the device name stamped on every case, so results from different GPUs
never mix: everything is written under <out>/<device>/.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

COLUMNS = ["op", "mode", "pattern", "L", "num_seqs", "V", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "tflops",
           "gbps", "peak_mem_bytes"]


def load_rows(paths: List[Path]) -> List[Dict]:
    """One flat dict per benchmark case: its extra_info plus the test name."""
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            if "op" not in info:
                continue
            info["name"] = bench["name"]
            rows.append(info)
    return rows


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def variant(row: Dict) -> str:
    """The case's mode, plus the model's block pattern for train steps (e.g. "fwd_bwd_adamw hybrid")."""
    return " ".join(str(row[k]) for k in ("mode", "pattern") if row.get(k))


def baseline_names(rows: List[Dict]) -> List[str]:
    return sorted({k[len("speedup_vs_"):] for r in rows for k in r if k.startswith("speedup_vs_")})


def write_csv(rows: List[Dict], path: Path) -> None:
    extra = [f"speedup_vs_{b}" for b in baseline_names(rows)]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in COLUMNS + extra})


def markdown_table(rows: List[Dict]) -> str:
    """The README's performance table: one line per case with its ratio to each baseline."""
    bases = baseline_names(rows)
    head = ["op", "mode", "L", "median ms", "tokens/s", "TFLOP/s", "peak MiB"] + [f"x vs {b}" for b in bases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["op"], variant(r), r.get("L", 0))):
        mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
        cells = [r["op"], variant(r), str(r.get("L", r.get("V", ""))), fmt(r.get("median_ms"), ".3f"),
                 fmt(r.get("tokens_per_s"), ".3g"), fmt(r.get("tflops"), ".1f"), fmt(mem, ".0f")]
        cells += [fmt(r.get(f"speedup_vs_{b}"), ".2f") for b in bases]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], out_dir: Path) -> List[Path]:
    """Throughput, peak memory and speedup vs each baseline against length, one PNG per op/mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if "L" in r:
            groups[(r["op"], variant(r), r.get("num_seqs", 1))].append(r)
    written = []
    for (op, mode, nseq), items in groups.items():
        items.sort(key=lambda r: r["L"])
        L = [r["L"] for r in items]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        axes[0].plot(L, [r["tokens_per_s"] for r in items], marker="o")
        axes[0].set(title=f"{op} {mode}: tokens/s", xscale="log", xlabel="packed length")
        mem = [(r.get("peak_mem_bytes") or 0) / 2**20 for r in items]
        axes[1].plot(L, mem, marker="o")
        axes[1].set(title="peak memory (MiB)", xscale="log", xlabel="packed length")
        for base in baseline_names(items):
            pts = [(r["L"], r[f"speedup_vs_{base}"]) for r in items if r.get(f"speedup_vs_{base}")]
            if pts:
                axes[2].plot(*zip(*pts), marker="o", label=base)
        axes[2].axhline(1.0, color="gray", lw=0.8)
        axes[2].set(title="speedup vs baseline", xscale="log", xlabel="packed length")
        axes[2].legend(fontsize=8)
        fig.suptitle(f"{items[0].get('device', '')}  commit {items[0].get('commit', '')}")
        path = out_dir / f"{op}-{mode.replace(' ', '-')}-{nseq}seq.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results root")
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    if not rows:
        raise SystemExit("no refrag benchmark rows found (cases carry extra_info['op'])")
    by_device = defaultdict(list)
    for r in rows:
        by_device[r.get("device", "unknown")].append(r)
    for device, items in by_device.items():
        out_dir = args.out / device_slug(device)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(items, out_dir / "results.csv")
        table = markdown_table(items)
        (out_dir / "table.md").write_text(f"Device: {device}\n\n{table}\n")
        plots = plot(items, out_dir)
        print(f"{device}: {len(items)} cases -> {out_dir} ({len(plots)} plots)")
        print(table)


if __name__ == "__main__":
    main()
