"""Turn saved pytest-benchmark JSON into CSV, PNG plots and markdown tables, and keep the
README's GPU results in step with the results committed under bench/results/<device>/.

    python -m bench.report bench/results/latest.json [--out bench/results]   # CSV, table, plots per device
    python -m bench.report                                                    # README section from bench/results/*/

Rows are keyed by the device name stamped on every case, so results from different GPUs
never mix: everything is written under <out>/<device>/. The goals (GOALS) are the ratios the
project promises, read off rows measured in the same run; `make gpu-check` reports them too.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- gpu-results -->", "<!-- /gpu-results -->"
DRY_RUN_DIR = "dry-run"
COLUMNS = ["op", "mode", "pattern", "model", "L", "num_seqs", "V", "density", "median_ms", "p20_ms", "p80_ms",
           "tokens_per_s", "tflops", "gbps", "peak_mem_bytes", "peak_mem_total_bytes"]
# Extra-info keys that tell cases of one op apart (besides mode and L), in label order, with their format;
# "density" is the share of loss tokens for the cross-entropy (for doc_attention, a measure of its layout).
CASE_KEYS = {"pattern": "{}", "model": "{}", "num_seqs": "{} seqs", "V": "V{}"}
OP_CASE_KEYS = {"fused_linear_cross_entropy": {"density": "{:.0%} loss"}}


def load_rows(paths: Sequence[Path]) -> List[Dict]:
    """One flat dict per benchmark case: its extra_info plus the test name."""
    rows = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"bench.report: no such file: {path} (`make bench` writes bench/results/latest.json, "
                             "`make gpu-check` a folder of suite JSONs)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"bench.report: {path} is not JSON ({error})") from None
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            if "op" not in info:
                continue
            info["name"] = bench["name"]
            rows.append(info)
    return rows


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def file_slug(text: str) -> str:
    """A file name of letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unnamed"


def variant(row: Dict) -> str:
    """The case's mode plus what tells it apart from other cases of its op at the same length
    (e.g. "fwd_bwd_adamw hybrid", "fwd_bwd 64 seqs", "fwd_bwd V32768 20% loss")."""
    parts = [str(row["mode"])] if row.get("mode") else []
    for key, fmt in {**CASE_KEYS, **OP_CASE_KEYS.get(row.get("op"), {})}.items():
        value = row.get(key)
        if value is not None and not (key == "num_seqs" and value == 1):
            parts.append(fmt.format(value))
    return " ".join(parts)


def case_label(row: Dict) -> str:
    """Short label of a case for tables and plots: its variant and length."""
    return f"{variant(row)} L{row['L']}".strip() if "L" in row else variant(row)


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
    head = (["op", "mode", "L", "median ms", "tokens/s", "TFLOP/s", "peak MiB", "peak MiB in all"]
            + [f"x vs {b}" for b in bases])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    mib = lambda v: None if v is None else v / 2**20  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["op"], variant(r), r.get("L", 0))):
        cells = [r["op"], variant(r), str(r.get("L", r.get("V", ""))), fmt(r.get("median_ms"), ".3f"),
                 fmt(r.get("tokens_per_s"), ".3g"), fmt(r.get("tflops"), ".1f"), fmt(mib(r.get("peak_mem_bytes")), ".0f"),
                 fmt(mib(r.get("peak_mem_total_bytes")), ".0f")]
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
            groups[(r["op"], variant(r))].append(r)
    written = []
    for (op, mode), items in groups.items():
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
        path = out_dir / f"{file_slug(f'{op}-{mode}')}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---- goals: the ratios the project promises, each read off rows measured in the same run ----

@dataclass(frozen=True)
class GoalResult:
    goal: str
    case: str
    value: Optional[float]  # None: not measured in this run
    target: float
    at_least: bool  # value >= target (ratios) or value <= target (memory)
    unit: str  # "x" or "GB"
    note: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target

    @property
    def margin(self) -> Optional[float]:
        """How far past the target (> 1: met), for plots."""
        if not self.value:
            return None
        return self.value / self.target if self.at_least else self.target / self.value


