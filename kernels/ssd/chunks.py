"""The SSD's chunk table and the document geometry of a chunk in doc_mode.

`refrag_kernels.layout.DocLayout.chunk_table(chunk_size, doc_mode)` builds the table (per-row metadata,
cached per batch): chunks restart at each example, but documents do not split them. Inside a
chunk, doc_mode is handled by masking (like mamba-ssm's `seq_idx` masking of the intra-chunk
scores), with per-token routing of the state each token reads:

* class 0, shared token (doc id 0): the carried state entering the chunk (`hc`), decayed by
  exp(g_t); it sees every earlier token of the chunk.
* class 1, a token of the document the chunk continues (doc id == enter_doc): that document's
  state entering the chunk (`hd`), decayed by exp(g_t).
* class 2, a token of a document that starts inside the chunk (at local index sd): the entry
  state of its retrieval block (`he`), decayed by exp(g_t - g_{sd-1}) (g_{-1} = 0). The table
  guarantees that all class-2 documents of a chunk belong to one block. That block either
  continues into the chunk or opens inside it at local index b; its entry state (the carried
  state after token b - 1, computed in `chunk_h`) is stored once, at the chunk where the block
  opens (the table's entry_chunk column), and read from there by every chunk of the block.

A document token sees, inside the chunk, only earlier tokens of its own document. g is the
chunk-local cumsum of dt * A. `chunk_docs` derives all of this from the chunk's doc ids.
"""
from __future__ import annotations

import triton
import triton.language as tl

from refrag_kernels.layout import ChunkTable

__all__ = ["ChunkTable", "chunk_docs", "at", "chunk_span", "chunk_enter_doc", "chunk_entry"]


# Chunk table rows (`ChunkTable`, kernels/layout.py): int32 (bos, eos, enter_doc, entry_chunk).
@triton.jit
def chunk_span(chunks, i_c):
    """[bos, eos) of chunk i_c, as int64 token offsets."""
    return tl.load(chunks + i_c * 4).to(tl.int64), tl.load(chunks + i_c * 4 + 1).to(tl.int64)


@triton.jit
def chunk_enter_doc(chunks, i_c):
    """The doc id chunk i_c continues from the previous chunk (0: none)."""
    return tl.load(chunks + i_c * 4 + 2)


@triton.jit
def chunk_entry(chunks, i_c):
    """The chunk holding the block-entry state of the block whose documents start in chunk i_c."""
    return tl.load(chunks + i_c * 4 + 3).to(tl.int64)


@triton.jit
def at(v, o_i, i):
    """v[i] of a [BT] vector (0 when i is outside it)."""
    return tl.sum(tl.where(o_i == i, v, 0), axis=0)


@triton.jit
def chunk_docs(docs, bos, eos, enter_doc, BT: tl.constexpr):
    """Doc-mode geometry of the chunk [bos, eos) (see the module docstring).

    Returns per token (local index) the doc id d, the class cls (0, 1, 2) and sd (local index
    of the first token of its document inside the chunk; only meaningful for documents), and
    per chunk: has_h / has_d / has_e (some token of class 0 / 1 / 2), opens (the class-2 block
    opens inside the chunk), b (its local start), and for the last token L (local index
    eos - bos - 1): d_L, cls_L and sd_L."""
    o_i = tl.arange(0, BT)
    m_t = bos + o_i < eos
    d = tl.load(docs + bos + o_i, mask=m_t, other=0).to(tl.int32)
    is_doc = (d != 0) & m_t
    cls = tl.where(is_doc, tl.where(d == enter_doc, 1, 2), 0)
    same = (d[:, None] == d[None, :]) & m_t[None, :]
    sd = tl.min(tl.where(same, o_i[None, :], BT), axis=1)
    has_h = tl.sum(((cls == 0) & m_t).to(tl.int32), axis=0) > 0
    has_d = tl.sum((cls == 1).to(tl.int32), axis=0) > 0
    f = tl.min(tl.where(cls == 2, o_i, BT), axis=0)
    has_e = f < BT
    before_f = tl.where(f == 0, enter_doc, at(d, o_i, f - 1))
    opens = has_e & (before_f == 0)
    last = eos - bos - 1
    d_L = at(d, o_i, last)
    cls_L = at(cls, o_i, last)
    sd_L = at(sd, o_i, last)
    return d, cls, sd, has_h, has_d, has_e, opens, f, d_L, cls_L, sd_L
