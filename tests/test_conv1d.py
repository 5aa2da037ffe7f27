"""causal_conv1d (Triton) against refrag_kernels.reference: forward, dx, dweight, dbias, window restarts."""
import pytest
import torch

from refrag_kernels import causal_conv1d, reference
from refrag_kernels.conv1d import CONV1D_CONFIGS
from refrag_kernels.layout import DocLayout

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_within_rule(out, ref64, ref_lowp, atol, what):
    """Kernel error vs fp64 <= 2x the error of the reference run in the kernel's dtype + atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol:g}"


def make_inputs(device, b, l, d, w, dtype, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=gen).to(device, dtype)
    weight = (torch.randn(d, w, generator=gen) / w ** 0.5).to(device, dtype)
    bias = torch.randn(d, generator=gen).to(device, dtype) if with_bias else None
    dy = torch.randn(b, l, d, generator=gen).to(device, dtype)
    return x, weight, bias, dy


def forward_backward(fn, x, weight, bias, dy, dtype=None, **kwargs):
    """Run fn on leaf copies (cast to `dtype` if given); returns (y, dx, dweight, dbias)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves, **kwargs)
    y.backward(dy.to(y.dtype))
    return (y,) + tuple(None if t is None else t.grad for t in leaves)


def check_against_reference(x, weight, bias, dy, config=None, **kwargs):
    out = forward_backward(causal_conv1d, x, weight, bias, dy, config=config, **kwargs)
    ref64 = forward_backward(reference.causal_conv1d, x, weight, bias, dy, dtype=torch.float64, **kwargs)
    ref_lowp = forward_backward(reference.causal_conv1d, x, weight, bias, dy, **kwargs)
    for name, o, r64, rlp in zip(("y", "dx", "dweight", "dbias"), out, ref64, ref_lowp):
        if o is None:
            continue
        assert o.dtype == rlp.dtype and o.shape == rlp.shape, name
        assert_within_rule(o, r64, rlp, ATOL[x.dtype], name)
    return out


def doc_row(*runs):
    """Doc ids from (doc_id, length) runs."""
    return torch.cat([torch.full((n,), doc) for doc, n in runs])


