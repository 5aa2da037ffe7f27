"""Pure-PyTorch oracles for every op in `kernels` (slow, obviously correct, autograd).

Signatures follow the public kernel API (docs/architecture.md). Everything is computed in fp32 (fp64 when the
inputs are fp64) and cast back to the input dtype. Packed rows use the varlen
convention: batch 1 plus `cu_seqlens` (N+1,); tokens past `cu_seqlens[-1]` are
padding and produce zeros.

Doc-mode semantics (docs/architecture.md "Packed documents"): inside a retrieval block (a maximal
run of tokens with doc_id > 0 inside one sequence) each document token is computed
from the state entering the block plus its own document only; the state carried
past the block is the ordinary recurrence over every document, which equals the
composition of per-document states
``h = P h0 + sum_i (prod_{j>i} D_j) (s_i - D_i h0)``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- helpers


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sequence_bounds(cu_seqlens: Optional[torch.Tensor], batch: int, length: int) -> List[List[Tuple[int, int]]]:
    """Per batch row, the (start, end) token ranges of its sequences."""
    if cu_seqlens is None:
        return [[(0, length)] for _ in range(batch)]
    cu = cu_seqlens.tolist()
    return [list(zip(cu[:-1], cu[1:]))]


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(L,) int64 sequence index of each token; -1 for padding past cu_seqlens[-1]."""
    pos = torch.arange(length, device=cu_seqlens.device)
    idx = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    return torch.where(pos < cu_seqlens[-1], idx, torch.full_like(idx, -1))


def segments(doc_row: Optional[List[int]], start: int, end: int) -> List[Tuple[int, int, int]]:
    """Split [start, end) into maximal runs of equal doc id: (run_start, run_end, doc_id)."""
    if doc_row is None or start == end:
        return [(start, end, 0)] if start < end else []
    runs, run_start = [], start
    for t in range(start + 1, end + 1):
        if t == end or doc_row[t] != doc_row[run_start]:
            runs.append((run_start, t, doc_row[run_start]))
            run_start = t
    return runs


