"""Chunked selective scan (Mamba-2 SSD) in Triton, forward and backward, varlen and doc_mode.

Mapping onto a chunked linear-attention scan (as flash-linear-attention's simple GLA):
q = C, k = B, v = x * dt, per-token log-decay dt * A (scalar per head). Stages:

1. `DocLayout.chunk_table`: chunks that never straddle a sequence boundary (documents do
   not split them: doc_mode masks inside a chunk, see `refrag_kernels.ssd.chunks`);
   `cumsum.chunk_dt_cumsum`: dt_bias + softplus and the chunk-local cumsum g of dt * A.
2. `chunk_h.chunk_fwd_h`: state entering every chunk (in doc_mode also the document and
   block-entry states its document tokens read).
3. `chunk_o.chunk_fwd_o`: outputs from the entering state plus the causal intra-chunk part,
   with the D skip term, the z gate, zeros on padding and the cast to the input dtype.
4. Backward: the states are recomputed (`chunk_fwd_h`), then `chunk_bwd_dh` (reverse
   state recurrence), `chunk_bwd_dqk` (dC, dB, dg), `chunk_bwd_dv` (dx, dz, dD and the
   dt-through-v part) and `chunk_dt_grad` (dg -> d dt through dt * A, softplus and dt_bias;
   dA, d dt_bias).

Forward saves only the inputs and two fp32 (T, H) tensors (dt after softplus and g). Dot
operands are in the input dtype with fp32 accumulation (`tuning.dot_precision`); chunk
states are stored in the input dtype. x, z, B, C and dt are read through their strides.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton

from refrag_kernels import reference
from refrag_kernels.common.checks import (
    check_cu_seqlens,
    check_decay_rates,
    check_doc_ids,
    check_float,
    check_layout,
    check_same_device,
    check_shape,
)
from refrag_kernels.common.dispatch import use_torch_path, use_triton
from refrag_kernels.layout import ChunkTable, DocLayout
from refrag_kernels.ssd import torch_path
from refrag_kernels.ssd.chunk_h import chunk_bwd_dh, chunk_fwd_h
from refrag_kernels.ssd.chunk_o import chunk_bwd_dqk, chunk_bwd_dv, chunk_fwd_o
from refrag_kernels.ssd.cumsum import chunk_dt_cumsum, chunk_dt_grad
from refrag_kernels.ssd.tuning import CONFIGS, dot_precision

__all__ = ["ssd_scan", "ssd_scan_triton", "CONFIGS"]


def _rows(t: Optional[torch.Tensor], *tail: int) -> Optional[torch.Tensor]:
    """(b, l, *tail) -> (b * l, *tail), a view when the strides allow (projection slices do),
    copied only when the last dimension is not unit-stride."""
    if t is None:
        return None
    t = t.reshape(-1, *tail)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class ChunkScanFunction(torch.autograd.Function):
    """The whole Triton SSD on packed tokens: x, z (T, H, P); dt (T, H) raw; B, C (T, G, N)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, table: ChunkTable, docs, total: int,
                softplus: bool, want_final: bool, config: Optional[triton.Config]):
        ctx.set_materialize_grads(False)  # an unused final state costs no zeros and no reads
        precision = dot_precision(x.dtype)
        dtp, g = chunk_dt_cumsum(dt, dt_bias, A, softplus, table)
        states, final = chunk_fwd_h(x, dtp, g, B, initial_states, table, docs, precision, config, want_final)
        y = chunk_fwd_o(x, z, dtp, g, C, B, states, D, table, docs, total, precision, config)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, dtp, g)
        ctx.table, ctx.docs, ctx.total, ctx.softplus, ctx.config = table, docs, total, softplus, config
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, dt_bias, initial_states, dtp, g = ctx.saved_tensors
        table, docs, total, config = ctx.table, ctx.docs, ctx.total, ctx.config
        precision = dot_precision(x.dtype)
        dy = torch.zeros_like(x) if dy is None else _rows(dy, *dy.shape[1:])
        dfinal = None if dfinal is None else dfinal.contiguous()
        states, _ = chunk_fwd_h(x, dtp, g, B, initial_states, table, docs, precision, config, False, True)
        dstates, dh0, dg_last = chunk_bwd_dh(C, g, dy, z, states, dfinal, table, docs, precision, config,
                                             initial_states is not None)
        dC, dB, dg = chunk_bwd_dqk(x, dy, z, dtp, g, C, B, states, dstates, table, docs, total, precision, config)
        dx, dz, ddt_v, dD = chunk_bwd_dv(x, dy, z, dtp, g, C, B, states, dstates, D, table, docs, total, precision,
                                         config)
        ddt, dA, ddt_bias = chunk_dt_grad(dt, dt_bias, A, ctx.softplus, dtp, dg, dg_last, ddt_v, table, docs, total)
        dD = None if dD is None else dD.to(D.dtype)
        ddt_bias = None if ddt_bias is None else ddt_bias.to(dt_bias.dtype)
        return dx, ddt, dA.to(A.dtype), dB, dC, dD, dz, ddt_bias, dh0, None, None, None, None, None, None


