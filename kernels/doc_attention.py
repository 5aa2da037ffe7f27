"""Fused doc-boundary flash attention (forward and backward) in Triton.

Mask rule (docs/architecture.md "Packed documents"): query i sees key j iff both are in the same example,
``j <= i`` (when causal), and ``doc_i == 0 or doc_j == 0 or doc_i == doc_j``. Tokens past
``cu_seqlens[-1]`` are padding: output 0, lse -inf, zero gradients.

The mask is never materialized. ``DocLayout.tile_summary`` lists, per query block, the key
blocks holding at least one visible pair (and whether every pair is visible); the kernels
visit only those tiles and rebuild the mask of a partial tile from the per-token example
index and doc id. Memory is O(L).

Kernels:
  forward   program per (query block, query head): online softmax over the listed key blocks.
  backward  delta = rowsum(o * do) - dlse; dk/dv program per (key block, kv head) over the
            query blocks that see it and the query heads of its GQA group; dq program per
            (query block, query head) over its key blocks. Every gradient element is
            accumulated by one program in a fixed order (no atomics), so the backward is
            always deterministic: repeated runs give bitwise identical gradients.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from refrag_kernels import reference
from refrag_kernels.common.checks import check_cu_seqlens, check_doc_ids, check_layout, check_same_device
from refrag_kernels.common.dispatch import INTERPRET, use_torch_path, use_triton
from refrag_kernels.layout import DocLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
LOG2E = 1.4426950408889634


class AttnConfig(NamedTuple):
    """Launch configuration: query block, key block, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Small config spaces for head dims 64 and 128 on GPU; the best one is picked per shape family.
# Forward, ptxas bf16 sm_90 spill stores per thread at head dim 64 / 128 (profiles/sm90_compile.py):
# (128, 64, 8 warps) 0 / 100 B, (64, 64, 4) 0 / 232 B, (64, 32, 4) 0 / 0, (64, 64, 8) 0 / 0. The
# forward holds V in registers on mixed tiles (non-finite V rows zeroed, the rows that see them
# poisoned: issue 23), about 35 more registers a thread: (128, 64, 4 warps) then spilled 1576 / 2300 B
# and (128, 128, 8) 616 / 780 B, so they left the space (a config spilling that much does not win).
FWD_CONFIGS = (
    AttnConfig(128, 64, 8, 3),
    AttnConfig(64, 64, 4, 3),
    AttnConfig(64, 32, 4, 2),
    AttnConfig(64, 64, 8, 2),
)
BWD_CONFIGS = (
    AttnConfig(64, 64, 8, 2),
    AttnConfig(64, 64, 4, 2),
    AttnConfig(64, 128, 8, 2),
    AttnConfig(128, 64, 8, 2),
    AttnConfig(32, 64, 4, 2),
    AttnConfig(32, 32, 4, 1),  # fits GPUs with ~100 KB shared memory at head dim 256
)
# Under TRITON_INTERPRET=1 benchmarking is meaningless and small blocks keep tests fast.
INTERPRET_CONFIG = AttnConfig(32, 16, 1, 1)

_TUNED: dict = {}


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _visible(q_seq, q_doc, q_pos, k_seq, k_doc, k_pos, CAUSAL: tl.constexpr):
    """Query (example, doc id, position) sees key (example, doc id, position), broadcast:
    pass [BM, 1] and [1, BN] operands for a [BM, BN] mask, [1, BM] and [BN, 1] for its
    transpose. Padding queries and keys carry distinct negative example indices."""
    m_vis = (q_seq == k_seq) & ((q_doc == 0) | (k_doc == 0) | (q_doc == k_doc))
    if CAUSAL:
        m_vis = m_vis & (q_pos >= k_pos)
    return m_vis


@triton.jit
def _tile_range(indptr, i_blk, N_BLOCKS):
    """[start, end) of block i_blk's entries in a CSR list; blocks past N_BLOCKS get none."""
    start = tl.load(indptr + tl.minimum(i_blk, N_BLOCKS))
    end = tl.load(indptr + tl.minimum(i_blk + 1, N_BLOCKS))
    return start, end


