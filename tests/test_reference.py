"""The oracles agree with each other in fp64 (issue 3): every identity checked here is an
independent derivation of the same semantics, so a bug in one form shows up as a mismatch."""
import math

import pytest
import torch
import torch.nn.functional as F

from refrag_kernels import reference as R

F64 = torch.float64
RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_ssd_inputs(L, h=4, p=3, n=5, g=2, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return dict(
        x=rnd(batch, L, h, p),
        dt=torch.rand(batch, L, h, generator=gen, dtype=F64) * 0.5,
        A=-torch.rand(h, generator=gen, dtype=F64) - 0.1,
        B=rnd(batch, L, g, n),
        C=rnd(batch, L, g, n),
    )


def doc_row(L, spans):
    docs = torch.zeros(L, dtype=torch.int64)
    for k, (s, e) in enumerate(spans, start=1):
        docs[s:e] = k
    return docs


CU = torch.tensor([0, 1, 20, 20, 50], dtype=torch.int32)  # lengths 1, 19, 0, 30 (+7 padding)
DOCS = doc_row(57, [(3, 6), (6, 7), (7, 12)])
DOCS[25:30], DOCS[30:40], DOCS[45:50] = 1, 2, 1


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("doc_mode", [False, True], ids=["plain", "docmode"])
def test_ssd_sequential_equals_chunked(chunk_size, doc_mode):
    inp = random_ssd_inputs(57)
    h, p = inp["x"].shape[2:]
    extra = dict(D=torch.randn(h, p, dtype=F64), z=torch.randn(1, 57, h, p, dtype=F64),
                 dt_bias=torch.randn(h, dtype=F64), dt_softplus=True,
                 initial_states=torch.randn(4, h, p, 5, dtype=F64), cu_seqlens=CU,
                 doc_ids=DOCS, doc_mode=doc_mode, return_final_states=True)
    y_seq, f_seq = R.ssd_scan_sequential(**inp, **extra)
    y_chk, f_chk = R.ssd_scan(**inp, chunk_size=chunk_size, **extra)
    assert rel_err(y_chk, y_seq) < RTOL
    assert rel_err(f_chk, f_seq) < RTOL
    assert y_chk[0, 50:].abs().max() == 0  # padding rows


def test_ssd_varlen_equals_each_sequence_alone():
    inp = random_ssd_inputs(57)
    h, p = inp["x"].shape[2:]
    init = torch.randn(4, h, p, 5, dtype=F64)
    y, final = R.ssd_scan(**inp, initial_states=init, cu_seqlens=CU, return_final_states=True)
    cu = CU.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        part = {k: (v[:, s:e] if v.dim() > 1 else v) for k, v in inp.items()}
        y_i, f_i = R.ssd_scan(**part, initial_states=init[i:i + 1], return_final_states=True)
        assert torch.allclose(y[:, s:e], y_i, rtol=RTOL, atol=1e-12)
        assert torch.allclose(final[i], f_i[0], rtol=RTOL, atol=1e-12)


def test_ssd_batch_rows_are_independent():
    inp = random_ssd_inputs(23, batch=3)
    y = R.ssd_scan(**inp)
    for r in range(3):
        y_r = R.ssd_scan(**{k: (v[r:r + 1] if v.dim() > 1 else v) for k, v in inp.items()})
        assert torch.allclose(y[r:r + 1], y_r, rtol=RTOL, atol=1e-12)


def test_ssd_doc_mode_equals_each_document_from_block_entry_and_composition():
    L = 40
    spans = [(5, 12), (12, 13), (13, 25)]
    docs = doc_row(L, spans)
    inp = random_ssd_inputs(L)
    y, final = R.ssd_scan(**inp, doc_ids=docs, doc_mode=True, return_final_states=True)
    _, entry = R.ssd_scan(**{k: (v[:, :5] if v.dim() > 1 else v) for k, v in inp.items()},
                          return_final_states=True)
    h0 = entry[0]
    decays, doc_finals = [], []
    for s, e in spans:
        part = {k: (v[:, s:e] if v.dim() > 1 else v) for k, v in inp.items()}
        y_doc, f_doc = R.ssd_scan(**part, initial_states=entry, return_final_states=True)
        assert torch.allclose(y[:, s:e], y_doc, rtol=RTOL, atol=1e-12)
        decays.append(torch.exp((inp["dt"][0, s:e] * inp["A"]).sum(0))[:, None, None])
        doc_finals.append(f_doc[0])
    # DESIGN: h = P h0 + sum_i (prod_{j>i} D_j)(s_i - D_i h0), P = prod_i D_i
    composed = math.prod(decays) * h0
    for i, (d_i, s_i) in enumerate(zip(decays, doc_finals)):
        composed = composed + math.prod(decays[i + 1:], start=torch.ones_like(d_i)) * (s_i - d_i * h0)
    tail = {k: (v[:, 25:] if v.dim() > 1 else v) for k, v in inp.items()}
    y_tail, f_tail = R.ssd_scan(**tail, initial_states=composed[None], return_final_states=True)
    assert torch.allclose(y[:, 25:], y_tail, rtol=RTOL, atol=1e-12)
    assert torch.allclose(final, f_tail, rtol=RTOL, atol=1e-12)


def test_ssd_doc_mode_false_ignores_doc_ids():
    inp = random_ssd_inputs(30)
    docs = doc_row(30, [(2, 9), (9, 20)])
    assert torch.equal(R.ssd_scan(**inp, doc_ids=docs, doc_mode=False), R.ssd_scan(**inp))


def test_ssd_state_update_steps_equal_scan():
    inp = random_ssd_inputs(17, g=2)
    h, p = inp["x"].shape[2:]
    D, z, bias = torch.randn(h, dtype=F64), torch.randn(1, 17, h, p, dtype=F64), torch.randn(h, dtype=F64)
    y = R.ssd_scan_sequential(**inp, D=D, z=z, dt_bias=bias, dt_softplus=True)
    state = torch.zeros(1, h, p, 5, dtype=F64)
    steps = [R.ssd_state_update(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t],
                                inp["C"][:, t], D=D, z=z[:, t], dt_bias=bias, dt_softplus=True)
             for t in range(17)]
    assert rel_err(torch.stack(steps, 1), y) < RTOL


