"""Chunk table of a packed row for the chunked SSD, and chunk-local cumulative sums.

Chunks never straddle a segment: a segment is a maximal run of equal doc id inside
one sequence in doc_mode, the whole sequence otherwise. Each chunk carries flags
that drive the doc-mode state routing in `chunk_h`:

- IS_DOC: the chunk belongs to a document (doc id > 0);
- SEG_START: first chunk of its segment (a document restarts from the block entry);
- BLOCK_START: first chunk of a retrieval block (a document segment that follows
  shared text or starts its sequence), where the carried state becomes the entry state.

Worked example, cu_seqlens = [0, 5, 9], doc_ids = [0, 1, 1, 1, 2 | 0, 0, 0, 0],
chunk_size = 2 (doc_mode)::

    chunks  (bos, eos, flags)  = (0,1,S) (1,3,D|S|B) (3,4,D) (4,5,D|S) (5,7,S) (7,9,0)
    seq_chunk_offsets          = [0, 4, 6]
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

IS_DOC, SEG_START, BLOCK_START = 1, 2, 4


class ChunkTable(NamedTuple):
    """chunks: int32 (NT, 3) rows (bos, eos, flags); seq_chunk_offsets: int32 (N+1,),
    sequence n owns chunks [offsets[n], offsets[n+1]); chunk_size: tokens per full chunk."""

    chunks: torch.Tensor
    seq_chunk_offsets: torch.Tensor
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]


def _segment_starts(cu_seqlens: torch.Tensor, docs: Optional[torch.Tensor], total: int) -> torch.Tensor:
    """(total,) bool: True where a sequence starts and, with docs, where the doc id changes."""
    device = cu_seqlens.device
    cu = cu_seqlens.long()
    seq_start = torch.zeros(total + 1, dtype=torch.bool, device=device)
    seq_start[cu[:-1]] = True
    starts = seq_start[:total].clone()
    if docs is not None:
        starts[1:] |= docs[1:total] != docs[:total - 1]
    return starts


def build_chunk_table(cu_seqlens: torch.Tensor, docs: Optional[torch.Tensor], chunk_size: int) -> ChunkTable:
    """Chunk the tokens [0, cu_seqlens[-1]) of a packed row at segment level.

    cu_seqlens: (N+1,) valid offsets; docs: (L,) int doc ids in doc_mode, else None.
    Syncs with the host to size the table (token, segment and chunk counts).
    """
    device = cu_seqlens.device
    cu = cu_seqlens.long()
    total = int(cu[-1])
    is_seq_start = _segment_starts(cu_seqlens, None, total)
    seg_bos = torch.nonzero(_segment_starts(cu_seqlens, docs, total)).flatten()
    seg_eos = torch.cat([seg_bos[1:], seg_bos.new_full((1,), total)])
    seg_chunks = (seg_eos - seg_bos + chunk_size - 1) // chunk_size
    num_chunks = int(seg_chunks.sum())
    seg = torch.repeat_interleave(torch.arange(seg_bos.numel(), device=device), seg_chunks, output_size=num_chunks)
    first_chunk = torch.cumsum(seg_chunks, 0) - seg_chunks
    within = torch.arange(num_chunks, device=device) - first_chunk[seg]
    bos = seg_bos[seg] + within * chunk_size
    eos = torch.minimum(bos + chunk_size, seg_eos[seg])
    flags = torch.where(within == 0, SEG_START, 0)
    if docs is not None:
        is_doc = docs[bos] > 0
        after_shared = is_seq_start[bos] | (docs[(bos - 1).clamp_min(0)] == 0)
        block_start = is_doc & (within == 0) & after_shared
        flags = flags + torch.where(is_doc, IS_DOC, 0) + torch.where(block_start, BLOCK_START, 0)
    seq_of_chunk = torch.searchsorted(cu[1:], bos, right=True)
    per_seq = torch.bincount(seq_of_chunk, minlength=cu.numel() - 1)
    offsets = torch.cat([per_seq.new_zeros(1), torch.cumsum(per_seq, 0)])
    chunks = torch.stack([bos, eos, flags.to(bos.dtype)], dim=1).to(torch.int32)
    return ChunkTable(chunks.contiguous(), offsets.to(torch.int32), chunk_size)
