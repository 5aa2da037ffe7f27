"""mamba-ssm and causal-conv1d compatible functions built on refrag's Triton ops.

Drop-in replacements, same signatures and semantics, for the five functions the Mamba-2 family of
Hugging Face transformers (Mamba2, Bamba, FalconH1, GraniteMoeHybrid, NemotronH, Zamba2) calls:

=====================================  ===========================================================
``mamba_chunk_scan_combined``          ``mamba_ssm.ops.triton.ssd_combined`` -> ``ssd_scan``
``mamba_split_conv1d_scan_combined``   ``mamba_ssm.ops.triton.ssd_combined`` -> conv + scan + norm
``selective_state_update``             ``mamba_ssm.ops.triton.selective_state_update``
``causal_conv1d_fn``                   ``causal_conv1d`` (channel-first x (b, d, l))
``causal_conv1d_update``               ``causal_conv1d``
=====================================  ===========================================================

Packed rows. mamba-ssm keeps sequences apart with ``seq_idx`` (b, l) int32 (what
``DataCollatorWithFlattening(return_seq_idx=True)`` produces); ``cu_seqlens`` (mamba-ssm: only for
``return_varlen_states``) and the flash-attention kwargs ``cu_seq_lens_q`` (``return_flash_attn_kwargs
=True``) are accepted too when ``seq_idx`` is absent and the batch is one row. Our ops take
``cu_seqlens`` on one row, so the batch is flattened to (1, b*l) with a boundary at every row start and
every change of ``seq_idx``. Finding the changes reads the device once (``nonzero``): mamba-ssm masks
inside its kernels instead; for a sync-free path call our ops with a ``refrag_kernels.DocLayout``.

``initial_states`` (b, h, p, n) start the first sequence of each row (mamba-ssm's rule: the state is
reset wherever ``seq_idx`` changes); ``final_states`` are those of the last sequence of each row;
``return_varlen_states`` gives one final state per sequence.

Decode: ``selective_state_update`` takes mamba-ssm's per-(head, dim) layout, dt (b, h, p), A (h, p, n),
dt_bias and D (h, p). Every model of the family expands per-head values over p and n; the Triton step
runs when A, dt and dt_bias are constant over those axes (checked exactly), else a torch step does.
``causal_conv1d_update`` accepts transformers' conv state of any length >= width - 1.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from refrag_kernels.conv1d import causal_conv1d as _conv
from refrag_kernels.gated_rms_norm import gated_rms_norm
from refrag_kernels.ssd import ssd_scan
from refrag_kernels.state_update import causal_conv1d_update as _conv_update
from refrag_kernels.state_update import ssd_state_update

__all__ = ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "selective_state_update",
           "causal_conv1d_fn", "causal_conv1d_update"]

_ACTIVATIONS = (None, "silu", "swish")
_NO_LIMIT = (0.0, float("inf"))


# ----------------------------------------------------------------------------- packed rows


class _Rows:
    """How a (b, l) batch maps onto one flattened row of sequences.

    cu: (N+1,) int32 boundaries in the flattened row; first[r] / last[r]: index of row r's first /
    last sequence.
    """

    def __init__(self, cu: torch.Tensor, first: torch.Tensor, last: torch.Tensor):
        self.cu, self.first, self.last = cu, first, last

    @property
    def count(self) -> int:
        return self.cu.numel() - 1


def _rows(b: int, l: int, device: torch.device, seq_idx: Optional[torch.Tensor],
          cu_seqlens: Optional[torch.Tensor]) -> Optional[_Rows]:
    """Sequence boundaries of the flattened batch; None when each row is one sequence."""
    if seq_idx is not None:
        if seq_idx.shape != (b, l):
            raise ValueError(f"seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")
        change = torch.ones(b, l, dtype=torch.bool, device=device)
        change[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        starts = change.reshape(-1).nonzero().flatten()  # the one host read of a packed call
    elif cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens, device=device).flatten().to(torch.int64)
        if b != 1:
            raise ValueError(f"cu_seqlens needs batch 1 (a packed row), got batch {b}; pass seq_idx instead")
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != l or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to seqlen {l}, got {cu.tolist()}")
        starts = cu[:-1][cu[1:] > cu[:-1]]  # empty sequences hold no tokens
    else:
        return None
    cu = torch.cat([starts, torch.tensor([b * l], device=device)]).to(torch.int32)
    row_of_seq = starts // l
    rows = torch.arange(b, device=device)
    first = torch.searchsorted(row_of_seq, rows, right=False)
    last = torch.searchsorted(row_of_seq, rows, right=True) - 1
    return _Rows(cu, first, last)


def _packed_kwargs(kwargs: dict, seq_idx, cu_seqlens):
    """transformers passes flash-attention boundaries as cu_seq_lens_q for flattened batches."""
    if seq_idx is None and cu_seqlens is None and kwargs.get("cu_seq_lens_q") is not None:
        cu_seqlens = kwargs["cu_seq_lens_q"]
    return seq_idx, cu_seqlens


def _dt_after_limit(dt, dt_bias, dt_softplus, dt_limit):
    """mamba-ssm clamps dt after bias and softplus; our kernels fuse bias and softplus but not the
    clamp, so with a limit dt is finished here (a few elementwise ops) and passed on as is."""
    if tuple(dt_limit) == _NO_LIMIT:
        return dt, dt_bias, dt_softplus
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1]), None, False


# ----------------------------------------------------------------------------- chunked scan


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=_NO_LIMIT,
                              return_final_states=False, return_varlen_states=False, **kwargs):
    """mamba-ssm's ``mamba_chunk_scan_combined`` on ``refrag_kernels.ssd_scan``.

    x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n), D (h,) or (h, p), z (b, l, h, p),
    dt_bias (h,), initial_states (b, h, p, n), seq_idx (b, l) int32, cu_seqlens (N+1,).
    Returns out, then final_states (b, h, p, n) if asked, then varlen_states (N, h, p, n) if asked.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    if return_varlen_states and cu_seqlens is None and seq_idx is None:
        raise ValueError("return_varlen_states needs cu_seqlens (or seq_idx) to know the sequences")
    seq_idx, cu_seqlens = _packed_kwargs(kwargs, seq_idx, cu_seqlens)
    dt, dt_bias, dt_softplus = _dt_after_limit(dt, dt_bias, dt_softplus, dt_limit)
    rows = _rows(b, l, x.device, seq_idx, cu_seqlens)
    want_final = return_final_states or return_varlen_states
    if rows is None:
        result = ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                          initial_states=initial_states, return_final_states=want_final)
        out, final = result if want_final else (result, None)
        varlen = final
    else:
        init = None
        if initial_states is not None:
            init = initial_states.new_zeros(rows.count, h, p, n)
            init = init.index_copy(0, rows.first, initial_states)
        flat = lambda t: None if t is None else t.reshape(1, b * l, *t.shape[2:])  # noqa: E731
        result = ssd_scan(flat(x), flat(dt), A, flat(B), flat(C), chunk_size=chunk_size, D=D, z=flat(z),
                          dt_bias=dt_bias, dt_softplus=dt_softplus, initial_states=init, cu_seqlens=rows.cu,
                          return_final_states=want_final)
        out, varlen = result if want_final else (result, None)
        out = out.reshape(b, l, h, p)
        final = None if varlen is None else varlen.index_select(0, rows.last)
    outputs = [out]
    if return_final_states:
        outputs.append(final)
    if return_varlen_states:
        outputs.append(varlen)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


