"""Compile every Triton kernel for sm_90 (H100) without a GPU and tabulate its static resources.

    python profiles/sm90_compile.py                    # every autotune config -> sm90-resource-usage.md
    python profiles/sm90_compile.py --configs first --json /tmp/r.json --markdown ""

Step 1 (subprocess, TRITON_INTERPRET=1): every op runs forward and backward on small CPU
inputs once per autotune config, its launchers set up as on CUDA, and each kernel launch is
recorded (`profiles.aot`). Step 2 (subprocess, interpreter off): each distinct launch
is compiled for sm_90; registers, stack and local memory come from cuobjdump, spills from
ptxas, shared memory from the compiler. Step 3: a markdown table with the occupancy these imply on an H100.
Shapes are small except the dimensions kernels specialize on (head dims, state sizes), which
take model-like values; the launch signatures do not depend on the sequence length.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python profiles/sm90_compile.py`: the repo root holds `profiles`
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / ".pythonpath")]

from profiles.aot import cuda_launchers, occupancy, record_launches, save_launches, unique_launches
from refrag_kernels.conv1d import CONV1D_CONFIGS, causal_conv1d
from refrag_kernels.cross_entropy import CROSS_ENTROPY_CONFIGS, fused_linear_cross_entropy
from refrag_kernels.doc_attention import BWD_CONFIGS as ATTENTION_BWD_CONFIGS
from refrag_kernels.doc_attention import FWD_CONFIGS as ATTENTION_FWD_CONFIGS
from refrag_kernels.doc_attention import _doc_attention
from refrag_kernels.gated_rms_norm import GATED_RMS_NORM_CONFIGS, gated_rms_norm
from refrag_kernels.layout import DocLayout
from refrag_kernels.selective_scan import BWD_CONFIGS as SCAN_BWD_CONFIGS
from refrag_kernels.selective_scan import FWD_CONFIGS as SCAN_FWD_CONFIGS
from refrag_kernels.selective_scan import selective_scan_bwd, selective_scan_fwd
from refrag_kernels.ssd import CONFIGS as SSD_CONFIGS
from refrag_kernels.ssd import ssd_scan_triton
from refrag_kernels.state_update import CONV_UPDATE_CONFIGS, SSD_UPDATE_CONFIGS, causal_conv1d_update, ssd_state_update

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MARKDOWN = ROOT / "profiles" / "sm90-resource-usage.md"
DTYPES = ("bf16", "fp16", "fp32")


# ----------------------------------------------------------------------------- workloads (capture process)


def _backward(outputs, inputs) -> None:
    """Backpropagate a fixed random cotangent through `outputs` into the tensors `inputs`."""
    outputs = [o for o in outputs if o is not None]
    gen = torch.Generator().manual_seed(0)
    seeds = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    torch.autograd.grad(outputs, inputs, seeds)


def _leaf(shape, dtype, gen, scale=1.0):
    """Random tensor of `dtype` that requires grad."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype).requires_grad_(True)


def _packed_row():
    """cu_seqlens (two examples, 100 + 60 tokens) and doc_ids (two documents in the first)."""
    cu = torch.tensor([0, 100, 160], dtype=torch.int32)
    docs = torch.zeros(160, dtype=torch.int64)
    docs[10:40], docs[40:75] = 1, 2
    return cu, docs


def ssd_packed(config, dtype):
    """Mamba-2 training call: varlen, doc_mode, D, dt_bias, softplus, final states; p = n = 64."""
    gen = torch.Generator().manual_seed(0)
    cu, docs = _packed_row()
    h, p, n = 2, 64, 64
    x, B, C = _leaf((1, 160, h, p), dtype, gen), _leaf((1, 160, 1, n), dtype, gen), _leaf((1, 160, 1, n), dtype, gen)
    dt = _leaf((1, 160, h), dtype, gen, 0.5)
    A = -torch.rand(h, generator=gen) - 0.5
    y, final = ssd_scan_triton(x, dt, A, B, C, chunk_size=64, D=torch.ones(h), dt_bias=torch.zeros(h),
                               dt_softplus=True, cu_seqlens=cu, doc_ids=docs, doc_mode=True,
                               return_final_states=True, config=config)
    _backward([y, final], [x, dt, B, C])


