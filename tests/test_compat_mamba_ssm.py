"""refrag_kernels.compat.mamba_ssm against refrag_kernels.reference (per sequence) and transformers' torch
fallbacks: packing by seq_idx, initial/final/varlen states, dt_limit, conv windows and decode."""
import pytest
import torch
import torch.nn.functional as F

from refrag_kernels import reference
from refrag_kernels.compat import mamba_ssm as ms


def _scan_inputs(b=2, l=40, h=4, p=16, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h) * 0.5, A=-torch.rand(h, generator=gen) - 0.5, B=r(b, l, g, n),
                C=r(b, l, g, n), D=r(h), z=r(b, l, h, p), dt_bias=r(h) * 0.1)


def test_chunk_scan_with_seq_idx_equals_each_sequence_alone():
    t = _scan_inputs()
    b, l = t["x"].shape[:2]
    seq_idx = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5, [0] * 40], dtype=torch.int32)
    init = torch.randn(b, 4, 16, 16)
    out, final, varlen = ms.mamba_chunk_scan_combined(
        t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=init,
        seq_idx=seq_idx, dt_softplus=True, dt_limit=(0.0, 0.8), return_final_states=True, return_varlen_states=True)
    dt_full = F.softplus(t["dt"] + t["dt_bias"]).clamp(0.0, 0.8)
    pieces = [(0, 0, 10), (0, 10, 35), (0, 35, 40), (1, 0, 40)]
    assert varlen.shape[0] == len(pieces)
    for i, (row, s, e) in enumerate(pieces):
        sl = lambda v: v[row:row + 1, s:e]  # noqa: E731
        h0 = init[row:row + 1] if s == 0 else None
        y, fin = reference.ssd_scan(sl(t["x"]), sl(dt_full), t["A"], sl(t["B"]), sl(t["C"]), chunk_size=16, D=t["D"],
                                    z=sl(t["z"]), initial_states=h0, return_final_states=True)
        torch.testing.assert_close(out[row:row + 1, s:e], y, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(varlen[i], fin[0], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(final, varlen[[2, 3]])


def test_chunk_scan_return_conventions_and_errors():
    t = _scan_inputs(b=1)
    out = ms.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16)
    assert torch.is_tensor(out) and out.shape == t["x"].shape
    cu = torch.tensor([0, 7, 40], dtype=torch.int32)
    out2, varlen = ms.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, cu_seqlens=cu,
                                                return_varlen_states=True)
    assert varlen.shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="return_varlen_states needs cu_seqlens"):
        ms.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, return_varlen_states=True)
    with pytest.raises(ValueError, match="seq_idx must be"):
        ms.mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 16,
                                     seq_idx=torch.zeros(2, 40, dtype=torch.int32))


def _conv_reference(x_bld, weight, bias, starts, silu):
    """Per-sequence conv of (b, l, d) rows restarted at `starts` (row, position) pairs."""
    out = torch.empty_like(x_bld)
    b, l, _ = x_bld.shape
    for row in range(b):
        cuts = sorted({s for r, s in starts if r == row} | {0, l})
        for s, e in zip(cuts[:-1], cuts[1:]):
            out[row, s:e] = reference.causal_conv1d(x_bld[row:row + 1, s:e], weight, bias,
                                                    activation="silu" if silu else None)[0]
    return out


@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_conv_fn_channel_first_with_seq_idx(activation):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 12, generator=gen)
    weight, bias = torch.randn(12, 4, generator=gen), torch.randn(12, generator=gen)
    seq_idx = torch.tensor([[0] * 9 + [1] * 21, [3] * 30], dtype=torch.int32)
    out = ms.causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx, activation=activation)
    assert out.shape == (2, 12, 30)
    expected = _conv_reference(x, weight, bias, [(0, 9)], activation is not None)
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        ms.causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="relu")


def test_conv_fn_initial_and_final_states_continue_a_window():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 20, 8, generator=gen)
    weight = torch.randn(8, 4, generator=gen)
    whole = ms.causal_conv1d_fn(x.transpose(1, 2), weight, None, activation="silu")
    first, state = ms.causal_conv1d_fn(x[:, :13].transpose(1, 2), weight, None, activation="silu",
                                       return_final_states=True)
    second = ms.causal_conv1d_fn(x[:, 13:].transpose(1, 2), weight, None, initial_states=state, activation="silu")
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole, atol=1e-5, rtol=1e-5)


def _hf_originals():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.mamba2 import modeling_mamba2 as m

    from refrag_kernels.compat import disable_for_transformers
    disable_for_transformers()
    return m


