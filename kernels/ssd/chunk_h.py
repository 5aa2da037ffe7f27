"""Inter-chunk state recurrence of the chunked SSD: forward states and backward state gradients.

Per chunk c of a sequence (q = C, k = B, v = x * dt, g = chunk-local cumsum of dt * A,
L = last token of the chunk, E = exp(g_L)):

    S_c     = sum_s exp(g_L - g_s) k_s^T v_s                    [K, V]
    h_out   = E * h_in + S_c

Dot operands are in the input dtype (decays and dt applied in fp32 to the k side before
the cast), accumulation in fp32; the recurrence itself runs in fp32 registers, and the
states stored for the output kernels are rounded to the input dtype (the final state is
returned in fp32). Backward recomputes the states instead of saving them.

One program owns a (K-block, V-block) tile of one (sequence, head) state and walks the
sequence's chunks in order (forward) or in reverse (backward). States are stored
[K, V] = (n, p) per chunk and head; initial/final states use the public (p, n) layout.

doc_mode keeps two states: `carried` runs over every chunk; `doc` restarts from `entry`
(the carried state at the start of the retrieval block) at each document start. A
document chunk reads `doc`, a shared chunk reads `carried`; the final state is `carried`.
Chunk flag bits (see `refrag_kernels.ssd.chunks`): 1 = IS_DOC, 2 = SEG_START, 4 = BLOCK_START.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels.common.autotune import launch
from refrag_kernels.ssd.chunks import ChunkTable
from refrag_kernels.ssd.tuning import autotuned, max_blocks


@triton.jit
def chunk_fwd_h_kernel(x, s_xt, s_xh, dt, g, k, s_kt, s_kg, h, hc, h0, ht, chunks, seq_chunk_offsets, H, K, V,
                       HPG, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                       DOC_MODE: tl.constexpr, STORE_FINAL: tl.constexpr, PRECISION: tl.constexpr):
    """Store the state entering each chunk in h (and the carried state in hc in doc_mode),
    and (STORE_FINAL) the final carried state of each sequence in ht."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // HPG
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]
    p_user = (i_n * H + i_h) * V * K + o_v[None, :] * K + o_k[:, None]
    b_carried = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_carried += tl.load(h0 + p_user, mask=m_kv, other=0.0)
    b_doc = tl.zeros([BK, BV], dtype=tl.float32)
    b_entry = tl.zeros([BK, BV], dtype=tl.float32)
    c_start = tl.load(seq_chunk_offsets + i_n).to(tl.int64)
    c_end = tl.load(seq_chunk_offsets + i_n + 1).to(tl.int64)
    for i_c in range(c_start, c_end):
        bos = tl.load(chunks + i_c * 3).to(tl.int64)
        eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
        p_h = h + (i_c * H + i_h) * K * V + p_state
        if DOC_MODE:
            flags = tl.load(chunks + i_c * 3 + 2)
            is_doc = (flags & 1) != 0
            b_entry = tl.where((flags & 4) != 0, b_carried, b_entry)
            b_doc = tl.where(is_doc & ((flags & 2) != 0), b_entry, b_doc)
            tl.store(hc + (i_c * H + i_h) * K * V + p_state, b_carried.to(hc.dtype.element_ty), mask=m_kv)
            tl.store(p_h, tl.where(is_doc, b_doc, b_carried).to(h.dtype.element_ty), mask=m_kv)
        else:
            tl.store(p_h, b_carried.to(h.dtype.element_ty), mask=m_kv)
        o_t = bos + tl.arange(0, BT)
        m_t = o_t < eos
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_k = tl.load(k + o_t[:, None] * s_kt + i_g * s_kg + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_x = tl.load(x + o_t[:, None] * s_xt + i_h * s_xh + o_v[None, :],
                      mask=m_t[:, None] & (o_v < V)[None, :], other=0.0)
        b_w = tl.where(m_t, tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0) * tl.exp(b_g_last - b_g), 0.0)
        b_kd = (b_k * b_w[:, None]).to(b_x.dtype)
        b_S = tl.dot(tl.trans(b_kd), b_x, input_precision=PRECISION)  # [BK, BT] @ [BT, BV] -> [BK, BV]
        b_E = tl.exp(b_g_last)
        b_carried = b_E * b_carried + b_S
        if DOC_MODE:
            b_doc = tl.where(is_doc, b_E * b_doc + b_S, b_doc)
    if STORE_FINAL:
        tl.store(ht + p_user, b_carried, mask=m_kv)


chunk_fwd_h_tuned = autotuned(chunk_fwd_h_kernel)