def ssd_cached(config, dtype):
    """Document-cache call: batched, initial states in, final states out."""
    gen = torch.Generator().manual_seed(0)
    h, p, n = 2, 64, 64
    x, B, C = _leaf((2, 80, h, p), dtype, gen), _leaf((2, 80, 1, n), dtype, gen), _leaf((2, 80, 1, n), dtype, gen)
    dt = _leaf((2, 80, h), dtype, gen, 0.5)
    h0 = torch.randn(2, h, p, n, generator=gen).requires_grad_(True)
    y, final = ssd_scan_triton(x, dt, -torch.ones(h), B, C, chunk_size=64, dt_bias=torch.zeros(h), dt_softplus=True,
                               initial_states=h0, return_final_states=True, config=config)
    _backward([y, final], [x, dt, B, C, h0])


def selective_scan_packed(configs, dtype):
    """Mamba-1 launchers, varlen with every option (D, z, delta_bias, softplus, initial state); n = 16."""
    fwd_config, bwd_config = configs
    gen = torch.Generator().manual_seed(0)
    cu, _ = _packed_row()
    d, n, l = 64, 16, 160
    u, delta, z = (torch.randn(1, d, l, generator=gen).to(dtype) for _ in range(3))
    B, C = (torch.randn(1, 1, n, l, generator=gen).to(dtype) for _ in range(2))
    A = -torch.rand(d, n, generator=gen) - 0.5
    D, delta_bias = torch.ones(d), torch.zeros(d)
    h0 = torch.randn(2, d, n, generator=gen)
    layout = DocLayout.from_batch(1, l, cu)
    y, last, states, offsets, chunk = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, True, layout, h0,
                                                         save_states=True, config=fwd_config)
    selective_scan_bwd(torch.randn_like(y), torch.randn_like(last), u, delta, A, B, C, D, z, delta_bias, True, cu,
                       states, offsets, chunk, config=bwd_config)


def conv1d_packed(config, dtype):
    """Mamba-2 block conv: width 4, bias, SiLU, windows restarting at examples and documents."""
    gen = torch.Generator().manual_seed(0)
    cu, docs = _packed_row()
    x, w, b = _leaf((1, 160, 256), dtype, gen), _leaf((256, 4), dtype, gen), _leaf((256,), dtype, gen)
    y = causal_conv1d(x, w, b, cu_seqlens=cu, doc_ids=docs, activation="silu", config=config)
    _backward([y], [x, w, b])


def doc_attention_packed(configs, dtype, head_dim):
    """Packed row with documents, GQA 4:2, causal; forward and backward (the private entry point
    takes the forward and backward configs)."""
    fwd_config, bwd_config = configs
    gen = torch.Generator().manual_seed(0)
    cu, docs = _packed_row()
    q = _leaf((160, 4, head_dim), dtype, gen)
    k, v = _leaf((160, 2, head_dim), dtype, gen), _leaf((160, 2, head_dim), dtype, gen)
    layout = DocLayout.from_cu_seqlens(cu, docs)
    o, lse = _doc_attention(q, k, v, layout, True, 1 / math.sqrt(head_dim), fwd_config, bwd_config)
    _backward([o], [q, k, v])


def state_update_step(configs, dtype):
    """Decode step of a Mamba-2 block: conv window update, then the SSD state update."""
    ssd_config, conv_config = configs
    gen = torch.Generator().manual_seed(0)
    h, p, n = 4, 64, 64
    conv_state = torch.randn(2, 256, 3, generator=gen).to(dtype)
    causal_conv1d_update(conv_state, torch.randn(2, 256, generator=gen).to(dtype),
                         torch.randn(256, 4, generator=gen).to(dtype), torch.randn(256, generator=gen).to(dtype),
                         activation="silu", config=conv_config)
    state = torch.randn(2, h, p, n, generator=gen)
    x, dt = torch.randn(2, h, p, generator=gen).to(dtype), torch.rand(2, h, generator=gen).to(dtype)
    B, C = (torch.randn(2, 1, n, generator=gen).to(dtype) for _ in range(2))
    ssd_state_update(state, x, dt, -torch.ones(h), B, C, D=torch.ones(h), dt_bias=torch.zeros(h), dt_softplus=True,
                     config=ssd_config)


