"""profiles/: the summary of Nsight Systems / Nsight Compute exports (on small synthetic exports
in their CSV formats) and the torch.profiler fallback end to end on the CPU smoke model."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiles import summarize

ROOT = Path(__file__).resolve().parents[1]

NSYS_KERNELS = """Generating SQLite file report.sqlite from report.nsys-rep
Processing [report.sqlite] with [cuda_gpu_kern_sum.py]...
"Time (%)","Total Time (ns)","Instances","Avg (ns)","Med (ns)","Min (ns)","Max (ns)","StdDev (ns)","Name"
"60.0","6000000","12","500000.0","500000.0","400000","600000","1000.0","chunk_fwd_o_kernel"
"40.0","4000000","40","100000.0","100000.0","90000","110000","100.0","sm90_xmma_gemm_bf16bf16_bf16f32<float>"
"""
NSYS_RANGES = (
    '"Time (%)","Total Time (ns)","Instances","Avg (ns)","Med (ns)","Min (ns)","Max (ns)","StdDev (ns)",'
    '"Style","Range"\n'
) + """"50.0","20000000","2","10000000.0","10000000.0","9000000","11000000","1.0","PushPop",":step"
"25.0","10000000","2","5000000.0","5000000.0","4000000","6000000","1.0","PushPop",":backward"
"""


def ncu_csv(launches):
    """An ncu --csv --page raw export: header, units row, one row per launch."""
    columns = ["ID", "Kernel Name", *summarize.NCU_METRICS.values(), *summarize.OCCUPANCY_LIMITS.values()]
    rows = [columns, ["", "", "nsecond", "%", "%", "%", "%", "byte/second", "%", "register/thread",
                      "block", "block", "block", "block"]]
    for i, (name, values) in enumerate(launches):
        rows.append([str(i), name, *[f"{v:,}" for v in values]])
    return "\n".join(",".join(f'"{cell}"' for cell in row) for row in rows) + "\n"


def launch(duration_ns, memory_pct, compute_pct, limits=(2, 8, 8, 32)):
    """Metric values in NCU_METRICS order, then the occupancy limits (registers, smem, warps, blocks)."""
    return [duration_ns, 40.0, 50.0, memory_pct, memory_pct * 0.9, 1.5e12, compute_pct, 128, *limits]


@pytest.mark.parametrize("memory, compute, expected", [
    pytest.param(85.0, 30.0, "memory", id="memory-bound"),
    pytest.param(20.0, 75.0, "compute", id="compute-bound"),
    pytest.param(30.0, 35.0, "latency", id="latency-bound"),
    pytest.param(None, 35.0, "unknown", id="missing-metric"),
])
def test_limiter_rule(memory, compute, expected):
    assert summarize.limiter(memory, compute) == expected


def test_ncu_launches_aggregate_per_kernel(tmp_path):
    path = tmp_path / "raw.csv"
    path.write_text(ncu_csv([("chunk_fwd_o_kernel", launch(3000, 90.0, 20.0)),
                             ("chunk_fwd_o_kernel", launch(1000, 50.0, 60.0)),
                             ("cross_entropy_rows_kernel", launch(2000, 10.0, 20.0, limits=(8, 1, 8, 32)))]))
    kernels = {k["name"]: k for k in summarize.read_ncu(path)}
    scan = kernels["chunk_fwd_o_kernel"]
    assert scan["launches"] == 2
    assert scan["mean_duration_us"] == pytest.approx(2.0)
    assert scan["memory_pct"] == pytest.approx((3000 * 90.0 + 1000 * 50.0) / 4000)
    assert scan["occupancy_limit"] == "registers"
    assert scan["limiter"] == "memory"
    ce = kernels["cross_entropy_rows_kernel"]
    assert (ce["occupancy_limit"], ce["limiter"]) == ("shared memory", "latency")


def test_nsys_summary_splits_time_by_kernel_and_range(tmp_path):
    (tmp_path / "k.csv").write_text(NSYS_KERNELS)
    (tmp_path / "r.csv").write_text(NSYS_RANGES)
    out = tmp_path / "dev" / "summary.md"
    summarize.main(["--device", "Test GPU", "--kernels", str(tmp_path / "k.csv"), "--ranges",
                    str(tmp_path / "r.csv"), "--out", str(out)])
    text = out.read_text()
    assert "| `chunk_fwd_o_kernel` | yes | 12 | 6.00 | 60.0% |" in text
    assert "| `sm90_xmma_gemm_bf16bf16_bf16f32<…>` |  | 40 | 4.00 | 40.0% |" in text
    assert "refrag Triton kernels: 60.0% of kernel time." in text
    assert "| backward | 2 | 10.00 | 50.0% |" in text


def test_kernel_regex_names_triton_kernels():
    regex = summarize.kernel_regex()
    assert regex.startswith("regex:^(") and "chunk_fwd_o_kernel" in regex and "cross_entropy_rows_kernel" in regex


@pytest.mark.slow
def test_torch_profile_cpu_smoke(tmp_path):
    """With no shape arguments on a CPU it picks the smoke model at 64 tokens, one step, and says so."""
    smoke = ["--smoke"] if torch.cuda.is_available() else []
    env = {k: v for k, v in os.environ.items() if k != "REFRAG_BENCH_SMOKE"}
    result = subprocess.run([sys.executable, "-m", "profiles.torch_profile", *smoke, "--out-root", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "building the smoke hybrid model, 64 tokens" in result.stdout
    assert "[profile] profiled step 1/1:" in result.stdout
    (device_dir,) = tmp_path.iterdir()
    stem = device_dir / "torch_hybrid_L64"
    assert Path(f"{stem}_trace.json").stat().st_size > 0
    with open(f"{stem}_ranges.csv") as fh:
        ranges = {row["name"]: row for row in csv.DictReader(fh)}
    assert {"step", "data", "forward", "forward/T", "forward/M", "backward", "optimizer"} <= set(ranges)
    assert all(int(ranges[name]["calls"]) == 1 for name in ("step", "forward/T", "forward/M"))
    with open(f"{stem}_kernels.csv") as fh:
        assert len(list(csv.DictReader(fh))) > 0
    assert "## Time split by kernel" in Path(f"{stem}_summary.md").read_text()
