"""Fused linear + cross-entropy that never materializes the [T, V] logits and costs
what the loss tokens cost.

1. Compaction. Only tokens whose target is not ``ignore_index`` (the "loss tokens", often
   5-20% of a packed RAG row) enter the GEMMs and the row kernel: their indices are found
   on the device (a stable sort, static shapes) from a count `num_valid` the caller
   knows without a sync (the loader counts targets on the CPU). Without it the count costs
   one host sync. Gradients of the hidden states are scattered back; ignored tokens get 0.
2. Chunks. The loss tokens are processed in chunks whose [chunk, V] logits block stays under
   ``LOGITS_BUDGET`` elements (Liger-Kernel's scheme). Per chunk: logits = h @ W^T (a torch
   GEMM in the hidden dtype), then one Triton program per row computes the logsumexp over V
   with an online max/sum, the token loss ``lse - logit[target] + z_loss * lse^2`` and, in
   the same kernel, overwrites the logits with ``(softmax * (1 + 2 z_loss lse) - onehot) *
   scale`` (scale = 1/num_valid for "mean", 1 for "sum", grad_output[t] for "none").
   grad_hidden = dlogits @ W and grad_weight += dlogits^T @ h follow; the latter
   accumulates in fp32 inside the GEMM (``addmm(out_dtype=float32)`` on CUDA, an fp32 GEMM
   elsewhere), never rounding a chunk's contribution to bf16.
3. Gradients in the forward. For "mean"/"sum" all of this happens in the forward pass (no
   logits recomputation); backward multiplies by the scalar grad_output in the one pass over
   dW that returning it needs anyway (in place for an fp32 weight, fused with the cast
   otherwise). For "none" the per-token grad_output is known only in backward, which
   recomputes the chunks with it folded into the row scale.

Memory (T tokens, n loss tokens, V vocab, H hidden, C = chunk, b = bytes of the hidden
dtype): logits block C*V*b (<= 128 MiB in bf16, reused in place for dlogits), dW fp32 V*H*4
(the accumulator; it is the returned gradient for an fp32 weight), compacted hidden and its
gradient n*H*b each, a cast copy of an fp32 weight V*H*b during the call. Plain torch holds
T*V logits plus fp32 softmax/gradient copies: T*V*(b + 8) and more.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels import reference
from refrag_kernels.common.autotune import launch
from refrag_kernels.common.checks import assert_on_device, check_float
from refrag_kernels.common.dispatch import use_triton

REDUCTIONS = ("mean", "sum", "none")
# Elements of one [chunk, V] logits block (128 MiB in bf16). Its size also sets the dW GEMM's
# arithmetic intensity: each chunk's addmm reads and writes the fp32 dW (8 V H bytes) for 2 V H C
# FLOPs, i.e. C/4 FLOP per byte, against an H100 ridge of ~295 (989 TFLOP/s / 3.35 TB/s). With
# 2^26, V = 32K gives C = 2048 (compute-bound) and V = 64K gives C = 1024 (near the ridge); half
# the budget would make every dW GEMM memory-bound at those vocabularies.
LOGITS_BUDGET = 2 ** 26

# One program per loss-token row sweeping V in BV blocks; every config must pass the precision
# tests (tests/test_cross_entropy.py runs each one).
CROSS_ENTROPY_CONFIGS = [
    triton.Config({"BV": 1024}, num_warps=4),
    triton.Config({"BV": 2048}, num_warps=8),
    triton.Config({"BV": 4096}, num_warps=8),
    triton.Config({"BV": 8192}, num_warps=16),
]


@triton.autotune(configs=CROSS_ENTROPY_CONFIGS, key=["V"], restore_value=["logits"])
@triton.jit
def cross_entropy_rows_kernel(
    logits, targets, loss, row_scale,
    V, stride_row, grad_scale, z_loss,
    WRITE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BV: tl.constexpr,
):
    # Every row is a loss token (ignored tokens were compacted away by the caller).
    i_r = tl.program_id(0).to(tl.int64)
    p_row = logits + i_r * stride_row
    b_tgt = tl.load(targets + i_r).to(tl.int64)
    b_m = tl.full([], float("-inf"), tl.float32)
    b_s = tl.zeros([], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        b_x = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_x - b_m_new), axis=0)
        b_m = b_m_new
    b_lse = b_m + tl.log(b_s)
    # The wrapper validated the targets; the mask keeps a bad one from reading out of the row.
    b_loss = b_lse - tl.load(p_row + b_tgt, mask=(b_tgt >= 0) & (b_tgt < V), other=0.0).to(tl.float32)
    b_softmax_scale = 1.0
    if HAS_Z_LOSS:
        b_loss += z_loss * b_lse * b_lse
        b_softmax_scale += 2.0 * z_loss * b_lse
    tl.store(loss + i_r, b_loss)
    if WRITE_GRAD:
        b_scale = grad_scale
        if HAS_ROW_SCALE:
            b_scale = b_scale * tl.load(row_scale + i_r).to(tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            b_x = tl.load(p_row + o_v, mask=o_v < V, other=0.0).to(tl.float32)
            b_g = tl.exp(b_x - b_lse) * b_softmax_scale - tl.where(o_v == b_tgt, 1.0, 0.0)
            tl.store(p_row + o_v, (b_g * b_scale).to(p_row.dtype.element_ty), mask=o_v < V)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, z_loss: float,
                       grad_scale: Optional[float] = None, row_scale: Optional[torch.Tensor] = None,
                       config: Optional[triton.Config] = None) -> None:
    """Per-row loss of logits (C,V) for targets (C,), all in [0, V), into loss (C,) fp32.

    With `grad_scale` the logits are overwritten by grad_scale * row_scale[c] * dloss/dlogits
    (row_scale (C,) fp32, optional); without it they are left untouched.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    launch(
        cross_entropy_rows_kernel,
        lambda meta: (rows,),
        config,
        logits=logits, targets=targets, loss=loss, row_scale=row_scale,
        V=vocab, stride_row=logits.stride(0), grad_scale=1.0 if grad_scale is None else float(grad_scale),
        z_loss=z_loss, WRITE_GRAD=grad_scale is not None, HAS_ROW_SCALE=row_scale is not None,
        HAS_Z_LOSS=z_loss != 0.0,
    )


