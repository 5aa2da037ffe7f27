"""doc_attention (Triton, interpreter on CPU) against the dense-mask reference, fwd and bwd."""
import math
import random

import pytest
import torch

import refrag_kernels
from refrag_kernels import reference
from refrag_kernels.doc_attention import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    _doc_attention,
    doc_attention,
)
from refrag_kernels.layout import DocLayout

# Absolute slack on top of the "2x the reference's own error in this dtype" rule, relative to
# the magnitude of the compared tensor.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---------------------------------------------------------------- layouts


def random_examples(rng: random.Random, n_examples: int, max_len: int, max_docs: int = 15):
    """(length, doc spans) per example: a shared prefix (>= 1 token when there are documents:
    DocLayout rejects an example that starts with the doc id the previous one ends with), one
    retrieval block of adjacent documents (0..max_docs, each >= 1 token), a shared suffix.
    Lengths may be 0 or 1."""
    examples = []
    for _ in range(n_examples):
        length = rng.randint(0, max_len)
        n_docs = rng.randint(0, min(max_docs, max(length - 1, 0)))
        start = rng.randint(min(1, n_docs), length - n_docs)
        ends = sorted(rng.sample(range(start + 1, length + 1), n_docs))
        examples.append((length, list(zip([start] + ends[:-1], ends))))
    return examples


def packed(examples, pad: int = 0):
    """cu_seqlens (N+1,) int32 and doc_ids (L + pad,) int64 of a packed row."""
    layout = DocLayout.from_examples(examples)
    docs = torch.cat([layout.doc_ids.long(), torch.zeros(pad, dtype=torch.int64)])
    return layout.cu_seqlens, docs


# Example 0: one-token document 2; example 1: no documents; example 2: one token; example 3:
# empty; example 4 starts with a one-token document.
HANDMADE = [(12, [(2, 5), (5, 6), (6, 10)]), (7, []), (1, []), (0, []), (9, [(0, 1), (1, 4)])]


def case_inputs(name: str):
    """(b, l, cu_seqlens, doc_ids) of a named layout case."""
    rng = random.Random(name)
    if name == "dense-T63":
        return 1, 63, None, None
    if name == "handmade":
        cu, docs = packed(HANDMADE)
        return 1, docs.numel(), cu, docs
    if name == "varlen-random":
        cu, docs = packed(random_examples(rng, 5, 40))
        return 1, docs.numel(), cu, docs
    if name == "many-tiny":
        cu, docs = packed(random_examples(rng, 16, 9, max_docs=4))
        return 1, docs.numel(), cu, docs
    if name == "one-long":
        cu, docs = packed([(150, [(3 + 9 * i, 12 + 9 * i) for i in range(15)])])
        return 1, docs.numel(), cu, docs
    if name == "padding":
        cu, docs = packed(random_examples(rng, 3, 30), pad=13)
        return 1, docs.numel(), cu, docs
    if name == "batch3":
        # rows end and start inside a document with the same id
        docs = torch.tensor([[0] * 10 + [1] * 5 + [2] * 6, [2] * 4 + [0] * 3 + [1] * 14, [0] * 21])
        return 3, 21, None, docs
    raise KeyError(name)


# ---------------------------------------------------------------- comparison helpers


def make_qkv(b, l, hq, hk, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, l, h, d, generator=gen, dtype=torch.float64) for h in (hq, hk, hk))


