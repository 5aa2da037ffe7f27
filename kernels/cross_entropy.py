"""Fused linear + cross-entropy that never materializes the [T, V] logits.

Tokens are processed in chunks whose [chunk, V] logits block stays under
``LOGITS_BUDGET`` elements (Liger-Kernel's scheme). Per chunk: logits = h @ W^T
(a torch GEMM in the input dtype), then one Triton program per row computes the
logsumexp over V with an online max/sum, the token loss
``lse - logit[target] + z_loss * lse^2`` and, in the same kernel, overwrites the
logits with their gradient ``(softmax * (1 + 2 z_loss lse) - onehot) * scale``.
The chunk's grad_hidden = dlogits @ W and grad_weight += dlogits^T @ h (fp32
accumulator) follow, all during the forward pass; backward only rescales them by
grad_output. For ``reduction="none"`` the per-token grad_output is known only in
backward, so backward recomputes the chunks with that scale instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.common.autotune import launch
from kernels.common.checks import assert_on_device, check_float
from kernels.common.dispatch import use_triton

REDUCTIONS = ("mean", "sum", "none")
LOGITS_BUDGET = 2 ** 25  # elements of one [chunk, V] logits block (64 MiB in bf16)

# One program per token row sweeping V in BV blocks; every config must pass the precision
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
    logits, targets, loss, scale,
    V, stride_row, stride_scale, ignore_index, z_loss,
    WRITE_GRAD: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BV: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)
    p_row = logits + i_r * stride_row
    b_tgt = tl.load(targets + i_r).to(tl.int64)
    if b_tgt != ignore_index:
        b_m = tl.full([], float("-inf"), tl.float32)
        b_s = tl.zeros([], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            b_x = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
            b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
            b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_x - b_m_new), axis=0)
            b_m = b_m_new
        b_lse = b_m + tl.log(b_s)
        b_loss = b_lse - tl.load(p_row + b_tgt).to(tl.float32)
        b_softmax_scale = 1.0
        if HAS_Z_LOSS:
            b_loss += z_loss * b_lse * b_lse
            b_softmax_scale += 2.0 * z_loss * b_lse
        tl.store(loss + i_r, b_loss)
        if WRITE_GRAD:
            b_scale = tl.load(scale + i_r * stride_scale).to(tl.float32)
            for i_v in range(0, tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                b_x = tl.load(p_row + o_v, mask=o_v < V, other=0.0).to(tl.float32)
                b_g = tl.exp(b_x - b_lse) * b_softmax_scale - tl.where(o_v == b_tgt, 1.0, 0.0)
                tl.store(p_row + o_v, (b_g * b_scale).to(p_row.dtype.element_ty), mask=o_v < V)
    else:
        tl.store(loss + i_r, 0.0)
        if WRITE_GRAD:
            for i_v in range(0, tl.cdiv(V, BV)):
                o_v = i_v * BV + tl.arange(0, BV)
                tl.store(p_row + o_v, tl.zeros([BV], dtype=p_row.dtype.element_ty), mask=o_v < V)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor,
                       scale: Optional[torch.Tensor], ignore_index: int, z_loss: float,
                       config: Optional[triton.Config] = None) -> None:
    """Per-row loss of logits (C,V) for targets (C,) into loss (C,) fp32.

    With `scale` ((C,) fp32, stride 0 allowed) the logits are overwritten by
    scale * dloss/dlogits; without it they are left untouched.
    """
    rows, vocab = logits.shape
    launch(
        cross_entropy_rows_kernel,
        lambda meta: (rows,),
        config,
        logits=logits, targets=targets, loss=loss, scale=scale,
        V=vocab, stride_row=logits.stride(0), stride_scale=0 if scale is None else scale.stride(0),
        ignore_index=ignore_index, z_loss=z_loss,
        WRITE_GRAD=scale is not None, HAS_Z_LOSS=z_loss != 0.0,
    )


def logits_chunk_size(num_tokens: int, vocab: int, chunk_size: Optional[int] = None) -> int:
    """Tokens per chunk: `chunk_size` if given, else the largest power of two whose
    [chunk, vocab] logits block fits LOGITS_BUDGET; never more than num_tokens."""
    if chunk_size is None:
        chunk_size = 1 << max(0, (LOGITS_BUDGET // vocab).bit_length() - 1)
    return max(1, min(num_tokens, chunk_size))


def linear_cross_entropy_chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                scale: Optional[torch.Tensor], ignore_index: int, z_loss: float,
                                grad_hidden: bool, grad_weight: bool, chunk_size: Optional[int] = None,
                                config: Optional[triton.Config] = None):
    """Chunked pass over hidden (T,H), weight (V,H), targets (T,); autocast does not apply.

    Returns (loss (T,) fp32, grad_hidden (T,H) | None, grad_weight (V,H) fp32 | None), the
    gradients of sum_t scale[t] * loss[t]; pass scale (T,) (stride 0 allowed) to get them.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    want_grads = scale is not None and (grad_hidden or grad_weight)
    loss = torch.empty(num_tokens, device=hidden.device, dtype=torch.float32)
    d_hidden = torch.empty_like(hidden) if want_grads and grad_hidden else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
        if want_grads and grad_weight else None
    step = logits_chunk_size(num_tokens, vocab, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs run in the inputs' dtype
        for start in range(0, num_tokens, step):
            end = min(start + step, num_tokens)
            h_chunk = hidden[start:end]
            logits = h_chunk @ weight.t()  # [C, H] @ [H, V] -> [C, V]
            cross_entropy_rows(logits, targets[start:end], loss[start:end],
                               scale[start:end] if want_grads else None, ignore_index, z_loss, config)
            if d_hidden is not None:
                torch.mm(logits, weight, out=d_hidden[start:end])  # [C, V] @ [V, H] -> [C, H]
            if d_weight is not None:
                _accumulate_grad_weight(d_weight, logits, h_chunk)
    return loss, d_hidden, d_weight


def _accumulate_grad_weight(d_weight: torch.Tensor, d_logits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """d_weight (V,H) fp32 += d_logits^T @ h_chunk: [V, C] @ [C, H] -> [V, H]."""
    if d_logits.dtype == torch.float32:
        d_weight.addmm_(d_logits.t(), h_chunk)
    else:
        d_weight += torch.mm(d_logits.t(), h_chunk)


def _counted_tokens(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of tokens whose target is not ignore_index, at least 1, as an fp32 tensor (no host sync)."""
    return (targets != ignore_index).sum().clamp(min=1).float()


def _reduce(loss: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Per-token losses (T,) -> the requested reduction; "none" keeps the shape of targets."""
    if reduction == "none":
        return loss.reshape(targets.shape)
    total = loss.sum()
    return total / _counted_tokens(targets, ignore_index) if reduction == "mean" else total


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, z_loss, chunk_size, config):
        h2d = hidden.reshape(-1, hidden.shape[-1])
        tgt = targets.reshape(-1)
        grad_hidden, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = None
        if reduction != "none":
            counted = _counted_tokens(tgt, ignore_index)
            scale = (1.0 / counted if reduction == "mean" else torch.ones_like(counted)).reshape(1)
            scale = scale.expand(h2d.shape[0])
        loss, d_hidden, d_weight = linear_cross_entropy_chunks(
            h2d, weight, tgt, scale, ignore_index, z_loss, grad_hidden, grad_weight, chunk_size, config)
        ctx.reduction, ctx.hidden_shape = reduction, hidden.shape
        if reduction == "none":
            ctx.save_for_backward(h2d, weight, tgt)
            ctx.ignore_index, ctx.z_loss, ctx.chunk_size, ctx.config = ignore_index, z_loss, chunk_size, config
        else:
            ctx.d_hidden = d_hidden
            ctx.d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        return _reduce(loss, targets, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            h2d, weight, tgt = ctx.saved_tensors
            _, d_hidden, d_weight = linear_cross_entropy_chunks(
                h2d, weight, tgt, grad_output.reshape(-1).float(), ctx.ignore_index, ctx.z_loss,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_size, ctx.config)
            d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        else:
            d_hidden, d_weight = ctx.d_hidden, ctx.d_weight
            d_hidden = None if d_hidden is None else d_hidden * grad_output.to(d_hidden.dtype)
            d_weight = None if d_weight is None else d_weight * grad_output.to(d_weight.dtype)
        d_hidden = None if d_hidden is None else d_hidden.reshape(ctx.hidden_shape)
        return d_hidden, d_weight, None, None, None, None, None, None


def _check_inputs(hidden, weight, targets, ignore_index, reduction, z_loss) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    # No host read: a CPU tensor raises at once, a CUDA one trips a device-side assert.
    in_range = ((targets >= 0) & (targets < weight.shape[0])) | (targets == ignore_index)
    assert_on_device(in_range.all(), f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0, *,
                               chunk_size: Optional[int] = None,
                               config: Optional[triton.Config] = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight^T without materializing them.

    hidden (..., H) fp16/bf16/fp32, weight (V, H) same dtype, targets (...) int.
    Per-token loss = lse - logit[target] + z_loss * lse^2 (fp32); tokens whose target is
    ignore_index count for nothing and get zero gradient. reduction "mean" divides by the
    number of counted tokens (0 when there are none), "sum" sums, "none" returns the
    per-token losses shaped like targets. `chunk_size` overrides the tokens per logits
    chunk; `config` forces one of CROSS_ENTROPY_CONFIGS (tests).

    Example, loss only on assistant tokens::

        targets = torch.where(assistant_mask, next_tokens, -100)
        loss = fused_linear_cross_entropy(h, lm_head.weight, targets)  # h (b, l, H)
    """
    _check_inputs(hidden, weight, targets, ignore_index, reduction, z_loss)
    if not use_triton(hidden, weight, targets, op="fused_linear_cross_entropy"):
        return reference.fused_linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, z_loss)
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, reduction,
                                                     float(z_loss), chunk_size, config)
    loss, _, _ = linear_cross_entropy_chunks(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                             None, ignore_index, float(z_loss), False, False, chunk_size, config)
    return _reduce(loss, targets, ignore_index, reduction)
