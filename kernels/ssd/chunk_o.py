"""Intra-chunk part of the chunked SSD: outputs (forward) and the gradients of q, k, v, g.

Per chunk (q = C, k = B, v = x * dt, g = chunk-local cumsum of dt * A, h_in the state
the chunk reads, L its last token):

    y_t = exp(g_t) q_t h_in + sum_{s <= t} exp(g_t - g_s) (q_t . k_s) dt_s x_s + D x_t
    out_t = y_t * silu(z_t)                      (when z is given)

Grouped B/C: head i_h reads group i_h // HPG (HPG = heads per group). The output and dv
kernels run one program per (V-block, chunk, group) and loop over the group's heads, so
C.B^T is formed once per (chunk, group, V-block); dq and dk are summed over the heads of a
group inside the kernel. Dot operands are in the input dtype (decays, dt and the gate are
applied in fp32 before the cast), accumulation in fp32. Inputs are read through their
token and head strides (views of one projection need no copy); outputs are contiguous.

doc_mode (see `refrag_kernels.ssd.chunks`): token t reads hc, hd or he by its class, decayed by
exp(g_t - g_{sd_t - 1}) for a document that starts in the chunk (else exp(g_t)), and the
intra-chunk scores are masked so that a document token sees only its own document.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels.common.autotune import launch
from refrag_kernels.ssd.chunk_h import _gated_do
from refrag_kernels.ssd.chunks import ChunkTable, at, chunk_docs, chunk_enter_doc, chunk_entry, chunk_span
from refrag_kernels.ssd.tuning import autotuned, max_blocks


@triton.jit
def _load_tk(t, s_t, s_g, o_t, i_g, o_k, m_tk):
    """[BT, BK] tile of a (T, G, K) tensor with unit last stride."""
    return tl.load(t + o_t[:, None] * s_t + i_g * s_g + o_k[None, :], mask=m_tk, other=0.0)


@triton.jit
def _doc_visible(d, o_i, m_t):
    """[t, s] visibility inside a chunk in doc_mode: s <= t, both live, and t shared or s in t's document."""
    return (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :] & ((d[:, None] == 0) | (d[:, None] == d[None, :]))


@triton.jit
def _read_states(b_o, b_q, h, hd, he, o_hs, o_he, m_kv, cls, has_h, has_d, has_e, PRECISION: tl.constexpr):
    """b_o + (q_t . X_cls(t)) for the K-block whose state tiles are at o_hs (he: o_he) ([BT, BK] @ [BK, BV])."""
    if has_h:
        b_h = tl.load(h + o_hs, mask=m_kv, other=0.0).to(b_q.dtype)
        b_o += tl.dot(tl.where((cls == 0)[:, None], b_q, 0.0).to(b_q.dtype), b_h, input_precision=PRECISION)
    if has_d:
        b_h = tl.load(hd + o_hs, mask=m_kv, other=0.0).to(b_q.dtype)
        b_o += tl.dot(tl.where((cls == 1)[:, None], b_q, 0.0).to(b_q.dtype), b_h, input_precision=PRECISION)
    if has_e:
        b_h = tl.load(he + o_he, mask=m_kv, other=0.0).to(b_q.dtype)
        b_o += tl.dot(tl.where((cls == 2)[:, None], b_q, 0.0).to(b_q.dtype), b_h, input_precision=PRECISION)
    return b_o


