"""Causal depthwise conv1d (+SiLU) whose window restarts at sequence and document starts.

y[b, t, c] = act(bias[c] + sum_k weight[c, w-1-k] * x[b, t-k, c]) over the taps k whose
token t-k lies inside token t's window. The window of a token starts at its sequence
start (``cu_seqlens``) and, for a document token (doc_id > 0), at its document start;
tokens past ``cu_seqlens[-1]`` are padding and give 0. The per-token window start is an
int32 (b, l) table that both kernels read: ``DocLayout.conv_window_starts``, cached on the
layout (built once per call for the keyword forms).

Forward: one program per (BT tokens, BD channels, row); bias and SiLU fused.
Backward: the pre-activation is recomputed; dx[t] gathers the taps of the w tokens
t..t+w-1 whose windows contain t; dweight and dbias are written as per-program partial
sums and reduced with torch (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels import reference
from refrag_kernels.common.autotune import launch
from refrag_kernels.common.checks import check_cu_seqlens, check_doc_ids, check_float, check_layout, check_same_device, check_shape
from refrag_kernels.common.dispatch import use_torch_path, use_triton
from refrag_kernels.layout import DocLayout

ACTIVATIONS = (None, "silu", "swish")
MIN_WIDTH, MAX_WIDTH = 2, 4

# Memory-bound op: the space trades tile shape against occupancy. Every config must pass
# the precision tests (tests/test_conv1d.py runs each one).
CONV1D_CONFIGS = [
    triton.Config({"BT": 32, "BD": 32}, num_warps=4),
    triton.Config({"BT": 64, "BD": 64}, num_warps=4),
    triton.Config({"BT": 128, "BD": 32}, num_warps=4),
    triton.Config({"BT": 64, "BD": 128}, num_warps=8),
]
_MIN_BT = min(c.kwargs["BT"] for c in CONV1D_CONFIGS)


@triton.jit
def _window_start(starts, i_b, o_t, m_t, L, USE_WINDOWS: tl.constexpr):
    """[BT] window start of tokens o_t; outside the row, t + 1 (an empty window: nothing is read)."""
    if USE_WINDOWS:
        b_start = tl.load(starts + i_b * L + o_t, mask=m_t, other=0)
    else:
        b_start = tl.zeros_like(o_t)
    return tl.where(m_t, b_start, o_t + 1)


@triton.jit
def _preactivation(x, weight, bias, i_b, o_t, b_start, o_d, m_d,
                   stride_xb, stride_xl, stride_xd, stride_wd, stride_ww,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] fp32 bias + sum_k weight[:, W-1-k] * x[t-k], taps outside the window masked."""
    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        o_s = o_t - k
        m_s = o_s >= b_start
        p_x = x + i_b * stride_xb + o_s[:, None] * stride_xl + o_d[None, :] * stride_xd
        b_x = tl.load(p_x, mask=m_s[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(weight + o_d * stride_wd + (W - 1 - k) * stride_ww, mask=m_d, other=0.0).to(tl.float32)
        b_acc += b_x * b_w[None, :]
    if HAS_BIAS:
        b_acc += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    return b_acc


@triton.autotune(configs=CONV1D_CONFIGS, key=["D", "W"])
@triton.heuristics({"USE_WINDOWS": lambda args: args["starts"] is not None})
@triton.jit
def causal_conv1d_fwd_kernel(
    x, weight, bias, starts, y,
    L, D,
    stride_xb, stride_xl, stride_xd, stride_wd, stride_ww, stride_yb, stride_yl, stride_yd,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_WINDOWS: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < L, o_d < D
    b_start = _window_start(starts, i_b, o_t, m_t, L, USE_WINDOWS)
    b_y = _preactivation(x, weight, bias, i_b, o_t, b_start, o_d, m_d,
                         stride_xb, stride_xl, stride_xd, stride_wd, stride_ww, W, HAS_BIAS, BT, BD)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    b_y = tl.where((b_start <= o_t)[:, None], b_y, 0.0)
    p_y = y + i_b * stride_yb + o_t[:, None] * stride_yl + o_d[None, :] * stride_yd
    tl.store(p_y, b_y.to(p_y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      starts: Optional[torch.Tensor], silu: bool,
                      config: Optional[triton.Config] = None) -> torch.Tensor:
    """Launch the forward kernel: x (b,l,d), weight (d,w), bias (d,)|None, starts (b,l) int32|None."""
    b, l, d = x.shape
    y = torch.empty_like(x)
    launch(
        causal_conv1d_fwd_kernel,
        lambda meta: (triton.cdiv(l, meta["BT"]), triton.cdiv(d, meta["BD"]), b),
        config,
        x=x, weight=weight, bias=bias, starts=starts, y=y, L=l, D=d,
        stride_xb=x.stride(0), stride_xl=x.stride(1), stride_xd=x.stride(2),
        stride_wd=weight.stride(0), stride_ww=weight.stride(1),
        stride_yb=y.stride(0), stride_yl=y.stride(1), stride_yd=y.stride(2),
        W=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu,
    )
    return y


@triton.jit
def _dpreactivation(x, weight, bias, starts, dy, i_b, o_t, o_d, m_d, L,
                    stride_xb, stride_xl, stride_xd, stride_wd, stride_ww,
                    stride_dyb, stride_dyl, stride_dyd,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_WINDOWS: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr):
    """([BT, BD] fp32 dL/d(pre-activation), [BT] window start) of tokens o_t; 0 outside live tokens."""
    m_t = o_t < L
    b_start = _window_start(starts, i_b, o_t, m_t, L, USE_WINDOWS)
    p_dy = dy + i_b * stride_dyb + o_t[:, None] * stride_dyl + o_d[None, :] * stride_dyd
    b_dpre = tl.load(p_dy, mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if SILU:
        b_pre = _preactivation(x, weight, bias, i_b, o_t, b_start, o_d, m_d,
                               stride_xb, stride_xl, stride_xd, stride_wd, stride_ww, W, HAS_BIAS, BT, BD)
        b_sig = tl.sigmoid(b_pre)
        b_dpre = b_dpre * b_sig * (1.0 + b_pre * (1.0 - b_sig))
    b_dpre = tl.where((b_start <= o_t)[:, None], b_dpre, 0.0)
    return b_dpre, b_start


@triton.autotune(configs=CONV1D_CONFIGS, key=["D", "W"], reset_to_zero=["dw_part", "db_part"])
@triton.heuristics({"USE_WINDOWS": lambda args: args["starts"] is not None})
@triton.jit
def causal_conv1d_bwd_kernel(
    x, weight, bias, starts, dy, dx, dw_part, db_part,
    L, D, NB,
    stride_xb, stride_xl, stride_xd, stride_wd, stride_ww, stride_dyb, stride_dyl, stride_dyd,
    stride_dxb, stride_dxl, stride_dxd,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_WINDOWS: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t, m_d = o_t < L, o_d < D
    b_dpre, b_start = _dpreactivation(x, weight, bias, starts, dy, i_b, o_t, o_d, m_d, L,
                                      stride_xb, stride_xl, stride_xd, stride_wd, stride_ww,
                                      stride_dyb, stride_dyl, stride_dyd, W, HAS_BIAS, SILU, USE_WINDOWS,
                                      BT, BD)
    # dweight[:, W-1-k] and dbias: this tile's partial sums, row (i_b * NB + i_t) of the partials.
    o_part = (i_b * NB + i_t) * D + o_d
    if HAS_BIAS:
        tl.store(db_part + o_part, tl.sum(b_dpre, axis=0), mask=m_d)
    for k in tl.static_range(W):
        o_s = o_t - k
        p_x = x + i_b * stride_xb + o_s[:, None] * stride_xl + o_d[None, :] * stride_xd
        b_x = tl.load(p_x, mask=(o_s >= b_start)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        tl.store(dw_part + o_part * W + (W - 1 - k), tl.sum(b_dpre * b_x, axis=0), mask=m_d)
    # dx[t] = sum_k dpre[t+k] * weight[:, W-1-k] over the tokens t+k whose window contains t.
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        if k == 0:
            b_dpre_s = b_dpre
            m_read = o_t >= b_start
        else:
            b_dpre_s, b_start_s = _dpreactivation(x, weight, bias, starts, dy, i_b, o_t + k, o_d, m_d, L,
                                                  stride_xb, stride_xl, stride_xd, stride_wd, stride_ww,
                                                  stride_dyb, stride_dyl, stride_dyd, W, HAS_BIAS, SILU,
                                                  USE_WINDOWS, BT, BD)
            m_read = o_t >= b_start_s
        b_w = tl.load(weight + o_d * stride_wd + (W - 1 - k) * stride_ww, mask=m_d, other=0.0).to(tl.float32)
        b_dx += tl.where(m_read[:, None], b_dpre_s * b_w[None, :], 0.0)
    p_dx = dx + i_b * stride_dxb + o_t[:, None] * stride_dxl + o_d[None, :] * stride_dxd
    tl.store(p_dx, b_dx.to(p_dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


def causal_conv1d_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      starts: Optional[torch.Tensor], dy: torch.Tensor, silu: bool,
                      config: Optional[triton.Config] = None):
    """Launch the backward kernel and reduce the partials: returns dx (b,l,d), dweight (d,w), dbias (d,)|None."""
    b, l, d = x.shape
    w = weight.shape[1]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    nb = triton.cdiv(l, _MIN_BT)
    dw_part = torch.zeros(b * nb, d, w, device=x.device, dtype=torch.float32)
    db_part = torch.zeros(b * nb, d, device=x.device, dtype=torch.float32) if bias is not None else None
    launch(
        causal_conv1d_bwd_kernel,
        lambda meta: (triton.cdiv(l, meta["BT"]), triton.cdiv(d, meta["BD"]), b),
        config,
        x=x, weight=weight, bias=bias, starts=starts, dy=dy, dx=dx, dw_part=dw_part, db_part=db_part,
        L=l, D=d, NB=nb,
        stride_xb=x.stride(0), stride_xl=x.stride(1), stride_xd=x.stride(2),
        stride_wd=weight.stride(0), stride_ww=weight.stride(1),
        stride_dyb=dy.stride(0), stride_dyl=dy.stride(1), stride_dyd=dy.stride(2),
        stride_dxb=dx.stride(0), stride_dxl=dx.stride(1), stride_dxd=dx.stride(2),
        W=w, HAS_BIAS=bias is not None, SILU=silu,
    )
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, starts, silu, config):
        ctx.save_for_backward(x, weight, bias, starts)
        ctx.silu, ctx.config = silu, config
        return causal_conv1d_fwd(x, weight, bias, starts, silu, config)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, starts = ctx.saved_tensors
        dx, dweight, dbias = causal_conv1d_bwd(x, weight, bias, starts, dy, ctx.silu, ctx.config)
        return dx, dweight, dbias, None, None, None


def _check_inputs(x, weight, bias, cu_seqlens, doc_ids, activation, layout) -> None:
    check_same_device(x=x, weight=weight, bias=bias, cu_seqlens=cu_seqlens, doc_ids=doc_ids)
    if x.dim() != 3:
        raise ValueError(f"x must be (b, l, d), got shape {tuple(x.shape)}")
    b, l, d = x.shape
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (d, w) = ({d}, w), got shape {tuple(weight.shape)}")
    if not MIN_WIDTH <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"conv width must be in {MIN_WIDTH}..{MAX_WIDTH}, got {weight.shape[1]}")
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (d,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if layout is not None:
        check_layout(layout, b, l, x.device, "x", given=cu_seqlens is not None or doc_ids is not None)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, b, l)
    if doc_ids is not None:
        check_doc_ids(doc_ids, b, l)


def _window_starts(b: int, l: int, layout: DocLayout) -> torch.Tensor:
    """(b, l) int32 window starts, relative to each batch row, from the layout of the b*l row."""
    starts = layout.conv_window_starts(b * l)
    if b == 1:
        return starts.view(1, l)
    rows = torch.arange(b, device=starts.device, dtype=torch.int32)[:, None] * l
    return (starts.view(b, l) - rows).contiguous()


def causal_conv1d_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: Optional[str]) -> torch.Tensor:
    """The "torch" path of `causal_conv1d` for rows that are whole sequences (no cu_seqlens,
    doc_ids or layout: a cache's continuation, documents encoded as rows): every window starts
    at its row's start, so the rows padded with w - 1 zeros on the left give each token its
    window as a strided view (``unfold``; tap j reads x_{t-(w-1-j)}, weight[:, j] as in the
    oracle and the decode update), one product and one sum. The oracle's per-tap masks, or a
    depthwise F.conv1d, cost 5-10x more for a few tokens. fp32 (fp64) compute, x's dtype out;
    autograd gives the gradients."""
    cdt = reference._compute_dtype(x)
    windows = torch.nn.functional.pad(x.to(cdt), (0, 0, weight.shape[1] - 1, 0)).unfold(1, weight.shape[1], 1)
    y = (windows * weight.to(cdt)).sum(-1)  # (b, l, d, w) -> (b, l, d)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation is not None:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None,
                  activation: Optional[str] = "silu", *, layout: Optional[DocLayout] = None,
                  config: Optional[triton.Config] = None) -> torch.Tensor:
    """Causal depthwise conv1d with window restarts: x (b,l,d), weight (d,w), bias (d,) -> y (b,l,d).

    w in 2..4; activation None or "silu" ("swish" is an alias). cu_seqlens (N+1,) int
    tensor requires b == 1 and restarts the window at each sequence; doc_ids (b,l) or (l,)
    restarts it at each document start for document tokens (doc_id > 0). Tokens past
    cu_seqlens[-1] are padding: y = 0 and no gradient. layout: a DocLayout (b == 1) instead of
    cu_seqlens/doc_ids, built once per batch; its window starts are cached on it, so the call
    reads nothing from the device (``layout.examples_only()`` ignores its documents). Computes
    in fp32 and returns x's dtype; `config` forces one of CONV1D_CONFIGS (tests).

    Example, two sequences of 3 and 5 tokens, the second holding a 2-token document::

        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
        docs = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0], device="cuda")
        y = causal_conv1d(x, weight, bias, cu_seqlens=cu, doc_ids=docs)  # x (1, 8, d)
    """
    _check_inputs(x, weight, bias, cu_seqlens, doc_ids, activation, layout)
    b, l, _ = x.shape
    if not use_triton(x, weight, bias, cu_seqlens, doc_ids, op="causal_conv1d"):
        if layout is not None:
            cu_seqlens = layout.cu_seqlens
            doc_ids = torch.nn.functional.pad(layout.doc_ids, (0, l - layout.total_tokens))
        if layout is None and cu_seqlens is None and doc_ids is None and use_torch_path(x, op="causal_conv1d"):
            return causal_conv1d_rows(x, weight, bias, activation)
        return reference.causal_conv1d(x, weight, bias, cu_seqlens, doc_ids, activation)
    if layout is None and (cu_seqlens is not None or doc_ids is not None):
        layout = DocLayout.from_batch(b, l, cu_seqlens, doc_ids, x.device)
    starts = None if layout is None else _window_starts(b, l, layout)
    bias = bias.contiguous() if bias is not None else None
    return CausalConv1dFunction.apply(x, weight, bias, starts, activation is not None, config)
