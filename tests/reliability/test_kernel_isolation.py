"""Issue 23: kernels keep bad values inside their example and refuse aliasing outputs.

Non-finite values in one packed example or document of `doc_attention` never reach another one,
in the kernel or in its reference, forward and backward (item 7); in-place decode ops refuse a
state whose memory overlaps itself (item 8); cross-entropy refuses a non-finite z_loss (item 10)
and takes every integer target dtype (item 11). On CPU the Triton kernels run in the interpreter, fp32.
"""
import math

import pytest
import torch

from refrag_kernels import causal_conv1d_update, doc_attention, fused_linear_cross_entropy, reference, ssd_state_update

# ---------------------------------------------------------------------------------- item 7

# Three examples (20, 17, 27 tokens) + 4 padding; example 0 holds documents 1 = [2, 10) and
# 2 = [10, 16), example 1 one document [3, 9). The poisoned token 5 is in example 0, document 1:
# document 2's queries and everything in examples 1 and 2 must not see it. Tiles of 32 x 16
# (interpreter) or larger mix examples, so masked pairs share tiles with the poisoned token.
LENGTHS, PAD, POISONED = (20, 17, 27), 4, 5
DOCS = [0, 0] + [1] * 8 + [2] * 6 + [0] * 4 + [0] * 3 + [1] * 6 + [0] * 8 + [0] * 27 + [0] * PAD


def attention_case(device):
    cu = torch.tensor([0, 20, 37, 64], dtype=torch.int32, device=device)
    docs = torch.tensor(DOCS, device=device)
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, len(DOCS), 2, 32, generator=gen).to(device) for _ in range(4))
    mask = reference.doc_attention_mask(len(DOCS), cu, docs, causal=True, device=device).cpu()
    return cu, docs, q, k, v, grad, mask


def run_attention(op, q, k, v, grad, cu, docs):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = op(q, k, v, cu_seqlens=cu, doc_ids=docs)
    o.backward(grad)
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def reached(mask: torch.Tensor, where: str) -> dict:
    """Per output, the tokens whose value may depend on the poisoned token's `where` input (from
    the dense mask: a query row reads the keys it sees, a key's gradient reads the rows seeing it)."""
    rows = torch.zeros(len(mask), dtype=torch.bool)
    rows[POISONED] = True
    if where in ("k", "v"):  # every row that sees the poisoned key
        rows |= mask[:, POISONED]
    keys = (mask & rows[:, None]).any(0)
    keys[POISONED] = True
    return {"o": torch.zeros_like(rows) if where == "do" else rows, "dq": rows, "dk": keys, "dv": keys}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_non_finite_values_stay_in_their_example_and_document(device, impl, where, value):
    op = doc_attention if impl == "kernel" else reference.doc_attention
    cu, docs, q, k, v, grad, mask = attention_case(device)
    clean = run_attention(op, q, k, v, grad, cu, docs)
    inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "do": grad.clone()}
    inputs[where][0, POISONED, :, 3] = value
    poisoned = run_attention(op, inputs["q"], inputs["k"], inputs["v"], inputs["do"], cu, docs)
    for name, may_change in reached(mask, where).items():
        safe = ~may_change.to(device)
        assert torch.isfinite(poisoned[name][0, safe]).all(), f"{where}={value} leaked into {name}"
        torch.testing.assert_close(poisoned[name][0, safe], clean[name][0, safe], rtol=0, atol=0)
    if where != "do" and math.isnan(value):  # and it is not hidden from the rows that do see it
        seen = reached(mask, where)["o"].to(device)
        assert (~torch.isfinite(poisoned["o"][0, seen])).flatten(1).any(1).all(), "NaN hidden in its own example"


# ---------------------------------------------------------------------------------- item 8


def test_ssd_state_update_refuses_a_state_broadcast_over_the_batch(device):
    b, h, p, n = 3, 2, 4, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, h, p, generator=gen).to(device)
    dt, A = torch.rand(b, h, generator=gen).to(device), -torch.rand(h, generator=gen).to(device)
    B, C = torch.randn(b, 1, n, generator=gen).to(device), torch.randn(b, 1, n, generator=gen).to(device)
    shared = torch.zeros(1, h, p, n, device=device).expand(b, h, p, n)  # stride 0 over the batch
    with pytest.raises(ValueError, match="state is updated in place but its memory overlaps itself"):
        ssd_state_update(shared, x, dt, A, B, C)
    assert torch.equal(shared, torch.zeros_like(shared)), "the refused call wrote the state"


def test_causal_conv1d_update_refuses_an_overlapping_state(device):
    b, d, w = 3, 5, 4
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(b, d, generator=gen).to(device), torch.randn(d, w, generator=gen).to(device)
    broadcast = torch.zeros(1, d, w - 1, device=device).expand(b, d, w - 1)
    overlapping = torch.zeros(b * d + w, device=device).as_strided((b, d, w - 1), (d, 1, 1))  # windows share memory
    for state in (broadcast, overlapping):
        with pytest.raises(ValueError, match="conv_state is updated in place but its memory overlaps itself"):
            causal_conv1d_update(state, x, weight)


# ----------------------------------------------------------------------------- items 10, 11


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_cross_entropy_takes_every_integer_target_dtype(device, dtype, reference_ops):
    """On CPU through the reference path (plain torch, whose gather wanted int64 indices)."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=gen).to(device), torch.randn(10, 16, generator=gen).to(device)
    targets = torch.tensor([1, 2, 9, 0, 4, 7], device=device)
    expected = reference.fused_linear_cross_entropy(hidden.double(), weight.double(), targets)
    loss = fused_linear_cross_entropy(hidden, weight, targets.to(dtype))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z_loss", [math.nan, math.inf])
def test_cross_entropy_refuses_a_non_finite_z_loss(z_loss):
    with pytest.raises(ValueError, match="z_loss must be a finite number"):
        fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(4, 8), torch.tensor([1, 2]), z_loss=z_loss)
