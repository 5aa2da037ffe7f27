"""Autotune configurations shared by the SSD kernels.

Every kernel that tiles the state dimensions takes `BK` (state size n) and `BV` (head
dim p) blocks and is autotuned over `CONFIGS` (launched through
`refrag_kernels.common.autotune.launch`: a forced config for tests, CONFIGS[0] under the
interpreter, the autotuner's choice on CUDA).

The space crosses four tile shapes with num_warps 4 and 8 and num_stages 2-4, plus 2 warps for the
smallest tile only: with 2 warps a 64-wide tile leaves each of the 64 threads so many accumulator
values that ptxas (sm_90, CUDA 13.4) gives up allocating and keeps 32 registers with 10-30 KB of
spill stores per thread (chunk_fwd_h, chunk_bwd_dh, chunk_bwd_dqk, chunk_bwd_dv;
profiles/sm90-resource-usage.md), a config that can never win. Before tuning,
`prune_by_shared_memory` drops the configs whose estimated shared memory (for the launch's
chunk size and input dtype) exceeds what one block may use on an RTX 4070 (sm_89, 99 KB),
so every config the autotuner times also runs on that GPU.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import triton

TILES = [(32, 32), (64, 64), (64, 32), (32, 64)]  # (BK, BV); the first is the interpreter's
CONFIGS = [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
           for (bk, bv), w, s in itertools.product(TILES, (4, 2, 8), (2, 3, 4))
           if w > 2 or bk * bv <= 32 * 32]
TUNE_KEY = ["H", "K", "V", "BT"]
SMEM_LIMIT_BYTES = 99 * 1024  # per block on sm_89 (RTX 4070); sm_90 allows 227 KB


def smem_estimate(config: triton.Config, chunk_size: int, elem_bytes: int) -> int:
    """Estimated shared memory of the SSD kernel with the most (`chunk_bwd_dqk`): the four
    tiles its head-dim loop loads for dots (x and dy [BT, BV], h and dh [BK, BV]), buffered
    num_stages times. Calibrated on the compiler's numbers for sm_89 (profiles/aot.py, bf16,
    chunk 64), which it bounds from above: 48/80/112 KB compiled vs 64/96/128 KB estimated
    for BK = BV = 64 at 2/3/4 stages; every other kernel uses at most 48 KB. Every config kept
    at chunk 64 (bf16 and fp32, 4 and 8 warps) compiles to at most 96 KB on sm_89."""
    BT, BK, BV = chunk_size, config.kwargs["BK"], config.kwargs["BV"]
    return elem_bytes * config.num_stages * (2 * BT * BV + 2 * BK * BV)


def prune_by_shared_memory(configs, named_args, **kwargs):
    """Configs that fit SMEM_LIMIT_BYTES for this launch's chunk size (BT) and input dtype;
    the smallest one when none does (chunks of 256 tokens)."""
    args = {**named_args, **kwargs}
    chunk = args["BT"]
    tensor = next(args[n] for n in ("x", "q", "k", "dy") if isinstance(args.get(n), torch.Tensor))
    elem = tensor.element_size()
    fits = [c for c in configs if smem_estimate(c, chunk, elem) <= SMEM_LIMIT_BYTES]
    return fits or [min(configs, key=lambda c: smem_estimate(c, chunk, elem))]


def autotuned(kernel, reset_to_zero: Sequence[str] = ()):
    """`kernel` autotuned over CONFIGS, keyed on heads, state/head dims and chunk size, pruned
    by shared memory; `reset_to_zero` names the partial-sum buffers a config may leave partly
    unwritten."""
    return triton.autotune(configs=CONFIGS, key=TUNE_KEY, reset_to_zero=list(reset_to_zero) or None,
                           prune_configs_by={"early_config_prune": prune_by_shared_memory})(kernel)


def max_blocks(dim: int, block: str, config: Optional[triton.Config]) -> int:
    """Largest number of `block` ("BK" or "BV") tiles over `dim` that a launch may use:
    sizes the partial-sum buffers before the autotuner picks a config."""
    configs = CONFIGS if config is None else [config]
    return triton.cdiv(dim, min(c.kwargs[block] for c in configs))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp16/bf16 inputs feed the dots in their own dtype (the setting
    then has no effect); only fp32 inputs give fp32 operands, computed exactly ("ieee")."""
    return "ieee"