@triton.jit
def _is_full_tile(full_flag, i_m, i_n, T, BM: tl.constexpr, BN: tl.constexpr):
    """A listed full tile skips mask math only when it holds no padding row or column."""
    return (full_flag != 0) & ((i_m + 1) * BM <= T) & ((i_n + 1) * BN <= T)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, seq_idx, doc_ids, kv_indptr, kv_indices, kv_full,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    L, T, NQB, qk_scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o and lse of one query block and query head: online softmax over its listed key blocks."""
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // G
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_m = o_m < T  # padding rows are never read (they may hold NaN)
    q_seq = tl.load(seq_idx + o_m, mask=m_m, other=-1)
    q_doc = tl.load(doc_ids + o_m, mask=m_m, other=0)
    p_q = q + o_m[:, None].to(tl.int64) * stride_qt + i_h.to(tl.int64) * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    b_poison = tl.zeros([BM], dtype=tl.int32)  # 1: the row sees a non-finite V row zeroed below
    start, end = _tile_range(kv_indptr, i_m, NQB)
    for idx in range(start, end):
        i_n = tl.load(kv_indices + idx)
        full = _is_full_tile(tl.load(kv_full + idx), i_m, i_n, T, BM, BN)
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < T
        p_k = k + o_n[:, None].to(tl.int64) * stride_kt + i_hk.to(tl.int64) * stride_kh + o_d[None, :]
        p_v = v + o_n[:, None].to(tl.int64) * stride_vt + i_hk.to(tl.int64) * stride_vh + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
        b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
        # [BM, BD] @ [BD, BN] -> [BM, BN], log2 domain
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale
        if not full:
            k_seq = tl.load(seq_idx + o_n, mask=m_n, other=-2)
            k_doc = tl.load(doc_ids + o_n, mask=m_n, other=0)
            m_vis = _visible(q_seq[:, None], q_doc[:, None], o_m[:, None],
                             k_seq[None, :], k_doc[None, :], o_n[None, :], CAUSAL)
            b_s = tl.where(m_vis, b_s, float("-inf"))
            # A masked p of 0 times a NaN/inf value is NaN in the dot: zero non-finite V entries
            # and poison only the rows that see them, so nothing crosses an example or document.
            m_vfin = tl.abs(b_v) < float("inf")
            b_v = tl.where(m_vfin, b_v, 0.0).to(DOT_DTYPE)
            m_vbad = tl.min(m_vfin.to(tl.int32), 1) == 0
            b_poison = tl.maximum(b_poison, tl.max(tl.where(m_vis & m_vbad[None, :], 1, 0), 1))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # rows that have seen nothing yet keep max -inf; shift them by 0 to avoid inf - inf
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(DOT_DTYPE), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    m_seen = b_l != 0  # a NaN sum (NaN score of a non-finite q or k) is seen: it stays NaN, not 0
    b_o = tl.where(m_seen[:, None], b_acc / tl.where(m_seen, b_l, 1.0)[:, None], 0.0)
    b_o = tl.where(b_poison[:, None] > 0, float("nan"), b_o)
    # back from the log2 domain: lse = ln(2) * (m + log2(l))
    b_lse = tl.where(m_seen, 0.6931471805599453 * (b_m + tl.log2(tl.where(m_seen, b_l, 1.0))), float("-inf"))
    p_o = o + o_m[:, None].to(tl.int64) * stride_ot + i_h.to(tl.int64) * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=(o_m < L)[:, None] & m_d[None, :])
    tl.store(lse + i_h.to(tl.int64) * L + o_m, b_lse, mask=o_m < L)


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the kernels' dots: the input dtype, except fp32 under the interpreter
    for bf16 inputs (its bf16 dot is wrong)."""
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _kernel_meta(q: torch.Tensor, k: torch.Tensor, causal: bool, config: AttnConfig) -> dict:
    """Compile-time arguments shared by every kernel of one call."""
    dot_dtype = _dot_dtype(q.dtype)
    return dict(
        G=q.shape[1] // k.shape[1],
        D=q.shape[2],
        BD=max(triton.next_power_of_2(q.shape[2]), 16),
        BM=config.block_m,
        BN=config.block_n,
        CAUSAL=causal,
        DOT_DTYPE=dot_dtype,
        # fp32 inputs get full-precision dots, not tf32
        DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _attention_forward(q, k, v, layout: DocLayout, causal: bool, scale: float, config: AttnConfig):
    """q (L, hq, d), k, v (L, hk, d), unit stride on d -> o (L, hq, d), lse (hq, L) fp32.

    Tokens past layout.total_tokens are padding (o = 0, lse = -inf).
    """
    L, hq, d = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(hq, L, dtype=torch.float32, device=q.device)
    if layout.total_tokens == 0:
        return o.zero_(), lse.fill_(-math.inf)
    tiles = layout.tile_summary(config.block_m, config.block_n, causal)
    grid = (triton.cdiv(L, config.block_m), hq)
    _fwd_kernel[grid](
        q, k, v, o, lse, layout.seq_idx, layout.doc_ids, tiles.kv_indptr, tiles.kv_indices, tiles.kv_full,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        L, layout.total_tokens, tiles.kv_indptr.numel() - 1, scale * LOG2E,
        **_kernel_meta(q, k, causal, config),
    )
    return o, lse


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess_kernel(
    o, do, dlse, delta, stride_ot, stride_oh, stride_dot, stride_doh, L, T,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta (hq, L) = rowsum(o * do) - dlse: the softmax-backward row term (0 on padding)."""
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_md = (o_m < T)[:, None] & (o_d < D)[None, :]
    p_o = o + o_m[:, None].to(tl.int64) * stride_ot + i_h.to(tl.int64) * stride_oh + o_d[None, :]
    p_do = do + o_m[:, None].to(tl.int64) * stride_dot + i_h.to(tl.int64) * stride_doh + o_d[None, :]
    b_o = tl.load(p_o, mask=m_md, other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m_md, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    p_row = i_h.to(tl.int64) * L + o_m
    if HAS_DLSE:
        b_delta -= tl.load(dlse + p_row, mask=o_m < T, other=0.0)
    tl.store(delta + p_row, b_delta, mask=o_m < L)


@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, seq_idx, doc_ids, q_indptr, q_indices, q_full,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    L, T, NKB, qk_scale, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dk, dv of one key block and kv head, summed over the query blocks that see it and the
    G query heads of the group."""
    i_n, i_hk = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_nd = (o_n < T)[:, None] & m_d[None, :]
    k_seq = tl.load(seq_idx + o_n, mask=o_n < T, other=-2)
    k_doc = tl.load(doc_ids + o_n, mask=o_n < T, other=0)
    p_k = k + o_n[:, None].to(tl.int64) * stride_kt + i_hk.to(tl.int64) * stride_kh + o_d[None, :]
    p_v = v + o_n[:, None].to(tl.int64) * stride_vt + i_hk.to(tl.int64) * stride_vh + o_d[None, :]
    b_k = tl.load(p_k, mask=m_nd, other=0.0).to(DOT_DTYPE)
    b_v = tl.load(p_v, mask=m_nd, other=0.0).to(DOT_DTYPE)
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv_poison = tl.zeros([BN], dtype=tl.int32)  # 1: the key is seen by a query whose do is non-finite
    start, end = _tile_range(q_indptr, i_n, NKB)
    for g in range(G):
        i_h = (i_hk * G + g).to(tl.int64)
        for idx in range(start, end):
            i_m = tl.load(q_indices + idx)
            full = _is_full_tile(tl.load(q_full + idx), i_m, i_n, T, BM, BN)
            o_m = i_m * BM + tl.arange(0, BM)
            m_m = o_m < T
            m_md = m_m[:, None] & m_d[None, :]
            p_q = q + o_m[:, None].to(tl.int64) * stride_qt + i_h * stride_qh + o_d[None, :]
            p_do = do + o_m[:, None].to(tl.int64) * stride_dot + i_h * stride_doh + o_d[None, :]
            b_q = tl.load(p_q, mask=m_md, other=0.0).to(DOT_DTYPE)
            b_do = tl.load(p_do, mask=m_md, other=0.0).to(DOT_DTYPE)
            b_lse = tl.load(lse + i_h * L + o_m, mask=m_m, other=0.0) * 1.4426950408889634
            b_delta = tl.load(delta + i_h * L + o_m, mask=m_m, other=0.0)
            # Transposed scores, so p^T and ds^T come out in the layout of the next dots.
            # [BN, BD] @ [BD, BM] -> [BN, BM]; padding rows are masked below
            b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale - b_lse[None, :])
            # [BN, BD] @ [BD, BM] -> [BN, BM]
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_q_dot = b_q
            b_do_dot = b_do
            if not full:
                q_seq = tl.load(seq_idx + o_m, mask=m_m, other=-1)
                q_doc = tl.load(doc_ids + o_m, mask=m_m, other=0)
                m_vis = _visible(q_seq[None, :], q_doc[None, :], o_m[None, :],
                                 k_seq[:, None], k_doc[:, None], o_n[:, None], CAUSAL)
                # where, not a multiply by 0: masked entries may be NaN (q, lse, do or delta of
                # another example); the dot operands' non-finite rows are zeroed (their visible
                # pairs carry NaN in p^T / ds^T already, except do: dv rows are poisoned)
                b_pt = tl.where(m_vis, b_pt, 0.0)
                b_dst = tl.where(m_vis, b_dst, 0.0)
                b_q_dot = tl.where(tl.abs(b_q) < float("inf"), b_q, 0.0).to(DOT_DTYPE)
                m_dofin = tl.abs(b_do) < float("inf")
                b_do_dot = tl.where(m_dofin, b_do, 0.0).to(DOT_DTYPE)
                m_dobad = tl.min(m_dofin.to(tl.int32), 1) == 0
                b_dv_poison = tl.maximum(b_dv_poison, tl.max(tl.where(m_vis & m_dobad[None, :], 1, 0), 1))
            # [BN, BM] @ [BM, BD] -> [BN, BD]
            b_dv += tl.dot(b_pt.to(DOT_DTYPE), b_do_dot, input_precision=DOT_PRECISION)
            # [BN, BM] @ [BM, BD] -> [BN, BD]
            b_dk += tl.dot(b_dst.to(DOT_DTYPE), b_q_dot, input_precision=DOT_PRECISION)
    p_dk = dk + o_n[:, None].to(tl.int64) * stride_dkt + i_hk.to(tl.int64) * stride_dkh + o_d[None, :]
    p_dv = dv + o_n[:, None].to(tl.int64) * stride_dvt + i_hk.to(tl.int64) * stride_dvh + o_d[None, :]
    m_store = (o_n < L)[:, None] & m_d[None, :]
    b_dv = tl.where(b_dv_poison[:, None] > 0, float("nan"), b_dv)
    tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_store)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_store)


