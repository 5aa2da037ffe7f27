"""Causal depthwise conv1d (width 4, SiLU, document resets) vs the reference and the
causal-conv1d package when installed. Memory-bound: bytes = read x + write y (+ grads)."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, bench_lengths, fwd_bwd, optional_import, run_case
from bench.layouts import examples_to_tensors, rag_examples
from refrag_kernels import DocLayout, causal_conv1d, reference

LENGTHS = bench_lengths()
CHANNELS, WIDTH = (16, 4) if SMOKE else (4352, 4)
DTYPE = torch.float32 if SMOKE else torch.bfloat16
DOC_LEN = (4, 10) if SMOKE else (200, 800)
SHARED = (3, 8) if SMOKE else (32, 96)

causal_conv1d_fn = optional_import("causal_conv1d", "causal_conv1d_fn")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_causal_conv1d(benchmark, L, mode):
    examples = rag_examples(L, doc_len=DOC_LEN, shared=SHARED)
    cu, docs = examples_to_tensors(examples, DEVICE)
    layout = DocLayout.from_examples(examples, device=DEVICE)  # once per batch, as in training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, L, CHANNELS, generator=g).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(CHANNELS, WIDTH, generator=g) * 0.3).to(DEVICE, DTYPE).requires_grad_()
    bias = torch.zeros(CHANNELS, device=DEVICE, dtype=DTYPE, requires_grad=True)
    inputs = (x, weight, bias)

    def wrap(forward):
        return (lambda: torch.no_grad()(forward)()) if mode == "fwd" else fwd_bwd(forward, inputs)

    baselines = {
        "reference": Case(wrap(lambda: reference.causal_conv1d(x, weight, bias, cu_seqlens=cu, doc_ids=docs))),
        # causal-conv1d resets only at sequences (seq_idx); document resets are ours alone
        "causal_conv1d_pkg": Case(wrap(lambda: causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu")))
        if (causal_conv1d_fn is not None and not SMOKE) else None,
    }
    nbytes = torch.finfo(DTYPE).bits // 8 * 2 * L * CHANNELS * (2 if mode == "fwd_bwd" else 1)
    fwd, bwd = costs.conv1d_flops(L, CHANNELS, WIDTH)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    ours = Case(wrap(lambda: causal_conv1d(x, weight, bias, layout=layout)), flops, nbytes)
    benchmark.group = f"conv1d-{mode}"
    run_case(benchmark, ours, baselines, tokens=L, op="causal_conv1d", L=L, mode=mode, channels=CHANNELS,
             width=WIDTH, dtype=str(DTYPE))