def mamba1_inputs(L, d=6, n=4, g=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (1, n, L) if g is None else (1, g, n, L)
    return dict(u=torch.randn(1, d, L, generator=gen, dtype=F64),
                delta=torch.rand(1, d, L, generator=gen, dtype=F64),
                A=-torch.rand(d, n, generator=gen, dtype=F64),
                B=torch.randn(*bc_shape, generator=gen, dtype=F64),
                C=torch.randn(*bc_shape, generator=gen, dtype=F64))


@pytest.mark.parametrize("groups", [None, 2], ids=["shared-BC", "grouped-BC"])
def test_selective_scan_varlen_equals_each_sequence_alone(groups):
    inp = mamba1_inputs(57, g=groups)
    init = torch.randn(4, 6, 4, dtype=F64)
    D = torch.randn(6, dtype=F64)
    y, last = R.selective_scan(**inp, D=D, cu_seqlens=CU, initial_state=init, return_last_state=True)
    cu = CU.tolist()
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        part = {k: (v[..., s:e] if k != "A" else v) for k, v in inp.items()}
        y_i, l_i = R.selective_scan(**part, D=D, initial_state=init[i:i + 1], return_last_state=True)
        assert torch.allclose(y[..., s:e], y_i, rtol=RTOL, atol=1e-12)
        assert torch.allclose(last[i], l_i[0], rtol=RTOL, atol=1e-12)
    assert y[..., 50:].abs().max() == 0


def test_selective_scan_is_ssd_with_one_head_per_channel():
    """Mamba-1 with p=1 per channel is Mamba-2 with one head per channel and scalar A per head."""
    L, d, n = 21, 4, 3
    inp = mamba1_inputs(L, d=d, n=n)
    A_scalar = -torch.rand(d, dtype=F64)
    y1 = R.selective_scan(inp["u"], inp["delta"], A_scalar[:, None].expand(d, n), inp["B"], inp["C"])
    y2 = R.ssd_scan(inp["u"].permute(0, 2, 1)[..., None], inp["delta"].permute(0, 2, 1), A_scalar,
                    inp["B"].permute(0, 2, 1)[:, :, None], inp["C"].permute(0, 2, 1)[:, :, None])
    assert rel_err(y2[..., 0].permute(0, 2, 1), y1) < RTOL


def test_conv1d_resets_equal_separate_calls():
    L, d, w = 57, 5, 4
    x, weight, bias = torch.randn(1, L, d, dtype=F64), torch.randn(d, w, dtype=F64), torch.randn(d, dtype=F64)
    y = R.causal_conv1d(x, weight, bias, cu_seqlens=CU, doc_ids=DOCS)
    cu = CU.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        for rs, re_, doc in R.segments(DOCS.tolist(), s, e):
            if doc:  # a document token's window starts at its document
                assert torch.allclose(y[:, rs:re_], R.causal_conv1d(x[:, rs:re_], weight, bias), atol=1e-12)
            else:  # a shared token's window reaches back to its sequence start
                full = R.causal_conv1d(x[:, s:re_], weight, bias)
                assert torch.allclose(y[:, rs:re_], full[:, rs - s:], atol=1e-12)
    assert y[:, 50:].abs().max() == 0


def test_conv1d_matches_torch_conv():
    x, weight, bias = torch.randn(2, 33, 6, dtype=F64), torch.randn(6, 3, dtype=F64), torch.randn(6, dtype=F64)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), weight[:, None], bias, groups=6)).transpose(1, 2)
    assert torch.allclose(R.causal_conv1d(x, weight, bias), expected, atol=1e-12)