@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, seq_idx, doc_ids, kv_indptr, kv_indices, kv_full,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    L, T, NQB, qk_scale, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq of one query block and query head over the key blocks it sees."""
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // G
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    m_m = o_m < T
    m_md = m_m[:, None] & m_d[None, :]
    q_seq = tl.load(seq_idx + o_m, mask=m_m, other=-1)
    q_doc = tl.load(doc_ids + o_m, mask=m_m, other=0)
    p_q = q + o_m[:, None].to(tl.int64) * stride_qt + i_h.to(tl.int64) * stride_qh + o_d[None, :]
    p_do = do + o_m[:, None].to(tl.int64) * stride_dot + i_h.to(tl.int64) * stride_doh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_md, other=0.0).to(DOT_DTYPE)
    b_do = tl.load(p_do, mask=m_md, other=0.0).to(DOT_DTYPE)
    b_lse = tl.load(lse + i_h.to(tl.int64) * L + o_m, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + i_h.to(tl.int64) * L + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    start, end = _tile_range(kv_indptr, i_m, NQB)
    for idx in range(start, end):
        i_n = tl.load(kv_indices + idx)
        full = _is_full_tile(tl.load(kv_full + idx), i_m, i_n, T, BM, BN)
        o_n = i_n * BN + tl.arange(0, BN)
        m_nd = (o_n < T)[:, None] & m_d[None, :]
        p_k = k + o_n[:, None].to(tl.int64) * stride_kt + i_hk.to(tl.int64) * stride_kh + o_d[None, :]
        p_v = v + o_n[:, None].to(tl.int64) * stride_vt + i_hk.to(tl.int64) * stride_vh + o_d[None, :]
        b_k = tl.load(p_k, mask=m_nd, other=0.0).to(DOT_DTYPE)
        b_v = tl.load(p_v, mask=m_nd, other=0.0).to(DOT_DTYPE)
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale - b_lse[:, None])
        # [BM, BD] @ [BD, BN] -> [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_k_dot = b_k
        if not full:
            k_seq = tl.load(seq_idx + o_n, mask=o_n < T, other=-2)
            k_doc = tl.load(doc_ids + o_n, mask=o_n < T, other=0)
            m_vis = _visible(q_seq[:, None], q_doc[:, None], o_m[:, None],
                             k_seq[None, :], k_doc[None, :], o_n[None, :], CAUSAL)
            # where, not a multiply by 0 (masked entries may be NaN from another example), and a
            # non-finite K row zeroed for the dot (its visible ds entries are NaN already)
            b_ds = tl.where(m_vis, b_ds, 0.0)
            b_k_dot = tl.where(tl.abs(b_k) < float("inf"), b_k, 0.0).to(DOT_DTYPE)
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_dq += tl.dot(b_ds.to(DOT_DTYPE), b_k_dot, input_precision=DOT_PRECISION)
    p_dq = dq + o_m[:, None].to(tl.int64) * stride_dqt + i_h.to(tl.int64) * stride_dqh + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=(o_m < L)[:, None] & m_d[None, :])


def _attention_backward(do, dlse, q, k, v, o, lse, layout: DocLayout, causal: bool, scale: float,
                        config: AttnConfig):
    """Gradients dq (L, hq, d), dk, dv (L, hk, d) from do (L, hq, d) and optional dlse (hq, L)."""
    L, hq, d = q.shape
    hk = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if layout.total_tokens == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _kernel_meta(q, k, causal, config)
    delta = torch.empty(hq, L, dtype=torch.float32, device=q.device)
    _bwd_preprocess_kernel[(triton.cdiv(L, config.block_m), hq)](
        o, do, dlse, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), L, layout.total_tokens,
        D=d, BD=meta["BD"], BM=config.block_m, HAS_DLSE=dlse is not None,
    )
    tiles = layout.tile_summary(config.block_m, config.block_n, causal)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    common = (L, layout.total_tokens)
    _bwd_dkdv_kernel[(triton.cdiv(L, config.block_n), hk)](
        q, k, v, do, lse, delta, dk, dv, layout.seq_idx, layout.doc_ids,
        tiles.q_indptr, tiles.q_indices, tiles.q_full,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        *common, tiles.q_indptr.numel() - 1, scale * LOG2E, scale, **meta,
    )
    _bwd_dq_kernel[(triton.cdiv(L, config.block_m), hq)](
        q, k, v, do, lse, delta, dq, layout.seq_idx, layout.doc_ids,
        tiles.kv_indptr, tiles.kv_indices, tiles.kv_full,
        *strides, dq.stride(0), dq.stride(1),
        *common, tiles.kv_indptr.numel() - 1, scale * LOG2E, scale, **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- config choice


def _time_config(run: Callable[[AttnConfig], object], config: AttnConfig) -> float:
    """Median milliseconds of run(config); inf when the config does not fit the GPU."""
    try:
        return triton.testing.do_bench(lambda: run(config), warmup=5, rep=25, return_mode="median")
    except triton.runtime.errors.OutOfResources:
        return math.inf


def _pick_config(kind: str, configs: Sequence[AttnConfig], q, k, causal: bool,
                 run: Callable[[AttnConfig], object]) -> AttnConfig:
    """The fixed interpreter config off CUDA; on CUDA the fastest of `configs` (tiles of at most
    64 x 64 above head dim 128), measured once per shape family (device, dtype, padded head dim,
    GQA ratio, causal, power-of-2 length)."""
    if q.device.type != "cuda":
        return INTERPRET_CONFIG
    key = (kind, q.device.index, q.dtype, triton.next_power_of_2(q.shape[2]), q.shape[1] // k.shape[1],
           causal, triton.next_power_of_2(q.shape[0]))
    if key not in _TUNED:
        if q.shape[2] > 128:  # larger tiles spill registers and compile slowly at head dim 256
            configs = [c for c in configs if c.block_m <= 64 and c.block_n <= 64]
        _TUNED[key] = min(configs, key=lambda c: _time_config(run, c))
    return _TUNED[key]


# ----------------------------------------------------------------------------- autograd


class _DocAttentionFn(torch.autograd.Function):
    """o, lse = attention over one packed row; q (L, hq, d), k, v (L, hk, d)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, causal, scale, fwd_config, bwd_config):
        if fwd_config is None:
            fwd_config = _pick_config("fwd", FWD_CONFIGS, q, k, causal,
                                      lambda c: _attention_forward(q, k, v, layout, causal, scale, c))
        o, lse = _attention_forward(q, k, v, layout, causal, scale, fwd_config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.causal, ctx.scale, ctx.bwd_config = layout, causal, scale, bwd_config
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else _unit_last_stride(do)
        dlse = None if dlse is None else dlse.contiguous()
        config = ctx.bwd_config
        if config is None:
            config = _pick_config(
                "bwd", BWD_CONFIGS, q, k, ctx.causal,
                lambda c: _attention_backward(do, dlse, q, k, v, o, lse, ctx.layout, ctx.causal, ctx.scale, c),
            )
        dq, dk, dv = _attention_backward(do, dlse, q, k, v, o, lse, ctx.layout, ctx.causal, ctx.scale, config)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- public API


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, length, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, l, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, l, d):
        raise ValueError(f"k, v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         "in batch, length or head dim")
    hk = k.shape[2]
    if hk == 0 or hq % hk:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hk}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM or d % 8:
        raise ValueError(f"head dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")


