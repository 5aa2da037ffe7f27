"""Index helpers for packed varlen rows: lengths, per-token sequence ids, positions.

Every function takes ``cu_seqlens``, an integer tensor (N+1,) in the flash-attn / mamba-ssm /
fla varlen convention: ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1]`` = number of
tokens L. Zero-length sequences (equal consecutive entries) are allowed. The functions assume
a valid ``cu_seqlens`` (``refrag_kernels.layout.DocLayout`` validates) and stay on its device.

Chunk tables are per-row metadata: ``DocLayout.chunk_table``.

Worked example, ``cu_seqlens = [0, 3, 3, 8]``::

    prepare_lens            -> [3, 0, 5]
    prepare_seq_idx         -> [0, 0, 0, 2, 2, 2, 2, 2]
    prepare_position_ids    -> [0, 1, 2, 0, 1, 2, 3, 4]
"""
from __future__ import annotations

import torch


def prepare_lens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence lengths (N,) from cu_seqlens (N+1,), same dtype."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def prepare_seq_idx(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Per-token sequence index, int32 (L,). ``total`` = L avoids a host sync when known."""
    if total is None:
        total = int(cu_seqlens[-1])
    lens = prepare_lens(cu_seqlens).long()
    seqs = torch.arange(lens.numel(), device=cu_seqlens.device, dtype=torch.int32)
    return seqs.repeat_interleave(lens, output_size=total)


def prepare_position_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Per-token position inside its sequence, int64 (L,), restarting at 0 at each sequence."""
    seq_idx = prepare_seq_idx(cu_seqlens, total)
    tokens = torch.arange(seq_idx.numel(), device=cu_seqlens.device, dtype=torch.int64)
    return tokens - cu_seqlens.long()[seq_idx.long()]