@triton.jit
def chunk_fwd_o_kernel(x, s_xt, s_xh, z, s_zt, s_zh, dt, g, q, s_qt, s_qg, k, s_kt, s_kg, h, hd, he, D, y, docs,
                       chunks, H, K, V, HPG, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr,
                       DOC_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """out[chunk tokens, heads of the group, V-block], D term and z gate included."""
    i_v, i_c, i_g = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos, eos = chunk_span(chunks, i_c)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    if DOC_MODE:
        enter_doc = chunk_enter_doc(chunks, i_c)
        d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
        e_c = chunk_entry(chunks, i_c)
        m_A = _doc_visible(d, o_i, m_t)
    else:
        m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_CB = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = _load_tk(q, s_qt, s_qg, o_t, i_g, o_k, m_tk)
        b_k = _load_tk(k, s_kt, s_kg, o_t, i_g, o_k, m_tk)
        b_CB += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BT, BK] @ [BK, BT] -> [BT, BT]
    for i_hh in range(HPG):
        i_h = i_g * HPG + i_hh
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_q = _load_tk(q, s_qt, s_qg, o_t, i_g, o_k, m_t[:, None] & (o_k < K)[None, :])
            o_hs = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            m_kv = (o_k < K)[:, None] & m_v[None, :]
            if DOC_MODE:
                o_he = (e_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
                b_o = _read_states(b_o, b_q, h, hd, he, o_hs, o_he, m_kv, cls, has_h, has_d, has_e, PRECISION)
            else:
                b_h = tl.load(h + o_hs, mask=m_kv, other=0.0).to(b_q.dtype)
                b_o += tl.dot(b_q, b_h, input_precision=PRECISION)  # [BT, BK] @ [BK, BV] -> [BT, BV]
        if DOC_MODE:
            b_gs = tl.load(g + (bos + sd - 1) * H + i_h, mask=(cls == 2) & (sd > 0), other=0.0)
            b_o = b_o * tl.where(m_t, tl.exp(b_g - b_gs), 0.0)[:, None]
        else:
            b_o = b_o * tl.exp(b_g)[:, None]
        b_dt = tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)
        b_x = tl.load(x + o_t[:, None] * s_xt + i_h * s_xh + o_v[None, :], mask=m_tv, other=0.0)
        b_A = tl.where(m_A, b_CB * tl.exp(b_g[:, None] - b_g[None, :]) * b_dt[None, :], 0.0)
        b_o += tl.dot(b_A.to(b_x.dtype), b_x, input_precision=PRECISION)  # [BT, BT] @ [BT, BV] -> [BT, BV]
        if HAS_D:
            if D_PER_CHANNEL:
                b_D = tl.load(D + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            else:
                b_D = tl.load(D + i_h).to(tl.float32)
            b_o += b_x.to(tl.float32) * b_D
        if HAS_Z:
            b_z = tl.load(z + o_t[:, None] * s_zt + i_h * s_zh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_o = b_o * b_z * tl.sigmoid(b_z)
        tl.store(y + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_o.to(y.dtype.element_ty), mask=m_tv)


chunk_fwd_o_tuned = autotuned(chunk_fwd_o_kernel)


def chunk_fwd_o(x, z, dt, g, q, k, states, D, table: ChunkTable, docs: Optional[torch.Tensor], total: int,
                precision: str, config: Optional[triton.Config]):
    """Chunk outputs. x, z (T, H, V) (z or None), q, k (T, G, K), unit last stride; dt, g
    (T, H) fp32; states = (h, hd, he) from `chunk_fwd_h`; D (H,), (H, V) or None; docs (T,)
    int32 in doc_mode, else None; chunks cover tokens [0, total). Returns out (T, H, V) in x's
    dtype, zero on padding tokens."""
    h, hd, he = states
    T, H, V = x.shape
    G, K = q.shape[1:]
    y = torch.empty(T, H, V, dtype=x.dtype, device=x.device)
    y[total:].zero_()
    if table.num_chunks:
        def grid(meta):
            return (triton.cdiv(V, meta["BV"]), table.num_chunks, G)

        zz = x if z is None else z
        launch(chunk_fwd_o_tuned, grid, config, x=x, s_xt=x.stride(0), s_xh=x.stride(1), z=zz, s_zt=zz.stride(0),
               s_zh=zz.stride(1), dt=dt, g=g, q=q, s_qt=q.stride(0), s_qg=q.stride(1), k=k, s_kt=k.stride(0),
               s_kg=k.stride(1), h=h, hd=h if hd is None else hd, he=h if he is None else he,
               D=dt if D is None else D, y=y, docs=table.chunks if docs is None else docs, chunks=table.chunks, H=H,
               K=K, V=V, HPG=H // G, BT=table.chunk_size, HAS_D=D is not None,
               D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None, DOC_MODE=docs is not None,
               PRECISION=precision)
    return y


@triton.jit
def _dq_states(b_dq, b_do, h, hd, he, o_hs, o_he, m_kv, cls, has_h, has_d, has_e, PRECISION: tl.constexpr):
    """b_dq + do_t X_cls(t)^T for the state tiles at o_hs (he: o_he) ([BT, BV] @ [BV, BK])."""
    if has_h:
        b_h = tl.load(h + o_hs, mask=m_kv, other=0.0).to(b_do.dtype)
        b_dq += tl.where((cls == 0)[:, None], tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION), 0.0)
    if has_d:
        b_h = tl.load(hd + o_hs, mask=m_kv, other=0.0).to(b_do.dtype)
        b_dq += tl.where((cls == 1)[:, None], tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION), 0.0)
    if has_e:
        b_h = tl.load(he + o_he, mask=m_kv, other=0.0).to(b_do.dtype)
        b_dq += tl.where((cls == 2)[:, None], tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION), 0.0)
    return b_dq