def _softmax_scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return float(softmax_scale)


def _doc_attention(q, k, v, layout: DocLayout, causal: bool, scale: float,
                   fwd_config: Optional[AttnConfig] = None, bwd_config: Optional[AttnConfig] = None):
    """Triton path on one packed row: q (L, hq, d), k, v (L, hk, d) -> o (L, hq, d), lse (hq, L).

    Configs default to the tuned choice; tests force each config of FWD_CONFIGS / BWD_CONFIGS.
    """
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _DocAttentionFn.apply(q, k, v, layout, causal, scale, fwd_config, bwd_config)


# ----------------------------------------------------------------------------- "torch" path (CPU)
# CPU training without the interpreter (the 2-core demo) spends most of a step in attention: the
# oracle builds the O(L^2) mask in every call and isolates non-finite values with where() over
# every score. This path keeps the oracle's mask rule but builds the mask once per layout (cached:
# every layer of a step shares it) and hands it to torch's fused scaled_dot_product_attention.
# It takes only finite fp32/fp64 inputs (anything else runs the oracle, which isolates non-finite
# values) and has no lse output (the oracle serves return_lse).


def _sdpa_applies(q, k, v) -> bool:
    return (q.dtype in (torch.float32, torch.float64)
            and all(bool(torch.isfinite(t).all()) for t in (q, k, v)))