def chunk_fwd_h(x, dt, g, k, initial_states: Optional[torch.Tensor], table: ChunkTable, doc_mode: bool,
                precision: str, config: Optional[triton.Config], store_final: bool = True):
    """States entering every chunk and the final state of every sequence.

    x (T, H, V) and k (T, G, K) with unit last stride; dt, g (T, H) fp32; initial_states
    (N, H, V, K) fp32 or None. Returns h (NT, H, K, V) in x's dtype (the state each chunk's
    outputs read), hc (NT, H, K, V) in x's dtype (the carried state entering each chunk; in
    doc_mode only, else None) and final (N, H, V, K) fp32 (None unless store_final).
    """
    T, H, V = x.shape
    K = k.shape[2]
    N = table.seq_chunk_offsets.numel() - 1
    h = x.new_empty(table.num_chunks, H, K, V)
    hc = torch.empty_like(h) if doc_mode else None
    final = x.new_empty(N, H, V, K, dtype=torch.float32) if store_final else None

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), triton.cdiv(K, meta["BK"]), N * H)

    launch(chunk_fwd_h_tuned, grid, config, x=x, s_xt=x.stride(0), s_xh=x.stride(1), dt=dt, g=g, k=k,
           s_kt=k.stride(0), s_kg=k.stride(1), h=h, hc=h if hc is None else hc,
           h0=h if initial_states is None else initial_states, ht=h if final is None else final,
           chunks=table.chunks, seq_chunk_offsets=table.seq_chunk_offsets, H=H, K=K, V=V, HPG=H // k.shape[1],
           BT=table.chunk_size, USE_H0=initial_states is not None, DOC_MODE=doc_mode, STORE_FINAL=store_final,
           PRECISION=precision)
    return h, hc, final


