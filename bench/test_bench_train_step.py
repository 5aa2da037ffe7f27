"""Full HybridLM train step (forward + backward + AdamW) on packed RAG rows (5-15 documents of
200-800 tokens per example, loss on shared text) at 2K-32K tokens, for a hybrid, a pure
Mamba-2 and a pure attention d12 model and the d16 hybrid (its peak memory at 16K is a goal),
against the same model with the PyTorch reference ops swapped in (dense-mask attention, chunked torch SSD, torch conv1d, materialized-logits
cross-entropy) where that fits in memory. Smoke: a 2-layer d_model-32 hybrid model at L=64.

FLOP model: `HybridLM.flops_per_token` (6 x matmul params + attention 12 n_attn h d n + SSD
terms) at the row's effective context length sum(n_i^2) / L over its examples; tflops in
extra_info is therefore model TFLOP/s (the causal and document masks are not discounted).
"""
import pytest

from bench.common import DEVICE, SMOKE, Case, bench_lengths, run_case
import refrag_kernels
from bench.train_setup import MODEL_SIZES, block_patterns, build_train_step, effective_seq_len

LENGTHS = bench_lengths()
PATTERNS = block_patterns(SMOKE)
# The reference attention materializes (heads, L, L) scores per layer; pure Mamba-2 has none.
REFERENCE_MAX_L = {"hybrid": 8192, "pure-M": 32768, "pure-T": 8192, "hybrid-d16": 8192}


def with_reference_ops(step):
    """The same train step on the refrag_kernels.reference ops."""
    def run():
        with refrag_kernels.use_backend("reference"):
            step.run()
    return run


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_train_step(benchmark, L, pattern):
    step = build_train_step(PATTERNS[pattern], L, DEVICE, SMOKE, size=MODEL_SIZES.get(pattern, "d12"))
    baselines = {"reference": Case(with_reference_ops(step)) if L <= REFERENCE_MAX_L[pattern] else None}
    benchmark.group = f"train_step-{pattern}"
    config = step.model.config
    run_case(benchmark, Case(step.run, flops=step.flops()), baselines, tokens=step.tokens, op="train_step",
             mode="fwd_bwd_adamw", L=L, examples=step.layout.num_seqs, pattern=pattern,
             size=MODEL_SIZES.get(pattern, "d12"), block_pattern=config.block_pattern, d_model=config.d_model,
             n_layer=config.n_layer,
             params=step.model.num_params(), effective_seq_len=effective_seq_len(step.layout),
             bf16=step.bf16, grad_checkpoint=config.grad_checkpoint)