@triton.jit
def _source_weights(b_g, b_dt, b_g_last, o_i, m_t, sd_L, b, cls_L, opens):
    """Per source token s, the weights of the three state gradients of `chunk_bwd_dh` in what s
    adds to the states leaving the chunk: dh (every token, exp(g_L - g_s)), dhd (tokens of the
    last token's document when it starts in the chunk, exp(g_L - g_s)) and dhe (tokens before a
    block that opens at b, exp(g_{b-1} - g_s)); dt_s included, zero where unused."""
    b_wL = tl.where(m_t, b_dt * tl.exp(b_g_last - b_g), 0.0)
    b_wD = tl.where((o_i >= sd_L) & (cls_L == 2), b_wL, 0.0)
    b_wE = tl.where((o_i < b) & opens, b_dt * tl.exp(at(b_g, o_i, b - 1) - b_g), 0.0)
    return b_wL, b_wD, b_wE


@triton.jit
def chunk_bwd_dqk_kernel(x, s_xt, s_xh, dy, s_dyt, s_dyh, z, s_zt, s_zh, dt, g, q, s_qt, s_qg, k, s_kt, s_kg, h,
                         hd, he, dh, dhd, dhe, dq, dk, dg, docs, chunks, T, H, K, V, HPG, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, HAS_Z: tl.constexpr, DOC_MODE: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dq, dk for one (chunk, group, K-block), summed over the group's heads, and this
    K-block's share of dg (gradient w.r.t. g) for each head: dg_t = q_t.dq_t - k_t.dk_t,
    plus, at the chunk's last token, the gradient of the source terms through exp(g_L) and
    (outside doc_mode) that of the decayed entering state, exp(g_L) <h_c, dh_c>. In doc_mode
    the source terms of a block opening at b add at b - 1 instead, and a class-2 token's state
    read subtracts at sd_t - 1."""
    i_k, i_c, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos, eos = chunk_span(chunks, i_c)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    b_q = _load_tk(q, s_qt, s_qg, o_t, i_g, o_k, m_tk)
    b_k = _load_tk(k, s_kt, s_kg, o_t, i_g, o_k, m_tk)
    if DOC_MODE:
        enter_doc = chunk_enter_doc(chunks, i_c)
        d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
        e_c = chunk_entry(chunks, i_c)
        m_A = _doc_visible(d, o_i, m_t)
    else:
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
        b_dkD = tl.zeros([BT, BK], dtype=tl.float32)
        b_dkE = tl.zeros([BT, BK], dtype=tl.float32)
        b_dA = tl.zeros([BT, BT], dtype=tl.float32)
        b_hdh = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)  # fp32 scalar
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
            p_state = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_x = tl.load(x + o_t[:, None] * s_xt + i_h * s_xh + o_v[None, :], mask=m_tv, other=0.0)
            b_do = _gated_do(dy, s_dyt, s_dyh, z, s_zt, s_zh, o_t, i_h, o_v, m_tv, HAS_Z).to(b_x.dtype)
            b_dh = tl.load(dh + p_state, mask=m_kv, other=0.0).to(b_x.dtype)
            b_dA += tl.dot(b_do, tl.trans(b_x), input_precision=PRECISION)  # [BT, BV] @ [BV, BT] -> [BT, BT]
            b_dk += tl.dot(b_x, tl.trans(b_dh), input_precision=PRECISION)  # [BT, BV] @ [BV, BK] -> [BT, BK]
            if DOC_MODE:
                o_he = (e_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
                b_dq = _dq_states(b_dq, b_do, h, hd, he, p_state, o_he, m_kv, cls, has_h, has_d, has_e, PRECISION)
                if cls_L == 2:
                    b_dhd = tl.load(dhd + p_state, mask=m_kv, other=0.0).to(b_x.dtype)
                    b_dkD += tl.dot(b_x, tl.trans(b_dhd), input_precision=PRECISION)
                if opens:
                    b_dhe = tl.load(dhe + p_state, mask=m_kv, other=0.0).to(b_x.dtype)
                    b_dkE += tl.dot(b_x, tl.trans(b_dhe), input_precision=PRECISION)
            else:
                b_h = tl.load(h + p_state, mask=m_kv, other=0.0).to(b_x.dtype)
                b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PRECISION)  # [BT, BV] @ [BV, BK] -> [BT, BK]
                b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32))
        b_kf = b_k.to(tl.float32)
        b_qf = b_q.to(tl.float32)
        if DOC_MODE:
            b_gs = tl.load(g + (bos + sd - 1) * H + i_h, mask=(cls == 2) & (sd > 0), other=0.0)
            b_dq = b_dq * tl.where(m_t, tl.exp(b_g - b_gs), 0.0)[:, None]
            b_read = tl.where((cls == 2) & (sd > 0), tl.sum(b_qf * b_dq, axis=1), 0.0)
            b_wL, b_wD, b_wE = _source_weights(b_g, b_dt, b_g_last, o_i, m_t, sd_L, b, cls_L, opens)
            b_dk = b_dk * b_wL[:, None] + b_dkD * b_wD[:, None]
            b_dkE = b_dkE * b_wE[:, None]
            b_dg_last = tl.sum(b_dk * b_kf)
            b_dg_b = tl.sum(b_dkE * b_kf)
            b_dk += b_dkE
        else:
            b_dq = b_dq * tl.exp(b_g)[:, None]
            b_dk = b_dk * tl.where(m_t, b_dt * tl.exp(b_g_last - b_g), 0.0)[:, None]
            b_dg_last = tl.sum(b_dk * b_kf) + tl.exp(b_g_last) * b_hdh
        b_dA = tl.where(m_A, b_dA * tl.exp(b_g[:, None] - b_g[None, :]) * b_dt[None, :], 0.0).to(b_q.dtype)
        b_dq += tl.dot(b_dA, b_k, input_precision=PRECISION)  # [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dk += tl.dot(tl.trans(b_dA), b_q, input_precision=PRECISION)  # [BT, BT] @ [BT, BK] -> [BT, BK]
        b_dg = tl.sum(b_qf * b_dq, axis=1) - tl.sum(b_kf * b_dk, axis=1)
        b_dg += tl.where(o_t == eos - 1, b_dg_last, 0.0)
        if DOC_MODE:
            b_dg += tl.where(o_i == b - 1, b_dg_b, 0.0)
            # a class-2 token's state read decays by exp(-g_{sd-1}): its share goes to sd - 1
            b_dg -= tl.sum(tl.where(sd[None, :] - 1 == o_i[:, None], b_read[None, :], 0.0), axis=1)
        tl.store(dg + (i_k * T + o_t) * H + i_h, b_dg, mask=m_t)
        b_dq_group += b_dq
        b_dk_group += b_dk
    p_out = (o_t[:, None] * (H // HPG) + i_g) * K + o_k[None, :]
    tl.store(dq + p_out, b_dq_group.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_out, b_dk_group.to(dk.dtype.element_ty), mask=m_tk)


chunk_bwd_dqk_tuned = autotuned(chunk_bwd_dqk_kernel, reset_to_zero=["dg"])


def chunk_bwd_dqk(x, dy, z, dt, g, q, k, states, dstates, table: ChunkTable, docs: Optional[torch.Tensor],
                  total: int, precision: str, config: Optional[triton.Config]):
    """Gradients w.r.t. q (C) and k (B), contiguous (T, G, K) in their dtypes, zero on
    padding, and dg (K-blocks, T, H) fp32 partial sums of the gradient w.r.t. the
    chunk-local cumsum g (in doc_mode without the state-decay part, which `chunk_bwd_dh`
    returns there). states = (h, hd, he) from `chunk_fwd_h`, dstates = (dh, dhd, dhe) from
    `chunk_bwd_dh`."""
    (h, hd, he), (dh, dhd, dhe) = states, dstates
    T, H, V = x.shape
    G, K = q.shape[1:]
    nk_max = max_blocks(K, "BK", config)
    dq = torch.empty(T, G, K, dtype=q.dtype, device=q.device)
    dk = torch.empty(T, G, K, dtype=k.dtype, device=k.device)
    dq[total:].zero_()
    dk[total:].zero_()
    dg = torch.zeros(nk_max, T, H, dtype=torch.float32, device=x.device)
    if table.num_chunks:
        def grid(meta):
            return (triton.cdiv(K, meta["BK"]), table.num_chunks, G)

        zz = dy if z is None else z
        launch(chunk_bwd_dqk_tuned, grid, config, x=x, s_xt=x.stride(0), s_xh=x.stride(1), dy=dy,
               s_dyt=dy.stride(0), s_dyh=dy.stride(1), z=zz, s_zt=zz.stride(0), s_zh=zz.stride(1), dt=dt, g=g, q=q,
               s_qt=q.stride(0), s_qg=q.stride(1), k=k, s_kt=k.stride(0), s_kg=k.stride(1), h=h,
               hd=h if hd is None else hd, he=h if he is None else he, dh=dh, dhd=dh if dhd is None else dhd,
               dhe=dh if dhe is None else dhe, dq=dq, dk=dk, dg=dg, docs=table.chunks if docs is None else docs,
               chunks=table.chunks, T=T, H=H, K=K, V=V, HPG=H // G, BT=table.chunk_size, HAS_Z=z is not None,
               DOC_MODE=docs is not None, PRECISION=precision)
    return dq, dk, dg


@triton.jit
def chunk_bwd_dv_kernel(x, s_xt, s_xh, dy, s_dyt, s_dyh, z, s_zt, s_zh, dt, g, q, s_qt, s_qg, k, s_kt, s_kg, h,
                        hd, he, dh, dhd, dhe, D, dx, dz, ddt, dD, docs, chunks, T, H, K, V, HPG, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
                        HAS_Z: tl.constexpr, DOC_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """For one (V-block, chunk, group), per head of the group: dv written as dx = dv * dt
    (+ D * do), this V-block's share of the gradient w.r.t. dt through v = x * dt, the
    chunk's share of dD and, with a gate, dz (the pre-gate output is recomputed here)."""
    i_v, i_c, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos, eos = chunk_span(chunks, i_c)
    o_i = tl.arange(0, BT)
    o_t = bos + o_i
    m_t = o_t < eos
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    # b_At[s, t] = k_s . q_t, used where the query t sees the key s
    if DOC_MODE:
        enter_doc = chunk_enter_doc(chunks, i_c)
        d, cls, sd, has_h, has_d, has_e, opens, b, d_L, cls_L, sd_L = chunk_docs(docs, bos, eos, enter_doc, BT)
        e_c = chunk_entry(chunks, i_c)
        m_At = tl.trans(_doc_visible(d, o_i, m_t))
    else:
        m_At = (o_i[:, None] <= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    b_BC = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_q = _load_tk(q, s_qt, s_qg, o_t, i_g, o_k, m_tk)
        b_k = _load_tk(k, s_kt, s_kg, o_t, i_g, o_k, m_tk)
        b_BC += tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BT, BK] @ [BK, BT] -> [BT, BT]
    for i_hh in range(HPG):
        i_h = i_g * HPG + i_hh
        b_g = tl.load(g + o_t * H + i_h, mask=m_t, other=0.0)
        b_g_last = tl.load(g + (eos - 1) * H + i_h)
        b_dt = tl.load(dt + o_t * H + i_h, mask=m_t, other=0.0)
        b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        b_dvD = tl.zeros([BT, BV], dtype=tl.float32)
        b_dvE = tl.zeros([BT, BV], dtype=tl.float32)
        b_y = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            m_kv = (o_k < K)[:, None] & m_v[None, :]
            p_state = (i_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
            b_k = _load_tk(k, s_kt, s_kg, o_t, i_g, o_k, m_tk)
            b_dh = tl.load(dh + p_state, mask=m_kv, other=0.0).to(b_k.dtype)
            b_dv += tl.dot(b_k, b_dh, input_precision=PRECISION)  # [BT, BK] @ [BK, BV] -> [BT, BV]
            if DOC_MODE:
                if cls_L == 2:
                    b_dhd = tl.load(dhd + p_state, mask=m_kv, other=0.0).to(b_k.dtype)
                    b_dvD += tl.dot(b_k, b_dhd, input_precision=PRECISION)
                if opens:
                    b_dhe = tl.load(dhe + p_state, mask=m_kv, other=0.0).to(b_k.dtype)
                    b_dvE += tl.dot(b_k, b_dhe, input_precision=PRECISION)
            if HAS_Z:
                b_q = _load_tk(q, s_qt, s_qg, o_t, i_g, o_k, m_tk)
                if DOC_MODE:
                    o_he = (e_c * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
                    b_y = _read_states(b_y, b_q, h, hd, he, p_state, o_he, m_kv, cls, has_h, has_d, has_e,
                                       PRECISION)
                else:
                    b_h = tl.load(h + p_state, mask=m_kv, other=0.0).to(b_q.dtype)
                    b_y += tl.dot(b_q, b_h, input_precision=PRECISION)  # [BT, BK] @ [BK, BV] -> [BT, BV]
        if DOC_MODE:
            b_wL, b_wD, b_wE = _source_weights(b_g, 1.0, b_g_last, o_i, m_t, sd_L, b, cls_L, opens)
            b_dv = b_dv * b_wL[:, None] + b_dvD * b_wD[:, None] + b_dvE * b_wE[:, None]
            b_gs = tl.load(g + (bos + sd - 1) * H + i_h, mask=(cls == 2) & (sd > 0), other=0.0)
            b_yw = tl.where(m_t, tl.exp(b_g - b_gs), 0.0)
        else:
            b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_g), 0.0)[:, None]
            b_yw = tl.exp(b_g)
        b_At = tl.where(m_At, b_BC * tl.exp(b_g[None, :] - b_g[:, None]), 0.0)
        p_x = o_t[:, None] * s_xt + i_h * s_xh + o_v[None, :]
        b_x = tl.load(x + p_x, mask=m_tv, other=0.0)
        b_xf = b_x.to(tl.float32)
        if HAS_D:
            if D_PER_CHANNEL:
                b_D = tl.load(D + i_h * V + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
            else:
                b_D = tl.load(D + i_h).to(tl.float32)
        b_dy = tl.load(dy + o_t[:, None] * s_dyt + i_h * s_dyh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z + o_t[:, None] * s_zt + i_h * s_zh + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_y = b_y * b_yw[:, None]
            b_y += tl.dot(tl.trans((b_At * b_dt[:, None]).to(b_x.dtype)), b_x, input_precision=PRECISION)
            if HAS_D:
                b_y += b_xf * b_D
            b_dz = b_dy * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(dz + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_dz.to(dz.dtype.element_ty), mask=m_tv)
            b_do = b_dy * b_z * b_sig
        else:
            b_do = b_dy
        b_dv += tl.dot(b_At.to(b_x.dtype), b_do.to(b_x.dtype), input_precision=PRECISION)  # [BT, BT] @ [BT, BV]
        b_dx = b_dv * b_dt[:, None]
        if HAS_D:
            b_dx += b_do * b_D
            b_dDx = tl.where(m_tv, b_do * b_xf, 0.0)
            if D_PER_CHANNEL:
                tl.store(dD + (i_c * H + i_h) * V + o_v, tl.sum(b_dDx, axis=0), mask=m_v)
            else:
                tl.store(dD + (i_v * tl.num_programs(1) + i_c) * H + i_h, tl.sum(b_dDx))
        tl.store(dx + (o_t[:, None] * H + i_h) * V + o_v[None, :], b_dx.to(dx.dtype.element_ty), mask=m_tv)
        tl.store(ddt + (i_v * T + o_t) * H + i_h, tl.sum(b_dv * b_xf, axis=1), mask=m_t)


chunk_bwd_dv_tuned = autotuned(chunk_bwd_dv_kernel, reset_to_zero=["ddt", "dD"])


def chunk_bwd_dv(x, dy, z, dt, g, q, k, states, dstates, D, table: ChunkTable, docs: Optional[torch.Tensor],
                 total: int, precision: str, config: Optional[triton.Config]):
    """Gradients w.r.t. x and z, contiguous (T, H, V) in their dtypes, zero on padding;
    ddt (V-blocks, T, H) fp32 partial sums of the gradient w.r.t. dt through v = x * dt;
    dD in D's shape, fp32 (None without D). Inputs as for `chunk_bwd_dqk`."""
    (h, hd, he), (dh, dhd, dhe) = states, dstates
    T, H, V = x.shape
    G, K = q.shape[1:]
    NT = table.num_chunks
    nv_max = max_blocks(V, "BV", config)
    dx = torch.empty(T, H, V, dtype=x.dtype, device=x.device)
    dx[total:].zero_()
    dz = None
    if z is not None:
        dz = torch.empty(T, H, V, dtype=z.dtype, device=z.device)
        dz[total:].zero_()
    ddt = torch.zeros(nv_max, T, H, dtype=torch.float32, device=x.device)
    dD = None
    if D is not None:
        dD = torch.zeros((NT, H, V) if D.dim() == 2 else (nv_max, NT, H), dtype=torch.float32, device=x.device)
    if NT:
        def grid(meta):
            return (triton.cdiv(V, meta["BV"]), NT, G)

        zz = dy if z is None else z
        launch(chunk_bwd_dv_tuned, grid, config, x=x, s_xt=x.stride(0), s_xh=x.stride(1), dy=dy,
               s_dyt=dy.stride(0), s_dyh=dy.stride(1), z=zz, s_zt=zz.stride(0), s_zh=zz.stride(1), dt=dt, g=g, q=q,
               s_qt=q.stride(0), s_qg=q.stride(1), k=k, s_kt=k.stride(0), s_kg=k.stride(1), h=h,
               hd=h if hd is None else hd, he=h if he is None else he, dh=dh, dhd=dh if dhd is None else dhd,
               dhe=dh if dhe is None else dhe, D=dt if D is None else D, dx=dx, dz=dx if dz is None else dz, ddt=ddt,
               dD=ddt if dD is None else dD, docs=table.chunks if docs is None else docs, chunks=table.chunks, T=T,
               H=H, K=K, V=V, HPG=H // G, BT=table.chunk_size, HAS_D=D is not None,
               D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None, DOC_MODE=docs is not None,
               PRECISION=precision)
    if dD is not None:
        dD = dD.sum(0) if D.dim() == 2 else dD.sum((0, 1))
    return dx, dz, ddt, dD
