"""Varlen equals loop: every op on one packed row equals a loop over its sequences and documents
(the row and the loops are described in packed_ops.py).

Forward outputs, final states and every input gradient (same random cotangents) must agree
to fp32 roundoff. Padding must come out zero and finite, and refilling it with garbage must
leave every real output and gradient bitwise unchanged.
"""
import pytest
import torch

from packed_ops import CASES, assert_close, forward_backward, padding_part, real_part


@pytest.mark.parametrize("case", CASES)
def test_packed_row_equals_loop_over_sequences_and_documents(case, device):
    """Forward, final states and every gradient of the packed call equal the per-piece loop."""
    leaves = case.make_leaves(None, device)
    packed_out, packed_grads = forward_backward(case.packed, leaves, device)
    loop_out, loop_grads = forward_backward(case.looped, leaves, device)
    for i, (p, q, axis) in enumerate(zip(packed_out, loop_out, case.out_axes)):
        assert_close(real_part(p, axis), real_part(q, axis), f"output {i}")
    for name, axis in case.token_axes.items():
        assert_close(real_part(packed_grads[name], axis), real_part(loop_grads[name], axis), f"grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_padding_is_zero_finite_and_never_leaks(case, device):
    """Padding outputs and padding gradients are zero; garbage in the padding changes no real
    output and no gradient of a real token or parameter (bitwise)."""
    clean_out, clean_grads = forward_backward(case.packed, case.make_leaves(None, device), device)
    dirty_out, dirty_grads = forward_backward(case.packed, case.make_leaves(7, device), device)
    for i, (clean, dirty, axis) in enumerate(zip(clean_out, dirty_out, case.out_axes)):
        assert torch.equal(real_part(clean, axis), real_part(dirty, axis)), f"output {i}: padding leaked"
        if axis is not None:
            assert torch.count_nonzero(padding_part(dirty, axis)) == 0, f"output {i}: padding output not zero"
    for name, axis in case.token_axes.items():
        clean, dirty = clean_grads[name], dirty_grads[name]
        assert torch.equal(real_part(clean, axis), real_part(dirty, axis)), f"grad {name}: padding leaked"
        if axis is not None:
            assert torch.count_nonzero(padding_part(dirty, axis)) == 0, f"grad {name}: padding grad not zero"