def _dense_mask(length: int, cu_seqlens, doc_ids, causal: bool, device) -> tuple:
    """(mask (b, 1, L, L) bool with each dead row (padding: sees nothing) seeing itself only,
    live (b, L, 1, 1) bool) for `scaled_dot_product_attention`; doc_ids (b, L) or None."""
    rows = 1 if doc_ids is None else doc_ids.shape[0]
    mask = torch.stack([reference.doc_attention_mask(length, cu_seqlens, None if doc_ids is None else doc_ids[r],
                                                     causal, device) for r in range(rows)])
    live = mask.any(-1)  # (b, L)
    mask |= torch.diag_embed(~live)  # a dead row attends to itself (no NaN); its output is zeroed below
    return mask[:, None], live[:, :, None, None]


def _sdpa_doc_attention(q, k, v, cu_seqlens, doc_ids, causal: bool, scale: float,
                        layout: Optional[DocLayout]) -> torch.Tensor:
    b, l, hq, _ = q.shape
    docs = None if doc_ids is None else doc_ids.reshape(-1, l)
    if layout is not None:  # every layer of the step asks for the same mask
        mask, live = layout.memo(("dense_attention_mask", l, causal),
                                 lambda lay: _dense_mask(l, cu_seqlens, docs, causal, q.device))
    else:
        mask, live = _dense_mask(l, cu_seqlens, docs, causal, q.device)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=hq != k.shape[2]).transpose(1, 2)
    # the oracle's backward zeroes non-finite output gradients; so does this path
    return torch.where(live, reference._ZeroNonFiniteGrad.apply(o), 0.0)


