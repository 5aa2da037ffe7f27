"""Mamba-1 selective scan in Triton: chunked parallel scan, forward and backward, varlen.

Recurrence per channel d and state index n (delta after delta_bias and optional softplus):

    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t ;  y_t = <h_t, C_t> + D u_t ;  y_t *= silu(z_t)

One program owns one sequence (or batch row) and a block of BD channels of one B/C group, and
walks its tokens in chunks of BT. Inside a chunk the recurrence is a first-order linear scan
over the [BT, BD, N] tile of (decay, injection) pairs, computed with ``tl.associative_scan``;
the state is carried from chunk to chunk. The forward stores the state entering each chunk
(N_chunks, d, n) so the backward recomputes h chunk by chunk (memory O(l d n / BT), never
O(l d n)) while a reverse scan over the same chunks yields dh. Blocks never straddle a B/C
group, so B/C tiles are read once per block without expanding grouped B/C, and dB/dC are
reduced over the block's channels in registers. Those block sums are combined either with one
atomic add per block (default: run-to-run float order varies on GPU) or, with
``deterministic=True``, stored per block and reduced by a fixed-order torch sum (bitwise
reproducible, extra memory; see `selective_scan`). Every other backward reduction (dA, dD,
ddelta_bias over sequences) goes through per-sequence partials and a torch sum already.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels.common.checks import check_cu_seqlens, check_decay_rates, check_float, check_layout, check_same_device, check_shape
from refrag_kernels.common.autotune import launch
from refrag_kernels.common.dispatch import INTERPRET, use_triton
from refrag_kernels.layout import DocLayout
from refrag_kernels.reference import selective_scan as reference_selective_scan

# Forward tiles are [BT, BD, N]: BD is tuned, BT is fixed per call (the stored chunk states
# depend on it, so forward and backward must agree).
FWD_CONFIGS = [
    triton.Config({"BD": 4}, num_warps=4),
    triton.Config({"BD": 8}, num_warps=4),
    triton.Config({"BD": 8}, num_warps=8),
    triton.Config({"BD": 16}, num_warps=8),
]
BWD_CONFIGS = [
    triton.Config({"BD": 4}, num_warps=4),
    triton.Config({"BD": 2}, num_warps=2),
    triton.Config({"BD": 4}, num_warps=8),
    triton.Config({"BD": 8}, num_warps=8),
]
TUNE_KEY = ["DIM", "N", "CPG", "BT", "ACC"]
# The deterministic backward runs this one config instead of autotuning: the block width BD
# and the warp layout set the float summation order, and the autotuner's pick can differ
# between processes. BD 8 halves the partial-sum buffers against BD 4.
DETERMINISTIC_BWD_CONFIG = triton.Config({"BD": 8}, num_warps=8)


def default_chunk_size(n: int) -> int:
    """Tokens per chunk (BT) for state size n: smaller chunks keep large-n tiles in registers."""
    if INTERPRET:
        return 16
    return 32 if triton.next_power_of_2(n) <= 16 else 16


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # composes h -> a1 h + b1 (earlier) with h -> a2 h + b2 (later)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _sequence_range(cu_seqlens, chunk_offsets, i_s, L, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(batch row, first token, token count, index of the first chunk) of program sequence i_s."""
    if IS_VARLEN:
        i_b = i_s * 0
        bos = tl.load(cu_seqlens + i_s).to(tl.int64)
        T = tl.load(cu_seqlens + i_s + 1).to(tl.int64) - bos
        chunk_base = tl.load(chunk_offsets + i_s).to(tl.int64)
    else:
        i_b = i_s
        bos = i_s * 0
        T = i_s * 0 + L
        chunk_base = i_s * tl.cdiv(L, BT)
    return i_b, bos, T, chunk_base


