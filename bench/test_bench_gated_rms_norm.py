"""Gated RMSNorm (Mamba-2 output norm, d_inner = 2048 as in d16, one group) vs the torch
reference and mamba-ssm's Triton rmsnorm_fn (norm_before_gate=False) when installed.
Memory-bound: bytes = read y, z, write out (+ read y, z, dout, write dy, dz backward)."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, bench_lengths, fwd_bwd, optional_import, run_case
from refrag_kernels import gated_rms_norm, reference

LENGTHS = bench_lengths()
WIDTH = 32 if SMOKE else 2048
DTYPE = torch.float32 if SMOKE else torch.bfloat16
EPS = 1e-5

mamba_rmsnorm_fn = optional_import("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_gated_rms_norm(benchmark, L, mode):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1, L, WIDTH, generator=g).to(DEVICE, DTYPE).requires_grad_()
    z = torch.randn(1, L, WIDTH, generator=g).to(DEVICE, DTYPE).requires_grad_()
    weight = torch.ones(WIDTH, device=DEVICE, requires_grad=True)
    inputs = (y, z, weight)

    def wrap(forward):
        return (lambda: torch.no_grad()(forward)()) if mode == "fwd" else fwd_bwd(forward, inputs)

    baselines = {
        "reference": Case(wrap(lambda: reference.gated_rms_norm(y, z, weight, EPS))),
        "mamba_ssm_rmsnorm_fn": Case(wrap(lambda: mamba_rmsnorm_fn(y, weight, None, z=z, eps=EPS,
                                                                   norm_before_gate=False)))
        if (mamba_rmsnorm_fn is not None and not SMOKE) else None,
    }
    elem = torch.finfo(DTYPE).bits // 8
    nbytes = elem * L * WIDTH * (3 + (5 if mode == "fwd_bwd" else 0))
    fwd, bwd = costs.gated_rms_norm_flops(L, WIDTH)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    ours = Case(wrap(lambda: gated_rms_norm(y, z, weight, EPS)), flops, nbytes)
    benchmark.group = f"gated_rms_norm-{mode}"
    run_case(benchmark, ours, baselines, tokens=L, op="gated_rms_norm", L=L, mode=mode, width=WIDTH,
             dtype=str(DTYPE))
