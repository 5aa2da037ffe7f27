"""The benchmark suite itself stays tested: its smoke mode (tiny shapes; Triton interpreter on
CPU) runs every bench/ module, and bench.report turns the JSON into the CSV, table and plots.

The timings it produces are meaningless; the test checks that every case runs against its
reference baseline and records what the report needs.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Suites measured against the PyTorch reference (refrag_kernels.reference, or the model running it);
# other suites (e.g. the document-cache TTFT) name their own baselines.
REFERENCE_OPS = {"ssd_scan", "selective_scan", "causal_conv1d", "doc_attention", "fused_linear_cross_entropy",
                 "train_step", "gated_rms_norm"}
REQUIRED_INFO = ("op", "median_ms", "tokens_per_s")
TIMEOUT_S = 600


def _without_xdist(environ) -> dict:
    """The child pytest must not look like an xdist worker (make test runs under pytest-xdist):
    pytest-benchmark would then disable timing and refuse --benchmark-only."""
    return {k: v for k, v in environ.items() if not k.startswith("PYTEST_XDIST_")}


def run_module(args, **env):
    """Run `python -m <args>` from the repo root; fail with its output when it fails."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env={**_without_xdist(os.environ), **env})
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    """pytest-benchmark JSON of one smoke run of the whole bench/ suite."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    run_module(["pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                f"--benchmark-json={out}"], REFRAG_BENCH_SMOKE="1")
    return out


@pytest.mark.slow
def test_every_suite_records_its_cases(smoke_json):
    cases = json.loads(smoke_json.read_text())["benchmarks"]
    infos = [case["extra_info"] for case in cases]
    assert REFERENCE_OPS <= {info.get("op") for info in infos}
    for case, info in zip(cases, infos):
        missing = [key for key in REQUIRED_INFO if info.get(key) is None]
        assert not missing, f"{case['name']} lacks {missing}"
        speedups = {key: value for key, value in info.items() if key.startswith("speedup_vs_")}
        assert speedups, f"{case['name']} was measured against no baseline"
        if info["op"] in REFERENCE_OPS:
            assert "speedup_vs_reference" in speedups, f"{case['name']} lacks speedup_vs_reference"
        assert info["median_ms"] > 0 and info["tokens_per_s"] > 0 and min(speedups.values()) > 0
        assert info["smoke"] is True


@pytest.mark.slow
def test_report_writes_csv_table_and_plots(smoke_json, tmp_path):
    run_module(["bench.report", str(smoke_json), "--out", str(tmp_path)])
    cases = json.loads(smoke_json.read_text())["benchmarks"]
    (device_dir,) = tmp_path.iterdir()
    with (device_dir / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(cases)
    assert all(row["speedup_vs_reference"] for row in rows if row["op"] in REFERENCE_OPS)
    table = (device_dir / "table.md").read_text().splitlines()
    assert "x vs reference" in table[2]
    assert len([line for line in table if line.startswith("| ") and "---" not in line]) == len(cases) + 1
    plotted_ops = {png.name.split("-")[0] for png in device_dir.glob("*.png")}
    assert plotted_ops == {info["extra_info"]["op"] for info in cases if "L" in info["extra_info"]}