@triton.jit
def _load_delta(delta, delta_bias, o_tok, o_d, m, stride_b_delta, stride_d_delta, i_b,
                ACC: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """delta + delta_bias as a [BT, BD] tile, and the processed delta (softplus if set; 0 where masked)."""
    p_delta = delta + i_b * stride_b_delta + o_d[None, :] * stride_d_delta + o_tok[:, None]
    b_raw = tl.load(p_delta, mask=m, other=0).to(ACC)
    if HAS_DELTA_BIAS:
        b_raw += tl.load(delta_bias + o_d, mask=o_d >= 0, other=0).to(ACC)[None, :]
    b_dt = _softplus(b_raw) if DELTA_SOFTPLUS else b_raw
    return b_raw, tl.where(m, b_dt, 0)


@triton.autotune(FWD_CONFIGS, key=TUNE_KEY)
@triton.heuristics({
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "HAS_D": lambda args: args["D"] is not None,
    "HAS_Z": lambda args: args["z"] is not None,
    "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
    "HAS_H0": lambda args: args["h0"] is not None,
    "SAVE_STATES": lambda args: args["states"] is not None,
})
@triton.jit
def selective_scan_fwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, h0, y, ht, states, cu_seqlens, chunk_offsets,
    stride_b_u, stride_d_u, stride_b_delta, stride_d_delta, stride_b_z, stride_d_z,
    stride_b_bc, stride_g_bc, stride_n_bc,
    L, DIM: tl.constexpr, N: tl.constexpr, CPG: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr,
):
    i_s, i_gd = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NDB = tl.cdiv(CPG, BD)
    i_g, i_db = i_gd // NDB, i_gd % NDB
    i_b, bos, T, chunk_base = _sequence_range(cu_seqlens, chunk_offsets, i_s, L, BT, IS_VARLEN)

    o_dl = i_db * BD + tl.arange(0, BD)
    m_d = o_dl < CPG
    o_d = tl.where(m_d, i_g * CPG + o_dl, -1)  # channel index; -1 marks lanes past the group
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0).to(ACC)
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0).to(ACC)
    if HAS_H0:
        b_h = tl.load(h0 + i_s * DIM * N + o_dn, mask=m_dn, other=0).to(ACC)
    else:
        b_h = tl.zeros([BD, BN], dtype=ACC)

    o_r = tl.arange(0, BT)
    for i_c in range(tl.cdiv(T, BT)):
        if SAVE_STATES:
            tl.store(states + (chunk_base + i_c) * DIM * N + o_dn, b_h.to(states.dtype.element_ty), mask=m_dn)
        o_t = i_c * BT + o_r
        m_t = o_t < T
        o_tok = bos + o_t
        m_td = m_t[:, None] & m_d[None, :]
        m_tn = m_t[:, None] & m_n[None, :]
        p_u = u + i_b * stride_b_u + o_d[None, :] * stride_d_u + o_tok[:, None]
        b_u = tl.load(p_u, mask=m_td, other=0).to(ACC)
        _, b_dt = _load_delta(delta, delta_bias, o_tok, o_d, m_td, stride_b_delta, stride_d_delta, i_b,
                              ACC, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        o_bc = i_b * stride_b_bc + i_g * stride_g_bc + o_n[None, :] * stride_n_bc + o_tok[:, None]
        b_B = tl.load(B + o_bc, mask=m_tn, other=0).to(ACC)
        b_C = tl.load(C + o_bc, mask=m_tn, other=0).to(ACC)

        # decay exp(dt A) and injection dt u B per (token, channel, state): [BT, BD, BN];
        # padded tokens are identity steps (decay 1, injection 0)
        b_a = tl.where(m_t[:, None, None], tl.exp(b_dt[:, :, None] * b_A[None, :, :]), 1.0)
        b_x = (b_dt * b_u)[:, :, None] * b_B[:, None, :]
        b_x = tl.where(o_r[:, None, None] == 0, b_x + b_a * b_h[None, :, :], b_x)
        _, b_hs = tl.associative_scan((b_a, b_x), 0, _linear_combine)
        b_h = tl.sum(tl.where(o_r[:, None, None] == BT - 1, b_hs, 0), 0)

        # y_t = <h_t, C_t>: [BT, BD, BN] * [BT, 1, BN] -> sum over n -> [BT, BD]
        b_y = tl.sum(b_hs * b_C[:, None, :], 2)
        if HAS_D:
            b_y += b_D[None, :] * b_u
        if HAS_Z:
            p_z = z + i_b * stride_b_z + o_d[None, :] * stride_d_z + o_tok[:, None]
            b_z = tl.load(p_z, mask=m_td, other=0).to(ACC)
            b_y *= b_z * tl.sigmoid(b_z)
        p_y = y + i_b * DIM * L + o_d[None, :] * L + o_tok[:, None]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_td)
    tl.store(ht + i_s * DIM * N + o_dn, b_h.to(ht.dtype.element_ty), mask=m_dn)