def live_tokens(cu_seqlens: Optional[torch.Tensor], batch: int, length: int, device=None) -> torch.Tensor:
    """(b, l) bool: True for tokens inside a sequence, False for padding past cu_seqlens[-1]."""
    live = torch.ones(batch, length, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        live[:, int(cu_seqlens[-1]):] = False
    return live


def _expand_groups(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Repeat grouped B/C along `dim` so that head h uses group h // (heads // g)."""
    groups = t.shape[dim]
    if heads % groups:
        raise ValueError(f"number of heads {heads} must be a multiple of the number of groups {groups}")
    return t if heads == groups else t.repeat_interleave(heads // groups, dim=dim)


def _prepare_dt(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool) -> torch.Tensor:
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _skip_term(x: torch.Tensor, D: Optional[torch.Tensor]) -> torch.Tensor:
    """D * x with D of shape (h,) or (h, p); x (..., h, p)."""
    if D is None:
        return torch.zeros_like(x)
    return x * (D[:, None] if D.dim() == 1 else D).to(x.dtype)


# ----------------------------------------------------------------------------- SSD (Mamba-2)


def _ssd_inputs(x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    cdt = _compute_dtype(x)
    h = x.shape[2]
    dt = _prepare_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus)
    B = _expand_groups(B.to(cdt), h, 2)
    C = _expand_groups(C.to(cdt), h, 2)
    D = None if D is None else D.to(cdt)
    z = None if z is None else z.to(cdt)
    return x.to(cdt), dt, A.to(cdt), B, C, D, z


def _ssd_output(y, x, D, z, out_dtype, live):
    """y + D x, gated by silu(z); zero where live (b, l) is False (padding; None: no padding)."""
    if D is not None:
        y = y + _skip_term(x, D)
    if z is not None:
        y = y * F.silu(z)
    if live is not None:
        y = torch.where(live[:, :, None, None], y, torch.zeros_like(y))
    return y.to(out_dtype)


def _initial_state(initial_states, row: int, seq: int, shape, cdt, device, varlen: bool):
    if initial_states is None:
        return torch.zeros(shape, dtype=cdt, device=device)
    return initial_states[seq if varlen else row].to(cdt)


def ssd_scan_sequential(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                        initial_states=None, cu_seqlens=None, doc_ids=None, doc_mode=False,
                        return_final_states=False):
    """Token-by-token SSD recurrence (the ground truth). Same signature as `ssd_scan`.

    x (b,l,h,p) dt (b,l,h) A (h,) B,C (b,l,g,n); returns y (b,l,h,p) [, final (N|b,h,p,n) fp32].
    In doc_mode a document token reads a second state that restarts from the block-entry
    state at each document start, while the carried state runs over every token.
    """
    out_dtype = x.dtype
    x, dt, A, B, C, D, z = _ssd_inputs(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    b, l, h, p = x.shape
    n = B.shape[-1]
    varlen = cu_seqlens is not None
    zero_row = torch.zeros(h, p, dtype=x.dtype, device=x.device)
    rows, finals = [], []
    for row, bounds in enumerate(sequence_bounds(cu_seqlens, b, l)):
        docs = doc_ids.reshape(b, l)[row].tolist() if (doc_mode and doc_ids is not None) else None
        ys = [zero_row] * l
        for seq, (s, e) in enumerate(bounds):
            state = _initial_state(initial_states, row, seq, (h, p, n), x.dtype, x.device, varlen)
            entry_state = doc_state = None
            prev_doc = 0
            for t in range(s, e):
                doc = docs[t] if docs is not None else 0
                decay = torch.exp(dt[row, t] * A)[:, None, None]
                inject = (dt[row, t][:, None] * x[row, t])[:, :, None] * B[row, t][:, None, :]
                if doc:
                    if prev_doc == 0:
                        entry_state = state
                    if doc != prev_doc:
                        doc_state = entry_state
                    doc_state = decay * doc_state + inject
                state = decay * state + inject
                read = doc_state if doc else state
                ys[t] = torch.einsum("hpn,hn->hp", read, C[row, t])
                prev_doc = doc
            finals.append(state)
        rows.append(torch.stack(ys) if ys else x.new_zeros(0, h, p))
    y = _ssd_output(torch.stack(rows), x, D, z, out_dtype, live_tokens(cu_seqlens, b, l, x.device))
    if not return_final_states:
        return y
    return y, torch.stack(finals).float() if x.dtype != torch.float64 else torch.stack(finals)


def _ssd_chunked_segment(x, dt, A, B, C, h0, chunk_size: int):
    """Chunked (quadratic-within-chunk) SSD over one segment that starts from state h0.

    x (T,h,p) dt (T,h) A (h,) B,C (T,h,n) h0 (h,p,n). Returns y (T,h,p) without the
    D/z terms, the final state (h,p,n) and the segment's total log-decay sum(dt*A) (h,).
    """
    T, h, p = x.shape
    n = B.shape[-1]
    pad = (-T) % chunk_size
    if pad:  # zero dt pads are identity steps: decay 1, nothing injected
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (x, dt, B, C))
    nc, Q = (T + pad) // chunk_size, chunk_size
    xc, dtc = x.reshape(nc, Q, h, p), dt.reshape(nc, Q, h)
    Bc, Cc = B.reshape(nc, Q, h, n), C.reshape(nc, Q, h, n)
    cs = (dtc * A).cumsum(1)  # (nc, Q, h) log-decay from the chunk start
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (cs[:, :, None, :] - cs[:, None, :, :]).masked_fill(~causal[None, :, :, None], -math.inf)
    scores = torch.einsum("cthn,cshn->ctsh", Cc, Bc) * torch.exp(seg)
    y_diag = torch.einsum("ctsh,csh,cshp->cthp", scores, dtc, xc)
    decay_to_end = torch.exp(cs[:, -1:, :] - cs)
    chunk_states = torch.einsum("cshn,csh,cshp->chpn", Bc, decay_to_end * dtc, xc)
    entering, state = [], h0
    for c in range(nc):
        entering.append(state)
        state = torch.exp(cs[c, -1])[:, None, None] * state + chunk_states[c]
    y_off = torch.einsum("cthn,chpn,cth->cthp", Cc, torch.stack(entering), torch.exp(cs))
    y = (y_diag + y_off).reshape(nc * Q, h, p)[:T]
    return y, state, cs[:, -1].sum(0)


def ssd_scan(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_states=None, cu_seqlens=None, doc_ids=None, doc_mode=False,
             return_final_states=False):
    """Chunked SSD oracle with the public `refrag_kernels.ssd_scan` signature (see docs/architecture.md).

    x (b,l,h,p) dt (b,l,h) A (h,) B,C (b,l,g,n); D (h,)|(h,p); z (b,l,h,p).
    cu_seqlens (N+1,) with b == 1; initial_states / final (N|b, h, p, n).
    doc_mode: documents run from the block-entry state; the carried state is built
    from per-document final states and total decays with the composition formula.
    """
    out_dtype = x.dtype
    x, dt, A, B, C, D, z = _ssd_inputs(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    b, l, h, p = x.shape
    n = B.shape[-1]
    varlen = cu_seqlens is not None
    rows, finals = [], []
    for row, bounds in enumerate(sequence_bounds(cu_seqlens, b, l)):
        docs = doc_ids.reshape(b, l)[row].tolist() if (doc_mode and doc_ids is not None) else None
        pieces, covered = [], 0
        for seq, (s, e) in enumerate(bounds):
            pieces.append(x.new_zeros(s - covered, h, p))
            state = _initial_state(initial_states, row, seq, (h, p, n), x.dtype, x.device, varlen)
            entry_state, prev_doc = None, 0
            for rs, re_, doc in segments(docs, s, e):
                args = (x[row, rs:re_], dt[row, rs:re_], A, B[row, rs:re_], C[row, rs:re_])
                if doc == 0:
                    y_run, state, _ = _ssd_chunked_segment(*args, state, chunk_size)
                else:
                    if prev_doc == 0:
                        entry_state = state
                    y_run, doc_final, log_decay = _ssd_chunked_segment(*args, entry_state, chunk_size)
                    total_decay = torch.exp(log_decay)[:, None, None]
                    state = total_decay * state + (doc_final - total_decay * entry_state)
                pieces.append(y_run)
                prev_doc = doc
            finals.append(state)
            covered = e
        pieces.append(x.new_zeros(l - covered, h, p))
        rows.append(torch.cat(pieces))
    y = _ssd_output(torch.stack(rows), x, D, z, out_dtype, live_tokens(cu_seqlens, b, l, x.device))
    if not return_final_states:
        return y
    return y, torch.stack(finals).float() if x.dtype != torch.float64 else torch.stack(finals)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the SSD recurrence; `state` (b,h,p,n) is updated in place.

    x (b,h,p) dt (b,h) A (h,) B,C (b,g,n) D (h,)|(h,p) z (b,h,p). Returns y (b,h,p).
    """
    out_dtype = x.dtype
    cdt = state.dtype
    h = x.shape[1]
    dt = _prepare_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus)
    B, C = _expand_groups(B.to(cdt), h, 1), _expand_groups(C.to(cdt), h, 1)
    xf = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))[:, :, None, None]
    state.mul_(decay).add_((dt[:, :, None] * xf)[:, :, :, None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    y = y + _skip_term(xf, None if D is None else D.to(cdt))
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(out_dtype)


# ----------------------------------------------------------------------------- gated RMSNorm


def gated_rms_norm(y, z, weight, eps=1e-5, group_size=None):
    """rmsnorm(y * silu(z)) * weight over groups of `group_size` channels of the last dim
    (all of it when None); z None gives a plain RMSNorm. Returns y's dtype."""
    cdt = _compute_dtype(y)
    gated = y.to(cdt) if z is None else y.to(cdt) * F.silu(z.to(cdt))
    n = gated.shape[-1]
    size = n if group_size is None else group_size
    groups = gated.reshape(*gated.shape[:-1], n // size, size)
    normed = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)
    return (normed.reshape(gated.shape) * weight.to(cdt)).to(y.dtype)


# ----------------------------------------------------------------------------- Mamba-1 selective scan


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   cu_seqlens=None, initial_state=None, return_last_state=False):
    """Sequential Mamba-1 selective scan oracle.

    u, delta, z (b,d,l); A (d,n); B, C (b,n,l) or (b,g,n,l); D, delta_bias (d,).
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ; y_t = <h_t, C_t> + D u_t ; y *= silu(z).
    cu_seqlens (N+1,) with b == 1 restarts the state per sequence; initial_state and
    the last state are (N|b, d, n).
    """
    out_dtype = u.dtype
    cdt = _compute_dtype(u)
    b, d, l = u.shape
    u, A = u.to(cdt), A.to(cdt)
    delta = _prepare_dt(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt)[:, None], delta_softplus)
    B = B.to(cdt) if B.dim() == 4 else B.to(cdt).unsqueeze(1)
    C = C.to(cdt) if C.dim() == 4 else C.to(cdt).unsqueeze(1)
    B, C = _expand_groups(B, d, 1), _expand_groups(C, d, 1)
    varlen = cu_seqlens is not None
    zero = u.new_zeros(d)
    rows, lasts = [], []
    for row, bounds in enumerate(sequence_bounds(cu_seqlens, b, l)):
        ys = [zero] * l
        for seq, (s, e) in enumerate(bounds):
            state = _initial_state(initial_state, row, seq, (d, A.shape[1]), cdt, u.device, varlen)
            for t in range(s, e):
                state = torch.exp(delta[row, :, t, None] * A) * state \
                    + (delta[row, :, t] * u[row, :, t])[:, None] * B[row, :, :, t]
                ys[t] = (state * C[row, :, :, t]).sum(-1)
            lasts.append(state)
        rows.append(torch.stack(ys, dim=-1) if ys else u.new_zeros(d, 0))
    y = torch.stack(rows)
    if D is not None:
        y = y + D.to(cdt)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = torch.where(live_tokens(cu_seqlens, b, l, u.device)[:, None, :], y, torch.zeros_like(y)).to(out_dtype)
    if not return_last_state:
        return y
    return y, torch.stack(lasts).float() if cdt != torch.float64 else torch.stack(lasts)


# ----------------------------------------------------------------------------- causal depthwise conv1d


def conv_window_starts(batch: int, length: int, cu_seqlens=None, doc_ids=None, device=None) -> torch.Tensor:
    """(b, l) int64 index of the first token each token's conv window may read.

    The window restarts at every sequence start and, for document tokens (doc_id > 0),
    at the start of their document. Padding tokens past cu_seqlens[-1] get l (empty window).
    """
    pos = torch.arange(length, device=device).expand(batch, length)
    is_start = torch.zeros(batch, length, dtype=torch.bool, device=device)
    is_start[:, :1] = True  # a zero-length row has no token 0
    if cu_seqlens is not None:
        starts = cu_seqlens[:-1].to(torch.int64)
        is_start[:, starts[starts < length]] = True
    seq_start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    if doc_ids is None:
        window = seq_start
    else:
        docs = doc_ids.reshape(batch, length).to(device)
        doc_change = is_start.clone()
        doc_change[:, 1:] |= docs[:, 1:] != docs[:, :-1]
        run_start = torch.where(doc_change, pos, torch.zeros_like(pos)).cummax(dim=1).values
        window = torch.where(docs > 0, run_start, seq_start)
    if cu_seqlens is not None:
        window = torch.where(pos < int(cu_seqlens[-1]), window, torch.full_like(window, length))
    return window


def causal_conv1d(x, weight, bias=None, cu_seqlens=None, doc_ids=None, activation="silu"):
    """Causal depthwise conv1d oracle: x (b,l,d), weight (d,w), bias (d,) -> (b,l,d).

    y_t = act(bias + sum_k weight[:, w-1-k] * x_{t-k}) over k with t-k inside the
    token's window (see `conv_window_starts`); padding tokens give 0.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    out_dtype = x.dtype
    cdt = _compute_dtype(x)
    b, l, d = x.shape
    w = weight.shape[1]
    xf, wf = x.to(cdt), weight.to(cdt)
    start = conv_window_starts(b, l, cu_seqlens, doc_ids, x.device)
    pos = torch.arange(l, device=x.device)
    y = torch.zeros_like(xf)
    for k in range(w):
        shifted = F.pad(xf, (0, 0, k, 0))[:, :l]
        valid = ((pos - k) >= start).unsqueeze(-1)
        y = y + torch.where(valid, shifted, torch.zeros_like(shifted)) * wf[:, w - 1 - k]
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = F.silu(y)
    live = (start < l).unsqueeze(-1)
    return torch.where(live, y, torch.zeros_like(y)).to(out_dtype)


def causal_conv1d_update(conv_state, x, weight, bias=None, activation="silu"):
    """One decode step of causal_conv1d; `conv_state` (b,d,w-1) holds the last w-1 inputs
    (oldest first) and is updated in place. x (b,d) -> y (b,d)."""
    cdt = conv_state.dtype
    window = torch.cat([conv_state, x.to(cdt).unsqueeze(-1)], dim=-1)  # (b, d, w)
    y = (window * weight.to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = F.silu(y)
    conv_state.copy_(window[:, :, 1:])
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- doc-boundary attention


def doc_attention_mask(length: int, cu_seqlens=None, doc_ids=None, causal=True, device=None) -> torch.Tensor:
    """(L, L) bool: query i sees key j iff same example, (j <= i if causal), and
    (doc_i == 0 or doc_j == 0 or doc_i == doc_j). Padding tokens see nothing. O(L^2): tests only."""
    if cu_seqlens is None:
        seq = torch.zeros(length, dtype=torch.int64, device=device)
    else:
        seq = seq_idx_from_cu_seqlens(cu_seqlens.to(device), length)
    mask = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0)
    if causal:
        mask &= torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if doc_ids is not None:
        docs = doc_ids.reshape(-1).to(device)
        mask &= (docs[:, None] == 0) | (docs[None, :] == 0) | (docs[:, None] == docs[None, :])
    return mask


class _ZeroNonFiniteGrad(torch.autograd.Function):
    """Identity whose backward replaces non-finite gradient entries by 0 (see doc_attention)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))