def number(value) -> Optional[float]:
    """A measured number, or None for missing, 'OOM' and baseline error strings."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def pick(rows: List[Dict], op: str, **match) -> List[Dict]:
    return [r for r in rows if r.get("op") == op and all(r.get(k) == v for k, v in match.items())]


def longest(rows: List[Dict]) -> List[Dict]:
    """The rows at the longest length measured (16K in `make gpu-check`, the tiny length in its dry run)."""
    top = max((r.get("L", 0) for r in rows), default=None)
    return [r for r in rows if r.get("L", 0) == top]


def baseline_ratio(row: Dict, *names: str) -> tuple[Optional[float], str]:
    """Our speedup over the first of `names` this row measured, and which one it was."""
    for name in names:
        value = number(row.get(f"speedup_vs_{name}"))
        if value is not None:
            return value, name
    return None, ""


def memory_ratio(row: Dict, baseline: str, key: str = "peak_mem_bytes") -> Optional[float]:
    ours, theirs = number(row.get(key)), number(row.get(f"{baseline}_{key}"))
    return ours / theirs if ours is not None and theirs else None


def ssd_goals(rows):
    for r in longest(pick(rows, "ssd_scan", mode="fwd_bwd")):
        measured = {b: number(r.get(f"speedup_vs_{b}")) for b in ("fla_chunk_simple_gla", "mamba_ssm")}
        got = [v for v in measured.values() if v is not None]
        note = "" if len(got) == 2 else ("no baseline measured" if not got else
                                         "only " + next(b for b, v in measured.items() if v is not None))
        yield GoalResult("SSD fwd+bwd vs max(fla, mamba-ssm)", case_label(r), min(got) if got else None, 1.2, True,
                         "x", note)


def doc_attention_goals(rows):
    for r in longest(pick(rows, "doc_attention", mode="fwd_bwd")):
        yield GoalResult("doc_attention fwd+bwd vs FlexAttention", case_label(r),
                         number(r.get("speedup_vs_flex_attention")), 1.3, True, "x")
        yield GoalResult("doc_attention fwd+bwd vs SDPA dense mask", case_label(r),
                         number(r.get("speedup_vs_sdpa_dense")), 5.0, True, "x")


FLCE_TORCH = ("torch", "reference")  # plain torch linear + cross-entropy, else the reference that is one


def flce_goals(rows):
    for r in pick(rows, "fused_linear_cross_entropy", mode="fwd_bwd"):
        density = number(r.get("density"))
        speed, base = baseline_ratio(r, *FLCE_TORCH)
        note = "" if base in ("", "torch") else f"vs {base}"
        if density is None or density >= 0.99:
            yield GoalResult("FLCE speed vs torch, 100% loss tokens", case_label(r), speed, 1.0, True, "x", note)
        if density is not None and abs(density - 0.2) < 0.01:
            yield GoalResult("FLCE speed vs torch, 20% loss tokens", case_label(r), speed, 2.0, True, "x", note)
            memory = next((m for m in (memory_ratio(r, b) for b in FLCE_TORCH) if m is not None), None)
            yield GoalResult("FLCE peak memory vs torch, 20% loss tokens", case_label(r), memory, 0.1, False, "x", note)


def train_step_goals(rows):
    steps = longest(pick(rows, "train_step"))
    by_pattern = {r.get("pattern"): r for r in steps}
    mamba, attention = by_pattern.get("pure-M"), by_pattern.get("pure-T")
    if mamba and attention:
        case = f"pure-M vs pure-T L{mamba['L']}"
        speed = number(mamba.get("tokens_per_s")), number(attention.get("tokens_per_s"))
        memory = number(mamba.get("peak_mem_total_bytes")), number(attention.get("peak_mem_total_bytes"))
        yield GoalResult("Mamba train step tokens/s vs transformer", case,
                         speed[0] / speed[1] if None not in speed else None, 1.4, True, "x")
        yield GoalResult("Mamba train step peak memory vs transformer", case,
                         memory[0] / memory[1] if None not in memory and memory[1] else None, 0.6, False, "x")
    else:
        yield GoalResult("Mamba train step tokens/s vs transformer", "pure-M, pure-T", None, 1.4, True, "x",
                         "not both measured")
    d16 = by_pattern.get("hybrid-d16")
    total = number(d16.get("peak_mem_total_bytes")) if d16 else None
    yield GoalResult("hybrid d16 train step peak memory", case_label(d16) if d16 else "hybrid-d16",
                     None if total is None else total / 1e9, 12.0, False, "GB", "" if d16 else "not measured")


def ttft_goals(rows):
    for r in pick(rows, "doc_cache_ttft"):
        yield GoalResult("TTFT with the document cache vs full prefill",
                         f"{r.get('model')} {r.get('docs')}x{r.get('doc_len')}",
                         number(r.get("speedup_vs_full_prefill")), 10.0, True, "x")


def hf_bamba_goals(rows):
    """Issue 21: transformers' Bamba on a packed batch at >= 1.0x its speed on mamba-ssm's kernels
    (where mamba-ssm installs; without it ours is the only packed option and nothing is compared)."""
    for r in pick(rows, "hf_bamba"):
        yield GoalResult("HF Bamba packed fwd+bwd vs mamba-ssm kernels", case_label(r),
                         number(r.get("speedup_vs_mamba_ssm")), 1.0, True, "x",
                         "" if r.get("mamba_ssm") == "installed" else "mamba-ssm not installed: ours only")


GOALS: List[Callable[[List[Dict]], Iterator[GoalResult]]] = [ssd_goals, doc_attention_goals, flce_goals,
                                                             train_step_goals, ttft_goals, hf_bamba_goals]


def evaluate_goals(rows: List[Dict]) -> List[GoalResult]:
    return [result for goal in GOALS for result in goal(rows)]


def goals_table(results: List[GoalResult]) -> str:
    lines = ["| goal | case | measured | target | met |", "|---|---|---|---|---|"]
    for g in results:
        measured = "not measured" if g.value is None else (f"{g.value:.2f}x" if g.unit == "x" else f"{g.value:.1f} GB")
        target = ("≥ " if g.at_least else "≤ ") + (f"{g.target:g}x" if g.unit == "x" else f"{g.target:g} GB")
        met = {True: "yes", False: "**no**", None: "–"}[g.met]
        lines.append(f"| {g.goal} | {g.case}{f' ({g.note})' if g.note else ''} | {measured} | {target} | {met} |")
    return "\n".join(lines)


def baseline_errors(rows: List[Dict]) -> List[str]:
    """'case: baseline: error' for every baseline that failed or ran out of memory."""
    found = []
    for r in rows:
        for key, value in r.items():
            if key.endswith("_median_ms") and isinstance(value, str):
                found.append(f"{r['op']} {case_label(r)}: {key[:-len('_median_ms')]}: {value}")
    return found


def summary_plot(rows: List[Dict], goals: List[GoalResult], path: Path, title: str) -> None:
    """One PNG: each goal's margin (> 1 met), then per op our speedup over each baseline per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(len(ops) + 1, 1, figsize=(11, 3.2 * (len(ops) + 1) + 0.25 * len(goals)),
                             squeeze=False, gridspec_kw={"height_ratios": [1 + 0.12 * len(goals)] + [1] * len(ops)})
    ax = axes[0][0]
    measured = [g for g in goals if g.margin is not None]
    if measured:
        ax.barh([textwrap.fill(f"{g.goal} [{g.case}]", 45) for g in measured], [g.margin for g in measured],
                color=["tab:green" if g.met else "tab:red" for g in measured])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
    ax.set_title("goals: measured / target (> 1 is met; memory goals inverted)")
    ax.tick_params(axis="y", labelsize=7)
    for ax, op in zip((row[0] for row in axes[1:]), ops):
        items = sorted(pick(rows, op), key=lambda r: (variant(r), r.get("L", 0)))
        bases = baseline_names(items)
        width = 0.8 / max(1, len(bases))
        for k, base in enumerate(bases):
            ax.bar([i + k * width for i in range(len(items))],
                   [number(r.get(f"speedup_vs_{base}")) or 0.0 for r in items], width, label=base)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(items))], [case_label(r) for r in items],
                      fontsize=7, rotation=15)
        ax.set_title(f"{op}: speedup over each baseline")
        if bases:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- README section from committed results ----

