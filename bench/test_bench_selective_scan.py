"""Mamba-1 selective scan forward / forward+backward vs the sequential reference (short
lengths only) and mamba-ssm's selective_scan_fn when installed.

FLOP model: ~9 flops per (token, channel, state) forward (decay exp, two FMAs, C product),
~2.5x backward. Bytes: u, delta, z, y per channel and B, C per state."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, bench_lengths, fwd_bwd, optional_import, run_case
from refrag_kernels import reference, selective_scan

LENGTHS = bench_lengths()
DIM, NSTATE = (8, 4) if SMOKE else (1536, 16)
DTYPE = torch.float32 if SMOKE else torch.bfloat16
REFERENCE_MAX_L = 64 if SMOKE else 2048

selective_scan_fn = optional_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_selective_scan(benchmark, L, mode):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, DIM, L, generator=g).to(DEVICE, DTYPE).requires_grad_()
    delta = (torch.rand(1, DIM, L, generator=g) * 0.1).to(DEVICE, DTYPE).requires_grad_()
    A = (-torch.rand(DIM, NSTATE, generator=g) - 0.5).to(DEVICE).requires_grad_()
    B, C = ((torch.randn(1, NSTATE, L, generator=g) * 0.3).to(DEVICE, DTYPE).requires_grad_() for _ in range(2))
    D = torch.ones(DIM, device=DEVICE, requires_grad=True)
    inputs = (u, delta, A, B, C, D)

    def wrap(forward):
        return (lambda: torch.no_grad()(forward)()) if mode == "fwd" else fwd_bwd(forward, inputs)

    baselines = {
        "reference": Case(wrap(lambda: reference.selective_scan(u, delta, A, B, C, D)))
        if L <= REFERENCE_MAX_L else None,
        "mamba_ssm": Case(wrap(lambda: selective_scan_fn(u, delta, A, B, C, D)))
        if (selective_scan_fn is not None and not SMOKE) else None,
    }
    fwd, bwd = costs.selective_scan_flops(L, DIM, NSTATE)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    nbytes = torch.finfo(DTYPE).bits // 8 * L * (3 * DIM + 2 * NSTATE) * (3 if mode == "fwd_bwd" else 1)
    ours = Case(wrap(lambda: selective_scan(u, delta, A, B, C, D)), flops, nbytes)
    benchmark.group = f"selective_scan-{mode}"
    run_case(benchmark, ours, baselines, tokens=L, op="selective_scan", L=L, mode=mode, dim=DIM,
             d_state=NSTATE, dtype=str(DTYPE))
