"""Chunk-local cumulative sums of the log-decay over the chunks of a `ChunkTable`.

The chunk table (chunks that never straddle a segment, with the IS_DOC / SEG_START /
BLOCK_START flags that drive the doc-mode state routing in `chunk_h`) is per-row metadata:
`kernels.layout.DocLayout.chunk_table(chunk_size, doc_mode)` builds and caches it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.layout import BLOCK_START, IS_DOC, SEG_START, ChunkTable

__all__ = ["ChunkTable", "IS_DOC", "SEG_START", "BLOCK_START", "chunk_decay_cumsum", "chunk_decay_grad"]


@triton.jit
def chunk_decay_cumsum_kernel(dt, A, g, chunks, H, BT: tl.constexpr, BH: tl.constexpr):
    """g[t, h] = sum of dt[s, h] * A[h] over the tokens s <= t of t's chunk."""
    i_c, i_hb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos = tl.load(chunks + i_c * 3).to(tl.int64)
    eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    o_t = bos + tl.arange(0, BT)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    m_th = (o_t < eos)[:, None] & m_h[None, :]
    p_th = o_t[:, None] * H + o_h[None, :]
    b_a = tl.load(dt + p_th, mask=m_th, other=0.0) * tl.load(A + o_h, mask=m_h, other=0.0)[None, :]
    tl.store(g + p_th, tl.cumsum(b_a, axis=0), mask=m_th)


def chunk_decay_cumsum(dt: torch.Tensor, A: torch.Tensor, table: ChunkTable) -> torch.Tensor:
    """Chunk-local cumulative log-decay. dt (T, H) fp32, A (H,) fp32 -> g (T, H) fp32."""
    g = torch.zeros_like(dt)
    H = dt.shape[1]
    BH = min(triton.next_power_of_2(H), 64)
    if table.num_chunks:
        grid = (table.num_chunks, triton.cdiv(H, BH))
        chunk_decay_cumsum_kernel[grid](dt, A, g, table.chunks, H, BT=table.chunk_size, BH=BH)
    return g


@triton.jit
def chunk_decay_grad_kernel(dg, dg_last, da, chunks, H, BT: tl.constexpr, BH: tl.constexpr):
    """da[s, h] = sum of dg[t, h] over tokens t >= s of the chunk, plus dg_last[chunk, h]
    (the gradient of the chunk's total decay, which every token's dt*A feeds)."""
    i_c, i_hb = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bos = tl.load(chunks + i_c * 3).to(tl.int64)
    eos = tl.load(chunks + i_c * 3 + 1).to(tl.int64)
    o_t = bos + tl.arange(0, BT)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    m_th = (o_t < eos)[:, None] & m_h[None, :]
    p_th = o_t[:, None] * H + o_h[None, :]
    b_dg = tl.load(dg + p_th, mask=m_th, other=0.0)
    b_da = tl.cumsum(b_dg, axis=0, reverse=True) + tl.load(dg_last + i_c * H + o_h, mask=m_h, other=0.0)[None, :]
    tl.store(da + p_th, b_da, mask=m_th)


def chunk_decay_grad(dg: torch.Tensor, dg_last: torch.Tensor, table: ChunkTable) -> torch.Tensor:
    """Gradient w.r.t. the per-token log-decay dt*A from the gradient w.r.t. its chunk-local
    cumsum g. dg (T, H) fp32, dg_last (NT, H) fp32 (gradient of each chunk's last g) -> (T, H)."""
    da = torch.zeros_like(dg)
    H = dg.shape[1]
    BH = min(triton.next_power_of_2(H), 64)
    if table.num_chunks:
        grid = (table.num_chunks, triton.cdiv(H, BH))
        chunk_decay_grad_kernel[grid](dg, dg_last, da, table.chunks, H, BT=table.chunk_size, BH=BH)
    return da