def doc_attention(q, k, v, *, cu_seqlens=None, doc_ids=None, causal=True, softmax_scale=None,
                  return_lse=False, layout=None, deterministic=False):
    """Document-boundary attention: token i sees key j iff same example, j <= i (causal), and
    (doc_i == 0 or doc_j == 0 or doc_i == doc_j). Differentiable in q, k, v (and through lse).

    q (b, l, hq, d); k, v (b, l, hk, d) with hq % hk == 0 (GQA: query head h reads kv head
    h // (hq // hk)); d a multiple of 8 in [32, 256]; fp16, bf16 or fp32 (fp32 accumulation).
    Returns o (b, l, hq, d) [, lse (b, hq, l) fp32, natural log, -inf for padding tokens].

    cu_seqlens (N+1,) int32/int64 packs N examples in one row (b == 1); tokens past
    cu_seqlens[-1] are padding (o = 0, zero gradients). doc_ids (b, l) or (l,) integer:
    0 = shared text, k >= 1 = k-th document of the token's example (one contiguous span).
    Without cu_seqlens each batch row is one example with its own doc_ids row.
    layout: a DocLayout (b == 1) instead of cu_seqlens/doc_ids; build it once per batch and pass
    it to every layer so its tile summary is reused. It may cover fewer than l tokens (the rest
    is padding). softmax_scale defaults to 1/sqrt(d).
    deterministic: accepted for flash-attn compatibility; the backward has no atomics and is
    always bitwise reproducible.

    Example, two examples of 6 and 3 tokens, documents at [1, 3) and [3, 5) of the first::

        cu = torch.tensor([0, 6, 9], dtype=torch.int32, device="cuda")
        docs = torch.tensor([0, 1, 1, 2, 2, 0, 0, 0, 0], device="cuda")
        o = doc_attention(q, k, v, cu_seqlens=cu, doc_ids=docs)   # q, k, v (1, 9, h, d)
        # token 4 (doc 2) attends to 0, 3, 4; token 5 attends to 0..5; token 6 to 6 only
    """
    _check_qkv(q, k, v)
    check_same_device(q=q, cu_seqlens=cu_seqlens, doc_ids=doc_ids)
    b, l, hq, d = q.shape
    scale = _softmax_scale(softmax_scale, d)
    if layout is not None:
        check_layout(layout, b, l, q.device, "q", given=cu_seqlens is not None or doc_ids is not None)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, b, l)
    if doc_ids is not None:
        check_doc_ids(doc_ids, b, l)
    causal = bool(causal)
    if q.numel() == 0:
        return reference.doc_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=return_lse)
    # built on every path: it also validates the doc ids (one contiguous span per document)
    row_layout = layout if layout is not None else DocLayout.from_batch(b, l, cu_seqlens, doc_ids, q.device)
    if not use_triton(q, k, v, op="doc_attention"):
        if layout is not None:
            cu_seqlens = layout.cu_seqlens
            doc_ids = torch.nn.functional.pad(layout.doc_ids, (0, l - layout.total_tokens))
        if not return_lse and use_torch_path(q, op="doc_attention") and _sdpa_applies(q, k, v):
            return _sdpa_doc_attention(q, k, v, cu_seqlens, doc_ids, causal, scale, layout)
        return reference.doc_attention(q, k, v, cu_seqlens=cu_seqlens, doc_ids=doc_ids, causal=causal,
                                       softmax_scale=scale, return_lse=return_lse)
    o, lse = _doc_attention(q.reshape(b * l, hq, d), k.reshape(b * l, -1, d), v.reshape(b * l, -1, d),
                            row_layout, causal, scale)
    o = o.view(b, l, hq, d)
    if not return_lse:
        return o
    return o, lse.view(hq, b, l).transpose(0, 1).contiguous()
