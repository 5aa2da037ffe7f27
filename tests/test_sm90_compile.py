"""sm_90 (H100) compile check without a GPU (profiles/aot.py, profiles/sm90_compile.py).

Launch recording runs in this process under the interpreter; the compile check runs the
profile script, whose compile step is a subprocess with the interpreter off. Only the first
autotune config of each op is compiled here; the script compiles them all for the report.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import refrag_kernels
from profiles import aot
from refrag_kernels.common.dispatch import INTERPRET
from refrag_kernels.conv1d import CONV1D_CONFIGS, causal_conv1d
from refrag_kernels.ssd import ssd_scan_triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "profiles" / "sm90_compile.py"
# Per-thread spill stores above this fail the check; smaller spills are listed in the report.
SPILL_LIMIT_BYTES = 1024
# Known regressions, each held at its measured ceiling so it cannot grow unnoticed (none today).
KNOWN_SPILLS: dict = {}

needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="recording launches needs TRITON_INTERPRET=1")
MISSING_TOOL = aot.tool_missing()
needs_nvidia_tools = pytest.mark.skipif(MISSING_TOOL is not None, reason=f"cannot compile for sm_90: {MISSING_TOOL}")


def _conv_inputs(length=63, channels=40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, channels, generator=gen).half()
    weight = torch.randn(channels, 4, generator=gen).half()
    cu = torch.tensor([0, 1, 30, length], dtype=torch.int32)
    return x, weight, cu


@needs_interpreter
def test_record_launches_describes_arguments_and_options():
    x, weight, cu = _conv_inputs()
    config = CONV1D_CONFIGS[1]
    with torch.no_grad(), aot.record_launches("conv") as launches:
        causal_conv1d(x, weight, None, cu_seqlens=cu, config=config)
    assert [launch.kernel for launch in launches] == ["refrag_kernels.conv1d:causal_conv1d_fwd_kernel"]
    args, options = launches[0].args, launches[0].options
    assert args["x"] == {"tensor": "float16", "aligned": True}
    assert args["bias"] == {"value": None}
    assert args["L"] == {"value": 63}
    assert args["USE_WINDOWS"] == {"value": True}  # set by the kernel's heuristic
    assert all(args[k] == {"value": v} for k, v in config.kwargs.items())
    assert options["num_warps"] == config.num_warps
    assert launches[0].label == "conv"


def _ssd_varlen_doc_mode():
    gen = torch.Generator().manual_seed(1)
    h, p, n, length = 2, 16, 16, 40
    x = torch.randn(1, length, h, p, generator=gen).requires_grad_(True)
    dt = (torch.rand(1, length, h, generator=gen) * 0.5).requires_grad_(True)
    B, C = (torch.randn(1, length, 1, n, generator=gen).requires_grad_(True) for _ in range(2))
    cu = torch.tensor([0, 1, 25, length], dtype=torch.int32)
    docs = torch.zeros(length, dtype=torch.int64)
    docs[3:10], docs[10:11] = 1, 2  # one one-token document
    y, final = ssd_scan_triton(x, dt, -torch.ones(h), B, C, chunk_size=16, cu_seqlens=cu, doc_ids=docs,
                               doc_mode=True, return_final_states=True)
    torch.autograd.grad([y, final], [x, dt, B, C], [torch.ones_like(y), torch.ones_like(final)])


@needs_interpreter
def test_recording_without_execution_matches_execution():
    """Host code between launches depends on shapes only: skipping the kernels records the same launches."""
    with aot.record_launches(execute=True) as executed:
        _ssd_varlen_doc_mode()
    with aot.record_launches(execute=False) as recorded:
        _ssd_varlen_doc_mode()
    assert len(executed) >= 6
    assert [launch.key() for launch in recorded] == [launch.key() for launch in executed]


@needs_interpreter
def test_cuda_launchers_turn_off_the_interpreter_flag_of_launchers_only():
    attention = importlib.import_module("refrag_kernels.doc_attention")
    dispatch = importlib.import_module("refrag_kernels.common.dispatch")
    with aot.cuda_launchers():
        assert attention.INTERPRET is False
        assert dispatch.INTERPRET is True
    assert attention.INTERPRET is True


def test_arguments_round_trip_through_their_description():
    for value in (None, True, 7, 2 ** 40, 0.5, "ieee"):
        assert aot.decode_arg(aot.encode_arg(value)) == value
    assert aot.decode_arg(aot.encode_arg(tl.bfloat16)) == tl.bfloat16
    assert aot.decode_arg(aot.encode_arg(tl.constexpr(64))) == 64
    stand_in = aot.decode_arg(aot.encode_arg(torch.zeros(4, dtype=torch.bfloat16)[1:]))
    assert stand_in.dtype == torch.bfloat16 and stand_in.data_ptr() % 16 != 0
    with pytest.raises(ValueError, match="cannot record a kernel argument of type list"):
        aot.encode_arg([1, 2])


@pytest.mark.parametrize("registers, shared, warps, blocks, limiter", [
    pytest.param(32, 0, 4, 16, "warps", id="light-4warps-full"),
    pytest.param(128, 0, 4, 4, "registers", id="128regs-4warps"),
    pytest.param(255, 0, 8, 1, "registers", id="255regs-8warps"),
    pytest.param(40, 100 * 1024, 4, 2, "shared", id="100KB-smem"),
    pytest.param(40, 228 * 1024, 4, 0, "shared (exceeds the per-block maximum)", id="smem-too-large"),
])
def test_h100_occupancy(registers, shared, warps, blocks, limiter):
    """Register file 64K per SM in 256-register warp units, 228 KB smem (+1 KB per block), 64 warps."""
    occ = aot.occupancy(registers, shared, warps)
    assert (occ["blocks"], occ["limiter"]) == (blocks, limiter)
    assert occ["occupancy"] == blocks * warps / 64


SMALL_DOT_KERNEL = """
import triton
import triton.language as tl