def _shape_args(u, delta, z, B, delta_softplus: bool, chunk_size: int) -> dict:
    """Strides, sizes and flags the forward and backward kernels share."""
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    return dict(
        stride_b_u=u.stride(0), stride_d_u=u.stride(1),
        stride_b_delta=delta.stride(0), stride_d_delta=delta.stride(1),
        stride_b_z=0 if z is None else z.stride(0), stride_d_z=0 if z is None else z.stride(1),
        stride_b_bc=B.stride(0), stride_g_bc=B.stride(1), stride_n_bc=B.stride(2),
        L=l, DIM=d, N=n, CPG=d // g, BT=chunk_size, BN=triton.next_power_of_2(n),
        ACC=tl.float64 if u.dtype == torch.float64 else tl.float32, DELTA_SOFTPLUS=delta_softplus,
    )


def _grid(num_seqs: int, groups: int, channels_per_group: int):
    """One program per (sequence or batch row, block of BD channels inside one B/C group)."""
    return lambda meta: (num_seqs, groups * triton.cdiv(channels_per_group, meta["BD"]))


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout: Optional[DocLayout],
                       initial_state, save_states: bool, chunk_size: Optional[int] = None,
                       config: Optional[triton.Config] = None):
    """Launch the forward scan on validated inputs.

    u, delta, z (b,d,l) with unit stride along l; A (d,n); B, C (b,g,n,l) with unit stride along l;
    D, delta_bias (d,); layout of the packed row (b == 1) or None; initial_state (N|b,d,n).
    Returns y (b,d,l) in u.dtype, the last state (N|b,d,n) in the compute dtype, the state
    entering every chunk (num_chunks, d, n) when save_states (else None), the chunk offsets
    (N+1,) (None without cu_seqlens) and the chunk size BT, all needed by the backward.
    `config` forces one entry of FWD_CONFIGS instead of autotuning.
    """
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    acc = _compute_dtype(u)
    BT = chunk_size or default_chunk_size(n)
    cu_seqlens = None if layout is None else layout.cu_seqlens
    num_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    chunk_offsets = None if layout is None else layout.chunk_table(BT).seq_chunk_offsets
    max_chunks = b * triton.cdiv(l, BT) if cu_seqlens is None else triton.cdiv(l, BT) + num_seqs
    states = u.new_empty(max_chunks, d, n, dtype=acc) if save_states else None
    y = (torch.empty_like if cu_seqlens is None else torch.zeros_like)(u, memory_format=torch.contiguous_format)
    last = u.new_empty(num_seqs, d, n, dtype=acc)
    launch(selective_scan_fwd_kernel, _grid(num_seqs, g, d // g), config,
           u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, h0=initial_state, y=y, ht=last,
           states=states, cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets,
           **_shape_args(u, delta, z, B, delta_softplus, BT))
    return y, last, states, chunk_offsets, BT


@triton.autotune(BWD_CONFIGS, key=TUNE_KEY, reset_to_zero=["dB", "dC"])
@triton.heuristics({
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
    "HAS_D": lambda args: args["D"] is not None,
    "HAS_Z": lambda args: args["z"] is not None,
    "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
    "HAS_DHT": lambda args: args["dht"] is not None,
})
@triton.jit
def selective_scan_bwd_kernel(
    u, delta, A, B, C, D, z, delta_bias, states, dy, dht, cu_seqlens, chunk_offsets,
    du, ddelta, dz, dB, dC, dA_part, dD_part, ddelta_bias_part, dh0, stride_part_dbc,
    stride_b_u, stride_d_u, stride_b_delta, stride_d_delta, stride_b_z, stride_d_z,
    stride_b_bc, stride_g_bc, stride_n_bc,
    L, DIM: tl.constexpr, N: tl.constexpr, CPG: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr, HAS_DHT: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    i_s, i_gd = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NDB = tl.cdiv(CPG, BD)
    i_g, i_db = i_gd // NDB, i_gd % NDB
    i_b, bos, T, chunk_base = _sequence_range(cu_seqlens, chunk_offsets, i_s, L, BT, IS_VARLEN)

    o_dl = i_db * BD + tl.arange(0, BD)
    m_d = o_dl < CPG
    o_d = tl.where(m_d, i_g * CPG + o_dl, -1)  # channel index; -1 marks lanes past the group
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0).to(ACC)
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0).to(ACC)
    # b_carry = gradient flowing into the state entering the chunk after the current one
    if HAS_DHT:
        b_carry = tl.load(dht + i_s * DIM * N + o_dn, mask=m_dn, other=0).to(ACC)
    else:
        b_carry = tl.zeros([BD, BN], dtype=ACC)
    b_dA = tl.zeros([BD, BN], dtype=ACC)
    b_dD = tl.zeros([BD], dtype=ACC)
    b_dbias = tl.zeros([BD], dtype=ACC)

    o_r = tl.arange(0, BT)
    NT = tl.cdiv(T, BT)
    for i_rev in range(NT):
        i_c = NT - 1 - i_rev
        o_t = i_c * BT + o_r
        m_t = o_t < T
        o_tok = bos + o_t
        m_td = m_t[:, None] & m_d[None, :]
        m_tn = m_t[:, None] & m_n[None, :]
        o_ud = i_b * stride_b_u + o_d[None, :] * stride_d_u + o_tok[:, None]
        b_u = tl.load(u + o_ud, mask=m_td, other=0).to(ACC)
        b_raw, b_dt = _load_delta(delta, delta_bias, o_tok, o_d, m_td, stride_b_delta, stride_d_delta, i_b,
                                  ACC, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        o_bc = i_b * stride_b_bc + i_g * stride_g_bc + o_n[None, :] * stride_n_bc + o_tok[:, None]
        b_B = tl.load(B + o_bc, mask=m_tn, other=0).to(ACC)
        b_C = tl.load(C + o_bc, mask=m_tn, other=0).to(ACC)
        o_out = i_b * DIM * L + o_d[None, :] * L + o_tok[:, None]
        b_do = tl.load(dy + o_out, mask=m_td, other=0).to(ACC)

        # recompute h over the chunk from its stored entering state: [BT, BD, BN]
        b_h0 = tl.load(states + (chunk_base + i_c) * DIM * N + o_dn, mask=m_dn, other=0).to(ACC)
        b_a = tl.where(m_t[:, None, None], tl.exp(b_dt[:, :, None] * b_A[None, :, :]), 1.0)
        b_x = (b_dt * b_u)[:, :, None] * b_B[:, None, :]
        b_x0 = tl.where(o_r[:, None, None] == 0, b_x + b_a * b_h0[None, :, :], b_x)
        _, b_hs = tl.associative_scan((b_a, b_x0), 0, _linear_combine)

        b_dy = b_do
        if HAS_Z:
            o_z = i_b * stride_b_z + o_d[None, :] * stride_d_z + o_tok[:, None]
            b_z = tl.load(z + o_z, mask=m_td, other=0).to(ACC)
            b_y = tl.sum(b_hs * b_C[:, None, :], 2)
            if HAS_D:
                b_y += b_D[None, :] * b_u
            b_sig = tl.sigmoid(b_z)
            b_dz = b_do * b_y * b_sig * (1 + b_z * (1 - b_sig))
            tl.store(dz + o_out, b_dz.to(dz.dtype.element_ty), mask=m_td)
            b_dy = b_do * b_z * b_sig
        if HAS_D:
            b_dD += tl.sum(b_dy * b_u, 0)
        # dC_t = sum over the block's channels of dy_t h_t: [BT, BD, BN] -> [BT, BN]
        b_dC = tl.sum(b_dy[:, :, None] * b_hs, 1)

        # reverse scan dh_t = dy_t C_t + a_{t+1} dh_{t+1}; the chunk's last token also receives
        # the gradient of the state it hands to the next chunk
        b_g = b_dy[:, :, None] * b_C[:, None, :]
        m_last = o_t == tl.minimum(T, (i_c + 1) * BT) - 1
        b_g = tl.where(m_last[:, None, None], b_g + b_carry[None, :, :], b_g)
        m_next = (o_t + 1 < T) & (o_r < BT - 1)
        _, b_dt_next = _load_delta(delta, delta_bias, o_tok + 1, o_d, m_next[:, None] & m_d[None, :],
                                   stride_b_delta, stride_d_delta, i_b, ACC, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        b_a_next = tl.where(m_next[:, None, None], tl.exp(b_dt_next[:, :, None] * b_A[None, :, :]), 0.0)
        _, b_dh = tl.associative_scan((b_a_next, b_g), 0, _linear_combine, reverse=True)
        b_carry = tl.sum(tl.where(o_r[:, None, None] == 0, b_a * b_dh, 0), 0)

        # h_t - x_t = a_t h_{t-1}, so dL/d(dt A) = dh_t * a_t h_{t-1}: [BT, BD, BN]
        b_da = b_dh * (b_hs - b_x)
        b_dhB = tl.sum(b_dh * b_B[:, None, :], 2)
        b_ddt = b_dhB * b_u + tl.sum(b_da * b_A[None, :, :], 2)
        b_du = b_dhB * b_dt
        if HAS_D:
            b_du += b_dy * b_D[None, :]
        b_dA += tl.sum(b_da * b_dt[:, :, None], 0)
        b_dB = tl.sum(b_dh * (b_dt * b_u)[:, :, None], 1)
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_raw)
        b_ddt = tl.where(m_td, b_ddt, 0)
        b_dbias += tl.sum(b_ddt, 0)

        tl.store(du + o_out, b_du.to(du.dtype.element_ty), mask=m_td)
        tl.store(ddelta + o_out, b_ddt.to(ddelta.dtype.element_ty), mask=m_td)
        o_dbc = (i_b * (DIM // CPG) + i_g) * N * L + o_n[None, :] * L + o_tok[:, None]
        if DETERMINISTIC:
            # this block's sums go to its own slot i_db of the (blocks, b, g, n, l) partials
            tl.store(dB + i_db * stride_part_dbc + o_dbc, b_dB, mask=m_tn)
            tl.store(dC + i_db * stride_part_dbc + o_dbc, b_dC, mask=m_tn)
        else:
            # every channel block of the group adds into the same dB/dC rows
            tl.atomic_add(dB + o_dbc, b_dB, mask=m_tn)
            tl.atomic_add(dC + o_dbc, b_dC, mask=m_tn)

    tl.store(dh0 + i_s * DIM * N + o_dn, b_carry.to(dh0.dtype.element_ty), mask=m_dn)
    tl.store(dA_part + i_s * DIM * N + o_dn, b_dA, mask=m_dn)
    tl.store(dD_part + i_s * DIM + o_d, b_dD, mask=m_d)
    tl.store(ddelta_bias_part + i_s * DIM + o_d, b_dbias, mask=m_d)


def _bc_grad_buffers(u, B, varlen: bool, blocks: Optional[int]):
    """Zeroed (b,g,n,l) dB and dC accumulators for the atomic path (blocks None), else
    (blocks,b,g,n,l) buffers for per-block partial sums, all in the compute dtype."""
    shape = tuple(B.shape[:3]) + (u.shape[2],)
    # without varlen every block writes its whole slot; varlen padding tokens stay unwritten
    new = torch.zeros if blocks is None or varlen else torch.empty
    if blocks is not None:
        shape = (blocks,) + shape
    return tuple(new(shape, dtype=_compute_dtype(u), device=u.device) for _ in range(2))


def selective_scan_bwd(dy, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cu_seqlens,
                       states, chunk_offsets, chunk_size: int, config: Optional[triton.Config] = None,
                       deterministic: bool = False):
    """Launch the backward scan; inputs as for `selective_scan_fwd` plus its saved states.

    dy (b,d,l) gradient of y; dlast (N|b,d,n) gradient of the last state or None.
    Returns du, ddelta (raw delta, before bias/softplus), dA, dB (b,g,n,l), dC, dD, dz,
    ddelta_bias, dinitial_state (N|b,d,n); entries are None for absent inputs. dB and dC
    (fp32, fp64 for fp64 inputs) sum over channel blocks: by atomics in no fixed order, or,
    when `deterministic`, through (d/g/BD, b, g, n, l) partial buffers and a fixed-order sum.
    `config` forces one entry of BWD_CONFIGS instead of autotuning (deterministic default:
    DETERMINISTIC_BWD_CONFIG).
    """
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    acc = _compute_dtype(u)
    num_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    new = torch.empty if cu_seqlens is None else torch.zeros
    device = u.device
    du = new(b, d, l, dtype=u.dtype, device=device)
    ddelta = new(b, d, l, dtype=delta.dtype, device=device)
    dz = None if z is None else new(b, d, l, dtype=z.dtype, device=device)
    if deterministic and config is None:
        config = DETERMINISTIC_BWD_CONFIG
    blocks = triton.cdiv(d // g, config.kwargs["BD"]) if deterministic else None
    dB, dC = _bc_grad_buffers(u, B, cu_seqlens is not None, blocks)
    dA_part = torch.empty(num_seqs, d, n, dtype=acc, device=device)
    dD_part = torch.empty(num_seqs, d, dtype=acc, device=device)
    ddelta_bias_part = torch.empty(num_seqs, d, dtype=acc, device=device)
    dh0 = torch.empty(num_seqs, d, n, dtype=acc, device=device)

    launch(selective_scan_bwd_kernel, _grid(num_seqs, g, d // g), config,
           u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, states=states, dy=dy, dht=dlast,
           cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets, du=du, ddelta=ddelta, dz=dz, dB=dB, dC=dC,
           dA_part=dA_part, dD_part=dD_part, ddelta_bias_part=ddelta_bias_part, dh0=dh0,
           stride_part_dbc=b * g * n * l, DETERMINISTIC=deterministic,
           **_shape_args(u, delta, z, B, delta_softplus, chunk_size))
    if deterministic:
        dB, dC = dB.sum(0), dC.sum(0)
    dD = None if D is None else dD_part.sum(0)
    ddelta_bias = None if delta_bias is None else ddelta_bias_part.sum(0)
    return du, ddelta, dA_part.sum(0), dB, dC, dD, dz, ddelta_bias, dh0


class SelectiveScanFunction(torch.autograd.Function):
    """Autograd wrapper around the Triton forward / backward launchers (inputs already validated)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout, initial_state,
                deterministic):
        y, last, states, chunk_offsets, chunk_size = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout, initial_state,
            save_states=any(ctx.needs_input_grad))
        cu_seqlens = None if layout is None else layout.cu_seqlens
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, cu_seqlens, chunk_offsets)
        ctx.delta_softplus, ctx.chunk_size, ctx.deterministic = delta_softplus, chunk_size, deterministic
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, states, cu_seqlens, chunk_offsets = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = selective_scan_bwd(
            dy.contiguous(), None if dlast is None else dlast.contiguous(), u, delta, A, B, C, D, z,
            delta_bias, ctx.delta_softplus, cu_seqlens, states, chunk_offsets, ctx.chunk_size,
            deterministic=ctx.deterministic)
        dinit = None if ctx.initial_state_dtype is None else dh0.to(ctx.initial_state_dtype)
        return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if dD is None else dD.to(D.dtype), dz,
                None if ddelta_bias is None else ddelta_bias.to(delta_bias.dtype), None, None, dinit, None)


def _unit_stride_last(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _validate(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, initial_state, layout):
    for name, t in dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                        initial_state=initial_state).items():
        if t is not None:
            check_float(name, t)
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      cu_seqlens=cu_seqlens, initial_state=initial_state)
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    check_shape("delta", delta, (b, d, l))
    if z is not None:
        check_shape("z", z, (b, d, l))
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) = ({d}, n), got shape {tuple(A.shape)}")
    n = A.shape[1]
    if B.dim() not in (3, 4):
        raise ValueError(f"B must be (b, n, l) or (b, g, n, l), got shape {tuple(B.shape)}")
    if tuple(B.shape[:1] + B.shape[-2:]) != (b, n, l):
        raise ValueError(f"B must be (b, n, l) or (b, g, n, l) with b={b} n={n} l={l}, got {tuple(B.shape)}")
    check_shape("C", C, tuple(B.shape))
    if B.dim() == 4 and (B.shape[1] == 0 or d % B.shape[1]):
        raise ValueError(f"number of channels d={d} must be a multiple of the number of B/C groups {B.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, (d,))
    if layout is not None:
        check_layout(layout, b, l, u.device, "u", given=cu_seqlens is not None)
        num_seqs = layout.num_seqs
    else:
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, b, l)
        num_seqs = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_shape("initial_state", initial_state, (num_seqs, d, n))
    check_decay_rates(A)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   cu_seqlens=None, initial_state=None, return_last_state=False, *, deterministic=False,
                   layout=None):
    """Mamba-1 selective scan (chunked Triton kernel; differentiable in every tensor input).

    u, delta, z: (b, d, l). A: (d, n) real. B, C: (b, n, l) or grouped (b, g, n, l), d % g == 0.
    D, delta_bias: (d,). delta -> softplus(delta + delta_bias) when delta_softplus.
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ; y_t = <h_t, C_t> + D u_t ; y_t *= silu(z_t).
    cu_seqlens: (N+1,) int32/int64 with b == 1 packs N sequences in one row; the state restarts
    at each sequence start and tokens past cu_seqlens[-1] are padding (y = 0, zero grads).
    layout: a DocLayout (b == 1) instead of cu_seqlens (its documents are ignored: a Mamba-1 scan
    restarts only at examples); its chunk offsets are cached on it, so nothing is read from the
    device. A must be <= 0 (decay rates).
    initial_state: (N|b, d, n) state before each sequence. Returns y (b, d, l) in u's dtype, and
    with return_last_state also the last state (N|b, d, n) in fp32 (fp64 for fp64 inputs).

    deterministic: bitwise reproducible gradients. The backward sums dB and dC over blocks of
    channels; by default with atomic adds into (b, g, n, l) fp32 buffers, whose float order
    (and so the low bits of dB/dC) varies from run to run on GPU. With deterministic=True each
    block of 8 channels stores its sums in its own slot of two (ceil(d / g / 8), b, g, n, l)
    buffers, reduced by a fixed-order torch sum: 2 * ceil(d / g / 8) * b * g * n * l * 4 bytes
    (8 for fp64 inputs) of extra memory during the backward, about d / 8 times the atomic
    path's buffers; e.g. d = 4096, g = 1, n = 16 and b * l = 8192 tokens need 512 MiB instead
    of 1 MiB. Its launch config is fixed (DETERMINISTIC_BWD_CONFIG, no autotuning), so the bits
    also repeat across processes on the same GPU model and software versions. Every other
    gradient is written by one program per element and summed over sequences by torch, so it
    repeats run to run in both modes; the reference path (no Triton) ignores the flag.

    Varlen example, sequences of 3 and 5 tokens packed in one row of 8::

        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
        y, last = selective_scan(u, delta, A, B, C, D=D, cu_seqlens=cu, return_last_state=True)
        # u (1, d, 8) -> y (1, d, 8), last (2, d, n)
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, cu_seqlens, initial_state, layout)
    if not use_triton(u, op="selective_scan"):
        if layout is not None:
            cu_seqlens = layout.cu_seqlens
        return reference_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus, cu_seqlens=cu_seqlens,
                                        initial_state=initial_state, return_last_state=return_last_state)
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    u, delta, z, B4, C4 = (_unit_stride_last(t) for t in (u, delta, z, B4, C4))
    if layout is None and cu_seqlens is not None:
        layout = DocLayout.from_batch(1, u.shape[2], cu_seqlens, None, u.device)
    y, last = SelectiveScanFunction.apply(
        u, delta, A.contiguous(), B4, C4, None if D is None else D.contiguous(), z,
        None if delta_bias is None else delta_bias.contiguous(), bool(delta_softplus), layout,
        None if initial_state is None else initial_state.contiguous(), bool(deterministic))
    return (y, last) if return_last_state else y
