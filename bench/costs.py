"""Cost models of the ops: the minimum FLOPs and bytes an op must spend, shared by the
timed benchmarks (bench/test_bench_*.py: TFLOP/s and GB/s) and the meter (bench.meter:
ratios to the minimum and the roofline).

FLOPs are the op's useful arithmetic (2 per multiply-add); `*_flops` return (forward,
backward). Bytes: `io_bytes` of the tensors an op must read and write once.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

BACKWARD_FACTOR = 2.5  # backward / forward FLOPs of a scan or attention (two GEMMs per forward GEMM + recompute)


def io_bytes(*trees) -> int:
    """Bytes of every tensor in the (nested) arguments, each counted once by identity."""
    leaves, _ = tree_flatten(list(trees))
    seen, total = set(), 0
    for t in leaves:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def ssd_flops(tokens: int, heads: int, headdim: int, d_state: int, chunk: int) -> Tuple[float, float]:
    """Chunked SSD per token and head: intra-chunk C B^T (2 Q N) and scores @ x (2 Q P),
    state build and read (2 P N each)."""
    fwd = 2.0 * tokens * heads * (chunk * d_state + chunk * headdim + 2 * headdim * d_state)
    return fwd, BACKWARD_FACTOR * fwd


def selective_scan_flops(tokens: int, channels: int, d_state: int) -> Tuple[float, float]:
    """Mamba-1 scan: ~9 FLOPs per (token, channel, state) (decay exp, two FMAs, C product); no GEMM."""
    fwd = 9.0 * tokens * channels * d_state
    return fwd, BACKWARD_FACTOR * fwd


def conv1d_flops(tokens: int, channels: int, width: int) -> Tuple[float, float]:
    """Depthwise conv: one multiply-add per tap; backward computes dx and dweight."""
    fwd = 2.0 * tokens * channels * width
    return fwd, 2 * fwd


def attention_flops(visible_pairs: int, head_dim: int, q_heads: int) -> Tuple[float, float]:
    """QK^T and PV over the visible (query, key) pairs only."""
    fwd = 4.0 * visible_pairs * head_dim * q_heads
    return fwd, BACKWARD_FACTOR * fwd


def linear_cross_entropy_flops(tokens: int, hidden: int, vocab: int,
                               counted_tokens: Optional[int] = None) -> Tuple[float, float]:
    """Logits GEMM 2 n H V forward, dhidden and dweight GEMMs 4 n H V backward, n = the tokens
    whose target counts: an ignored token needs no logits (no loss) and has zero gradient, so a
    minimal implementation skips it in both (fused_linear_cross_entropy does)."""
    counted = tokens if counted_tokens is None else counted_tokens
    return 2.0 * counted * hidden * vocab, 4.0 * counted * hidden * vocab


def matmul_flops(tokens: int, weights: Iterable[torch.Tensor]) -> Tuple[float, float]:
    """Linear layers: 2 x params per token forward, twice that backward (dinput and dweight)."""
    params = sum(w.numel() for w in weights if w.dim() >= 2)
    return 2.0 * tokens * params, 4.0 * tokens * params


def gated_rms_norm_flops(tokens: int, width: int) -> Tuple[float, float]:
    """rmsnorm(y * silu(z)) * weight: ~10 FLOPs per element forward, twice that backward; no GEMM."""
    fwd = 10.0 * tokens * width
    return fwd, 2 * fwd