def cross_entropy_masked(config, dtype):
    """LM-head loss with ignored tokens; forward computes the gradients too."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = _leaf((64, 128), dtype, gen), _leaf((4096, 128), dtype, gen, 0.1)
    targets = torch.randint(0, 4096, (64,), generator=gen)
    targets[::3] = -100
    loss = fused_linear_cross_entropy(hidden, weight, targets, config=config)
    _backward([loss], [hidden, weight])


def gated_norm_mamba(config, dtype):
    """Mamba-2 output norm at d16 width (d_inner 2048, one group), z a slice of a projection."""
    gen = torch.Generator().manual_seed(0)
    proj = _leaf((160, 2 * 2048), dtype, gen)
    y, weight = _leaf((160, 2048), dtype, gen), _leaf((2048,), torch.float32, gen)
    out = gated_rms_norm(y, proj[:, :2048], weight, 1e-5, config=config)
    _backward([out], [y, proj, weight])


def _paired(*config_lists) -> list:
    """Tuples taking the i-th entry of every list (cycling the shorter ones): each config runs once."""
    longest = max(len(c) for c in config_lists)
    return [tuple(c[i % len(c)] for c in config_lists) for i in range(longest)]


def workloads() -> dict:
    """name -> (autotune configs, run(config, dtype)) for every op."""
    attention_configs = _paired(ATTENTION_FWD_CONFIGS, ATTENTION_BWD_CONFIGS)
    return {
        "ssd_scan packed": (SSD_CONFIGS, ssd_packed),
        "ssd_scan cached": (SSD_CONFIGS, ssd_cached),
        "selective_scan": (_paired(SCAN_FWD_CONFIGS, SCAN_BWD_CONFIGS), selective_scan_packed),
        "causal_conv1d": (CONV1D_CONFIGS, conv1d_packed),
        "doc_attention d64": (attention_configs, partial(doc_attention_packed, head_dim=64)),
        "doc_attention d128": (attention_configs, partial(doc_attention_packed, head_dim=128)),
        "state_update": (_paired(SSD_UPDATE_CONFIGS, CONV_UPDATE_CONFIGS), state_update_step),
        "cross_entropy": (CROSS_ENTROPY_CONFIGS, cross_entropy_masked),
        "gated_rms_norm": (GATED_RMS_NORM_CONFIGS, gated_norm_mamba),
    }


def capture(path: str, dtype_name: str, first_only: bool) -> None:
    """Run every workload under the interpreter and save the distinct launches to `path`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    launches = []
    with cuda_launchers():
        for name, (configs, run) in workloads().items():
            for i, config in enumerate(configs[:1] if first_only else configs):
                with record_launches(f"{name} #{i}", execute=False) as recorded:
                    run(config, dtype)
                launches += recorded
    save_launches(unique_launches(launches), path)


# ----------------------------------------------------------------------------- orchestration


def _run_step(args: list, interpret: bool) -> None:
    # "0", not unset: importing `profiles` turns the interpreter on when the flag is absent.
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / ".pythonpath"), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, *args], env=env, cwd=ROOT, check=True)


def compile_all(dtype: str, first_only: bool, jobs: int) -> list:
    """Capture (interpreter on) then compile (interpreter off), each in its own process; the
    list of CompileResult dicts."""
    with tempfile.TemporaryDirectory() as tmp:
        launches, results = os.path.join(tmp, "launches.json"), os.path.join(tmp, "results.json")
        _run_step([__file__, "--capture", launches, "--dtype", dtype] + (["--configs", "first"] if first_only else []),
                  interpret=True)
        _run_step(["-m", "profiles.aot", launches, results, "--jobs", str(jobs)], interpret=False)
        with open(results) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- report


def _short_kernel(name: str) -> str:
    module, qualname = name.split(":")
    return f"{module.removeprefix('refrag_kernels.')}.{qualname}"


def _describe(value: dict) -> str:
    if "tensor" in value:
        return value["tensor"]
    if "tl_dtype" in value:
        return value["tl_dtype"]
    return str(value["value"])


def _varying_constexprs(results: list) -> list:
    """Constexpr arguments whose value differs between results."""
    names = sorted({k for r in results for k in r["constexprs"]})
    return [k for k in names if len({_describe(r["launch"]["args"].get(k, {"value": None})) for r in results}) > 1]