@triton.jit
def square_kernel(a, out, BM: tl.constexpr):
    o_m = tl.arange(0, BM)
    p_a = a + o_m[:, None] * BM + o_m[None, :]
    b_a = tl.load(p_a)
    tl.store(out + o_m[:, None] * BM + o_m[None, :], tl.dot(b_a, b_a))  # [BM, BM] @ [BM, BM] -> [BM, BM]
"""


@needs_nvidia_tools
def test_compile_reports_gpu_only_errors_per_launch(tmp_path):
    """A dot on 8 x 8 tiles runs in the interpreter but not on sm_90 (tiles must be >= 16):
    the error comes back in its result, the other launch still compiles."""
    (tmp_path / "square_kernels.py").write_text(SMALL_DOT_KERNEL)
    tensor = {"tensor": "float16", "aligned": True}
    launches = [aot.KernelLaunch("square_kernels:square_kernel", {"a": tensor, "out": tensor, "BM": {"value": bm}},
                                 {"num_warps": 4}, f"BM={bm}") for bm in (8, 32)]
    aot.save_launches(launches, str(tmp_path / "launches.json"))
    env = dict(os.environ, TRITON_INTERPRET="0")  # importing `profiles` would turn it on if absent
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), str(ROOT / ".pythonpath")])
    run = subprocess.run([sys.executable, "-m", "profiles.aot", str(tmp_path / "launches.json"),
                          str(tmp_path / "results.json"), "--jobs", "1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    small, large = json.loads((tmp_path / "results.json").read_text())
    assert small["error"].startswith("CompilationError") and small["registers"] is None
    assert large["error"] is None and large["registers"] > 0 and large["spill_store_bytes"] == 0
    assert large["constexprs"] == ["BM"]


def _autotuned_kernels() -> set:
    """"module:qualname" of every autotuned kernel in the kernels package."""
    names = set()
    for info in pkgutil.walk_packages(refrag_kernels.__path__, "refrag_kernels."):
        for obj in vars(importlib.import_module(info.name)).values():
            if isinstance(obj, triton.runtime.Autotuner):
                fn = obj.fn
                while not hasattr(fn, "__qualname__"):
                    fn = fn.fn
                names.add(f"{fn.__module__}:{fn.__qualname__}")
    return names


@pytest.mark.slow
@needs_nvidia_tools
def test_every_kernel_compiles_for_sm90_without_heavy_spills(tmp_path):
    results_path = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--configs", "first", "--json", str(results_path),
                          "--markdown", ""], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{SCRIPT.name} failed:\n{run.stderr[-4000:]}"
    results = json.loads(results_path.read_text())
    compiled = {r["launch"]["kernel"] for r in results}
    assert _autotuned_kernels() <= compiled, f"kernels no workload launches: {_autotuned_kernels() - compiled}"
    failed = [f"{r['launch']['kernel']} ({r['launch']['label']}): {r['error']}" for r in results if r["error"]]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)
    heavy = [f"{r['launch']['kernel']} ({r['launch']['label']}): {r['spill_store_bytes']} B spill stores"
             for r in results
             if r["spill_store_bytes"] > KNOWN_SPILLS.get(r["launch"]["kernel"], SPILL_LIMIT_BYTES)]
    assert not heavy, (f"kernels spilling more than {SPILL_LIMIT_BYTES} B per thread (or their KNOWN_SPILLS "
                       "ceiling):\n" + "\n".join(heavy))
    assert all(0 < r["registers"] <= 255 for r in results)
