"""Intra-chunk part of the chunked SSD: outputs (forward) and the gradients of q, k, v, g.

Per chunk (q = C, k = B, v = x * dt, g = chunk-local cumsum of dt * A, h_in the state
the chunk reads, L its last token):

    y_t = exp(g_t) q_t h_in + sum_{s <= t} exp(g_t - g_s) (q_t . k_s) v_s

Grouped B/C: head i_h reads group i_h // HPG (HPG = heads per group); dq and dk are
summed over the heads of a group inside the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.ssd.chunks import ChunkTable
from kernels.common.autotune import launch
from kernels.ssd.tuning import autotuned, max_blocks


@triton.jit
def chunk_fwd_o_kernel(x, dt, g, q, k, h, y, chunks, H, K, V, HPG, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, PRECISION: tl.constexpr):
    """y[chunk tokens, head, V-block] (without the D and z terms)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_g = i_h // HPG
    bos = tl.load(chunks + i_c * 3).to(tl.int64)
    eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_qk = (o_t[:, None] * (H // HPG) + i_g) * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_h = tl.load(h + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PRECISION)  # [BT, BK] @ [BK, BV] -> [BT, BV]
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT, BK] @ [BK, BT] -> [BT, BT]
    b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
    b_o = b_o * tl.exp(b_g)[:, None]
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_A = tl.where(m_A, b_A * tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
    b_x = tl.load(x + (o_t[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    b_v = b_x * tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)[:, None]
    b_o += tl.dot(b_A, b_v, input_precision=PRECISION)  # [BT, BT] @ [BT, BV] -> [BT, BV]
    tl.store(y + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_o, mask=m_tv)


chunk_fwd_o_tuned = autotuned(chunk_fwd_o_kernel)


def chunk_fwd_o(x, dt, g, q, k, h, table: ChunkTable, precision: str, config: Optional[triton.Config]):
    """Chunk outputs. x (T, H, V); dt, g (T, H) fp32; q, k (T, G, K); h (NT, H, K, V) fp32.
    Returns y (T, H, V) fp32, zero on tokens outside every chunk (padding)."""
    T, H, V = x.shape
    K = q.shape[2]
    y = torch.zeros(T, H, V, dtype=torch.float32, device=x.device)
    if table.num_chunks:
        def grid(meta):
            return (triton.cdiv(V, meta["BV"]), table.num_chunks, H)

        launch(chunk_fwd_o_tuned, grid, config, x=x, dt=dt, g=g, q=q, k=k, h=h, y=y, chunks=table.chunks,
               H=H, K=K, V=V, HPG=H // q.shape[1], BT=table.chunk_size, PRECISION=precision)
    return y


@triton.jit
def chunk_bwd_dqk_kernel(x, dt, g, q, k, h, do, dh, dq, dk, dg, chunks, T, H, K, V, HPG,
                         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk for one (chunk, group, K-block), summed over the group's heads, and this
    K-block's share of dg (gradient w.r.t. g) for each head: dg_t = q_t.dq_t - k_t.dk_t,
    plus, at the chunk's last token, the gradient of S_c through exp(g_L)."""
    i_k, i_c, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    G = H // HPG
    bos = tl.load(chunks + i_c * 3).to(tl.int64)
    eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p_qk = (o_t[:, None] * G + i_g) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_dq_group = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk_group = tl.zeros([BT, BK], dtype=tl.float32)
    for i_hh in range(HPG):
        i_h = i_g * HPG + i_hh
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_dt = tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)
        b_dq = tl.zeros([BT, BK], dtype=tl.float32)
        b_dk = tl.zeros([BT, BK], dtype=tl.float32)
        b_dA = tl.zeros([BT, BT], dtype=tl.float32)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
            p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
            p_state = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_v = tl.load(x + p_tv, mask=m_tv, other=0.0).to(tl.float32) * b_dt[:, None]
            b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
            b_h = tl.load(h + p_state, mask=m_kv, other=0.0)
            b_dh = tl.load(dh + p_state, mask=m_kv, other=0.0)
            b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BT, BV] @ [BV, BT] -> [BT, BT]
            b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)  # [BT, BV] @ [BV, BK] -> [BT, BK]
            b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision=PRECISION)  # [BT, BV] @ [BV, BK] -> [BT, BK]
        b_dq = b_dq * tl.exp(b_g)[:, None]
        b_dk = b_dk * tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
        b_dg_last = tl.sum(b_dk * b_k)
        b_dA = tl.where(m_A, b_dA * tl.exp(b_g[:, None] - b_g[None, :]), 0.0)
        b_dq += tl.dot(b_dA, b_k, input_precision=PRECISION)  # [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dk += tl.dot(tl.trans(b_dA), b_q, input_precision=PRECISION)  # [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dg = tl.sum(b_q * b_dq, axis=1) - tl.sum(b_k * b_dk, axis=1) + tl.where(o_t == eos - 1, b_dg_last, 0.0)
        tl.store(dg + (i_k * T + o_t) * H + i_h, b_dg, mask=m_t)
        b_dq_group += b_dq
        b_dk_group += b_dk
    tl.store(dq + p_qk, b_dq_group.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_qk, b_dk_group.to(dk.dtype.element_ty), mask=m_tk)


chunk_bwd_dqk_tuned = autotuned(chunk_bwd_dqk_kernel, reset_to_zero=["dg"])


def chunk_bwd_dqk(x, dt, g, q, k, h, do, dh, table: ChunkTable, precision: str, config: Optional[triton.Config]):
    """Gradients w.r.t. q (C) and k (B) in their dtypes, (T, G, K), zero on padding, and
    dg (T, H) fp32, the gradient w.r.t. the chunk-local cumsum g (without the state-decay
    part, which `chunk_bwd_dh` returns per chunk)."""
    T, H, V = x.shape
    G, K = q.shape[1:]
    nk_max = max_blocks(K, "BK", config)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dg = torch.zeros(nk_max, T, H, dtype=torch.float32, device=x.device)
    if table.num_chunks:
        def grid(meta):
            return (triton.cdiv(K, meta["BK"]), table.num_chunks, G)

        launch(chunk_bwd_dqk_tuned, grid, config, x=x, dt=dt, g=g, q=q, k=k, h=h, do=do, dh=dh, dq=dq, dk=dk,
               dg=dg, chunks=table.chunks, T=T, H=H, K=K, V=V, HPG=H // G, BT=table.chunk_size,
               PRECISION=precision)
    return dq, dk, dg.sum(0)


@triton.jit
def chunk_bwd_dv_kernel(x, dt, g, q, k, do, dh, dx, ddt, chunks, T, H, K, V, HPG,
                        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dv for one (chunk, head, V-block), written as dx = dv * dt, and this V-block's share
    of the gradient w.r.t. dt through v = x * dt."""
    i_v, i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_g = i_h // HPG
    bos = tl.load(chunks + i_c * 3).to(tl.int64)
    eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_qk = (o_t[:, None] * (H // HPG) + i_g) * K + o_k[None, :]
        b_q = tl.load(q + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_qk, mask=m_tk, other=0.0).to(tl.float32)
        b_dh = tl.load(dh + (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=(o_k < K)[:, None] & (o_v < V)[None, :], other=0.0)
        b_At += tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BT, BK] @ [BK, BT] -> [BT, BT]
        b_dv += tl.dot(b_k, b_dh, input_precision=PRECISION)  # [BT, BK] @ [BK, BV] -> [BT, BV]
    b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
    b_g_last = tl.load(g + (eos - 1) * H + i_h)
    b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
    # b_At[s, t] = k_s . q_t, used where the query t comes at or after the key s
    m_At = (o_i[:, None] <= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_At = tl.where(m_At, b_At * tl.exp(b_g[None, :] - b_g[:, None]), 0.0)
    p_tv = (o_t[:, None] * H + i_h) * V + o_v[None, :]
    b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
    b_dv += tl.dot(b_At, b_do, input_precision=PRECISION)  # [BT, BT] @ [BT, BV] -> [BT, BV]
    b_x = tl.load(x + p_tv, mask=m_tv, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)
    tl.store(dx + p_tv, (b_dv * b_dt[:, None]).to(dx.dtype.element_ty), mask=m_tv)
    tl.store(ddt + (i_v * T + o_t) * H + i_h, tl.sum(b_dv * b_x, axis=1), mask=m_t)


chunk_bwd_dv_tuned = autotuned(chunk_bwd_dv_kernel, reset_to_zero=["ddt"])


def chunk_bwd_dv(x, dt, g, q, k, do, dh, table: ChunkTable, precision: str, config: Optional[triton.Config]):
    """Gradient w.r.t. x (T, H, V) in x's dtype and the part of the gradient w.r.t. dt
    (T, H) fp32 that flows through v = x * dt; both zero on padding."""
    T, H, V = x.shape
    G, K = q.shape[1:]
    nv_max = max_blocks(V, "BV", config)
    dx = torch.zeros_like(x)
    ddt = torch.zeros(nv_max, T, H, dtype=torch.float32, device=x.device)
    if table.num_chunks:
        def grid(meta):
            return (triton.cdiv(V, meta["BV"]), table.num_chunks, H)

        launch(chunk_bwd_dv_tuned, grid, config, x=x, dt=dt, g=g, q=q, k=k, do=do, dh=dh, dx=dx, ddt=ddt,
               chunks=table.chunks, T=T, H=H, K=K, V=V, HPG=H // G, BT=table.chunk_size, PRECISION=precision)
    return dx, ddt.sum(0)