@pytest.mark.parametrize("state_len", [3, 4])
def test_conv_update_matches_transformers(state_len):
    m = _hf_originals()
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    state = torch.randn(2, 8, state_len, generator=gen)
    ours_state, ref_state = state.clone(), state.clone()
    for _ in range(3):
        x = torch.randn(2, 8, 1, generator=gen)
        y = ms.causal_conv1d_update(x, ours_state, weight, bias, activation="silu")
        if state_len == 4:  # transformers' own update keeps `width` inputs
            y_ref = m.causal_conv1d_update(x, ref_state, weight, bias, activation="silu")
            torch.testing.assert_close(ref_state, ours_state)
        else:
            window = torch.cat([ref_state, x], dim=-1)
            y_ref = F.silu((window * weight).sum(-1, keepdim=True) + bias[:, None])
            ref_state.copy_(window[..., 1:])
            torch.testing.assert_close(ours_state, ref_state)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_selective_state_update_matches_transformers(tied):
    m = _hf_originals()
    gen = torch.Generator().manual_seed(4)
    b, h, p, n, g = 2, 4, 16, 8, 2
    state = torch.randn(b, h, p, n, generator=gen)
    x, z = torch.randn(b, h, p, generator=gen), torch.randn(b, h, p, generator=gen)
    B, C = torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    if tied:  # how every transformers model passes them: per-head values expanded
        dt = torch.randn(b, h, 1, generator=gen).expand(b, h, p)
        A = -torch.rand(h, 1, 1, generator=gen).expand(h, p, n)
        dt_bias = torch.randn(h, 1, generator=gen).expand(h, p)
    else:
        dt, A, dt_bias = torch.randn(b, h, p, generator=gen), -torch.rand(h, p, n, generator=gen), torch.randn(h, p)
    D = torch.randn(h, p, generator=gen)
    ours_state, ref_state = state.clone(), state.clone()
    y = ms.selective_state_update(ours_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
    if tied:
        y_ref = m.mamba2_selective_state_update(ref_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
    else:  # transformers' torch step ties A per head; the general recurrence, written out
        dtf = F.softplus(dt + dt_bias)
        ref_state = state * torch.exp(dtf[..., None] * A) + (dtf * x)[..., None] * B.repeat_interleave(2, 1)[:, :, None]
        y_ref = ((ref_state * C.repeat_interleave(2, 1)[:, :, None]).sum(-1) + x * D) * F.silu(z)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_state, ref_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_split_conv_scan_equals_its_composition(norm_before_gate):
    gen = torch.Generator().manual_seed(5)
    b, l, h, p, g, n, w, out_dim = 1, 24, 4, 16, 2, 8, 4, 10
    dim = h * p
    zxbcdt = torch.randn(b, l, 2 * dim + 2 * g * n + h, generator=gen, requires_grad=True)
    conv_w, conv_b = torch.randn(dim + 2 * g * n, w, generator=gen), torch.randn(dim + 2 * g * n, generator=gen)
    dt_bias, A, D = torch.randn(h, generator=gen) * 0.1, -torch.rand(h, generator=gen) - 0.5, torch.randn(h)
    norm_w, out_w = torch.rand(dim, generator=gen) + 0.5, torch.randn(out_dim, dim, generator=gen) * 0.1
    seq_idx = torch.tensor([[0] * 9 + [1] * 15], dtype=torch.int32)
    out = ms.mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, 16, seq_idx=seq_idx,
                                              rmsnorm_weight=norm_w, rmsnorm_eps=1e-6, outproj_weight=out_w,
                                              headdim=p, ngroups=g, norm_before_gate=norm_before_gate)
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * g * n, h], dim=-1)
    xBC = _conv_reference(xBC, conv_w, conv_b, [(0, 9)], True)
    x, Bm, Cm = torch.split(xBC, [dim, g * n, g * n], dim=-1)
    ys = []
    for s, e in ((0, 9), (9, 24)):
        ys.append(reference.ssd_scan(x[:, s:e].unflatten(-1, (h, p)), dt[:, s:e], A, Bm[:, s:e].unflatten(-1, (g, n)),
                                     Cm[:, s:e].unflatten(-1, (g, n)), chunk_size=16, D=D, dt_bias=dt_bias,
                                     dt_softplus=True))
    y = torch.cat(ys, dim=1).flatten(-2)
    if norm_before_gate:
        y = reference.gated_rms_norm(y, None, norm_w, 1e-6, dim // g) * F.silu(z)
    else:
        y = reference.gated_rms_norm(y, z, norm_w, 1e-6, dim // g)
    expected = F.linear(y, out_w)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
    grad, = torch.autograd.grad(out.square().sum(), zxbcdt)
    expected_grad, = torch.autograd.grad(expected.square().sum(), zxbcdt)
    torch.testing.assert_close(grad, expected_grad, atol=5e-4, rtol=5e-4)
