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

doc_mode (see `refrag_kernels.ssd.chunks`) keeps three states per (sequence, head) tile: `carried`
runs over every token; `doc` is the state of the document holding the last token seen, which
restarts from `entry` (the carried state where its retrieval block opened) at each document
start. Per chunk the forward stores the states its tokens read: hc (carried, always), hd (the
continued document's state, when the chunk has such tokens) and he (the entry state of the
block whose documents start in the chunk, when it has any). Backward walks the chunks in
reverse with the three state gradients and stores, per chunk, the gradients its source tokens
need: dh (the carried state leaving the chunk, every token; plus the document state leaving it
when the last token's document spans the whole chunk), dhd (the document state leaving it, for
the tokens of the last token's document, when that document starts inside the chunk) and dhe
(the entry state of a block opening inside the chunk, for the tokens before the block).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels.common.autotune import launch
from refrag_kernels.ssd.chunks import ChunkTable, at, chunk_docs, chunk_enter_doc, chunk_entry, chunk_span
from refrag_kernels.ssd.tuning import autotuned, max_blocks


@triton.jit
def _chunk_source(x, s_xt, s_xh, dt, g, k, s_kt, s_kg, o_t, m_t, i_h, i_g, o_k, o_v, K, V, H):
    """The tiles a chunk's state update needs: k [BT, BK], x [BT, BV], dt and g [BT] (fp32)."""
    b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
    b_dt = tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)
    b_k = tl.load(k + o_t[:, None] * s_kt + i_g * s_kg + o_k[None, :],
                  mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
    b_x = tl.load(x + o_t[:, None] * s_xt + i_h * s_xh + o_v[None, :],
                  mask=m_t[:, None] & (o_v < V)[None, :], other=0.0)
    return b_k, b_x, b_g, b_dt


@triton.jit
def _state_add(b_k, b_x, b_w, PRECISION: tl.constexpr):
    """sum_s w_s k_s^T x_s: [BK, BT] @ [BT, BV] -> [BK, BV], weights applied in fp32 before the cast."""
    b_kd = (b_k * b_w[:, None]).to(b_x.dtype)
    return tl.dot(tl.trans(b_kd), b_x, input_precision=PRECISION)


@triton.jit
def chunk_fwd_h_kernel(x, s_xt, s_xh, dt, g, k, s_kt, s_kg, h, hd, he, h0, ht, docs, chunks, seq_chunk_offsets,
                       H, K, V, HPG, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_H0: tl.constexpr,
                       DOC_MODE: tl.constexpr, ALL_H: tl.constexpr, STORE_FINAL: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Store the carried state entering each chunk in h (in doc_mode only where shared tokens
    read it, unless ALL_H; and the document and block-entry states its tokens read in hd, he:
    he at the chunk where the block opens), and (STORE_FINAL) the final carried state of each
    sequence in ht."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // HPG
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
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
        bos, eos = chunk_span(chunks, i_c)
        o_state = (i_c * H + i_h) * K * V + p_state
        if DOC_MODE:
            enter_doc = chunk_enter_doc(chunks, i_c)
            d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
            if has_h | ALL_H:
                tl.store(h + o_state, b_carried.to(h.dtype.element_ty), mask=m_kv)
        else:
            tl.store(h + o_state, b_carried.to(h.dtype.element_ty), mask=m_kv)
        o_t = bos + o_i
        m_t = o_t < eos
        b_k, b_x, b_g, b_dt = _chunk_source(x, s_xt, s_xh, dt, g, k, s_kt, s_kg, o_t, m_t, i_h, i_g, o_k, o_v,
                                             K, V, H)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_decay = tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)
        b_S = _state_add(b_k, b_x, b_dt * b_decay, PRECISION)
        b_E = tl.exp(b_g_last)
        if DOC_MODE:
            if has_d:
                tl.store(hd + o_state, b_doc.to(hd.dtype.element_ty), mask=m_kv)
            if opens:  # the block opens at b: its entry state is the carried state after token b - 1
                b_gb = at(b_g, o_i, b - 1)
                b_we = tl.where(o_i < b, b_dt * tl.exp(b_gb - b_g), 0.0)
                b_entry = tl.exp(b_gb) * b_carried + _state_add(b_k, b_x, b_we, PRECISION)
                tl.store(he + o_state, b_entry.to(he.dtype.element_ty), mask=m_kv)
            if cls_L == 1:  # the continued document spans the chunk
                b_doc = b_E * b_doc + b_S
            elif cls_L == 2:  # the last document starts at sd_L, from the block entry
                b_gs = at(b_g, o_i, sd_L - 1)
                b_wd = tl.where(o_i >= sd_L, b_dt * b_decay, 0.0)
                b_doc = tl.exp(b_g_last - b_gs) * b_entry + _state_add(b_k, b_x, b_wd, PRECISION)
        b_carried = b_E * b_carried + b_S
    if STORE_FINAL:
        tl.store(ht + p_user, b_carried, mask=m_kv)


chunk_fwd_h_tuned = autotuned(chunk_fwd_h_kernel)


def chunk_fwd_h(x, dt, g, k, initial_states: Optional[torch.Tensor], table: ChunkTable,
                docs: Optional[torch.Tensor], precision: str, config: Optional[triton.Config],
                store_final: bool = True, for_backward: bool = False):
    """States entering every chunk and the final state of every sequence.

    x (T, H, V) and k (T, G, K) with unit last stride; dt, g (T, H) fp32; initial_states
    (N, H, V, K) fp32 or None; docs (T,) int32 doc ids in doc_mode, else None. Returns
    (h, hd, he), each (NT, H, K, V) in x's dtype: the carried state entering each chunk and,
    in doc_mode (else None), the document / block-entry states its tokens read, and final
    (N, H, V, K) fp32 (None unless store_final). In doc_mode a state is written only where it
    is read: h where the chunk has shared tokens (every chunk for_backward), hd where it
    continues a document, he at the chunk of the table's entry_chunk column.
    """
    T, H, V = x.shape
    K = k.shape[2]
    N = table.seq_chunk_offsets.numel() - 1
    doc_mode = docs is not None
    h = x.new_empty(table.num_chunks, H, K, V)
    hd = torch.empty_like(h) if doc_mode else None
    he = torch.empty_like(h) if doc_mode else None
    final = x.new_empty(N, H, V, K, dtype=torch.float32) if store_final else None

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), triton.cdiv(K, meta["BK"]), N * H)

    launch(chunk_fwd_h_tuned, grid, config, x=x, s_xt=x.stride(0), s_xh=x.stride(1), dt=dt, g=g, k=k,
           s_kt=k.stride(0), s_kg=k.stride(1), h=h, hd=h if hd is None else hd, he=h if he is None else he,
           h0=h if initial_states is None else initial_states, ht=h if final is None else final,
           docs=table.chunks if docs is None else docs, chunks=table.chunks,
           seq_chunk_offsets=table.seq_chunk_offsets, H=H, K=K, V=V, HPG=H // k.shape[1],
           BT=table.chunk_size, USE_H0=initial_states is not None, DOC_MODE=doc_mode, ALL_H=for_backward,
           STORE_FINAL=store_final, PRECISION=precision)
    return (h, hd, he), final


