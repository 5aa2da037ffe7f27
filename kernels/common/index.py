"""Index helpers for packed varlen rows: lengths, per-token sequence ids, positions, chunk tables.

Every function takes ``cu_seqlens``, an integer tensor (N+1,) in the flash-attn / mamba-ssm /
fla varlen convention: ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1]`` = number of
tokens L. Zero-length sequences (equal consecutive entries) are allowed. The functions assume
a valid ``cu_seqlens`` (``kernels.layout.DocLayout`` validates) and stay on its device.

Worked example, ``cu_seqlens = [0, 3, 3, 8]`` and ``chunk_size = 2``::

    prepare_lens            -> [3, 0, 5]
    prepare_seq_idx         -> [0, 0, 0, 2, 2, 2, 2, 2]
    prepare_position_ids    -> [0, 1, 2, 0, 1, 2, 3, 4]
    prepare_chunk_offsets   -> [0, 2, 2, 5]
    prepare_chunk_indices   -> [[0, 0], [0, 1], [2, 0], [2, 1], [2, 2]]
"""
from __future__ import annotations

import torch


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


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


def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Cumulative chunk counts, int32 (N+1,): sequence n owns chunks [offsets[n], offsets[n+1]).

    A sequence of length T has ceil(T / chunk_size) chunks (zero-length sequences have none);
    chunks restart at each sequence start, so no chunk spans two sequences.
    """
    _check_chunk_size(chunk_size)
    counts = (prepare_lens(cu_seqlens).long() + chunk_size - 1) // chunk_size
    zero = counts.new_zeros(1)
    return torch.cat([zero, counts.cumsum(0)]).to(torch.int32)


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(sequence index, chunk index within the sequence) of every chunk, int32 (NT, 2).

    Row t describes the t-th chunk of the packed row; its tokens are
    ``cu_seqlens[n] + c * chunk_size`` up to ``min(cu_seqlens[n] + (c + 1) * chunk_size,
    cu_seqlens[n + 1])`` for ``(n, c) = indices[t]``. Same layout as fla's helper of that name,
    except that zero-length sequences are skipped correctly.
    """
    offsets = prepare_chunk_offsets(cu_seqlens, chunk_size).long()
    counts = offsets[1:] - offsets[:-1]
    num_chunks = int(offsets[-1])
    seqs = torch.arange(counts.numel(), device=cu_seqlens.device).repeat_interleave(
        counts, output_size=num_chunks
    )
    within = torch.arange(num_chunks, device=cu_seqlens.device) - offsets[seqs]
    return torch.stack([seqs, within], dim=1).to(torch.int32)
