"""The SSD's chunk table: chunks that never straddle a segment, with the IS_DOC / SEG_START /
BLOCK_START flags that drive the doc-mode state routing in `chunk_h`.

It is per-row metadata: `refrag_kernels.layout.DocLayout.chunk_table(chunk_size, doc_mode)` builds it
(on the layout's CPU copy) and caches it per batch; this module names it for the SSD stages.
"""
from __future__ import annotations

from refrag_kernels.layout import BLOCK_START, IS_DOC, SEG_START, ChunkTable

__all__ = ["ChunkTable", "IS_DOC", "SEG_START", "BLOCK_START"]