@triton.jit
def _gated_do(dy, s_dyt, s_dyh, z, s_zt, s_zh, o_t, i_h, o_v, m_tv, HAS_Z: tl.constexpr):
    """Gradient w.r.t. the SSD output before the z gate: dy * silu(z), fp32 [BT, BV]."""
    b_do = tl.load(dy + o_t[:, None] * s_dyt + i_h * s_dyh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_t[:, None] * s_zt + i_h * s_zh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_do = b_do * b_z * tl.sigmoid(b_z)
    return b_do


@triton.jit
def _class_grad(b_q, b_do, b_w, sel, PRECISION: tl.constexpr):
    """sum over the tokens t with sel_t of w_t q_t^T do_t: [BK, BT] @ [BT, BV] -> [BK, BV]."""
    b_qw = (b_q * tl.where(sel, b_w, 0.0)[:, None]).to(b_q.dtype)
    return tl.dot(tl.trans(b_qw), b_do, input_precision=PRECISION)


@triton.jit
def chunk_bwd_dh_kernel(q, s_qt, s_qg, g, dy, s_dyt, s_dyh, z, s_zt, s_zh, h, hd, he, dh, dhd, dhe, dht, dh0,
                        dg_last, docs, chunks, seq_chunk_offsets, H, K, V, HPG, NV_MAX, NT, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                        DOC_MODE: tl.constexpr, HAS_Z: tl.constexpr, PRECISION: tl.constexpr):
    """Reverse walk: dh[c] = gradient w.r.t. what chunk c's tokens add to the carried state
    leaving it (in doc_mode also dhd, dhe: see the module docstring), dh0 = gradient w.r.t.
    the initial state (STORE_DH0); in doc_mode, dg_last[tile, c, h, :] = this tile's share of
    the gradient w.r.t. g at the chunk's last token, at sd_L - 1 and at b - 1 through the
    decays of the states entering the chunk (outside doc_mode that is exp(g_L) <h_c, dh_c> at
    the last token, which `chunk_bwd_dqk` adds from the tiles it loads anyway)."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // HPG
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]
    p_user = (i_n * H + i_h) * V * K + o_v[None, :] * K + o_k[:, None]
    p_dg_last = dg_last + (((i_k.to(tl.int64) * NV_MAX + i_v) * NT) * H + i_h) * 3
    b_dH = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dH += tl.load(dht + p_user, mask=m_kv, other=0.0)
    b_dD = tl.zeros([BK, BV], dtype=tl.float32)
    b_dE = tl.zeros([BK, BV], dtype=tl.float32)
    c_start = tl.load(seq_chunk_offsets + i_n).to(tl.int64)
    c_end = tl.load(seq_chunk_offsets + i_n + 1).to(tl.int64)
    for i_r in range(c_start, c_end):
        i_c = c_start + c_end - 1 - i_r
        bos, eos = chunk_span(chunks, i_c)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_E = tl.exp(b_g_last)
        o_state = (i_c * H + i_h) * K * V + p_state
        o_t = bos + o_i
        m_t = o_t < eos
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_q = tl.load(q + o_t[:, None] * s_qt + i_g * s_qg + o_k[None, :],
                      mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_do = _gated_do(dy, s_dyt, s_dyh, z, s_zt, s_zh, o_t, i_h, o_v, m_t[:, None] & (o_v < V)[None, :],
                         HAS_Z).to(b_q.dtype)
        if DOC_MODE:
            enter_doc = chunk_enter_doc(chunks, i_c)
            d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
            b_gs = tl.load(g + (bos + sd - 1) * H + i_h, mask=(cls == 2) & (sd > 0), other=0.0)
            b_w = tl.where(m_t, tl.exp(b_g - b_gs), 0.0)
            b_hc = tl.load(h + o_state, mask=m_kv, other=0.0).to(tl.float32)
            tl.store(dh + o_state, (b_dH + tl.where(cls_L == 1, b_dD, 0.0)).to(dh.dtype.element_ty), mask=m_kv)
            b_sL = b_E * tl.sum(b_hc * b_dH)
            b_ssd = b_sL * 0.0
            b_sb = b_sL * 0.0
            b_dHin = b_E * b_dH
            if has_h:
                b_dHin += _class_grad(b_q, b_do, b_w, cls == 0, PRECISION)
            b_dDin = tl.zeros([BK, BV], dtype=tl.float32)
            if has_d:
                b_dDin += _class_grad(b_q, b_do, b_w, cls == 1, PRECISION)
            if cls_L == 1:
                b_hd = tl.load(hd + o_state, mask=m_kv, other=0.0).to(tl.float32)
                b_sL += b_E * tl.sum(b_hd * b_dD)
                b_dDin += b_E * b_dD
            b_dEc = tl.zeros([BK, BV], dtype=tl.float32)
            if has_e:
                b_dEc += _class_grad(b_q, b_do, b_w, cls == 2, PRECISION)
            if d_L != 0:
                b_dEc += b_dE
            if cls_L == 2:
                tl.store(dhd + o_state, b_dD.to(dhd.dtype.element_ty), mask=m_kv)
                b_wX = tl.exp(b_g_last - at(b_g, o_i, sd_L - 1))
                e_c = chunk_entry(chunks, i_c)
                b_he = tl.load(he + (e_c * H + i_h) * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)
                b_sX = b_wX * tl.sum(b_he * b_dD)
                b_sL += b_sX
                b_ssd -= b_sX
                b_dEc += b_wX * b_dD
            b_dEin = b_dEc
            if opens:
                tl.store(dhe + o_state, b_dEc.to(dhe.dtype.element_ty), mask=m_kv)
                b_gb = tl.exp(at(b_g, o_i, b - 1))
                b_sb = b_gb * tl.sum(b_hc * b_dEc)
                b_dHin += b_gb * b_dEc
                b_dEin = b_dEin * 0.0
            tl.store(p_dg_last + i_c * H * 3, b_sL)
            tl.store(p_dg_last + i_c * H * 3 + 1, b_ssd)
            tl.store(p_dg_last + i_c * H * 3 + 2, b_sb)
            b_dH = b_dHin
            b_dD = b_dDin
            b_dE = b_dEin
        else:
            tl.store(dh + o_state, b_dH.to(dh.dtype.element_ty), mask=m_kv)
            b_qg = (b_q * tl.where(m_t, tl.exp(b_g), 0.0)[:, None]).to(b_q.dtype)
            b_dH = b_dH * b_E + tl.dot(tl.trans(b_qg), b_do, input_precision=PRECISION)  # [BK, BT] @ [BT, BV]
    if STORE_DH0:
        tl.store(dh0 + p_user, b_dH, mask=m_kv)


chunk_bwd_dh_tuned = autotuned(chunk_bwd_dh_kernel, reset_to_zero=["dg_last"])


def chunk_bwd_dh(q, g, dy, z, states, dfinal: Optional[torch.Tensor], table: ChunkTable,
                 docs: Optional[torch.Tensor], precision: str, config: Optional[triton.Config],
                 need_dh0: bool = True):
    """Reverse state recurrence.

    q (T, G, K); g (T, H) fp32; dy, z (T, H, V) (z or None: the output gate), unit last
    stride; states = (h, hd, he) as from `chunk_fwd_h`; dfinal (N, H, V, K) fp32 or None;
    docs as for `chunk_fwd_h`. Returns (dh, dhd, dhe) (NT, H, K, V) in h's dtype (dhd, dhe
    None outside doc_mode, written only for the chunks that need them), dh0 (N, H, V, K) fp32
    (None unless need_dh0) and, in doc_mode, dg_last (tiles, NT, H, 3) fp32 partial sums of
    the gradient w.r.t. g at each chunk's last token, sd_L - 1 and b - 1 through the state
    decays (None outside doc_mode).
    """
    T, H, V = dy.shape
    K = q.shape[2]
    N = table.seq_chunk_offsets.numel() - 1
    NT = table.num_chunks
    doc_mode = docs is not None
    h, hd, he = states
    nk_max, nv_max = max_blocks(K, "BK", config), max_blocks(V, "BV", config)
    dh = torch.empty_like(h)
    dhd = torch.empty_like(h) if doc_mode else None
    dhe = torch.empty_like(h) if doc_mode else None
    dh0 = dy.new_empty(N, H, V, K, dtype=torch.float32) if need_dh0 else None
    dg_last = dy.new_zeros(nk_max * nv_max, NT, H, 3, dtype=torch.float32) if doc_mode else None

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), triton.cdiv(K, meta["BK"]), N * H)

    zz = dy if z is None else z
    launch(chunk_bwd_dh_tuned, grid, config, q=q, s_qt=q.stride(0), s_qg=q.stride(1), g=g, dy=dy,
           s_dyt=dy.stride(0), s_dyh=dy.stride(1), z=zz, s_zt=zz.stride(0), s_zh=zz.stride(1), h=h,
           hd=h if hd is None else hd, he=h if he is None else he, dh=dh, dhd=dh if dhd is None else dhd,
           dhe=dh if dhe is None else dhe, dht=dh if dfinal is None else dfinal, dh0=dh if dh0 is None else dh0,
           dg_last=dh if dg_last is None else dg_last, docs=table.chunks if docs is None else docs,
           chunks=table.chunks, seq_chunk_offsets=table.seq_chunk_offsets, H=H, K=K, V=V, HPG=H // q.shape[1],
           NV_MAX=nv_max, NT=NT, BT=table.chunk_size, USE_DHT=dfinal is not None, STORE_DH0=need_dh0,
           DOC_MODE=doc_mode, HAS_Z=z is not None, PRECISION=precision)
    return (dh, dhd, dhe), dh0, dg_last