def device_results(root: Path = RESULTS) -> Dict[str, List[Dict]]:
    """{device folder name: rows} of every committed GPU run under root (dry runs and smoke rows left out)."""
    found = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != DRY_RUN_DIR) if root.is_dir() else []:
        rows = [r for r in load_rows(sorted(folder.glob("*.json"))) if not r.get("smoke")]
        if rows:
            found[folder.name] = rows
    return found


def readme_section(results: Dict[str, List[Dict]], root: Path = RESULTS) -> str:
    if not results:
        return ("No GPU result is committed yet: run `make gpu-check` on a GPU machine and commit its folder "
                "(see \"On a GPU\").")
    parts = []
    for folder, rows in results.items():
        first = rows[0]
        rel = (root / folder).relative_to(ROOT) if (root / folder).is_relative_to(ROOT) else root / folder
        parts.append(f"#### {first.get('device', folder)}\n\ncommit {first.get('commit', '?')}, "
                     f"{first.get('time', '?')}, torch {first.get('torch', '?')}; full report: `{rel}/report.md`\n\n"
                     f"{goals_table(evaluate_goals(rows))}\n\n{markdown_table(rows)}")
    return "\n\n".join(parts)


def update_readme(readme: Path = README, root: Path = RESULTS) -> str:
    """Rewrite the README between the gpu-results markers from the results under root."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    section = readme_section(device_results(root), root)
    readme.write_text(f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")
    return section


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="*", type=Path,
                        help="pytest-benchmark --benchmark-json files; none: regenerate the README's GPU results")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root")
    parser.add_argument("--readme", type=Path, default=README, help="README to update (no json given)")
    args = parser.parse_args(argv)
    if not args.json:
        section = update_readme(args.readme, args.out)
        print(f"{args.readme}: GPU results section regenerated from {args.out}\n{section}")
        return
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