def _config_columns(r: dict, varying: list) -> str:
    launch = r["launch"]
    warps, stages = launch["options"].get("num_warps", 4), launch["options"].get("num_stages", 3)
    spec = " ".join(f"{k}={_describe(launch['args'][k])}" for k in varying if k in launch["args"]) or "-"
    return f"| {launch['label']} | {spec} | {warps} | {stages} |"


def _row(r: dict, varying: list) -> str:

    if r["error"]:
        return f"{_config_columns(r, varying)} compile error: {r['error'][:200]} |||||||"
    occ = occupancy(r["registers"], r["shared_bytes"], r["launch"]["options"].get("num_warps", 4))
    return (f"{_config_columns(r, varying)} {r['registers']} | {r['spill_store_bytes']} / {r['spill_load_bytes']} | "
            f"{r['stack_bytes']} | {r['local_bytes']} | {r['shared_bytes'] / 1024:.1f} | {occ['blocks']} | "
            f"{occ['occupancy']:.0%} | {occ['limiter']} |")


def _summary(results: list) -> list:
    """Lines listing the launches that failed to compile or spill registers, worst first."""
    failed = [r for r in results if r["error"]]
    spilling = sorted((r for r in results if not r["error"] and r["spill_store_bytes"]),
                      key=lambda r: -r["spill_store_bytes"])
    lines = [f"{len(results)} distinct kernel launches compiled: {len(failed)} failed, "
             f"{len(spilling)} spill registers.", ""]
    for r in failed:
        lines.append(f"- FAILED {_short_kernel(r['launch']['kernel'])} ({r['launch']['label']}): {r['error'][:300]}")
    for r in spilling:
        lines.append(f"- spills {_short_kernel(r['launch']['kernel'])} ({r['launch']['label']}, "
                     f"{r['launch']['options'].get('num_warps', 4)} warps): {r['registers']} registers, "
                     f"{r['spill_store_bytes']} B spill stores / {r['spill_load_bytes']} B loads per thread")
    return lines + [""]


def markdown(results: list, dtype: str) -> str:
    """The resource table of every compiled launch, one section per kernel."""
    by_kernel = defaultdict(list)
    for r in results:
        by_kernel[r["launch"]["kernel"]].append(r)
    lines = [
        "# Static resource usage of every Triton kernel on sm_90 (H100)",
        "",
        "**Static, from the compiler, not a measurement on a GPU.** Generated by "
        "`python profiles/sm90_compile.py`: each op runs forward and backward under the Triton "
        f"interpreter with {dtype} inputs once per autotune config, every distinct kernel launch "
        "is recorded and compiled for sm_90 (`profiles/aot.py`).",
        "",
        "- regs: registers per thread; spill: bytes of register spill stores / loads per thread "
        "(ptxas); stack, local: per-thread stack frame and local memory in bytes (cuobjdump); "
        "smem: shared memory per block.",
        "- blocks/SM and occupancy (resident warps / 64) follow from registers (65536 per SM, "
        "allocated per warp in units of 256), shared memory (228 KB per SM, 1 KB reserved per "
        "block, at most 227 KB per block), 2048 threads and 32 blocks per SM; limiter names the "
        "binding resource. Real occupancy also depends on the grid size.",
        "- workload #i runs the i-th autotune config of the op; spec lists the compile-time "
        "arguments that differ between the rows of one kernel.",
        "",
        *_summary(results),
    ]
    for kernel in sorted(by_kernel):
        rows = by_kernel[kernel]
        varying = _varying_constexprs(rows)
        lines += [f"## {_short_kernel(kernel)}", "",
                  "| workload | spec | warps | stages | regs | spill B | stack B | local B | smem KB | blocks/SM "
                  "| occupancy | limiter |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row(r, varying) for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_90 and report its resources.")
    parser.add_argument("--configs", choices=("all", "first"), default="all",
                        help="run every autotune config of each op, or only the first")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="input dtype of the recorded runs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--markdown", default=str(DEFAULT_MARKDOWN), help="report to write ('' for none)")
    parser.add_argument("--json", default="", help="also write the raw results as JSON here")
    parser.add_argument("--capture", metavar="PATH", help=argparse.SUPPRESS)  # step 1, run by the script itself
    args = parser.parse_args(argv)
    if args.capture:
        capture(args.capture, args.dtype, args.configs == "first")
        return
    results = compile_all(args.dtype, args.configs == "first", args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results, args.dtype))


if __name__ == "__main__":
    main()
