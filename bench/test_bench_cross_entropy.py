"""Fused linear + cross-entropy at loss densities 100%, 20% and 5% (the share of tokens whose
target is not ignored: RAG fine-tuning learns only the answer tokens) against plain torch
(linear then cross-entropy, materializing [T, V] logits), the refrag_kernels.reference oracle and
Liger's fused kernel when installed: time and peak memory, and their ratios.

Ours gets `num_valid` (the loader counts targets on the CPU), so it makes no host sync.
FLOP model (useful work only): 2*n*H*V for the logits of the n loss tokens, 4*n*H*V more for
the two gradient GEMMs; the baselines spend it on all T tokens.
"""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, fwd_bwd, optional_import, run_case, torch_linear_cross_entropy
from refrag_kernels import fused_linear_cross_entropy, reference

TOKENS = 64 if SMOKE else 16384
HIDDEN = 32 if SMOKE else 2048
VOCABS = [500] if SMOKE else [32768, 65536]
DENSITIES = [1.0, 0.2, 0.05]
DTYPE = torch.float32 if SMOKE else torch.bfloat16

liger_flce = optional_import("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("density", DENSITIES, ids=[f"dens{int(d * 100)}" for d in DENSITIES])
@pytest.mark.parametrize("V", VOCABS, ids=[f"V{v}" for v in VOCABS])
def test_fused_linear_cross_entropy(benchmark, V, density, mode):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(TOKENS, HIDDEN, generator=g) * 0.5).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(V, HIDDEN, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()
    targets = torch.randint(0, V, (TOKENS,), generator=g)
    targets[torch.rand(TOKENS, generator=g) >= density] = -100  # loss tokens scattered through the row
    num_valid = int((targets != -100).sum())  # counted on the CPU, as the loader does
    targets = targets.to(DEVICE)
    inputs = (hidden, weight)

    def wrap(forward):
        return (lambda: torch.no_grad()(forward)()) if mode == "fwd" else fwd_bwd(forward, inputs)

    baselines = {
        "torch": Case(wrap(lambda: torch_linear_cross_entropy(hidden, weight, targets))),
        "reference": Case(wrap(lambda: reference.fused_linear_cross_entropy(hidden, weight, targets))),
        "liger": Case(wrap(lambda: liger_flce.apply(hidden, weight, targets)[0]))
        if (liger_flce is not None and not SMOKE) else None,
    }
    fwd, bwd = costs.linear_cross_entropy_flops(num_valid, HIDDEN, V)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    nbytes = torch.finfo(DTYPE).bits // 8 * (num_valid * HIDDEN + V * HIDDEN) * (2 if mode == "fwd_bwd" else 1)
    ours = Case(wrap(lambda: fused_linear_cross_entropy(hidden, weight, targets, num_valid=num_valid)), flops, nbytes)
    benchmark.group = f"cross_entropy-{mode}-V{V}"
    run_case(benchmark, ours, baselines, tokens=TOKENS, op="fused_linear_cross_entropy", V=V, hidden=HIDDEN,
             mode=mode, dtype=str(DTYPE), density=density, num_valid=num_valid)
    extra = benchmark.extra_info
    for name in baselines:
        extra[f"mem_ratio_vs_{name}"] = _ratio(extra.get("peak_mem_bytes"), extra.get(f"{name}_peak_mem_bytes"))
