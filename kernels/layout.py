"""DocLayout: per-token example / document metadata of a packed row, built once per batch.

A packed row of L tokens holds N examples (sequences). Per token we know ``seq_idx`` (its
example) and ``doc_ids`` (0 = shared text of the example; k >= 1 = the k-th retrieved document
of that example, its ``[DOC_k]``..``[/DOC_k]`` markers included). Doc ids are per example and
each document is one contiguous span. As a guard against misaligned ``cu_seqlens``, the last
token of an example and the first token of the next may not carry the same nonzero doc id.

Attention rule (``dense_mask``, ``tile_summary``): query i sees key j iff ``j <= i`` (when
causal), both are in the same example, and ``doc_i == 0 or doc_j == 0 or doc_i == doc_j``.

Worked example: two examples of lengths 6 and 3; the first holds documents at [1, 3) and
[3, 5) (relative to its start)::

    layout = DocLayout.from_examples([(6, [(1, 3), (3, 5)]), (3, [])])
    layout.cu_seqlens                          # [0, 6, 9]
    layout.seq_idx                             # [0, 0, 0, 0, 0, 0, 1, 1, 1]
    layout.doc_ids                             # [0, 1, 1, 2, 2, 0, 0, 0, 0]
    layout.position_ids()                      # [0, 1, 2, 3, 4, 5, 0, 1, 2]
    layout.position_ids(per_document=True)     # [0, 1, 2, 1, 2, 5, 0, 1, 2]

Token 4 (doc 2) sees keys 0 (shared) and 3, 4 (its own document); token 5 (shared) sees 0..5.
With ``per_document=True`` both documents start at position 1, where their retrieval block
starts, so a document's positions do not depend on its siblings.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from refrag_kernels.common.index import prepare_lens, prepare_seq_idx

INT32_MAX = 2**31 - 1

class ChunkTable(NamedTuple):
    """Chunks of a varlen chunked scan (``DocLayout.chunk_table``); no chunk straddles an example.

    chunks: int32 (NT, 4) rows (bos, eos, enter_doc, entry_chunk), tokens [bos, eos). Chunks hold
    ``chunk_size`` tokens and restart at each example; documents do not split them (the doc-mode
    SSD masks document boundaries inside a chunk), except that in doc_mode chunks also restart
    at a retrieval block that opens fewer than ``chunk_size`` tokens after a document start of
    an earlier block of its example (rare), so that the documents that start in one chunk all
    belong to one block. enter_doc (doc_mode, else 0): the doc id of the token before bos when it
    is a document token of the same example (the document, and block, the chunk continues), else
    0. entry_chunk (doc_mode, else 0): the last chunk at or before this one that holds a
    block-opening token (where the SSD stores the entry state of the block whose documents
    start in this chunk). seq_chunk_offsets: int32 (N+1,), example n owns chunks
    [offsets[n], offsets[n+1]).
    chunk_size: tokens per full chunk.

    Worked example, cu_seqlens = [0, 5, 9], doc_ids = [0, 1, 1, 1, 2 | 0, 0, 0, 0],
    chunk_size = 2, doc_mode::

        chunks (bos, eos, enter_doc, entry_chunk) = (0,2,0,0) (2,4,1,0) (4,5,1,0) (5,7,0,0) (7,9,0,0)
        seq_chunk_offsets                         = [0, 3, 5]
    """

    chunks: torch.Tensor
    seq_chunk_offsets: torch.Tensor
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return self.chunks.shape[0]


class TileSummary(NamedTuple):
    """Visibility of the (block_m x block_n) tiles of the L x L attention mask, in CSR form.

    Query block m visits key blocks ``kv_indices[kv_indptr[m]:kv_indptr[m+1]]`` (increasing);
    ``kv_full`` marks tiles where every pair (i, j) with i, j < L is visible, so the kernel may
    skip mask math there. A tile is listed iff at least one of its pairs is visible. The
    transpose (for the backward pass) lists, for each key block n, the query blocks that see it:
    ``q_indices[q_indptr[n]:q_indptr[n+1]]`` with ``q_full``. Index tensors are int32, flags bool.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_full: torch.Tensor
    q_indptr: torch.Tensor
    q_indices: torch.Tensor
    q_full: torch.Tensor
    block_m: int
    block_n: int
    causal: bool


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def _as_pair(value, what: str) -> tuple:
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a pair, got {type(value).__name__} {value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a pair, got {type(value).__name__} {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{what} must be a pair, got {len(items)} items: {value!r}")
    return items


def _check_positive(value, what: str) -> int:
    number = _as_int(value, what)
    if number < 1:
        raise ValueError(f"{what} must be positive, got {number}")
    return number


def _check_index_tensor(t, name: str) -> None:
    """1-D integer tensor with values that fit in int32."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and int(t.max()) > INT32_MAX:
        raise ValueError(f"{name} has values above the int32 maximum {INT32_MAX}")


def _check_same_device(a, a_name: str, b, b_name: str) -> None:
    """Both are tensors (b may be None) on one device."""
    for t, name in ((a, a_name), (b, b_name)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if b is not None and a.device != b.device:
        raise ValueError(f"{a_name} ({a.device}) and {b_name} ({b.device}) must be on one device")


def _first_true(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None) -> None:
    _check_index_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must have at least one entry (the leading 0)")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    decreasing = cu_seqlens[1:] < cu_seqlens[:-1]
    if bool(decreasing.any()):
        n = _first_true(decreasing)
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {int(cu_seqlens[n])} then "
            f"{int(cu_seqlens[n + 1])} at entries {n}, {n + 1}"
        )
    if total is not None and int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must end at the token count {total}, got {int(cu_seqlens[-1])}"
        )


def _check_seq_ids(seq_ids: torch.Tensor) -> None:
    _check_index_tensor(seq_ids, "seq_ids")
    if seq_ids.numel() == 0:
        return
    if int(seq_ids[0]) != 0:
        raise ValueError(f"seq_ids must start at 0, got {int(seq_ids[0])}")
    steps = seq_ids[1:].long() - seq_ids[:-1].long()
    if bool((steps < 0).any()):
        i = _first_true(steps < 0) + 1
        raise ValueError(f"seq_ids decrease at token {i}: {int(seq_ids[i - 1])} -> {int(seq_ids[i])}")
    if bool((steps > 1).any()):
        i = _first_true(steps > 1) + 1
        raise ValueError(
            f"seq_ids must be contiguous (step 0 or 1), got {int(seq_ids[i - 1])} -> "
            f"{int(seq_ids[i])} at token {i}; use from_cu_seqlens for empty sequences"
        )


def run_starts_mask(seq_idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool (L,): the token starts a maximal run of equal (example, doc id), or of equal
    example without doc_ids. The one definition of where a run starts, for every table."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[1:] = seq_idx[1:] != seq_idx[:-1]
    if doc_ids is not None:
        starts[1:] |= doc_ids[1:] != doc_ids[:-1]
    return starts


def _check_doc_ids(seq_idx: torch.Tensor, doc_ids: torch.Tensor, unit: str = "example") -> None:
    """Doc ids are >= 0, never continue across an example boundary, one span per document.

    unit "batch row": the examples are independent batch rows, where a document id may end
    one row and start the next."""
    if bool((doc_ids < 0).any()):
        i = _first_true(doc_ids < 0)
        raise ValueError(f"doc_ids must be >= 0, got {int(doc_ids[i])} at token {i}")
    crossing = (seq_idx[1:] != seq_idx[:-1]) & (doc_ids[1:] == doc_ids[:-1]) & (doc_ids[1:] != 0)
    if unit == "example" and bool(crossing.any()):
        i = _first_true(crossing) + 1
        raise ValueError(
            f"document {int(doc_ids[i])} crosses the boundary between example "
            f"{int(seq_idx[i - 1])} and example {int(seq_idx[i])} at token {i}"
        )
    starts = run_starts_mask(seq_idx, doc_ids) & (doc_ids != 0)
    run_seq, run_doc = seq_idx[starts].long(), doc_ids[starts].long()
    keys, _ = torch.sort(run_seq * (INT32_MAX + 1) + run_doc)
    repeated = keys[1:] == keys[:-1]
    if bool(repeated.any()):
        key = int(keys[_first_true(repeated)])
        seq, doc = divmod(key, INT32_MAX + 1)
        spans = int((keys == key).sum())
        raise ValueError(
            f"document {doc} of {unit} {seq} is not contiguous: it appears in {spans} separate spans"
        )


@dataclass(frozen=True, eq=False)
class DocLayout:
    """Example / document metadata of one packed row of L tokens, shared by every layer.

    Build it with ``from_examples``, ``from_ids``, ``from_cu_seqlens`` or ``from_batch`` (they
    validate, on the CPU) once per batch, move it with ``to(device)`` and pass it as
    ``layout=`` to every op of every layer. What the ops derive from it (chunk tables, conv
    window starts, tile summaries, positions) is computed on first use from the layout's CPU
    copy, cached, and copied to the device without blocking: an op given a layout never waits
    on the device.

    cu_seqlens: int32 (N+1,), example n is tokens [cu_seqlens[n], cu_seqlens[n+1]).
    seq_idx:    int32 (L,), example of each token.
    doc_ids:    int32 (L,), 0 = shared text, k >= 1 = k-th document of the token's example.
    max_seqlen: longest example, in tokens.
    has_documents: whether any token belongs to a document.
    """

    cu_seqlens: torch.Tensor
    seq_idx: torch.Tensor
    doc_ids: torch.Tensor
    max_seqlen: int
    has_documents: bool
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _host: "DocLayout | None" = field(default=None, repr=False, compare=False)

    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor, doc_ids: torch.Tensor | None = None, total: int | None = None
    ) -> "DocLayout":
        """Layout from cu_seqlens (N+1,) and optional per-token doc_ids (L,) on the same device.

        Zero-length examples are allowed. ``total`` (= L) is checked against cu_seqlens[-1] and
        len(doc_ids); without doc_ids every token is shared text. Validated on the CPU; the
        layout lives on the inputs' device.
        """
        if total is not None:
            total = _as_int(total, "total")
        _check_same_device(cu_seqlens, "cu_seqlens", doc_ids, "doc_ids")
        device = cu_seqlens.device
        cu_seqlens = cu_seqlens.cpu()
        doc_ids = None if doc_ids is None else doc_ids.cpu()
        _check_cu_seqlens(cu_seqlens, total)
        if doc_ids is None:
            doc_ids = torch.zeros(int(cu_seqlens[-1]), dtype=torch.int32)
        _check_index_tensor(doc_ids, "doc_ids")
        if total is not None and doc_ids.numel() != total:
            raise ValueError(f"doc_ids has {doc_ids.numel()} tokens, expected total={total}")
        if int(cu_seqlens[-1]) != doc_ids.numel():
            raise ValueError(
                f"cu_seqlens must end at the token count {doc_ids.numel()} (len(doc_ids)), "
                f"got {int(cu_seqlens[-1])}"
            )
        return cls._build(cu_seqlens.to(torch.int32), doc_ids.to(torch.int32)).to(device)

    @classmethod
    def from_ids(cls, seq_ids: torch.Tensor, doc_ids: torch.Tensor) -> "DocLayout":
        """Layout from per-token example ids and doc ids, both integer tensors (L,) on one device.

        seq_ids start at 0 and step by 0 or 1 (so no example is empty; use from_cu_seqlens for
        empty examples). Example: seq_ids [0, 0, 0, 1], doc_ids [0, 1, 1, 0].
        """
        _check_same_device(seq_ids, "seq_ids", doc_ids, "doc_ids")
        if doc_ids is None:
            raise ValueError("doc_ids must be a torch.Tensor, got NoneType")
        device = seq_ids.device
        seq_ids, doc_ids = seq_ids.cpu(), doc_ids.cpu()
        _check_seq_ids(seq_ids)
        _check_index_tensor(doc_ids, "doc_ids")
        if seq_ids.numel() != doc_ids.numel():
            raise ValueError(f"seq_ids has {seq_ids.numel()} tokens but doc_ids has {doc_ids.numel()}")
        num_seqs = int(seq_ids[-1]) + 1 if seq_ids.numel() else 0
        counts = torch.bincount(seq_ids.long(), minlength=num_seqs)
        cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return cls._build(cu_seqlens, doc_ids.to(torch.int32)).to(device)

    @classmethod
    def from_examples(cls, examples: Sequence, device: torch.device | str | None = None) -> "DocLayout":
        """Layout from a list of ``(length, [(doc_start, doc_end), ...])``, one per example.

        Spans are half-open, relative to the example start, non-empty, non-overlapping and in
        increasing order; the k-th span is document k. Example: ``[(6, [(1, 3), (3, 5)]), (3, [])]``.
        Built on the CPU, then moved to ``device`` (default CPU) without blocking.
        """
        try:
            examples = list(examples)
        except TypeError:
            raise ValueError(f"examples must be a sequence, got {type(examples).__name__}") from None
        lengths, starts, ends, ids = [], [], [], []
        offset = 0
        for n, example in enumerate(examples):
            length, spans = _as_pair(example, f"example {n}")
            length = _as_int(length, f"example {n} length")
            if length < 0:
                raise ValueError(f"example {n} length must be >= 0, got {length}")
            for k, (start, end) in enumerate(_example_spans(spans, length, n), start=1):
                starts.append(offset + start)
                ends.append(offset + end)
                ids.append(k)
            lengths.append(length)
            offset += length
        if offset > INT32_MAX:
            raise ValueError(f"total length {offset} exceeds the int32 maximum {INT32_MAX}")
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        cu_seqlens = torch.cat([lengths_t.new_zeros(1), lengths_t.cumsum(0)]).to(torch.int32)
        delta = torch.zeros(offset + 1, dtype=torch.int64)
        ids_t = torch.tensor(ids, dtype=torch.int64)
        delta.index_add_(0, torch.tensor(starts, dtype=torch.int64), ids_t)
        delta.index_add_(0, torch.tensor(ends, dtype=torch.int64), -ids_t)
        doc_ids = delta.cumsum(0)[:offset].to(torch.int32)
        return cls._build(cu_seqlens, doc_ids).to(device if device is not None else "cpu")

    @classmethod
    def from_batch(cls, batch: int, length: int, cu_seqlens: torch.Tensor | None = None,
                   doc_ids: torch.Tensor | None = None, device: torch.device | str | None = None
                   ) -> "DocLayout":
        """Layout of the (batch * length)-token row an op sees for its keyword inputs.

        batch == 1: the examples come from cu_seqlens (default: one example of ``length``
        tokens; tokens past cu_seqlens[-1] are padding, outside the layout), doc_ids (length,)
        or (1, length). batch > 1 (no cu_seqlens): each batch row is one example with its own
        doc_ids row (batch, length); documents of neighbouring rows never merge.
        """
        device = torch.device(device) if device is not None else (
            cu_seqlens.device if cu_seqlens is not None else
            doc_ids.device if doc_ids is not None else torch.device("cpu"))
        if batch == 1:
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, length], dtype=torch.int32)
            cu_seqlens = cu_seqlens.cpu()
            docs = None
            if doc_ids is not None:
                docs = doc_ids.reshape(-1).cpu()[:int(cu_seqlens[-1])]
            return cls.from_cu_seqlens(cu_seqlens, docs).to(device)
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens requires batch size 1 (one packed row), got batch {batch}")
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32) * length
        if doc_ids is None:
            return cls.from_cu_seqlens(cu_seqlens).to(device)
        docs = doc_ids.reshape(batch, length).cpu().to(torch.int64)
        _check_doc_ids(prepare_seq_idx(cu_seqlens, batch * length), docs.reshape(-1), unit="batch row")
        # Only equality inside a row matters. Odd rows get odd ids and even rows even ids, so a
        # document ending one row is never read as continuing into the next.
        parity = (torch.arange(batch) % 2)[:, None]
        docs = torch.where(docs > 0, 2 * docs - parity, docs)
        return cls.from_cu_seqlens(cu_seqlens, docs.reshape(-1)).to(device)

    @classmethod
    def _build(cls, cu_seqlens: torch.Tensor, doc_ids: torch.Tensor) -> "DocLayout":
        """cu_seqlens int32 (N+1,) already validated; doc_ids int32 (L,) validated here."""
        seq_idx = prepare_seq_idx(cu_seqlens, doc_ids.numel())
        _check_doc_ids(seq_idx, doc_ids)
        lens = prepare_lens(cu_seqlens)
        return cls(
            cu_seqlens=cu_seqlens,
            seq_idx=seq_idx,
            doc_ids=doc_ids,
            max_seqlen=int(lens.max()) if lens.numel() else 0,
            has_documents=bool((doc_ids != 0).any()),
        )

    @property
    def num_seqs(self) -> int:
        """Number of examples N (empty ones included)."""
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        """Number of tokens L in the row."""
        return self.doc_ids.numel()

    @property
    def device(self) -> torch.device:
        """Device of the layout's tensors."""
        return self.doc_ids.device

    @property
    def host(self) -> "DocLayout":
        """The same layout on the CPU (itself when it lives there), where its tables are built."""
        return self if self._host is None else self._host

    def to(self, device: torch.device | str) -> "DocLayout":
        """The same layout on ``device``: copies from pinned memory that do not block the host.

        The CPU copy stays attached (``host``), so the device layout builds its tables on the
        CPU without reading device memory, and caches its own device copies of them.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        host = self.host
        if device.type == "cpu":
            return host
        return DocLayout(
            cu_seqlens=_to_device(host.cu_seqlens, device),
            seq_idx=_to_device(host.seq_idx, device),
            doc_ids=_to_device(host.doc_ids, device),
            max_seqlen=host.max_seqlen,
            has_documents=host.has_documents,
            _host=host,
        )

    def _derived(self, key, build):
        """Cached value ``build(host)`` (a tensor or a tuple of them, computed on the CPU copy),
        moved to this layout's device."""
        if key not in self._cache:
            value = build(self.host)
            if self._host is not None:
                value = _to_device(value, self.device)
            self._cache[key] = value
        return self._cache[key]

    def memo(self, key, build):
        """``build(self)`` computed once on this layout's device and cached under ``key``: for
        per-batch values a caller derives from the layout (e.g. a model's RoPE tables), so every
        layer and every step on this batch reuses them. ``key`` must name what ``build`` does."""
        key = ("memo", key)
        if key not in self._cache:
            self._cache[key] = build(self)
        return self._cache[key]

    def examples_only(self) -> "DocLayout":
        """The layout with every token shared text (documents dropped), cached: for the ops of a
        layer that ignores documents (a Mamba block without doc_mode)."""
        if not self.has_documents:
            return self
        if "examples_only" not in self._cache:
            host = self.host
            host_only = host._cache.get("examples_only")
            if host_only is None:
                host_only = DocLayout(host.cu_seqlens, host.seq_idx, torch.zeros_like(host.doc_ids),
                                      host.max_seqlen, False)
                host._cache["examples_only"] = host_only
            self._cache["examples_only"] = host_only if self._host is None else DocLayout(
                self.cu_seqlens, self.seq_idx, torch.zeros_like(self.doc_ids), self.max_seqlen, False,
                _host=host_only)
        return self._cache["examples_only"]

    def _runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Maximal runs of equal (example, doc id): run of each token (L,), run starts, run ends.
        Host only (the run count depends on the data)."""
        if "runs" not in self._cache:
            is_start = run_starts_mask(self.seq_idx, self.doc_ids)
            run_of_token = is_start.long().cumsum(0) - 1
            run_starts = is_start.nonzero().flatten()
            run_ends = _ends_of(run_starts, self.total_tokens)
            self._cache["runs"] = (run_of_token, run_starts, run_ends)
        return self._cache["runs"]

    def position_ids(self, per_document: bool = False) -> torch.Tensor:
        """Token positions, int64 (L,), restarting at 0 at each example (cached).

        With ``per_document=True`` every document of a retrieval block (a maximal run of
        consecutive documents, see ``retrieval_blocks``) starts at the position of the block's
        first token: a document token's position is ``block_start + offset_in_document``, so it
        does not depend on the sibling documents before it. Shared tokens keep their position
        in the example (counting every earlier token), so they stay unique and increasing.
        """
        per_document = bool(per_document)
        return self._derived(("positions", per_document), lambda host: host._position_ids(per_document))

    def _position_ids(self, per_document: bool) -> torch.Tensor:
        tokens = torch.arange(self.total_tokens, device=self.device)
        positions = tokens - self.cu_seqlens.long()[self.seq_idx.long()]
        if not per_document:
            return positions
        run_of_token, run_starts, _ = self._runs()
        offset_in_document = tokens - run_starts[run_of_token]
        is_doc = self.doc_ids != 0
        opens_block = is_doc.clone()
        opens_block[1:] &= ~is_doc[:-1] | (self.seq_idx[1:] != self.seq_idx[:-1])
        # Every document token has its block's first token at or before it, so the running
        # maximum over block-opening token indices is that first token.
        block_first = torch.where(opens_block, tokens, torch.zeros_like(tokens)).cummax(0).values
        return torch.where(is_doc, positions[block_first] + offset_in_document, positions)

    def chunk_table(self, chunk_size: int, doc_mode: bool = False) -> ChunkTable:
        """Chunks of ``chunk_size`` tokens that restart at each example, with the doc-mode
        columns (see ``ChunkTable``); cached per (chunk_size, doc_mode)."""
        chunk_size = _check_positive(chunk_size, "chunk_size")
        doc_mode = bool(doc_mode)
        return self._derived(("chunks", chunk_size, doc_mode),
                             lambda host: host._chunk_table(chunk_size, doc_mode))

    def _chunk_table(self, chunk_size: int, doc_mode: bool) -> ChunkTable:
        total = self.total_tokens
        seq_idx = self.seq_idx.long()
        starts = run_starts_mask(self.seq_idx)
        doc_mode = doc_mode and self.has_documents
        if doc_mode:
            opens_block = self._block_opens()
            starts = starts | self._second_block_starts(chunk_size, opens_block)
        seg_bos = starts.nonzero().flatten()
        seg_eos = _ends_of(seg_bos, total)
        seg_chunks = (seg_eos - seg_bos + chunk_size - 1) // chunk_size
        seg = torch.repeat_interleave(torch.arange(seg_bos.numel()), seg_chunks)
        first_chunk = torch.cumsum(seg_chunks, 0) - seg_chunks
        within = torch.arange(seg.numel()) - first_chunk[seg]
        bos = seg_bos[seg] + within * chunk_size
        eos = torch.minimum(bos + chunk_size, seg_eos[seg])
        enter_doc = torch.zeros_like(bos)
        entry_chunk = torch.zeros_like(bos)
        if doc_mode and bos.numel():
            prev = (bos - 1).clamp_min(0)
            continues = (bos > 0) & (seq_idx[prev] == seq_idx[bos])
            enter_doc = torch.where(continues, self.doc_ids.long()[prev], 0)
            # the chunk where the block of a chunk's starting documents opened: the last chunk
            # at or before it that holds a block-opening token
            opened = torch.cat([opens_block.new_zeros(1, dtype=torch.long), opens_block.long().cumsum(0)])
            holds_open = opened[eos] > opened[bos]
            entry_chunk = torch.where(holds_open, torch.arange(bos.numel()), 0).cummax(0).values
        seq_of_chunk = seq_idx[bos]
        per_seq = torch.bincount(seq_of_chunk, minlength=self.num_seqs)
        offsets = torch.cat([per_seq.new_zeros(1), torch.cumsum(per_seq, 0)])
        chunks = torch.stack([bos, eos, enter_doc, entry_chunk], dim=1).to(torch.int32)
        return ChunkTable(chunks.contiguous(), offsets.to(torch.int32), chunk_size)

    def _block_opens(self) -> torch.Tensor:
        """bool (L,): the token opens a retrieval block (a document token after shared text or
        at its example's start)."""
        docs = self.doc_ids
        opens_block = run_starts_mask(self.seq_idx, docs) & (docs != 0)
        opens_block[1:] &= (docs[:-1] == 0) | (self.seq_idx[1:] != self.seq_idx[:-1])
        return opens_block

    def _second_block_starts(self, chunk_size: int, opens_block: torch.Tensor) -> torch.Tensor:
        """bool (L,): retrieval blocks that open fewer than chunk_size tokens after the last
        document start of an earlier block of their example; chunks restart there, so that
        the documents starting in one chunk belong to one block."""
        tokens = torch.arange(self.total_tokens)
        doc_start = run_starts_mask(self.seq_idx, self.doc_ids) & (self.doc_ids != 0)
        last_start = torch.where(doc_start, tokens, -1).cummax(0).values  # last document start <= t
        before = torch.cat([last_start.new_full((1,), -1), last_start[:-1]])
        example_start = self.cu_seqlens.long()[self.seq_idx.long()]
        return opens_block & (before >= example_start) & (tokens - before < chunk_size)

    def conv_window_starts(self, length: int | None = None) -> torch.Tensor:
        """int32 (length,): the first token each token's causal conv window may read, cached.

        The window restarts at every example start and, for a document token, at its
        document's start. Tokens past total_tokens (padding, up to ``length``, default L) get
        ``length``: an empty window. Example, cu_seqlens = [0, 4, 7], doc_ids =
        [0, 1, 1, 2, 0, 3, 3], length 8: [0, 1, 1, 3, 4, 5, 5, 8].
        """
        length = self.total_tokens if length is None else _as_int(length, "length")
        if length < self.total_tokens:
            raise ValueError(f"length {length} is shorter than the layout's {self.total_tokens} tokens")
        return self._derived(("conv", length), lambda host: host._conv_window_starts(length))

    def _conv_window_starts(self, length: int) -> torch.Tensor:
        run_of_token, run_starts, _ = self._runs()
        example_start = self.cu_seqlens.long()[self.seq_idx.long()]
        window = torch.where(self.doc_ids > 0, run_starts[run_of_token], example_start)
        padding = window.new_full((length - self.total_tokens,), length)
        return torch.cat([window, padding]).to(torch.int32)

    def _document_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Example, start and end (absolute, half-open) of every document, in token order."""
        _, run_starts, run_ends = self._runs()
        is_document = self.doc_ids[run_starts] != 0
        starts, ends = run_starts[is_document], run_ends[is_document]
        return self.seq_idx[starts], starts, ends

    def _spans_per_example(self, seqs, starts, ends) -> list[list[tuple[int, int]]]:
        spans = [[] for _ in range(self.num_seqs)]
        example_starts = self.cu_seqlens.tolist()
        for seq, start, end in zip(seqs.tolist(), starts.tolist(), ends.tolist()):
            spans[seq].append((start - example_starts[seq], end - example_starts[seq]))
        return spans

    def doc_spans(self) -> list[list[tuple[int, int]]]:
        """For each example, its documents' (start, end) spans relative to the example start.

        Spans are half-open and in token order, the input format of ``from_examples``; with doc
        ids numbered 1, 2, ... in token order (the convention) the k-th span is document k.
        """
        host = self.host
        return host._spans_per_example(*host._document_table())

    def retrieval_blocks(self) -> list[list[tuple[int, int]]]:
        """For each example, the (start, end) spans, relative to the example start, of its
        retrieval blocks: maximal runs of consecutive documents with no shared token between."""
        host = self.host
        is_doc = host.doc_ids != 0
        block_start = is_doc.clone()
        block_start[1:] &= ~is_doc[:-1] | (host.seq_idx[1:] != host.seq_idx[:-1])
        block_end = is_doc.clone()
        block_end[:-1] &= ~is_doc[1:] | (host.seq_idx[1:] != host.seq_idx[:-1])
        starts = block_start.nonzero().flatten()
        ends = block_end.nonzero().flatten() + 1
        return host._spans_per_example(host.seq_idx[starts], starts, ends)

    def dense_mask(self, causal: bool = True) -> torch.Tensor:
        """bool (L, L), [i, j] = query i sees key j. O(L^2) memory: tests and references only."""
        seq, doc = self.seq_idx, self.doc_ids
        visible = seq[:, None] == seq[None, :]
        visible &= (doc[:, None] == 0) | (doc[None, :] == 0) | (doc[:, None] == doc[None, :])
        if causal:
            tokens = torch.arange(self.total_tokens, device=self.device)
            visible &= tokens[None, :] <= tokens[:, None]
        return visible

    def tile_summary(self, block_m: int, block_n: int, causal: bool = True) -> TileSummary:
        """Exact per-tile visibility of the attention mask for (block_m x block_n) tiles, cached.

        See ``TileSummary``. Computed without the L x L mask: the queries of a query block are
        split into pieces of equal (example, doc id); over a piece, visible key sets grow with
        the query index, so the union (any pair visible) and the intersection (all pairs
        visible) of a piece are given by its last and first query.
        """
        block_m = _check_positive(block_m, "block_m")
        block_n = _check_positive(block_n, "block_n")
        causal = bool(causal)
        return self._derived(("tiles", block_m, block_n, causal),
                             lambda host: host._tile_summary(block_m, block_n, causal))

    def _tile_summary(self, block_m: int, block_n: int, causal: bool) -> TileSummary:
        any_tile, full_tile = self._tile_visibility(block_m, block_n, causal)
        kv_indptr, kv_indices, kv_full = _to_csr(any_tile, full_tile)
        q_indptr, q_indices, q_full = _to_csr(any_tile.t(), full_tile.t())
        return TileSummary(kv_indptr, kv_indices, kv_full, q_indptr, q_indices, q_full, block_m, block_n, causal)

    def _tile_visibility(self, block_m: int, block_n: int, causal: bool):
        """bool (n_q_blocks, n_k_blocks) twice: some pair visible, every valid pair visible."""
        L, device = self.total_tokens, self.device
        n_q_blocks, n_k_blocks = -(-L // block_m), -(-L // block_n)
        if L == 0:
            empty = torch.zeros(0, 0, dtype=torch.bool, device=device)
            return empty, empty
        tokens = torch.arange(L, device=device)
        run_of_token, run_starts, run_ends = self._runs()
        # Pieces: runs of equal (example, doc id), cut at query block boundaries; columns (P, 1).
        piece_mask = run_starts_mask(self.seq_idx, self.doc_ids) | (tokens % block_m == 0)
        p_first = piece_mask.nonzero().flatten()
        seq = self.seq_idx[p_first].long()
        is_doc = (self.doc_ids[p_first] != 0)[:, None]
        seq_start = self.cu_seqlens.long()[seq][:, None]
        seq_end = self.cu_seqlens.long()[seq + 1]
        doc_start = run_starts[run_of_token[p_first]][:, None]
        doc_end = run_ends[run_of_token[p_first]][:, None]
        # Queries see keys below hi: i + 1 when causal, else the example end.
        hi_union = (_ends_of(p_first, L) if causal else seq_end)[:, None]
        hi_inter = (p_first + 1 if causal else seq_end)[:, None]

        # A piece only meets the key blocks from its example start to its last visible key.
        kb_first, kb_last = seq_start // block_n, (hi_union - 1) // block_n
        # Bound on kb_last - kb_first + 1 from host-side facts (no read of the data): extra
        # columns fall outside in_window.
        width = (block_n - 1 + max(self.max_seqlen, 1) - 1) // block_n + 1
        k_block = kb_first + torch.arange(width, device=device)  # (P, W)
        in_window = k_block <= kb_last
        k_block = torch.minimum(k_block, kb_last)
        k_lo = k_block * block_n
        k_hi = torch.clamp(k_lo + block_n, max=L)
        shared_before = torch.cat([tokens.new_zeros(1), (self.doc_ids == 0).long().cumsum(0)])
        block_edges = torch.clamp(torch.arange(n_k_blocks + 1, device=device) * block_n, max=L)
        doc_tokens_per_block = block_edges.diff() - shared_before[block_edges].diff()

        lo = torch.maximum(seq_start, k_lo)
        hi = torch.minimum(hi_union, k_hi)
        some_in_example = hi > lo
        some_shared = shared_before[torch.maximum(hi, lo)] - shared_before[lo] > 0
        own_doc_in_block = torch.minimum(doc_end, k_hi) - torch.maximum(doc_start, k_lo)
        some_own_doc = torch.minimum(own_doc_in_block, hi_union - torch.maximum(doc_start, k_lo)) > 0
        piece_any = torch.where(is_doc, some_shared | some_own_doc, some_in_example)

        block_in_range = (k_lo >= seq_start) & (k_hi <= hi_inter)
        only_own_doc = doc_tokens_per_block[k_block] == own_doc_in_block.clamp(min=0)
        piece_full = block_in_range & (~is_doc | only_own_doc)

        p_block = p_first // block_m
        tile = (p_block[:, None] * n_k_blocks + k_block)[in_window]
        any_count = torch.zeros(n_q_blocks * n_k_blocks, dtype=torch.int64, device=device)
        full_count = torch.zeros_like(any_count)
        any_count.index_add_(0, tile, piece_any[in_window].long())
        full_count.index_add_(0, tile, piece_full[in_window].long())
        pieces_per_block = torch.bincount(p_block, minlength=n_q_blocks)[:, None]
        any_tile = any_count.view(n_q_blocks, n_k_blocks) > 0
        return any_tile, full_count.view(n_q_blocks, n_k_blocks) == pieces_per_block


def _example_spans(spans, length: int, n: int) -> list[tuple[int, int]]:
    """Validated (start, end) document spans of example n of the given length."""
    if isinstance(spans, (str, bytes)):
        raise ValueError(f"example {n} documents must be a sequence of (start, end) spans, got {spans!r}")
    try:
        spans = list(spans)
    except TypeError:
        raise ValueError(f"example {n} documents must be a sequence of (start, end) spans") from None
    checked, previous_end = [], 0
    for k, span in enumerate(spans, start=1):
        start, end = _as_pair(span, f"example {n} document {k} span")
        start = _as_int(start, f"example {n} document {k} start")
        end = _as_int(end, f"example {n} document {k} end")
        if not 0 <= start < end <= length:
            raise ValueError(
                f"example {n} document {k} span ({start}, {end}) must satisfy "
                f"0 <= start < end <= length {length}"
            )
        if start < previous_end:
            raise ValueError(
                f"example {n} document {k} span ({start}, {end}) overlaps or precedes the "
                f"previous document, which ends at {previous_end}"
            )
        checked.append((start, end))
        previous_end = end
    return checked


def _to_device(value, device: torch.device):
    """A tensor, or a (named) tuple holding tensors, on ``device``: CPU tensors are pinned first on
    CUDA so the copies do not block the host."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if device.type == "cuda" and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        items = [_to_device(v, device) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _ends_of(starts: torch.Tensor, total: int) -> torch.Tensor:
    """Ends of consecutive segments that start at ``starts`` (sorted) and cover [starts[0], total)."""
    return torch.cat([starts, starts.new_full((1,), total)])[1:]


def _to_csr(any_tile: torch.Tensor, full_tile: torch.Tensor):
    """Row-wise CSR (indptr int32 (R+1,), indices int32 (nnz,), full bool (nnz,)) of a bool matrix."""
    rows, cols = any_tile.nonzero(as_tuple=True)
    counts = any_tile.sum(1)
    indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return indptr, cols.to(torch.int32), full_tile[rows, cols]