def ssd_scan_triton(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
                    initial_states=None, cu_seqlens=None, doc_ids=None, doc_mode=False,
                    return_final_states=False, layout: Optional[DocLayout] = None,
                    config: Optional[triton.Config] = None):
    """`ssd_scan` on the Triton kernels without input validation; `config` (one of CONFIGS)
    pins every kernel's launch (None: autotune on CUDA, CONFIGS[0] under the interpreter).
    With a layout, no value is read from the device."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if layout is None:
        layout = DocLayout.from_batch(b, l, cu_seqlens, doc_ids if doc_mode else None, x.device)
    total = layout.total_tokens
    doc_mode = doc_mode and layout.has_documents  # without documents doc_mode is the plain scan
    table = layout.chunk_table(chunk_size, doc_mode)
    docs = layout.doc_ids if doc_mode else None
    h0 = None if initial_states is None else initial_states.float().contiguous()
    y, final = ChunkScanFunction.apply(_rows(x, h, p), _rows(dt, h), A.contiguous(), _rows(B, g, n),
                                       _rows(C, g, n), None if D is None else D.contiguous(), _rows(z, h, p),
                                       None if dt_bias is None else dt_bias.contiguous(), h0, table, docs, total,
                                       dt_softplus, return_final_states, config)
    y = y.view(b, l, h, p)
    return (y, final) if return_final_states else y


def _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, doc_ids, doc_mode,
                  layout):
    named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    for name, t in named.items():
        if t is not None:
            check_float(name, t)
    check_same_device(**named, cu_seqlens=cu_seqlens, doc_ids=doc_ids)
    if x.dim() != 4:
        raise ValueError(f"x must be (b, l, h, p), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (b, l, g, n) = ({b}, {l}, g, n), got shape {tuple(B.shape)}")
    g, n = B.shape[2:]
    if g == 0 or h % g:
        raise ValueError(f"number of heads {h} must be a multiple of the number of groups {g}")
    check_shape("C", C, B.shape)
    check_shape("dt", dt, (b, l, h))
    check_shape("A", A, (h,))
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if z is not None:
        check_shape("z", z, x.shape)
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 16 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size!r}")
    if layout is not None:
        check_layout(layout, b, l, x.device, "x", given=cu_seqlens is not None or doc_ids is not None)
        num_states = layout.num_seqs
    else:
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, b, l)
        num_states = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_states is not None:
        check_shape("initial_states", initial_states, (num_states, h, p, n))
    if doc_mode and doc_ids is None and layout is None:
        raise ValueError("doc_mode=True needs doc_ids (or a layout)")
    if doc_ids is not None:
        if not doc_mode:
            raise ValueError("doc_ids given with doc_mode=False: the scan would ignore them (only doc_mode "
                             "reads documents); pass doc_mode=True or drop doc_ids")
        check_doc_ids(doc_ids, b, l)
    check_decay_rates(A)


def ssd_scan(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_states=None, cu_seqlens=None, doc_ids=None, doc_mode=False, return_final_states=False,
             layout=None):
    """Chunked Mamba-2 selective scan (SSD), document-aware; same semantics as mamba_ssm's
    `mamba_chunk_scan_combined`.

    Recurrence per sequence and head (dt after dt_bias and optional softplus):
        h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D x_t ;  y_t *= silu(z_t)

    x (b, l, h, p); dt (b, l, h); A (h,) <= 0 (decay rates; a positive A, a growing state, is
    rejected where A is on the CPU and trips a device assert on CUDA); B, C (b, l, g, n) with
    h % g == 0; D (h,) or (h, p);
    z (b, l, h, p); dt_bias (h,); chunk_size a power of two >= 16.
    Varlen: b == 1 and cu_seqlens (N+1,) int; tokens past cu_seqlens[-1] are padding (y = 0).
    initial_states and the returned final states are (N | b, h, p, n) fp32.
    doc_mode with doc_ids (b, l) or (l,): a document token (doc id > 0) reads the state entering
    its retrieval block plus its own document only; the carried (final) state still runs over
    every token. doc_ids are read only in doc_mode (passing them without it is an error).
    layout: a DocLayout (b == 1) instead of cu_seqlens/doc_ids, built once per batch and shared
    by every layer; it may cover fewer than l tokens (the rest is padding). With a layout,
    doc_mode selects whether the scan reads its documents, and no value is read from the
    device (its chunk tables are cached on the layout). Returns y (b, l, h, p) in x's dtype,
    or (y, final_states).

    Example (two packed sequences of lengths 5 and 3, the first with a document at [1, 4))::

        cu = torch.tensor([0, 5, 8], dtype=torch.int32, device="cuda")
        docs = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0], device="cuda")
        y, final = ssd_scan(x, dt, A, B, C, cu_seqlens=cu, doc_ids=docs, doc_mode=True,
                            return_final_states=True)   # x (1, 8, h, p); final (2, h, p, n)
    """
    _check_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens, doc_ids, doc_mode,
                  layout)
    doc_mode = bool(doc_mode)
    kwargs = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                  initial_states=initial_states, doc_mode=doc_mode, return_final_states=return_final_states)
    if not use_triton(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens, doc_ids, op="ssd_scan"):
        if layout is not None:
            cu_seqlens = layout.cu_seqlens
            doc_ids = F.pad(layout.doc_ids, (0, x.shape[1] - layout.total_tokens)) if doc_mode else None
        oracle = torch_path.ssd_scan if use_torch_path(x, op="ssd_scan") else reference.ssd_scan
        return oracle(x, dt, A, B, C, cu_seqlens=cu_seqlens, doc_ids=doc_ids, **kwargs)
    if x.dtype == torch.float64:
        raise ValueError("the Triton ssd_scan computes in fp32: pass fp16, bf16 or fp32 inputs (fp64 runs only "
                         "through refrag_kernels.reference.ssd_scan)")
    if layout is None:  # validates the doc ids (one span per document) once
        layout = DocLayout.from_batch(x.shape[0], x.shape[1], cu_seqlens, doc_ids, x.device)
    return ssd_scan_triton(x, dt, A, B, C, layout=layout, **kwargs)