# ----------------------------------------------------------------------------- conv


def _check_activation(activation) -> Optional[str]:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return None if activation is None else "silu"


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None, **kwargs):
    """causal-conv1d's ``causal_conv1d_fn`` on ``refrag_kernels.causal_conv1d``.

    x (b, d, l) channel-first (usually a transposed view of (b, l, d): no copy then), weight (d, w),
    bias (d,), seq_idx (b, l) restarts the window per sequence, initial_states (b, d, w-1) continue a
    previous window (first sequence of each row), activation None / "silu" / "swish".
    Returns out (b, d, l), and final_states (b, d, w-1) (the last w-1 inputs) when asked.
    """
    act = _check_activation(activation)
    b, d, l = x.shape
    w = weight.shape[-1]
    seq_idx, cu_seqlens = _packed_kwargs(kwargs, seq_idx, None)
    xt = x.transpose(1, 2)  # (b, l, d)
    history = 0
    if initial_states is not None:
        if initial_states.shape != (b, d, w - 1):
            raise ValueError(f"initial_states must be (batch, dim, width - 1) = {(b, d, w - 1)}, "
                             f"got {tuple(initial_states.shape)}")
        # Continuing a window = prepending its inputs to the row's first sequence.
        xt = torch.cat([initial_states.transpose(1, 2).to(x.dtype), xt], dim=1)
        history = w - 1
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx[:, :1].expand(b, history), seq_idx], dim=1)
        if cu_seqlens is not None:
            cu_seqlens = torch.cat([cu_seqlens[:1], torch.as_tensor(cu_seqlens)[1:] + history])
    L = l + history
    rows = _rows(b, L, x.device, seq_idx, cu_seqlens)
    if rows is None and history == 0:
        y = _conv(xt, weight, bias, activation=act)
    else:
        cu = rows.cu if rows is not None else torch.arange(0, b * L + 1, L, device=x.device, dtype=torch.int32)
        y = _conv(xt.reshape(1, b * L, d), weight, bias, cu_seqlens=cu, activation=act).reshape(b, L, d)
    out = y[:, history:].transpose(1, 2)
    if not return_final_states:
        return out
    final = F.pad(xt, (0, 0, max(0, w - 1 - L), 0))[:, -(w - 1):].transpose(1, 2)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, **kwargs):
    """causal-conv1d's ``causal_conv1d_update`` on ``refrag_kernels.causal_conv1d_update``.

    x (b, d) or (b, d, 1); conv_state (b, d, s) with s >= w - 1, updated in place (shifted left, x
    appended); weight (d, w). Returns out shaped like x.
    """
    act = _check_activation(activation)
    if cache_seqlens is not None or conv_state_indices is not None:
        raise NotImplementedError("causal_conv1d_update: cache_seqlens / conv_state_indices (circular and "
                                  "indexed conv states) are not supported")
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    if x3.shape[-1] != 1:
        raise NotImplementedError(f"causal_conv1d_update: one token per call, got {x3.shape[-1]}")
    w = weight.shape[-1]
    s = conv_state.shape[-1]
    if s < w - 1:
        raise ValueError(f"conv_state holds {s} inputs, the width-{w} window needs {w - 1}")
    token = x3[..., 0]
    if s == w - 1:
        y = _conv_update(conv_state, token, weight, bias, activation=act)
    else:
        # transformers keeps `w` inputs; the kernel shifts the last w-1 of a scratch copy.
        window = conv_state[..., s - (w - 1):].clone()
        y = _conv_update(window, token, weight, bias, activation=act)
        conv_state.copy_(torch.cat([conv_state[..., 1:], token.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
    return y.unsqueeze(-1) if not squeeze else y


# ----------------------------------------------------------------------------- decode step


def _per_head(t: Optional[torch.Tensor], name: str, axes: Sequence[int]):
    """t reduced over `axes` when constant along them (exactly), else None."""
    if t is None:
        return None
    first = t
    for axis in sorted(axes, reverse=True):
        first = first.select(axis, 0)
    expanded = first
    for axis in sorted(axes):
        expanded = expanded.unsqueeze(axis)
    return first if torch.equal(t, expanded.expand_as(t)) else None


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, **kwargs):
    """mamba-ssm's ``selective_state_update`` (Mamba-2 layout with heads).

    state (b, h, p, n) updated in place; x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias
    (h, p). Returns out (b, h, p). The Triton step runs when A, dt and dt_bias are per-head values
    (constant over p and n, as every transformers model passes them); otherwise a torch step does.
    """
    if state_batch_indices is not None:
        raise NotImplementedError("selective_state_update: state_batch_indices is not supported")
    if state.dim() != 4 or x.dim() != 3:
        raise ValueError("selective_state_update here takes the Mamba-2 layout: state (b, h, p, n), x (b, h, p)")
    A_h = _per_head(A, "A", (1, 2)) if A.dim() == 3 else (A if A.dim() == 1 else None)
    dt_h = _per_head(dt, "dt", (2,)) if dt.dim() == 3 else dt
    bias_h = None if dt_bias is None else (_per_head(dt_bias, "dt_bias", (1,)) if dt_bias.dim() == 2 else dt_bias)
    tied = A_h is not None and dt_h is not None and (dt_bias is None or bias_h is not None)
    if tied:
        return ssd_state_update(state, x, dt_h, A_h, B, C, D=D, z=z, dt_bias=bias_h, dt_softplus=dt_softplus)
    # General (untied) parameters: the recurrence in torch, fp32.
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dtf = dt.float() if dt.dim() == 3 else dt.float()[..., None].expand(b, h, p)
    if dt_bias is not None:
        dtf = dtf + (dt_bias.float() if dt_bias.dim() == 2 else dt_bias.float()[:, None])
    if dt_softplus:
        dtf = F.softplus(dtf)
    Af = A.float() if A.dim() == 3 else A.float()[:, None, None].expand(h, p, n)
    Bh = B.float().repeat_interleave(h // g, dim=1)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    new = state.float() * torch.exp(dtf[..., None] * Af) + (dtf * x.float())[..., None] * Bh[:, :, None, :]
    state.copy_(new.to(state.dtype))
    out = (new * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.float() * (D.float() if D.dim() == 2 else D.float()[:, None])
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- fused block


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=_NO_LIMIT, return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                     outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True, **kwargs):
    """mamba-ssm's ``mamba_split_conv1d_scan_combined``: split the in-projection, causal conv + SiLU on
    xBC, SSD scan (dt_bias, softplus, dt_limit, D), then either the z gate (no rmsnorm_weight) or the
    gated RMSNorm over groups of dim / ngroups (``norm_before_gate``: norm(y) * silu(z), else
    norm(y * silu(z))), then the optional out-projection.

    zxbcdt (b, l, 2*d_nonssm + 2*dim + 2*ngroups*dstate + nheads); conv1d_weight (dim + 2*ngroups*dstate, w);
    D (nheads,) with headdim, or (nheads, headdim). Returns out (and final_states if asked).
    """
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is needed when D is (nheads,)")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    b, l, width = zxbcdt.shape
    dim = nheads * headdim
    if nheads % ngroups:
        raise ValueError(f"nheads {nheads} must be a multiple of ngroups {ngroups}")
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (width - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0 or width != 2 * d_nonssm + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt's last dim {width} does not match dim {dim}, ngroups {ngroups}, dstate {dstate}, "
                         f"nheads {nheads}")
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation,
                           **kwargs).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = x.unflatten(-1, (nheads, headdim))
    B, C = B.unflatten(-1, (ngroups, dstate)), C.unflatten(-1, (ngroups, dstate))
    zh = z.unflatten(-1, (nheads, headdim))
    result = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=zh if rmsnorm_weight is None else None,
                                       dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
                                       dt_softplus=True, dt_limit=dt_limit, return_final_states=return_final_states,
                                       **kwargs)
    y, final = result if return_final_states else (result, None)
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        if norm_before_gate:
            y = gated_rms_norm(y, None, rmsnorm_weight, rmsnorm_eps, dim // ngroups) * F.silu(z.float()).to(y.dtype)
        else:
            y = gated_rms_norm(y, z, rmsnorm_weight, rmsnorm_eps, dim // ngroups)
    if d_nonssm > 0:
        gate, up = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(gate) * up, y], dim=-1)
    if outproj_weight is not None:
        if torch.is_autocast_enabled(y.device.type):
            dtype = torch.get_autocast_dtype(y.device.type)
            y, outproj_weight = y.to(dtype), outproj_weight.to(dtype)
            outproj_bias = None if outproj_bias is None else outproj_bias.to(dtype)
        y = F.linear(y, outproj_weight, outproj_bias)
    elif outproj_bias is not None:
        raise ValueError("outproj_bias without outproj_weight")
    return (y, final) if return_final_states else y
