"""Autotune configurations shared by the SSD kernels.

Every kernel that tiles the state dimensions takes `BK` (state size n) and `BV` (head
dim p) blocks and is autotuned over `CONFIGS` (launched through
`kernels.common.autotune.launch`: a forced config for tests, CONFIGS[0] under the
interpreter, the autotuner's choice on CUDA).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton

CONFIGS = [
    triton.Config({"BK": 32, "BV": 32}, num_warps=4, num_stages=2),
    triton.Config({"BK": 64, "BV": 64}, num_warps=4, num_stages=2),
    triton.Config({"BK": 64, "BV": 32}, num_warps=4, num_stages=3),
    triton.Config({"BK": 32, "BV": 64}, num_warps=8, num_stages=3),
]
TUNE_KEY = ["H", "K", "V", "BT"]


def autotuned(kernel, reset_to_zero: Sequence[str] = ()):
    """`kernel` autotuned over CONFIGS, keyed on heads, state/head dims and chunk size;
    `reset_to_zero` names the partial-sum buffers a config may leave partly unwritten."""
    return triton.autotune(configs=CONFIGS, key=TUNE_KEY, reset_to_zero=list(reset_to_zero) or None)(kernel)


def max_blocks(dim: int, block: str, config: Optional[triton.Config]) -> int:
    """Largest number of `block` ("BK" or "BV") tiles over `dim` that a launch may use:
    sizes the partial-sum buffers before the autotuner picks a config."""
    configs = CONFIGS if config is None else [config]
    return triton.cdiv(dim, min(c.kwargs[block] for c in configs))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp16/bf16 inputs feed the dots in their own dtype (the setting
    then has no effect); only fp32 inputs give fp32 operands, computed exactly ("ieee")."""
    return "ieee"