def test_conv1d_update_steps_equal_conv():
    x, weight, bias = torch.randn(2, 13, 6, dtype=F64), torch.randn(6, 4, dtype=F64), torch.randn(6, dtype=F64)
    state = torch.zeros(2, 6, 3, dtype=F64)
    steps = torch.stack([R.causal_conv1d_update(state, x[:, t], weight, bias) for t in range(13)], 1)
    assert torch.allclose(steps, R.causal_conv1d(x, weight, bias), atol=1e-12)


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 1), (8, 2)], ids=["MHA", "MQA", "GQA4"])
def test_doc_attention_equals_per_document_sdpa(hq, hk):
    """Each document token = causal SDPA over [shared prefix of its example] + [its document]."""
    L, dim = 57, 8
    q, k, v = (torch.randn(1, L, hh, dim, dtype=F64) for hh in (hq, hk, hk))
    o, lse = R.doc_attention(q, k, v, cu_seqlens=CU, doc_ids=DOCS, return_lse=True)
    kx, vx = (t.repeat_interleave(hq // hk, dim=2) for t in (k, v))
    docs, cu = DOCS.tolist(), CU.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        for t in range(s, e):
            keys = [j for j in range(s, t + 1) if docs[j] == 0 or docs[t] == 0 or docs[j] == docs[t]]
            att = F.scaled_dot_product_attention(q[0, t:t + 1].transpose(0, 1), kx[0, keys].transpose(0, 1),
                                                 vx[0, keys].transpose(0, 1))
            assert torch.allclose(o[0, t], att.transpose(0, 1)[0], atol=1e-12)
    assert o[0, 50:].abs().max() == 0 and torch.isinf(lse[0, :, 50:]).all()


def test_doc_attention_without_docs_is_varlen_causal():
    q, k, v = (torch.randn(1, 20, 2, 8, dtype=F64) for _ in range(3))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    o = R.doc_attention(q, k, v, cu_seqlens=cu)
    for s, e in [(0, 8), (8, 20)]:
        ref = F.scaled_dot_product_attention(*(t[:, s:e].transpose(1, 2) for t in (q, k, v)), is_causal=True)
        assert torch.allclose(o[:, s:e], ref.transpose(1, 2), atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    h, W = torch.randn(2, 9, 16, dtype=F64), torch.randn(37, 16, dtype=F64)
    tgt = torch.randint(0, 37, (2, 9))
    tgt[0, :4] = -100
    ours = R.fused_linear_cross_entropy(h, W, tgt, reduction=reduction)
    theirs = F.cross_entropy((h @ W.t()).reshape(-1, 37), tgt.reshape(-1), reduction=reduction)
    assert torch.allclose(ours, theirs.reshape(ours.shape), atol=1e-12)


def test_cross_entropy_all_ignored_is_zero_and_z_loss_adds_lse_squared():
    h, W = torch.randn(5, 8, dtype=F64), torch.randn(11, 8, dtype=F64)
    assert R.fused_linear_cross_entropy(h, W, torch.full((5,), -100)).item() == 0.0
    tgt = torch.randint(0, 11, (5,))
    lse = torch.logsumexp(h @ W.t(), -1)
    diff = R.fused_linear_cross_entropy(h, W, tgt, z_loss=1e-2) - R.fused_linear_cross_entropy(h, W, tgt)
    assert torch.allclose(diff, 1e-2 * lse.square().mean())


def test_references_are_differentiable():
    inp = {k: v.requires_grad_() for k, v in random_ssd_inputs(19).items()}
    y, final = R.ssd_scan(**inp, chunk_size=8, doc_ids=doc_row(19, [(3, 9)]), doc_mode=True,
                          return_final_states=True)
    (y.sum() + final.sum()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in inp.values())
