"""Per-token dt preprocessing and chunk-local decay cumsums of the chunked SSD, and their backward.

Forward (`chunk_dt_cumsum`): dt' = softplus(dt + dt_bias) (each step optional) and the
chunk-local cumsum g of dt' * A, both fp32 (T, H). Backward (`chunk_dt_grad`): from the
gradient w.r.t. g (summed here over the K-block partials of `chunk_bwd_dqk`, plus the
per-chunk state-decay part of `chunk_bwd_dh`) and w.r.t. dt' (V-block partials of
`chunk_bwd_dv`), the gradient w.r.t. the raw dt in dt's dtype and per-chunk partial sums
of the gradients w.r.t. A and dt_bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels.ssd.chunks import ChunkTable, chunk_docs, chunk_enter_doc, chunk_span


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) in fp32, accurate for very negative x."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def chunk_dt_cumsum_kernel(dt_raw, s_dt, dt_bias, A, dt, g, chunks, H, BT: tl.constexpr, BH: tl.constexpr,
                           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt[t, h] = softplus(dt_raw[t, h] + dt_bias[h]); g[t, h] = sum of dt[s, h] * A[h] over
    the tokens s <= t of t's chunk."""
    i_c, i_hb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = chunk_span(chunks, i_c)
    o_t = bos + tl.arange(0, BT)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    m_th = (o_t < eos)[:, None] & m_h[None, :]
    b_dt = tl.load(dt_raw + o_t[:, None] * s_dt + o_h[None, :], mask=m_th, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_dt += tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_dt = tl.where(m_th, b_dt, 0.0)
    p_th = o_t[:, None] * H + o_h[None, :]
    tl.store(dt + p_th, b_dt, mask=m_th)
    b_a = b_dt * tl.load(A + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    tl.store(g + p_th, tl.cumsum(b_a, axis=0), mask=m_th)


def chunk_dt_cumsum(dt_raw: torch.Tensor, dt_bias: Optional[torch.Tensor], A: torch.Tensor, softplus: bool,
                    table: ChunkTable):
    """dt_raw (T, H) any float dtype, row stride free; dt_bias (H,) or None; A (H,).
    Returns dt (T, H) fp32 after bias and softplus and g (T, H) fp32, both written only on
    chunk tokens (padding past the last chunk is never read)."""
    T, H = dt_raw.shape
    dt = dt_raw.new_empty(T, H, dtype=torch.float32)
    g = torch.empty_like(dt)
    BH = min(triton.next_power_of_2(H), 64)
    if table.num_chunks:
        grid = (table.num_chunks, triton.cdiv(H, BH))
        chunk_dt_cumsum_kernel[grid](dt_raw, dt_raw.stride(0), dt_bias, A, dt, g, table.chunks, H,
                                     BT=table.chunk_size, BH=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus)
    return dt, g


@triton.jit
def chunk_dt_grad_kernel(dt_raw, s_dt, dt_bias, A, dt, dg, NDG, dg_last, NDL, NT, ddt_v, NDV, ddt_raw, dA_part,
                         dbias_part, docs, chunks, T, H, BT: tl.constexpr, BH: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, DOC_MODE: tl.constexpr):
    """Per chunk: da = reverse cumsum of dg (+ in doc_mode the state-decay gradients of
    `chunk_bwd_dh` at the chunk's last token, sd_L - 1 and b - 1), the gradient w.r.t.
    dt' = ddt_v + da * A, then through softplus to the raw dt; per-chunk sums of da * dt'
    (for A) and of the raw-dt gradient (for dt_bias)."""
    i_c, i_hb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos, eos = chunk_span(chunks, i_c)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    m_th = (o_t < eos)[:, None] & m_h[None, :]
    p_th = o_t[:, None] * H + o_h[None, :]
    b_dg = tl.zeros([BT, BH], dtype=tl.float32)
    for i in range(NDG):
        b_dg += tl.load(dg + i * T * H + p_th, mask=m_th, other=0.0)
    if DOC_MODE:
        enter_doc = chunk_enter_doc(chunks, i_c)
        d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
        b_sL = tl.zeros([BH], dtype=tl.float32)
        b_ssd = tl.zeros([BH], dtype=tl.float32)
        b_sb = tl.zeros([BH], dtype=tl.float32)
        for i in range(NDL):
            p_dl = dg_last + ((i * NT + i_c) * H + o_h) * 3
            b_sL += tl.load(p_dl, mask=m_h, other=0.0)
            b_ssd += tl.load(p_dl + 1, mask=m_h, other=0.0)
            b_sb += tl.load(p_dl + 2, mask=m_h, other=0.0)
        b_dg += tl.where((o_t == eos - 1)[:, None], b_sL[None, :], 0.0)
        b_dg += tl.where((o_i == sd_L - 1)[:, None], b_ssd[None, :], 0.0)
        b_dg += tl.where((o_i == b - 1)[:, None], b_sb[None, :], 0.0)
    b_ddt = tl.zeros([BT, BH], dtype=tl.float32)
    for i in range(NDV):
        b_ddt += tl.load(ddt_v + i * T * H + p_th, mask=m_th, other=0.0)
    b_da = tl.where(m_th, tl.cumsum(b_dg, axis=0, reverse=True), 0.0)
    b_dt = tl.load(dt + p_th, mask=m_th, other=0.0)
    b_ddt += b_da * tl.load(A + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    tl.store(dA_part + i_c * H + o_h, tl.sum(b_da * b_dt, axis=0), mask=m_h)
    if SOFTPLUS:
        b_raw = tl.load(dt_raw + o_t[:, None] * s_dt + o_h[None, :], mask=m_th, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_raw += tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_ddt = b_ddt * tl.sigmoid(b_raw)
    b_ddt = tl.where(m_th, b_ddt, 0.0)
    if HAS_BIAS:
        tl.store(dbias_part + i_c * H + o_h, tl.sum(b_ddt, axis=0), mask=m_h)
    tl.store(ddt_raw + p_th, b_ddt.to(ddt_raw.dtype.element_ty), mask=m_th)


def chunk_dt_grad(dt_raw, dt_bias, A, softplus: bool, dt, dg, dg_last, ddt_v, table: ChunkTable,
                  docs: Optional[torch.Tensor], total: int):
    """dg (NDG, T, H), ddt_v (NDV, T, H) fp32 partial sums; in doc_mode (docs (T,) int32)
    dg_last (NDL, NT, H, 3) from `chunk_bwd_dh`, else None. Chunks cover the tokens
    [0, total). Returns ddt_raw (T, H) in dt_raw's dtype (zero on padding), dA (H,) fp32 and
    ddt_bias (H,) fp32 or None."""
    T, H = dt.shape
    NT = table.num_chunks
    ddt_raw = torch.empty(T, H, dtype=dt_raw.dtype, device=dt.device)
    ddt_raw[total:].zero_()
    dA_part = dt.new_empty(NT, H)
    dbias_part = dt.new_empty(NT, H) if dt_bias is not None else None
    BH = min(triton.next_power_of_2(H), 64)
    if NT:
        grid = (NT, triton.cdiv(H, BH))
        chunk_dt_grad_kernel[grid](dt_raw, dt_raw.stride(0), dt_bias, A, dt, dg, dg.shape[0],
                                   dg if dg_last is None else dg_last, 0 if dg_last is None else dg_last.shape[0], NT,
                                   ddt_v, ddt_v.shape[0], ddt_raw, dA_part,
                                   dA_part if dbias_part is None else dbias_part,
                                   table.chunks if docs is None else docs, table.chunks, T, H,
                                   BT=table.chunk_size, BH=BH, HAS_BIAS=dt_bias is not None, SOFTPLUS=softplus,
                                   DOC_MODE=docs is not None)
    dA = dA_part.sum(0)
    return ddt_raw, dA, None if dbias_part is None else dbias_part.sum(0)
