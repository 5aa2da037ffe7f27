"""Determinism and batch invariance of every op (the packed row of packed_ops.py).

- Deterministic mode (torch.use_deterministic_algorithms): five forward + backward runs of the
  packed row give bitwise identical outputs and gradients. GPU only: the Triton interpreter runs
  programs one after another, so on CPU the check could not fail.
- Batch invariance: each example's outputs, final state and gradients are the same whether it
  runs alone (its own doc ids, no cu_seqlens) or packed with the others. Bitwise for
  selective_scan and conv1d. SSD and cross-entropy differ by a few ulps (rtol 1e-6): the torch
  elementwise ops and matmuls around their kernels pick shape-dependent vector code paths.
  Attention tiles start at different offsets in the packed row: fp32 roundoff (rtol 1e-5).
"""
import pytest
import torch

from refrag_kernels import doc_attention, fused_linear_cross_entropy
from packed_ops import (
    CASES, attention_leaves, attention_packed, ce_leaves, ce_packed, ce_targets, conv_call, conv_leaves, conv_packed,
    forward_backward, packed_doc_ids, sequence_bounds, ss_call, ss_leaves, ss_packed, ssd_call, ssd_leaves,
    ssd_packed,
)

RUNS = 5


@pytest.fixture
def deterministic_mode():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_backward_is_bitwise_identical_over_five_runs(case, device, deterministic_mode):
    leaves = case.make_leaves(None, device)
    first_out, first_grads = forward_backward(case.packed, leaves, device)
    for run in range(1, RUNS):
        out, grads = forward_backward(case.packed, leaves, device)
        assert all(torch.equal(a, b) for a, b in zip(first_out, out)), f"run {run}: forward differs"
        for name in leaves:
            assert torch.equal(first_grads[name], grads[name]), f"run {run}: grad {name} differs"


# ----------------------------------------------------------------------------- each example alone


def example_doc_ids(start, end, device):
    return packed_doc_ids(device)[start:end]


def ssd_alone(t, i, start, end, device):
    y, final = ssd_call(t, start, end, t["h0"][i:i + 1], doc_ids=example_doc_ids(start, end, device),
                        doc_mode=True)
    return y, final[0]


def ss_alone(t, i, start, end, device):
    y, last = ss_call(t, start, end, t["h0"][i:i + 1])
    return y, last[0]


def conv_alone(t, i, start, end, device):
    return (conv_call(t, start, end, doc_ids=example_doc_ids(start, end, device)),)


def attention_alone(t, i, start, end, device):
    cut = lambda name: t[name][:, start:end]  # noqa: E731
    return (doc_attention(cut("q"), cut("k"), cut("v"), doc_ids=example_doc_ids(start, end, device)),)


def ce_alone(t, i, start, end, device):
    return (fused_linear_cross_entropy(t["hidden"][start:end], t["weight"], ce_targets(device)[start:end],
                                       reduction="none"),)


def ssd_packed_slices(out, i, start, end):
    return out[0][:, start:end], out[1][i]


def ss_packed_slices(out, i, start, end):
    return out[0][..., start:end], out[1][i]


def token_slice(axis):
    return lambda out, i, start, end: (out[0].narrow(axis, start, end - start),)


INVARIANCE = [
    pytest.param(ssd_leaves, ssd_packed(True), ssd_alone, ssd_packed_slices, 1e-6, id="ssd_scan-doc_mode"),
    pytest.param(ss_leaves, ss_packed, ss_alone, ss_packed_slices, 0.0, id="selective_scan"),
    pytest.param(conv_leaves, conv_packed(True), conv_alone, token_slice(1), 0.0, id="conv1d-docs"),
    pytest.param(attention_leaves, attention_packed, attention_alone, token_slice(1), 1e-5,
                 id="doc_attention"),
    pytest.param(ce_leaves, ce_packed, ce_alone, token_slice(0), 1e-6, id="cross_entropy"),
]


def assert_same(actual, expected, rtol: float, what: str):
    if rtol == 0.0:
        assert torch.equal(actual, expected), f"{what}: not bitwise identical"
    else:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("make_leaves, packed, alone, packed_slices, rtol", INVARIANCE)
def test_output_and_gradients_do_not_depend_on_packing(make_leaves, packed, alone, packed_slices, rtol,
                                                       device):
    leaves = make_leaves(None, device)
    packed_out = packed(leaves, device)
    for i, (start, end, _) in enumerate(sequence_bounds()):
        if end == start:
            continue
        own = alone(leaves, i, start, end, device)
        mine = packed_slices(packed_out, i, start, end)
        for j, (a, b) in enumerate(zip(mine, own)):
            assert_same(a.detach(), b.detach(), rtol, f"example {i} output {j}")
        # Gradients of this example's outputs only: packed and alone must give the same input grads.
        cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(device) for o in own]
        g_packed = torch.autograd.grad(mine, list(leaves.values()), cots, retain_graph=True, allow_unused=True)
        g_alone = torch.autograd.grad(own, list(leaves.values()), cots, allow_unused=True)
        for (name, leaf), gp, ga in zip(leaves.items(), g_packed, g_alone):
            gp = torch.zeros_like(leaf) if gp is None else gp
            ga = torch.zeros_like(leaf) if ga is None else ga
            assert_same(gp, ga, rtol, f"example {i} grad {name}")