# (b, l, d, w, cu_seqlens, doc_ids): awkward layouts, lengths not multiples of the blocks.
LAYOUTS = [
    pytest.param(2, 63, 20, 4, None, None, id="B2-L63-W4-dense"),
    pytest.param(1, 1, 5, 2, None, None, id="L1-W2"),
    pytest.param(1, 48, 12, 4, [0, 0, 1, 1, 9, 40], None, id="varlen-empty-len1-padding"),
    pytest.param(1, 40, 12, 3, [0, 17, 40], doc_row((0, 3), (1, 1), (2, 4), (0, 9), (1, 6), (0, 2), (3, 1), (0, 14)),
                 id="docs-one-token-docs"),
    pytest.param(1, 9, 7, 4, list(range(10)), None, id="many-len1-seqs"),
    pytest.param(1, 150, 8, 4, [0, 150], doc_row((0, 20), (1, 50), (2, 33), (0, 47)), id="one-long-seq-docs"),
    pytest.param(2, 30, 6, 3, None, torch.stack([doc_row((0, 5), (1, 10), (0, 15)), doc_row((1, 7), (2, 23))]),
                 id="B2-docs-no-cu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, l, d, w, cu, docs", LAYOUTS)
def test_matches_reference(device, b, l, d, w, cu, docs, dtype):
    x, weight, bias, dy = make_inputs(device, b, l, d, w, dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    doc_ids = None if docs is None else docs.to(device)
    check_against_reference(x, weight, bias, dy, cu_seqlens=cu_seqlens, doc_ids=doc_ids)


@pytest.mark.parametrize("activation, with_bias", [(None, True), ("silu", False), ("swish", True)],
                         ids=["no-act", "silu-no-bias", "swish"])
def test_activation_and_bias_options(device, activation, with_bias):
    x, weight, bias, dy = make_inputs(device, 1, 33, 10, 4, torch.float32, with_bias=with_bias)
    cu = torch.tensor([0, 2, 20, 30], dtype=torch.int32, device=device)
    check_against_reference(x, weight, bias, dy, cu_seqlens=cu, activation=activation)


@pytest.mark.parametrize("config", CONV1D_CONFIGS, ids=[str(c.kwargs) for c in CONV1D_CONFIGS])
def test_every_config(device, config):
    docs = doc_row((0, 4), (1, 1), (2, 70), (0, 65)).to(device)
    x, weight, bias, dy = make_inputs(device, 1, 140, 40, 4, torch.float32)
    cu = torch.tensor([0, 1, 1, 130], dtype=torch.int32, device=device)
    check_against_reference(x, weight, bias, dy, cu_seqlens=cu, doc_ids=docs, config=config)


def test_varlen_equals_per_sequence_loop(device):
    """Packed varlen output == the reference run on each sequence on its own; padding rows are 0."""
    x, weight, bias, dy = make_inputs(device, 1, 50, 9, 4, torch.float32)
    bounds = [0, 7, 8, 8, 31, 44]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    y, dx, _, _ = forward_backward(causal_conv1d, x, weight, bias, dy, cu_seqlens=cu)
    for s, e in zip(bounds[:-1], bounds[1:]):
        expected = reference.causal_conv1d(x[:, s:e], weight, bias)
        torch.testing.assert_close(y[:, s:e], expected, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(y[:, bounds[-1]:]) == 0
    assert torch.count_nonzero(dx[:, bounds[-1]:]) == 0


def test_document_window_ignores_sibling_documents(device):
    """Changing document 1 changes its own outputs but not document 2's (its window restarts)."""
    docs = doc_row((0, 6), (1, 5), (2, 7), (0, 4)).to(device)
    x, weight, bias, _ = make_inputs(device, 1, 22, 6, 4, torch.float32)
    y = causal_conv1d(x, weight, bias, doc_ids=docs)
    x_changed = x.clone()
    x_changed[:, 6:11] += 1.0
    y_changed = causal_conv1d(x_changed, weight, bias, doc_ids=docs)
    torch.testing.assert_close(y_changed[:, 11:18], y[:, 11:18], atol=0, rtol=0)
    assert not torch.allclose(y_changed[:, 6:11], y[:, 6:11])


def test_non_contiguous_input(device):
    x_full, weight, bias, dy = make_inputs(device, 2, 21, 24, 4, torch.float32)
    x = x_full[:, :, 4:16]
    assert not x.is_contiguous()
    check_against_reference(x, weight[4:16], bias[4:16], dy[:, :, 4:16])


def test_window_starts_worked_example():
    layout = DocLayout.from_cu_seqlens(torch.tensor([0, 4, 7]), torch.tensor([0, 1, 1, 2, 0, 3, 3]))
    starts = layout.conv_window_starts(8)
    assert starts.tolist() == [0, 1, 1, 3, 4, 5, 5, 8]
    assert layout.conv_window_starts(8) is starts
    assert layout.examples_only().conv_window_starts(8).tolist() == [0, 0, 0, 0, 4, 4, 4, 8]
    assert starts.dtype == torch.int32


def test_empty_row(device):
    x, weight, bias, dy = make_inputs(device, 1, 0, 4, 3, torch.float32)
    y, dx, dweight, dbias = forward_backward(causal_conv1d, x, weight, bias, dy,
                                             cu_seqlens=torch.tensor([0, 0], device=device))
    assert y.shape == (1, 0, 4) and dx.shape == (1, 0, 4)
    assert torch.count_nonzero(dweight) == 0 and torch.count_nonzero(dbias) == 0


def _bad_cases(device):
    x = torch.randn(1, 8, 4, device=device)
    w = torch.randn(4, 3, device=device)
    return [
        ((x[0], w), {}, "x must be"),
        ((x, w[:3]), {}, "weight must be"),
        ((x, torch.randn(4, 5, device=device)), {}, "width"),
        ((x, torch.randn(4, 1, device=device)), {}, "width"),
        ((x, w, torch.randn(3, device=device)), {}, "bias must have shape"),
        ((x.to(torch.int32), w), {}, "x must be fp16"),
        ((x, w), {"activation": "relu"}, "activation"),
        ((torch.randn(2, 8, 4, device=device), w), {"cu_seqlens": torch.tensor([0, 8], device=device)},
         "batch size 1"),
        ((x, w), {"cu_seqlens": torch.tensor([0, 9], device=device)}, "only 8 tokens"),
        ((x, w), {"cu_seqlens": torch.tensor([0, 5, 3], device=device)}, "non-decreasing"),
        ((x, w), {"doc_ids": torch.zeros(7, dtype=torch.long, device=device)}, "doc_ids must have shape"),
        ((x, w.to("meta")), {}, "one device"),
        ((x, w), {"cu_seqlens": [0, 3, 8]}, "cu_seqlens must be a torch.Tensor"),
        ((x, w), {"layout": DocLayout.from_examples([(9, [])], device=device)}, "layout covers 9 tokens"),
        ((x, w), {"layout": DocLayout.from_examples([(8, [])], device=device),
                  "cu_seqlens": torch.tensor([0, 8], device=device)}, "either layout or cu_seqlens"),
        ((torch.randn(2, 8, 4, device=device), w), {"layout": DocLayout.from_examples([(8, [])], device=device)},
         "batch 1"),
        ((x, w), {"layout": (0, 8)}, "layout must be a refrag_kernels.DocLayout"),
    ]


def test_bad_inputs_raise(device):
    for args, kwargs, match in _bad_cases(device):
        with pytest.raises(ValueError, match=match):
            causal_conv1d(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("b, l, d, w, cu, docs", LAYOUTS)
def test_bf16_matches_reference(device, b, l, d, w, cu, docs):
    x, weight, bias, dy = make_inputs(device, b, l, d, w, torch.bfloat16)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    doc_ids = None if docs is None else docs.to(device)
    check_against_reference(x, weight, bias, dy, cu_seqlens=cu_seqlens, doc_ids=doc_ids)


@pytest.mark.gpu
def test_offsets_past_int32(device):
    """x with more than 2^31 elements: the tail (addressed past 2^31) matches the reference."""
    d, w = 2048, 4
    l = 2 ** 31 // d + 300
    x = torch.randn(1, l, d, device=device, dtype=torch.bfloat16)
    weight = torch.randn(d, w, device=device, dtype=torch.bfloat16)
    y = causal_conv1d(x, weight)
    tail = reference.causal_conv1d(x[:, -200 - (w - 1):], weight)[:, w - 1:]
    torch.testing.assert_close(y[:, -200:], tail, atol=2e-2, rtol=2e-2)


def test_layout_equals_keyword_form(device):
    """layout= and cu_seqlens/doc_ids give bitwise the same outputs and gradients; padding past
    the layout gives 0."""
    layout = DocLayout.from_examples([(17, [(3, 4), (4, 8)]), (0, []), (23, [(0, 6)])], device=device)
    x, weight, bias, dy = make_inputs(device, 1, 44, 12, 4, torch.float32)
    docs = torch.nn.functional.pad(layout.doc_ids, (0, 4))
    keyword = forward_backward(causal_conv1d, x, weight, bias, dy, cu_seqlens=layout.cu_seqlens, doc_ids=docs)
    with_layout = forward_backward(causal_conv1d, x, weight, bias, dy, layout=layout)
    for a, b in zip(keyword, with_layout):
        assert torch.equal(a, b)
    assert with_layout[0][:, 40:].abs().sum() == 0


# ---------------------------------------------------------------- the "torch" path (rows without a layout)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("b, l, d, w, with_bias", [
    pytest.param(2, 63, 20, 4, True, id="B2-L63-W4"),
    pytest.param(1, 1, 5, 2, False, id="L1-W2"),
    pytest.param(3, 2, 7, 4, True, id="shorter-than-the-window"),
    pytest.param(1, 17, 9, 3, False, id="W3"),
])
def test_torch_path_rows_match_reference(b, l, d, w, with_bias, activation, dtype):
    """causal_conv1d_rows (what "auto" runs for CPU rows without a layout): y and every gradient
    within 2x the oracle's own error in the same dtype."""
    from refrag_kernels.conv1d import causal_conv1d_rows

    x, weight, bias, dy = make_inputs("cpu", b, l, d, w, dtype, with_bias=with_bias, seed=l)
    out = forward_backward(causal_conv1d_rows, x, weight, bias, dy, activation=activation)
    ref64 = forward_backward(reference.causal_conv1d, x, weight, bias, dy, dtype=torch.float64, activation=activation)
    ref_lowp = forward_backward(reference.causal_conv1d, x, weight, bias, dy, activation=activation)
    for name, o, r64, rlp in zip(("y", "dx", "dweight", "dbias"), out, ref64, ref_lowp):
        if rlp is None:
            assert o is None, name
            continue
        assert o.dtype == rlp.dtype and o.shape == rlp.shape, name
        assert_within_rule(o, r64, rlp, ATOL[dtype], name)


def test_torch_path_is_what_auto_runs_for_rows_only():
    """On CPU without the interpreter, rows without a layout take the row path; a layout
    (or cu_seqlens / doc_ids) still runs the oracle, whose window restarts it needs."""
    from unittest import mock

    from refrag_kernels import conv1d, use_backend

    x, weight, bias, _ = make_inputs("cpu", 1, 12, 6, 4, torch.float32)
    with use_backend("torch", ops="causal_conv1d"), mock.patch.object(
            conv1d, "causal_conv1d_rows", wraps=conv1d.causal_conv1d_rows) as rows:
        conv1d.causal_conv1d(x, weight, bias)
        assert rows.call_count == 1
        conv1d.causal_conv1d(x, weight, bias, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
        assert rows.call_count == 1