def forward_backward(fn, q, k, v, dtype, weights, **kwargs):
    """o, lse, dq, dk, dv (fp64) of loss = sum(o * w_o) + sum over finite lse of lse * w_lse."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves, return_lse=True, **kwargs)
    w_o, w_lse = weights
    finite = torch.isfinite(lse)
    loss = (o.double() * w_o).sum() + torch.where(finite, lse.double() * w_lse, 0.0).sum()
    loss.backward()
    return {"o": o, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def assert_matches_reference(q, k, v, dtype, **kwargs):
    """Kernel error vs the fp64 reference <= 2x the reference's own error in `dtype` + atol."""
    b, l, hq, _ = q.shape
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(q.shape, generator=gen, dtype=torch.float64),
               torch.randn(b, hq, l, generator=gen, dtype=torch.float64))
    got = forward_backward(doc_attention, q, k, v, dtype, weights, **kwargs)
    low = forward_backward(reference.doc_attention, q, k, v, dtype, weights, **kwargs)
    exact = forward_backward(reference.doc_attention, q, k, v, torch.float64, weights, **kwargs)
    assert torch.equal(torch.isfinite(got["lse"]), torch.isfinite(exact["lse"])), "lse -inf rows differ"
    for name in ("o", "lse", "dq", "dk", "dv"):
        assert got[name].dtype == (torch.float32 if name == "lse" else dtype), name
        g, lo, ex = (torch.nan_to_num(t[name].double(), neginf=0.0) for t in (got, low, exact))
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err, base = (g - ex).abs().max().item(), (lo - ex).abs().max().item()
        bound = 2 * base + ATOL[dtype] * max(1.0, ex.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {base:.3g})"


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "case, hq, hk, d, dtype, extra",
    [
        pytest.param("dense-T63", 2, 2, 32, torch.float32, {}, id="T63-H2-dense-fp32"),
        pytest.param("handmade", 4, 2, 32, torch.float32, {}, id="handmade-GQA2-fp32"),
        pytest.param("handmade", 2, 2, 64, torch.float16, {}, id="handmade-d64-fp16"),
        pytest.param("varlen-random", 2, 2, 32, torch.float32, {}, id="varlen-H2-fp32"),
        pytest.param("varlen-random", 4, 1, 32, torch.float16, {}, id="varlen-GQA4-fp16"),
        pytest.param("many-tiny", 8, 1, 32, torch.float32, {}, id="16-examples-GQA8-fp32"),
        pytest.param("one-long", 2, 1, 64, torch.float32, {}, id="T150-15docs-d64-fp32"),
        pytest.param("varlen-random", 2, 1, 40, torch.float32, {}, id="varlen-d40-fp32"),
        pytest.param("varlen-random", 2, 2, 32, torch.float32, {"causal": False}, id="varlen-noncausal-fp32"),
        pytest.param("handmade", 2, 1, 32, torch.float16, {"causal": False}, id="handmade-noncausal-fp16"),
        pytest.param("varlen-random", 2, 2, 32, torch.float32, {"softmax_scale": 0.3}, id="varlen-scale0.3"),
        pytest.param("padding", 2, 1, 32, torch.float32, {}, id="padding-fp32"),
        pytest.param("batch3", 2, 1, 32, torch.float32, {}, id="b3-rows-fp32"),
    ],
)
def test_matches_reference(case, hq, hk, d, dtype, extra):
    b, l, cu, docs = case_inputs(case)
    q, k, v = make_qkv(b, l, hq, hk, d)
    assert_matches_reference(q, k, v, dtype, cu_seqlens=cu, doc_ids=docs, **extra)


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(3)])
def test_random_layouts(seed):
    rng = random.Random(seed)
    n_examples = rng.randint(1, 16)
    cu, docs = packed(random_examples(rng, n_examples, 150 // n_examples), pad=rng.randint(0, 5))
    hk = rng.choice([1, 2])
    q, k, v = make_qkv(1, docs.numel(), hk * rng.choice([1, 2]), hk, 32, seed=seed)
    assert_matches_reference(q, k, v, torch.float32, cu_seqlens=cu, doc_ids=docs, causal=bool(seed % 2 == 0))


@pytest.mark.parametrize(
    "config",
    [pytest.param(c, id=f"fwd-BM{c.block_m}-BN{c.block_n}-w{c.num_warps}") for c in FWD_CONFIGS]
    + [pytest.param(c, id=f"bwd-BM{c.block_m}-BN{c.block_n}-w{c.num_warps}") for c in BWD_CONFIGS],
)
def test_every_config(config):
    """Each tuned config computes the same attention (forward and backward) as the reference."""
    cu, docs = packed([(70, [(5, 20), (20, 21), (21, 50)]), (3, []), (60, [(1, 30), (30, 45)])], pad=4)
    layout = DocLayout.from_cu_seqlens(cu, docs[: int(cu[-1])].int())
    q, k, v = make_qkv(1, docs.numel(), 2, 1, 32)
    scale = 1 / math.sqrt(32)

    def with_config(q_, k_, v_, return_lse, **_):
        o, lse = _doc_attention(q_[0], k_[0], v_[0], layout, True, scale, config, config)
        return o[None], lse[None]

    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(q.shape, generator=gen, dtype=torch.float64),
               torch.randn(1, 2, docs.numel(), generator=gen, dtype=torch.float64))
    got = forward_backward(with_config, q, k, v, torch.float32, weights)
    exact = forward_backward(reference.doc_attention, q, k, v, torch.float64, weights, cu_seqlens=cu, doc_ids=docs)
    for name in ("o", "lse", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name].double(), exact[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- semantics


def test_document_does_not_leak_into_siblings():
    """Perturbing document 2's K/V leaves every token outside it unchanged except the shared
    tokens after the retrieval block, which do change."""
    examples = [(40, [(6, 14), (14, 22), (22, 31)]), (10, [(2, 5)])]
    cu, docs = packed(examples)
    q, k, v = (t.float() for t in make_qkv(1, docs.numel(), 2, 1, 32))
    o = doc_attention(q, k, v, cu_seqlens=cu, doc_ids=docs)
    k2, v2 = k.clone(), v.clone()
    k2[:, 14:22] += 1.0
    v2[:, 14:22] -= 2.0
    o2 = doc_attention(q, k2, v2, cu_seqlens=cu, doc_ids=docs)
    changed = (o2 != o).any(-1).any(-1)[0]  # (L,)
    after_block = torch.zeros_like(changed)
    after_block[31:40] = True
    assert torch.equal(changed, (docs == 2) & (torch.arange(docs.numel()) < 40) | after_block)


def test_padding_is_never_read_and_gets_zeros():
    """NaN in the padding rows of q, k, v and do changes nothing: valid rows match a clean run
    bitwise, padding rows get o = 0, lse = -inf and zero gradients."""
    cu, docs = packed([(9, [(2, 5)]), (6, [])], pad=11)
    clean = [t.float() for t in make_qkv(1, docs.numel(), 2, 2, 32)]
    do = torch.randn(clean[0].shape, generator=torch.Generator().manual_seed(2))

    def run(poison: bool):
        leaves = [t.clone() for t in clean]
        grad = do.clone()
        if poison:
            for t in leaves + [grad]:
                t[:, 15:] = float("nan")
        leaves = [t.requires_grad_() for t in leaves]
        o, lse = doc_attention(*leaves, cu_seqlens=cu, doc_ids=docs, return_lse=True)
        o.backward(grad)
        return [o, lse] + [t.grad for t in leaves]

    poisoned, reference_run = run(poison=True), run(poison=False)
    assert torch.equal(poisoned[1], reference_run[1])  # lse (1, h, l)
    assert torch.isneginf(poisoned[1][..., 15:]).all() and torch.isfinite(poisoned[1][..., :15]).all()
    for got, want in zip(poisoned[:1] + poisoned[2:], reference_run[:1] + reference_run[2:]):
        assert torch.equal(got[:, :15], want[:, :15])
        assert torch.equal(got[:, 15:], torch.zeros_like(got[:, 15:]))


def test_all_padding_row():
    q, k, v = (t.float().requires_grad_() for t in make_qkv(1, 5, 2, 1, 32))
    o, lse = doc_attention(q, k, v, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32), return_lse=True)
    o.sum().backward()
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


def test_layout_argument_matches_ids_and_pads():
    """A DocLayout gives the same result as cu_seqlens + doc_ids, and may cover fewer tokens."""
    cu, docs = packed(HANDMADE, pad=6)
    layout = DocLayout.from_cu_seqlens(cu, docs[: int(cu[-1])])
    q, k, v = (t.float() for t in make_qkv(1, docs.numel(), 2, 1, 32))
    o_ids, lse_ids = doc_attention(q, k, v, cu_seqlens=cu, doc_ids=docs, return_lse=True)
    o_layout, lse_layout = doc_attention(q, k, v, layout=layout, return_lse=True)
    assert torch.equal(o_ids, o_layout) and torch.equal(lse_ids, lse_layout)


def test_reference_path_reads_the_layout():
    """Without Triton (CPU, interpreter off) the reference runs on the layout's ids and pads."""
    cu, docs = packed(HANDMADE, pad=3)
    layout = DocLayout.from_cu_seqlens(cu, docs[: int(cu[-1])])
    q, k, v = (t.float() for t in make_qkv(1, docs.numel(), 2, 1, 32))
    o_kernel, lse_kernel = doc_attention(q, k, v, layout=layout, return_lse=True)
    with refrag_kernels.use_backend("reference", ops="doc_attention"):
        o_ref, lse_ref = doc_attention(q, k, v, layout=layout, return_lse=True)
    torch.testing.assert_close(o_kernel, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_kernel, lse_ref, rtol=1e-5, atol=1e-5)


def test_backward_is_bitwise_deterministic():
    cu, docs = packed(random_examples(random.Random(7), 6, 30))
    q, k, v = (t.float() for t in make_qkv(1, docs.numel(), 4, 1, 32))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        doc_attention(*leaves, cu_seqlens=cu, doc_ids=docs, deterministic=True).backward(do)
        return [t.grad for t in leaves]

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- bad inputs


def _bad(**overrides):
    b, l, hq, hk, d = 1, 8, 2, 1, 32
    args = dict(q=torch.randn(b, l, hq, d), k=torch.randn(b, l, hk, d), v=torch.randn(b, l, hk, d))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        pytest.param(_bad(q=torch.randn(8, 2, 32)), "q must be 4-D", id="q-rank"),
        pytest.param(_bad(v=torch.randn(1, 8, 2, 32)), "same shape", id="kv-shape"),
        pytest.param(_bad(k=torch.randn(1, 7, 1, 32), v=torch.randn(1, 7, 1, 32)), "does not match", id="kv-len"),
        pytest.param(_bad(q=torch.randn(1, 8, 3, 32), k=torch.randn(1, 8, 2, 32), v=torch.randn(1, 8, 2, 32)),
                     "multiple of kv heads", id="gqa-ratio"),
        pytest.param(_bad(q=torch.randn(1, 8, 2, 36), k=torch.randn(1, 8, 1, 36), v=torch.randn(1, 8, 1, 36)),
                     "head dim", id="head-dim-not-x8"),
        pytest.param(_bad(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 1, 16), v=torch.randn(1, 8, 1, 16)),
                     "head dim", id="head-dim-small"),
        pytest.param(_bad(q=torch.randn(1, 8, 2, 264), k=torch.randn(1, 8, 1, 264), v=torch.randn(1, 8, 1, 264)),
                     "head dim", id="head-dim-large"),
        pytest.param(_bad(k=torch.randn(1, 8, 1, 32).half()), "share one dtype", id="dtype-mismatch"),
        pytest.param(_bad(q=torch.randn(1, 8, 2, 32).double(), k=torch.randn(1, 8, 1, 32).double(),
                          v=torch.randn(1, 8, 1, 32).double()), "fp16, bf16 or fp32", id="fp64"),
        pytest.param(_bad(q=torch.randn(2, 8, 2, 32), k=torch.randn(2, 8, 1, 32), v=torch.randn(2, 8, 1, 32),
                          cu_seqlens=torch.tensor([0, 8])), "batch size 1", id="cu-with-batch2"),
        pytest.param(_bad(cu_seqlens=torch.tensor([0, 5, 3])), "non-decreasing", id="cu-decreasing"),
        pytest.param(_bad(cu_seqlens=torch.tensor([0, 9])), "only 8 tokens", id="cu-too-long"),
        pytest.param(_bad(doc_ids=torch.zeros(7, dtype=torch.int64)), "doc_ids must have shape", id="doc-shape"),
        pytest.param(_bad(doc_ids=torch.tensor([0, 1, 1, 0, 1, 0, 0, 0])), "not contiguous", id="doc-split"),
        pytest.param(_bad(q=torch.randn(2, 8, 2, 32), k=torch.randn(2, 8, 1, 32), v=torch.randn(2, 8, 1, 32),
                          doc_ids=torch.tensor([[0] * 8, [0, 3, 0, 3, 0, 0, 0, 0]])),
                     "document 3 of batch row 1 is not contiguous", id="doc-split-batch2"),
        pytest.param(_bad(softmax_scale=float("nan")), "softmax_scale", id="scale-nan"),
        pytest.param(_bad(layout=DocLayout.from_cu_seqlens(torch.tensor([0, 9], dtype=torch.int32))),
                     "covers 9 tokens", id="layout-too-long"),
        pytest.param(_bad(layout=DocLayout.from_cu_seqlens(torch.tensor([0, 8], dtype=torch.int32)),
                          cu_seqlens=torch.tensor([0, 8])), "either layout", id="layout-and-cu"),
        pytest.param(_bad(layout=torch.tensor([0, 8])), "DocLayout", id="layout-type"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        doc_attention(**args)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("d", [pytest.param(64, id="d64"), pytest.param(128, id="d128")])
def test_bf16_matches_reference_gpu(d):
    cu, docs = packed(random_examples(random.Random(d), 6, 300), pad=17)
    q, k, v = (t.cuda() for t in make_qkv(1, docs.numel(), 8, 2, d))
    assert_matches_reference(q, k, v, torch.bfloat16, cu_seqlens=cu.cuda(), doc_ids=docs.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [pytest.param(t, id=str(t)[6:]) for t in (torch.float16, torch.bfloat16)])
def test_long_packed_row_gpu(dtype):
    """4K tokens, 8 examples x 10 documents, head dim 128, GQA 4:1: the kernel agrees with the
    reference on every example (checked one example at a time to keep the reference small)."""
    rng = random.Random(0)
    examples = [(512, [(16 + 40 * i, 56 + 40 * i) for i in range(10)]) for _ in range(8)]
    cu, docs = packed(examples)
    q, k, v = (t.cuda().to(dtype) for t in make_qkv(1, docs.numel(), 8, 2, 128, seed=rng.randint(0, 99)))
    o = doc_attention(q, k, v, cu_seqlens=cu.cuda(), doc_ids=docs.cuda())
    for n in range(8):
        s, e = int(cu[n]), int(cu[n + 1])
        ref = reference.doc_attention(q[:, s:e].float(), k[:, s:e].float(), v[:, s:e].float(),
                                      doc_ids=docs[s:e].cuda())
        torch.testing.assert_close(o[:, s:e].float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_offsets_past_int32_gpu():
    """q, o, dq hold more than 2^31 elements: the last example's output and gradients must
    still be right (int32 offset math would wrap around)."""
    l, hq, hk, d = 2**17 + 64, 64, 8, 256
    cu = torch.arange(0, l + 1, 1024, dtype=torch.int32, device="cuda")
    cu = torch.cat([cu, torch.tensor([l], dtype=torch.int32, device="cuda")]).unique()
    q, k, v = (torch.randn(1, l, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (hq, hk, hk))
    assert q.numel() > 2**31
    o = doc_attention(q, k, v, cu_seqlens=cu)
    do = torch.randn_like(o)
    o.backward(do)
    s = int(cu[-2])
    tail = [t[:, s:].detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference.doc_attention(*tail)
    ref.backward(do[:, s:].float())
    torch.testing.assert_close(o[:, s:].float(), ref, rtol=2e-2, atol=2e-2)
    for leaf, ref_leaf in zip((q, k, v), tail):
        torch.testing.assert_close(leaf.grad[:, s:].float(), ref_leaf.grad, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- the "torch" path (CPU without the interpreter)


def torch_path_forward_backward(fn, q, k, v, w_o, **kwargs):
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves, **kwargs)
    (o.double() * w_o).sum().backward()
    return {"o": o, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


@pytest.mark.parametrize("case, hq, hk, extra", [
    pytest.param("dense-T63", 2, 2, {}, id="dense"),
    pytest.param("handmade", 4, 2, {}, id="handmade-GQA2"),
    pytest.param("many-tiny", 8, 1, {}, id="16-examples-GQA8"),
    pytest.param("padding", 2, 1, {}, id="padding"),
    pytest.param("batch3", 2, 1, {}, id="b3-rows"),
    pytest.param("varlen-random", 2, 2, {"causal": False}, id="noncausal"),
    pytest.param("varlen-random", 2, 2, {"softmax_scale": 0.3}, id="scale0.3"),
])
@pytest.mark.parametrize("with_layout", [False, True], ids=["ids", "layout"])
def test_torch_path_matches_reference(case, hq, hk, extra, with_layout):
    """fp32 output and gradients within 2x the oracle's own fp32 error of the fp64 oracle."""
    b, l, cu, docs = case_inputs(case)
    if with_layout and b > 1:
        pytest.skip("a layout describes one packed row")
    q, k, v = make_qkv(b, l, hq, hk, 32)
    w_o = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = {"cu_seqlens": cu, "doc_ids": docs}
    if with_layout:
        total = l if cu is None else int(cu[-1])
        layout_args = {"layout": DocLayout.from_cu_seqlens(cu if cu is not None else torch.tensor([0, l]),
                                                           (docs if docs is not None else torch.zeros(l, dtype=torch.int64))[:total])}
    with refrag_kernels.use_backend("torch", ops="doc_attention"):
        got = torch_path_forward_backward(doc_attention, q, k, v, w_o, **(layout_args if with_layout else ids), **extra)
    low = torch_path_forward_backward(reference.doc_attention, q, k, v, w_o, **ids, **extra)
    exact = forward_backward(reference.doc_attention, q, k, v, torch.float64, (w_o, torch.zeros(b, hq, l)),
                             **ids, **extra)
    for name in ("o", "dq", "dk", "dv"):
        g, lo, ex = (t[name].double() for t in (got, low, exact))
        err, base = (g - ex).abs().max().item(), (lo - ex).abs().max().item()
        bound = 2 * base + ATOL[torch.float32] * max(1.0, ex.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference error {base:.3g})"
    if case == "padding":  # padding tokens: output 0 and no gradient
        assert got["o"][0, int(cu[-1]):].abs().max() == 0 and got["dq"][0, int(cu[-1]):].abs().max() == 0


def test_torch_path_zeroes_non_finite_output_gradients_like_the_oracle():
    cu, docs = packed(HANDMADE)
    q, k, v = (t.float().requires_grad_() for t in make_qkv(1, docs.numel(), 2, 2, 32))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    do[0, 3, 0, 5] = float("inf")
    grads = []
    for backend in ("torch", "reference"):
        with refrag_kernels.use_backend(backend, ops="doc_attention"):
            o = doc_attention(q, k, v, cu_seqlens=cu, doc_ids=docs)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