@triton.jit
def _gated_do(dy, s_dyt, s_dyh, z, s_zt, s_zh, o_t, i_h, o_v, m_tv, HAS_Z: tl.constexpr):
    """Gradient w.r.t. the SSD output before the z gate: dy * silu(z), fp32 [BT, BV]."""
    b_do = tl.load(dy + o_t[:, None] * s_dyt + i_h * s_dyh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_t[:, None] * s_zt + i_h * s_zh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = b_do * b_z * tl.sigmoid(b_z)
    return b_do


@triton.jit
def chunk_bwd_dh_kernel(q, s_qt, s_qg, g, dy, s_dyt, s_dyh, z, s_zt, s_zh, h, hc, dh, dht, dh0, dg_last, chunks,
                        seq_chunk_offsets, H, K, V, HPG, NV_MAX, NT, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOC_MODE: tl.constexpr,
                        HAS_Z: tl.constexpr, PRECISION: tl.constexpr):
    """Reverse walk: dh[c] = gradient w.r.t. S_c (what chunk c adds to the states it feeds),
    dh0 = gradient w.r.t. the initial state (STORE_DH0); in doc_mode, dg_last[tile, c, h] =
    this tile's share of the gradient w.r.t. g_L through the decay E of the states crossing
    chunk c (outside doc_mode that is E <h_c, dh_c>, which `chunk_bwd_dqk` adds from the
    tiles it loads anyway)."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // HPG
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]
    p_user = (i_n * H + i_h) * V * K + o_v[None, :] * K + o_k[:, None]
    p_dg_last = dg_last + ((i_k.to(tl.int64) * NV_MAX + i_v) * NT) * H + i_h
    b_dcarried = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dcarried += tl.load(dht + p_user, mask=m_kv, other=0.0)
    b_ddoc = tl.zeros([BK, BV], dtype=tl.float32)
    b_dentry = tl.zeros([BK, BV], dtype=tl.float32)
    c_start = tl.load(seq_chunk_offsets + i_n).to(tl.int64)
    c_end = tl.load(seq_chunk_offsets + i_n + 1).to(tl.int64)
    for i_r in range(c_start, c_end):
        i_c = c_start + c_end - 1 - i_r
        bos = tl.load(chunks + i_c * 3).to(tl.int64)
        eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_E = tl.exp(b_g_last)
        o_state = (i_c * H + i_h) * K * V + p_state
        if DOC_MODE:
            b_h = tl.load(h + o_state, mask=m_kv, other=0.0).to(tl.float32)
            flags = tl.load(chunks + i_c * 3 + 2)
            is_doc = (flags & 1) != 0
            b_hc = tl.load(hc + o_state, mask=m_kv, other=0.0).to(tl.float32)
            b_ddoc_out = tl.where(is_doc, b_ddoc, 0.0)
            tl.store(dh + o_state, (b_dcarried + b_ddoc_out).to(dh.dtype.element_ty), mask=m_kv)
            tl.store(p_dg_last + i_c * H, b_E * (tl.sum(b_hc * b_dcarried) + tl.sum(b_h * b_ddoc_out)))
            b_ddoc = b_ddoc_out * b_E
        else:
            tl.store(dh + o_state, b_dcarried.to(dh.dtype.element_ty), mask=m_kv)
        b_dcarried = b_dcarried * b_E
        o_t = bos + tl.arange(0, BT)
        m_t = o_t < eos
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_q = tl.load(q + o_t[:, None] * s_qt + i_g * s_qg + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_do = _gated_do(dy, s_dyt, s_dyh, z, s_zt, s_zh, o_t, i_h, o_v, m_t[:, None] & (o_v < V)[None, :], HAS_Z)
        b_qg = (b_q * tl.where(m_t, tl.exp(b_g), 0.0)[:, None]).to(b_q.dtype)
        b_dh_out = tl.dot(tl.trans(b_qg), b_do.to(b_q.dtype), input_precision=PRECISION)  # [BK, BT] @ [BT, BV]
        if DOC_MODE:
            seg_start = is_doc & ((flags & 2) != 0)
            block_start = (flags & 4) != 0
            b_ddoc = tl.where(is_doc, b_ddoc + b_dh_out, b_ddoc)
            b_dcarried = tl.where(is_doc, b_dcarried, b_dcarried + b_dh_out)
            b_dentry = tl.where(seg_start, b_dentry + b_ddoc, b_dentry)
            b_ddoc = tl.where(seg_start, 0.0, b_ddoc)
            b_dcarried = tl.where(block_start, b_dcarried + b_dentry, b_dcarried)
            b_dentry = tl.where(block_start, 0.0, b_dentry)
        else:
            b_dcarried += b_dh_out
    if STORE_DH0:
        tl.store(dh0 + p_user, b_dcarried, mask=m_kv)


chunk_bwd_dh_tuned = autotuned(chunk_bwd_dh_kernel, reset_to_zero=["dg_last"])


def chunk_bwd_dh(q, g, dy, z, h, hc, dfinal: Optional[torch.Tensor], table: ChunkTable, doc_mode: bool,
                 precision: str, config: Optional[triton.Config], need_dh0: bool = True):
    """Reverse state recurrence.

    q (T, G, K); g (T, H) fp32; dy, z (T, H, V) (z or None: the output gate), unit last
    stride; h, hc as from `chunk_fwd_h`; dfinal (N, H, V, K) fp32 or None. Returns dh
    (NT, H, K, V) in h's dtype (gradient w.r.t. each chunk's S_c), dh0 (N, H, V, K) fp32
    (None unless need_dh0) and, in doc_mode, dg_last (tiles, NT, H) fp32 partial sums of the
    gradient w.r.t. each chunk's g_L through the state decay (None outside doc_mode).
    """
    T, H, V = dy.shape
    K = q.shape[2]
    N = table.seq_chunk_offsets.numel() - 1
    NT = table.num_chunks
    nk_max, nv_max = max_blocks(K, "BK", config), max_blocks(V, "BV", config)
    dh = torch.empty_like(h)
    dh0 = dy.new_empty(N, H, V, K, dtype=torch.float32) if need_dh0 else None
    dg_last = dy.new_zeros(nk_max * nv_max, NT, H, dtype=torch.float32) if doc_mode else None

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), triton.cdiv(K, meta["BK"]), N * H)

    zz = dy if z is None else z
    launch(chunk_bwd_dh_tuned, grid, config, q=q, s_qt=q.stride(0), s_qg=q.stride(1), g=g, dy=dy,
           s_dyt=dy.stride(0), s_dyh=dy.stride(1), z=zz, s_zt=zz.stride(0), s_zh=zz.stride(1), h=h,
           hc=h if hc is None else hc, dh=dh, dht=dh if dfinal is None else dfinal, dh0=dh if dh0 is None else dh0,
           dg_last=dh if dg_last is None else dg_last, chunks=table.chunks, seq_chunk_offsets=table.seq_chunk_offsets,
           H=H, K=K, V=V, HPG=H // q.shape[1], NV_MAX=nv_max, NT=NT, BT=table.chunk_size,
           USE_DHT=dfinal is not None, STORE_DH0=need_dh0, DOC_MODE=doc_mode, HAS_Z=z is not None,
           PRECISION=precision)
    return dh, dh0, dg_last