def doc_attention(q, k, v, *, cu_seqlens=None, doc_ids=None, causal=True, softmax_scale=None,
                  return_lse=False):
    """Dense-mask attention oracle: q (b,l,hq,d), k,v (b,l,hk,d), hq % hk == 0.

    Returns o (b,l,hq,d) [, lse (b,hq,l) fp32, -inf for rows that see nothing].
    doc_ids (b,l) or (l,); cu_seqlens (N+1,) requires b == 1.

    Non-finite inputs stay inside the rows that see them, forward and backward: masked pairs
    contribute exactly 0 (torch.where, never 0 * value), the matmul operands have their
    non-finite entries zeroed, and what that hides is put back as NaN where it is visible (a
    score of a non-finite q or k row; an output row that sees a non-finite v row). Non-finite
    output gradients are zeroed before the backward matmuls for the same reason.
    """
    out_dtype = q.dtype
    cdt = _compute_dtype(q)
    b, l, hq, d = q.shape
    hk = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qf = q.to(cdt)
    kf = k.to(cdt).repeat_interleave(hq // hk, dim=2)
    vf = v.to(cdt).repeat_interleave(hq // hk, dim=2)
    docs = None if doc_ids is None else doc_ids.reshape(b, l)
    masks = torch.stack([doc_attention_mask(l, cu_seqlens, None if docs is None else docs[r], causal, q.device)
                         for r in range(b)])[:, None]  # (b, 1, l, l)

    def finite(t):  # (b, l, h, d) -> t with non-finite entries 0, (b, h, l) "row had one" flags
        ok = torch.isfinite(t)
        return torch.where(ok, t, torch.zeros_like(t)), ~ok.all(-1).transpose(1, 2)

    (q0, q_bad), (k0, k_bad), (v0, v_bad) = finite(qf), finite(kf), finite(vf)
    scores = torch.einsum("bihd,bjhd->bhij", q0, k0) * scale
    scores = torch.where(q_bad[..., :, None] | k_bad[..., None, :], math.nan, scores)
    scores = scores.masked_fill(~masks, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (b, hq, l)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.where(masks, torch.exp(scores - safe_lse[..., None]), 0.0)
    o = _ZeroNonFiniteGrad.apply(torch.einsum("bhij,bjhd->bihd", probs, v0))
    sees_bad_v = (masks & v_bad[..., None, :]).any(-1).transpose(1, 2)  # (b, l, hq)
    o = torch.where(sees_bad_v[..., None], math.nan, o).to(out_dtype)
    if not return_lse:
        return o
    return o, lse.float() if cdt != torch.float64 else lse


# ----------------------------------------------------------------------------- linear + cross-entropy


def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean",
                               z_loss=0.0, num_valid=None):
    """Plain linear + cross-entropy oracle (materializes [T, V] logits).

    hidden (..., H), weight (V, H), targets (...) int. Tokens whose target equals
    ignore_index contribute nothing. Per-token loss = lse - logit[target] + z_loss*lse^2.
    reduction "mean" divides by the number of counted tokens (0 when there are none),
    "sum" sums, "none" returns per-token fp32 losses shaped like targets. num_valid (the
    kernel's host-known count of counted tokens) is accepted for a common signature; the
    oracle counts them itself.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cdt = _compute_dtype(hidden)
    h = hidden.reshape(-1, hidden.shape[-1]).to(cdt)
    tgt = targets.reshape(-1)
    logits = h @ weight.to(cdt).t()
    lse = torch.logsumexp(logits, dim=-1)
    valid = tgt != ignore_index
    picked = logits.gather(1, torch.where(valid, tgt, torch.zeros_like(tgt)).unsqueeze(1)).squeeze(1)
    per_token = torch.where(valid, lse - picked + z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return per_token.reshape(targets.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
