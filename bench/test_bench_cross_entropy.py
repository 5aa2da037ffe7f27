"""Fused linear + cross-entropy vs the torch reference (linear then cross-entropy, which
materializes [T, V] logits) and Liger's fused kernel when installed: time and peak memory.

FLOP model: 2*T*H*V for the logits, 4*T*H*V more for the two gradient GEMMs."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, fwd_bwd, optional_import, run_case
from kernels import fused_linear_cross_entropy, reference

TOKENS = 64 if SMOKE else 16384
HIDDEN = 32 if SMOKE else 2048
VOCABS = [500] if SMOKE else [32768, 65536]
DTYPE = torch.float32 if SMOKE else torch.bfloat16

liger_flce = optional_import("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("V", VOCABS, ids=[f"V{v}" for v in VOCABS])
def test_fused_linear_cross_entropy(benchmark, V, mode):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(TOKENS, HIDDEN, generator=g) * 0.5).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(V, HIDDEN, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()
    targets = torch.randint(0, V, (TOKENS,), generator=g).to(DEVICE)
    targets[::7] = -100
    inputs = (hidden, weight)

    def wrap(forward):
        return (lambda: torch.no_grad()(forward)()) if mode == "fwd" else fwd_bwd(forward, inputs)

    reference_loss = lambda: reference.fused_linear_cross_entropy(hidden, weight, targets)  # noqa: E731
    baselines = {"reference": Case(wrap(reference_loss)),
                 "liger": Case(wrap(lambda: liger_flce.apply(hidden, weight, targets)[0]))
                 if (liger_flce is not None and not SMOKE) else None}
    fwd, bwd = costs.linear_cross_entropy_flops(TOKENS, HIDDEN, V)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    nbytes = torch.finfo(DTYPE).bits // 8 * (TOKENS * HIDDEN + V * HIDDEN) * (2 if mode == "fwd_bwd" else 1)
    ours = Case(wrap(lambda: fused_linear_cross_entropy(hidden, weight, targets)), flops, nbytes)
    benchmark.group = f"cross_entropy-{mode}"
    run_case(benchmark, ours, baselines, tokens=TOKENS, op="fused_linear_cross_entropy", V=V, hidden=HIDDEN,
             mode=mode, dtype=str(DTYPE))
