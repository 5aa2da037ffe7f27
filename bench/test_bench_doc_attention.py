"""Doc-boundary attention forward+backward on packed RAG rows (5-15 documents of 200-800
tokens per example), head dim 128, GQA 4:1, against SDPA with a dense boolean mask,
FlexAttention with a document block mask built once per batch, flash-attn varlen (plain
causal per example: a lower bound that ignores document isolation) and the reference.

FLOP model: 4 * visible_pairs * head_dim * hq forward (QK^T and PV), 2.5x that backward.
Bytes: q, k, v, o once (+ do, dq, dk, dv for backward)."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, bench_lengths, fwd_bwd, optional_import, run_case
from bench.layouts import examples_to_tensors, rag_examples, visible_pairs
from refrag_kernels import DocLayout, doc_attention, reference

LENGTHS = bench_lengths()
HQ, HK, D = (4, 1, 32) if SMOKE else (16, 4, 128)
DTYPE = torch.float32 if SMOKE else torch.bfloat16
DOC_LEN = (4, 10) if SMOKE else (200, 800)
SHARED = (3, 8) if SMOKE else (32, 96)
DENSE_MAX_L = 16384
REFERENCE_MAX_L = 4096

flash_attn_varlen_func = optional_import("flash_attn", "flash_attn_varlen_func")


def flex_baseline(q, k, v, cu, docs):
    """FlexAttention with a create_block_mask document mask (built once, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = docs.numel()
    seq = torch.searchsorted(cu[1:].long(), torch.arange(L, device=DEVICE), right=True)

    def mask_mod(b, h, qi, ki):
        same_doc = (docs[qi] == 0) | (docs[ki] == 0) | (docs[qi] == docs[ki])
        return (seq[qi] == seq[ki]) & (ki <= qi) & same_doc

    block_mask = create_block_mask(mask_mod, None, None, L, L, device=DEVICE)
    compiled = torch.compile(flex_attention)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True)


def dense_sdpa_baseline(q, k, v, cu, docs):
    mask = reference.doc_attention_mask(docs.numel(), cu, docs, causal=True, device=DEVICE)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)


def flash_varlen_baseline(q, k, v, cu):
    max_len = int((cu[1:] - cu[:-1]).max())
    return lambda: flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, causal=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_doc_attention(benchmark, L, mode):
    examples = rag_examples(L, doc_len=DOC_LEN, shared=SHARED)
    cu, docs = examples_to_tensors(examples, DEVICE)
    layout = DocLayout.from_examples(examples, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, L, h, D, generator=g).to(DEVICE, DTYPE).requires_grad_() for h in (HQ, HK, HK))
    inputs = (q, k, v)

    def wrap(forward):
        if mode == "fwd":
            return lambda: torch.no_grad()(forward)()
        return fwd_bwd(forward, inputs)

    baselines = {
        "sdpa_dense": Case(wrap(dense_sdpa_baseline(q, k, v, cu, docs))) if L <= DENSE_MAX_L else None,
        "flex_attention": None if SMOKE else Case(wrap(flex_baseline(q, k, v, cu, docs))),
        "flash_attn_varlen": Case(wrap(flash_varlen_baseline(q, k, v, cu)))
        if (flash_attn_varlen_func is not None and not SMOKE) else None,
        "reference": Case(wrap(lambda: reference.doc_attention(q, k, v, cu_seqlens=cu, doc_ids=docs)))
        if L <= REFERENCE_MAX_L else None,
    }
    pairs = visible_pairs(cu, docs)
    fwd, bwd = costs.attention_flops(pairs, D, HQ)
    flops = fwd + (bwd if mode == "fwd_bwd" else 0.0)
    nbytes = torch.finfo(DTYPE).bits // 8 * L * D * (2 * HQ + 2 * HK) * (2 if mode == "fwd_bwd" else 1)
    ours = Case(wrap(lambda: doc_attention(q, k, v, layout=layout)), flops, nbytes)
    benchmark.group = f"doc_attention-{mode}"
    run_case(benchmark, ours, baselines, tokens=L, op="doc_attention", L=L, mode=mode, hq=HQ, hk=HK,
             head_dim=D, examples=len(examples), documents=sum(len(s) for _, s in examples),
             density=pairs / (L * (L + 1) / 2), dtype=str(DTYPE))
