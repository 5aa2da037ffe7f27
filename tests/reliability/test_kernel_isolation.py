"""Issue 23: kernels keep bad values inside their example and refuse aliasing outputs.

Non-finite values in one packed example or document of `doc_attention` never reach another one,
in the kernel or in its reference, forward and backward (item 7); in-place decode ops refuse a
state whose memory overlaps itself (item 8); cross-entropy takes every integer target dtype
(item 11). On CPU the Triton kernels run in the interpreter, fp32.
"""
import pytest
import torch

from kernels import causal_conv1d_update, doc_attention, fused_linear_cross_entropy, reference, ssd_state_update

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