def logits_chunk_size(num_tokens: int, vocab: int, chunk_size: Optional[int] = None) -> int:
    """Tokens per chunk: `chunk_size` if given, else the largest power of two whose
    [chunk, vocab] logits block fits LOGITS_BUDGET; never more than num_tokens."""
    if chunk_size is None:
        chunk_size = 1 << max(0, (LOGITS_BUDGET // vocab).bit_length() - 1)
    return max(1, min(num_tokens, chunk_size))


def loss_token_index(valid: torch.Tensor, num_valid: int) -> Optional[torch.Tensor]:
    """Ascending int64 indices (num_valid,) of the True entries of `valid` (T,) bool, found on
    the device without a host sync; None when every token is valid (no compaction needed).

    A stable sort puts the valid tokens first in their order (deterministic, no duplicate
    writes; 16K tokens sort in microseconds). `num_valid` must equal valid.sum() (the wrapper
    checks it); a wrong count still yields in-range indices.
    """
    if num_valid == valid.numel():
        return None
    return torch.argsort((~valid).to(torch.uint8), stable=True)[:num_valid]


@functools.lru_cache(maxsize=None)
def _gemm_has_fp32_out(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=torch.float32, out=c) accumulates into the fp32 c
    in place for `dtype` operands on this device (CUDA, torch >= 2.8). Probed once per process
    on tiny tensors, checking the result (one host read then, never in a step after it)."""
    try:
        a = torch.arange(4, dtype=torch.float32, device=device_type).reshape(2, 2)
        c = torch.ones(2, 2, device=device_type)
        torch.addmm(c, a.to(dtype), a.to(dtype), out_dtype=torch.float32, out=c)
        return bool(torch.equal(c, 1 + a @ a))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_grad_weight(d_weight: torch.Tensor, d_logits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """d_weight (V,H) fp32 += d_logits^T @ h_chunk: [V, C] @ [C, H] -> [V, H], accumulated in fp32.

    fp16/bf16 operands: the GEMM's fp32 accumulator is added to d_weight directly (cuBLAS
    addmm with fp32 output, as Liger does), so no chunk's contribution is rounded to the
    input dtype and no [V, H] temporary is written. Where torch lacks that (CPU), the operands
    are cast to fp32 first (a C*V*4-byte temporary; exact products, same accumulation).
    """
    # addmm(out=) rather than addmm_: same kernel, and FLOP counters (the meter) see it.
    if d_logits.dtype == torch.float32:
        torch.addmm(d_weight, d_logits.t(), h_chunk, out=d_weight)
    elif _gemm_has_fp32_out(d_logits.device.type, d_logits.dtype):
        torch.addmm(d_weight, d_logits.t(), h_chunk, out_dtype=torch.float32, out=d_weight)
    else:
        torch.addmm(d_weight, d_logits.t().float(), h_chunk.float(), out=d_weight)


def linear_cross_entropy_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float,
                                grad_scale: Optional[float] = None, row_scale: Optional[torch.Tensor] = None,
                                grad_hidden: bool = False, grad_weight: bool = False,
                                chunk_size: Optional[int] = None, config: Optional[triton.Config] = None):
    """Chunked pass over loss tokens only: hidden (n,H), weight (V,H) of hidden's dtype, targets
    (n,) all in [0, V); autocast does not apply.

    Returns (loss (n,) fp32, grad_hidden (n,H) | None, grad_weight (V,H) fp32 | None): the
    gradients of grad_scale * sum_t row_scale[t] * loss[t] when grad_scale is given.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    want_grads = grad_scale is not None
    loss = torch.empty(num_tokens, device=hidden.device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if want_grads and grad_hidden else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
        if want_grads and grad_weight else None
    step = logits_chunk_size(num_tokens, vocab, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs run in the inputs' dtype
        for start in range(0, num_tokens, step):
            end = min(start + step, num_tokens)
            h_chunk = hidden[start:end]
            logits = h_chunk @ weight.t()  # [C, H] @ [H, V] -> [C, V]; becomes dlogits in place
            cross_entropy_rows(logits, targets[start:end], loss[start:end], z_loss,
                               grad_scale if want_grads else None,
                               None if row_scale is None else row_scale[start:end], config)
            if d_hidden is not None:
                torch.mm(logits, weight, out=d_hidden[start:end])  # [C, V] @ [V, H] -> [C, H]
            if d_weight is not None:
                _accumulate_grad_weight(d_weight, logits, h_chunk)
    return loss, d_hidden, d_weight


def _scatter_tokens(values: torch.Tensor, index: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Compacted per-loss-token rows (n, ...) -> (T, ...) with zeros at ignored tokens."""
    if index is None:
        return values
    return values.new_zeros((num_tokens,) + tuple(values.shape[1:])).index_copy_(0, index, values)


def _compact(h2d: torch.Tensor, tgt: torch.Tensor, index: Optional[torch.Tensor]):
    """The loss tokens' hidden rows (n,H) and targets (n,) (the inputs themselves when all count)."""
    if index is None:
        return h2d, tgt
    return h2d.index_select(0, index), tgt.index_select(0, index)


def _reduced(loss_v: torch.Tensor, num_valid: int, reduction: str) -> torch.Tensor:
    """Sum of the loss tokens' losses, divided by their count (at least 1) for "mean"."""
    total = loss_v.sum()
    return total / max(num_valid, 1) if reduction == "mean" else total


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, num_valid, chunk_size, config):
        h2d = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        index = loss_token_index(tgt != ignore_index, num_valid)
        h_v, t_v = _compact(h2d, tgt, index)
        w_lp = weight.to(hidden.dtype)  # the GEMM operand; a V*H*b copy only for an fp32 weight
        grad_hidden, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction, ctx.hidden_shape, ctx.num_tokens, ctx.weight_dtype = \
            reduction, hidden.shape, h2d.shape[0], weight.dtype
        if reduction == "none":
            loss_v, _, _ = linear_cross_entropy_chunks(h_v, w_lp, t_v, z_loss, chunk_size=chunk_size, config=config)
            ctx.save_for_backward(h2d, weight, tgt, index)
            ctx.z_loss, ctx.chunk_size, ctx.config = z_loss, chunk_size, config
            return _scatter_tokens(loss_v, index, h2d.shape[0]).reshape(targets.shape)
        grad_scale = 1.0 / max(num_valid, 1) if reduction == "mean" else 1.0
        loss_v, d_hidden_v, d_weight = linear_cross_entropy_chunks(
            h_v, w_lp, t_v, z_loss, grad_scale, None, grad_hidden, grad_weight, chunk_size, config)
        # Held until backward: d_hidden_v (n,H) in the hidden dtype, d_weight (V,H) fp32.
        ctx.index, ctx.d_hidden_v, ctx.d_weight = index, d_hidden_v, d_weight
        return _reduced(loss_v, num_valid, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            h2d, weight, tgt, index = ctx.saved_tensors
            h_v, t_v = _compact(h2d, tgt, index)
            g_v = grad_output.reshape(-1)
            g_v = (g_v if index is None else g_v.index_select(0, index)).float().contiguous()
            _, d_hidden_v, d_weight = linear_cross_entropy_chunks(
                h_v, weight.to(h2d.dtype), t_v, ctx.z_loss, 1.0, g_v, ctx.needs_input_grad[0],
                ctx.needs_input_grad[1], ctx.chunk_size, ctx.config)
            if d_weight is not None and d_weight.dtype != ctx.weight_dtype:
                d_weight = d_weight.to(ctx.weight_dtype)
        else:
            if ctx.d_hidden_v is None and ctx.d_weight is None and ctx.needs_input_grad[0] | ctx.needs_input_grad[1]:
                raise RuntimeError("fused_linear_cross_entropy: backward ran twice through the same graph; its "
                                   "gradients are computed in the forward and consumed by the first backward")
            d_hidden_v, d_weight, index = ctx.d_hidden_v, ctx.d_weight, ctx.index
            ctx.d_hidden_v = ctx.d_weight = None
            # grad_output (a scalar) enters in the one pass each gradient needs anyway.
            if d_hidden_v is not None:
                d_hidden_v.mul_(grad_output)  # fp32 scalar: not rounded to the hidden dtype first
            if d_weight is not None:
                if ctx.weight_dtype == torch.float32:
                    d_weight.mul_(grad_output)
                else:  # scale and cast to the weight's dtype in one pass
                    d_weight = torch.mul(d_weight, grad_output.float(),
                                         out=torch.empty(d_weight.shape, dtype=ctx.weight_dtype,
                                                         device=d_weight.device))
        d_hidden = None
        if d_hidden_v is not None:
            d_hidden = _scatter_tokens(d_hidden_v, index, ctx.num_tokens).reshape(ctx.hidden_shape)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def _check_num_valid(num_valid, num_tokens: int) -> None:
    if num_valid is None:
        return
    if isinstance(num_valid, bool) or not isinstance(num_valid, numbers.Integral):
        raise ValueError(f"num_valid must be a Python int (counted on the host), got {type(num_valid).__name__}")
    if not 0 <= num_valid <= num_tokens:
        raise ValueError(f"num_valid must lie in [0, {num_tokens}] (the number of tokens), got {num_valid}")


def _check_inputs(hidden, weight, targets, ignore_index, reduction, z_loss, num_valid) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: {tuple(hidden.shape)} and {tuple(weight.shape)}")
    mixed = hidden.dtype in (torch.float16, torch.bfloat16) and weight.dtype == torch.float32
    if weight.dtype != hidden.dtype and not mixed:
        raise ValueError(f"hidden and weight must share a dtype (or weight fp32 with fp16/bf16 hidden), "
                         f"got {hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    _check_num_valid(num_valid, targets.numel())


def _count_and_check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, num_valid: Optional[int]) -> int:
    """The number of loss tokens; raises on targets outside [0, vocab) other than ignore_index
    and on a num_valid that miscounts them.

    Host sync: none when num_valid is given (the checks are device-side asserts on CUDA, which
    fail the stream at its next sync); one, reading the count, when it is not.
    """
    valid = targets != ignore_index
    in_range = ((targets >= 0) & (targets < vocab)) | ~valid
    assert_on_device(in_range.all(), f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    if num_valid is None:
        return int(valid.sum())  # the host sync a caller-supplied num_valid avoids
    assert_on_device(valid.sum() == num_valid,
                     f"num_valid={num_valid} differs from the number of targets != ignore_index={ignore_index}")
    return num_valid


# Targets equal to this take no loss (PyTorch and Hugging Face convention); the data and the model share it.
IGNORE_INDEX = -100


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean", z_loss: float = 0.0, *,
                               num_valid: Optional[int] = None, chunk_size: Optional[int] = None,
                               config: Optional[triton.Config] = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight^T without materializing them.

    hidden (..., H) fp16/bf16/fp32, weight (V, H) of the same dtype or fp32 with fp16/bf16
    hidden (the GEMMs run in hidden's dtype; weight's gradient comes back fp32, accumulated
    in fp32), targets (...) int. Per-token loss = lse - logit[target] + z_loss * lse^2
    (fp32); tokens whose target is ignore_index count for nothing, cost no GEMM work and get
    zero gradient. reduction "mean" divides by the number of counted tokens (0 when there are
    none), "sum" sums, "none" returns the per-token losses shaped like targets.

    num_valid: the number of targets != ignore_index, if the caller knows it without a sync
    (e.g. counted on the CPU by the loader). With it on CUDA the call makes no host sync (a
    wrong count fails a device-side assert); without it the count costs one host sync.
    `chunk_size` overrides the tokens per logits chunk; `config` forces one of
    CROSS_ENTROPY_CONFIGS (tests).

    Example, loss only on assistant tokens::

        targets = torch.where(assistant_mask, next_tokens, -100)
        loss = fused_linear_cross_entropy(h, lm_head.weight, targets,
                                          num_valid=int(assistant_mask.sum()))  # mask on the CPU
    """
    _check_inputs(hidden, weight, targets, ignore_index, reduction, z_loss, num_valid)
    if targets.dtype not in (torch.int32, torch.int64):  # int8/int16/uint8...: index dtypes only
        targets = targets.long()
    triton_path = use_triton(hidden, weight, targets, op="fused_linear_cross_entropy")
    num_valid = _count_and_check_targets(targets, weight.shape[0], ignore_index, num_valid)
    if not triton_path:
        return reference.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss)
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction,
                                                     float(z_loss), num_valid, chunk_size, config)
    h2d, tgt = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    index = loss_token_index(tgt != ignore_index, num_valid)
    h_v, t_v = _compact(h2d, tgt, index)
    loss_v, _, _ = linear_cross_entropy_chunks(h_v, weight.to(hidden.dtype), t_v, float(z_loss),
                                               chunk_size=chunk_size, config=config)
    if reduction == "none":
        return _scatter_tokens(loss_v, index, h2d.shape[0]).reshape(targets.shape)
    return _reduced(loss_v, num_valid, reduction)
