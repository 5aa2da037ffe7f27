"""Per-document prefill cache: encode each retrieved document once, compose cached documents.

In doc_mode every layer's outputs on a document's tokens depend only on the shared text
before its retrieval block and on the document itself (docs/architecture.md), so a document can be
encoded once from the prefix state and reused. Per document and layer the cache keeps:

- attention blocks: the document's keys and values (after QK-norm and RoPE) and, with a key
  conv, its last ``key_conv - 1`` raw keys;
- Mamba blocks: the final SSD state ``s_i`` started from the block-entry state ``h0``, the
  total decay ``D_i = exp(sum_t dt_t * A)`` per head, and the last ``d_conv - 1`` raw conv
  inputs (xBC) of the document.

A retrieval block of documents 1..K is composed instead of re-run: keys and values are
appended in order, the SSD state carried past the block is
``h = P h0 + sum_i (prod_{j>i} D_j) (s_i - D_i h0)`` with ``P = prod_i D_i`` (evaluated as
the recurrence ``h <- D_i h + (s_i - D_i h0)``), and the conv windows of the next shared
token (Mamba's and the key conv's) hold the last raw inputs of prefix + documents. Only the shared tokens
are run through the model.

Cache keys are (sha256 of the document's token ids, sha256 of the prefix tokens and their
document ids, a position part). The position part is None for attention-free models (Mamba
state does not see positions). With ``config.doc_positions == "block"`` (the default) every
document of a retrieval block starts at the block's first RoPE position, which the prefix
fixes, so the position part is the constant "block" and a document's entry is reused
whatever sibling documents come before it, in any order. With "sequential" positions a
document's keys depend on the length of the siblings before it, so the position part is the
document's first RoPE position and a new offset in the block is a miss. KV cache slots are
token indices (positions repeat across the documents of a block), so composition only
appends entries in order.

The key holds the document's exact token ids. A rendered document carries its slot marker
(``[DOC_k]``..``[/DOC_k]``, k = its index in the block), so the same passage in another slot
is another key: reordering hits for a document that keeps its slot (same marked tokens, same
prefix, different siblings before it), and for documents given without per-slot markers.
Each entry stores the model version it was computed with; an entry from another version is
never used (dropped, counted in ``stats.stale``).

The same LRU also keeps prompt-head states (`StateEntry`, keyed by the exact tokens and
document ids of the head): the decode state at each retrieval block's entry and each generated
row's state after its turn. A prefill resumes from the longest stored head of its prompt (so
the system prompt runs once, and turn k+1 of the multi-hop loop runs only what turn k's row
lacks); the missing documents of a block are encoded together, rows of one forward per length.
A later turn (a prompt that resumes from a stored row and continues it with shared text, e.g.
the previous turn's row plus a new hop) runs everything it lacks in one forward, its new
blocks' documents included (doc_mode masks, conv windows and block-entry states, as in a
forward over the whole prompt): their heads hold this conversation, so no other prompt could
reuse their encodings, and encoding them apart would only add forwards. They count as misses.

Example::

    cache = DocumentCache(max_bytes=2 << 30)
    engine = CachedEngine(model, cache)                      # version: weight fingerprint
    logits, hybrid_cache = engine.prefill([prefix_ids, [doc_a_ids, doc_b_ids], suffix_ids])
    outputs = engine.generate([prompt_ids], 32, doc_ids=[prompt_doc_ids])   # Engine's signature
"""
from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from refrag.data import SYSTEM_PROMPT, render_for_generation
from refrag.infer.engine import decode_loop, timed
from refrag.model import AttentionCache, HybridCache, HybridLM, MambaCache
from refrag.model.blocks import AttentionBlock, SequenceContext, conv_state_after
from refrag.model.layers import rotary_cos_sin

Segment = Union[Sequence[int], Sequence[Sequence[int]]]


@dataclass
class AttentionDocState:
    """One attention block's keys and values of a document, k, v (n, n_kv_head, head_dim), and
    key_tail (t, n_kv_head * head_dim), t = min(n, key_conv - 1): its last raw keys (None
    without a key conv)."""

    k: torch.Tensor
    v: torch.Tensor
    key_tail: torch.Tensor | None = None


@dataclass
class MambaDocState:
    """One Mamba block's summary of a document encoded from the block-entry state h0.

    final (h, p, n) fp32: SSD state after the document; log_decay (h,) fp32: sum_t dt_t * A;
    conv_tail (t, conv_dim), t = min(n_tokens, d_conv - 1): the document's last raw conv inputs.
    """

    final: torch.Tensor
    log_decay: torch.Tensor
    conv_tail: torch.Tensor


@dataclass
class DocumentEntry:
    """Everything a composition needs about one document, for one model version."""

    layers: list
    num_tokens: int
    model_version: str

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StateEntry:
    """Decode state of a prompt head (its first num_tokens tokens, ending with shared text):
    per layer a one-row AttentionCache (k, v holding exactly num_tokens slots) or MambaCache.
    documents: how many documents the head holds (served with it, never looked up)."""

    layers: list
    num_tokens: int
    model_version: str
    documents: int = 0

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CacheStats:
    """Counters of a DocumentCache.

    hits, misses: document lookups (misses also count a later turn's new documents, encoded
    with it without a lookup, see the module doc); stale: entries of another model version rejected;
    evictions (LRU, memory budget) and too_large (entries too large to store at all).
    state_hits: prefills that resumed from a stored prompt-head state, state_tokens: the prompt
    tokens those states covered, state_documents: the documents inside them (served from the
    cache without a lookup: documents of earlier hops on a later turn).
    """

    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0
    too_large: int = 0
    state_hits: int = 0
    state_tokens: int = 0
    state_documents: int = 0

    @property
    def document_hit_rate(self) -> float | None:
        """Share of the prompts' documents not encoded for the prompt: looked-up hits plus the
        documents inside restored states, over every document of every prefilled prompt."""
        served = self.hits + self.state_documents
        total = served + self.misses
        return served / total if total else None


@dataclass
class DocumentCache:
    """LRU map key -> DocumentEntry (a document's encoding) or StateEntry (a prompt head's
    decode state), bounded by `max_bytes` of tensor memory shared by both kinds.

    A document may evict any least recently used entry; a state evicts only other states
    (oldest first) and is not stored when that does not make room (counted in too_large), so
    per-question states never push documents (e.g. a precomputed KB) out.
    """

    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _nbytes: int = field(default=0, repr=False)
    _state_lengths: Counter = field(default_factory=Counter, repr=False)
    _states: OrderedDict = field(default_factory=OrderedDict, repr=False)  # state keys, LRU order
    _state_nbytes: int = field(default=0, repr=False)

    def __post_init__(self):
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {self.max_bytes!r}")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Tensor bytes held by the cached entries."""
        return self._nbytes

    def get(self, key: tuple, model_version: str) -> DocumentEntry | None:
        """The entry for `key` computed by `model_version`, else None (a miss).

        An entry from another model version is removed and counted in `stats.stale`.
        """
        entry = self._fetch(key, model_version)
        if entry is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return entry

    def get_state(self, key: tuple, model_version: str) -> StateEntry | None:
        """Like `get` for a StateEntry, without touching the document counters."""
        return self._fetch(key, model_version)

    def summary(self) -> dict:
        """The counters (`CacheStats`) plus hit_rate (document hits / lookups, None before any),
        document_hit_rate (`CacheStats.document_hit_rate`), entries (documents), states
        (prompt-head states) and bytes."""
        lookups = self.stats.hits + self.stats.misses
        return {**vars(self.stats), "hit_rate": self.stats.hits / lookups if lookups else None,
                "document_hit_rate": self.stats.document_hit_rate, "entries": len(self) - self.num_states,
                "states": self.num_states, "bytes": self.nbytes}

    @property
    def num_states(self) -> int:
        """How many of the entries are prompt-head states (the rest are documents)."""
        return len(self._states)

    @property
    def state_lengths(self) -> list[int]:
        """Token counts of the stored prompt-head states (each once)."""
        return list(self._state_lengths)

    def _fetch(self, key: tuple, model_version: str):
        entry = self._entries.get(key)
        if entry is not None and entry.model_version != model_version:
            self._remove(key)
            self.stats.stale += 1
            entry = None
        if entry is not None:
            self._entries.move_to_end(key)
            if key in self._states:
                self._states.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: DocumentEntry | StateEntry) -> None:
        """Store `entry`, evicting least recently used entries to stay within max_bytes (a
        state evicts only states, see the class doc)."""
        if key in self._entries:
            self._remove(key)
        size = entry.nbytes
        is_state = isinstance(entry, StateEntry)
        room = self.max_bytes - (self._nbytes - self._state_nbytes if is_state else 0)  # after every eviction
        if size > room:
            self.stats.too_large += 1
            return
        while self._nbytes + size > self.max_bytes:
            self._remove(next(iter(self._states if is_state else self._entries)))
            self.stats.evictions += 1
        self._entries[key] = entry
        self._nbytes += size
        if is_state:
            self._states[key] = None
            self._state_nbytes += size
            self._state_lengths[entry.num_tokens] += 1

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._states.clear()
        self._state_nbytes = 0
        self._state_lengths.clear()
        self._nbytes = 0

    def _remove(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self._nbytes -= entry.nbytes
        if isinstance(entry, StateEntry):
            del self._states[key]
            self._state_nbytes -= entry.nbytes
            self._state_lengths[entry.num_tokens] -= 1
            if not self._state_lengths[entry.num_tokens]:
                del self._state_lengths[entry.num_tokens]


def token_digest(token_ids: Sequence[int], doc_ids: Sequence[int] | None = None) -> str:
    """sha256 hex digest of token ids (and optionally their document ids)."""
    h = hashlib.sha256(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    if doc_ids is not None:
        h.update(b"|docs|")
        h.update(torch.tensor(list(doc_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def prefix_digests(token_ids: Sequence[int], doc_ids: Sequence[int], lengths: Sequence[int]) -> dict[int, str]:
    """sha256 hex digest of the first n (token id, document id) pairs, for each n in lengths
    (one pass over the prompt): the keys of prompt-head states."""
    pairs = torch.tensor([list(token_ids), list(doc_ids)], dtype=torch.int64).t().contiguous().numpy().tobytes()
    h, digests, done = hashlib.sha256(b"state"), {}, 0
    for n in sorted(set(lengths)):
        h.update(pairs[16 * done:16 * n])
        done = n
        digests[n] = h.hexdigest()  # hexdigest does not finalize h
    return digests


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WeightsVersion:
    """Model version string that follows in-place weight updates.

    The fingerprint is recomputed only when a parameter's autograd version counter moved
    (optimizer steps, load_state_dict); writes through ``param.data`` bypass the counter,
    so pass an explicit version to CachedEngine when weights change that way.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._counters = None
        self._digest = ""

    def __call__(self) -> str:
        counters = tuple((id(p), p._version) for p in self.model.parameters())
        if counters != self._counters:
            self._digest = weights_fingerprint(self.model)
            self._counters = counters
        return self._digest


class CachedEngine:
    """Prefill with per-document caching and generation on top of a HybridLM.

    model_version: a string naming the weights (e.g. checkpoint path + step); default
    `WeightsVersion(model)`, recomputed when the weights change in place.
    max_batch: documents encoded together (rows of one forward) at most. keep_states: also
    store and resume from prompt-head states (below); False caches documents only.

    Besides document encodings the cache keeps prompt-head states (`StateEntry`): the decode
    state at the entry of every retrieval block (documents first, the first one is the system
    prompt's, shared by every question) and each generated row's state after its turn (the
    prompt and every generated token but the last). A prefill resumes from the longest stored
    head of its prompt, so a later turn of the multi-hop loop, whose prompt is the previous
    turn's row plus a new hop, runs only the new tokens.
    """

    def __init__(self, model: HybridLM, cache: DocumentCache, model_version: str | None = None,
                 max_batch: int = 64, keep_states: bool = True):
        if not isinstance(model, HybridLM):
            raise ValueError(f"model must be a HybridLM, got {type(model).__name__}")
        if not isinstance(cache, DocumentCache):
            raise ValueError(f"cache must be a DocumentCache, got {type(cache).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model
        self.cache = cache
        self.max_batch = max_batch
        self.keep_states = bool(keep_states)
        self._version = (lambda: model_version) if model_version is not None else WeightsVersion(model)
        self._has_attention = any(isinstance(b, AttentionBlock) for b in model.blocks)

    @property
    def model_version(self) -> str:
        return self._version()

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, segments: Sequence[Segment], capacity: int | None = None) -> tuple[torch.Tensor, HybridCache]:
        """Prefill one prompt given as segments; returns last-token logits (1, vocab) fp32 and its cache.

        segments alternate shared text (a list of token ids) and retrieval blocks (a list of
        documents, each a non-empty list of token ids); the prompt must end with shared text.
        The result equals `model.prefill(ids, doc_ids)` of the concatenated prompt with
        documents numbered 1, 2, ... in order. capacity: KV slots to preallocate (default the
        prompt length).
        """
        return self._prefill(_normalize_segments(segments), capacity, self.model_version)

    def _prefill(self, parts: list, capacity: int | None, version: str) -> tuple[torch.Tensor, HybridCache]:
        ids, doc_ids = _flatten(parts)
        if doc_ids[-1] != 0:
            raise ValueError("the prompt must end with shared text (e.g. [ASST]), not inside a retrieval block")
        ids_t = torch.tensor(ids, dtype=torch.int64, device=self.device)[None]
        self.model._check_input(ids_t, None)
        rope = self._rope(parts)
        capacity = max(len(ids), capacity or 0)
        cache, resumed = self._restore(ids, doc_ids, len(ids) - 1, capacity, version)
        spans, start = [], 0
        for kind, value in parts:
            stop = start + (len(value) if kind == "shared" else sum(len(d) for d in value))
            spans.append((kind, value, start, stop))
            start = stop
        new_blocks = [value for kind, value, start, _ in spans if kind == "docs" and start >= resumed]
        if resumed and new_blocks and next(kind for kind, _, _, stop in spans if stop > resumed) == "shared":
            # A later turn: the prompt continues a stored row (the previous turn's) with shared text,
            # so its new blocks' heads are this conversation's alone and their documents would be
            # encoded for this prompt only. Everything new runs in one forward instead of
            # head / documents / tail forwards; the documents count as misses (not looked up).
            self.cache.stats.misses += sum(len(block) for block in new_blocks)
            docs = torch.tensor(doc_ids, dtype=torch.int64, device=self.device)
            hidden = _run_tokens(self.model, cache, ids_t[:, resumed:], rope.cos[:, resumed:], rope.sin[:, resumed:],
                                 docs[resumed:], docs[:resumed] == 0)
        else:
            hidden = None
            for kind, value, start, stop in spans:
                if stop <= resumed:
                    continue
                if kind == "shared":
                    begin = max(start, resumed)
                    hidden = _run_tokens(self.model, cache, ids_t[:, begin:stop], rope.cos[:, begin:stop],
                                         rope.sin[:, begin:stop])
                else:  # a stored head ends with shared text: a block lies wholly after it
                    if start > resumed:
                        self._save_state(cache, 0, ids[:start], doc_ids[:start], version)
                    _compose(cache, self._documents(cache, ids, doc_ids, start, value, rope, version))
        logits = self.model.lm_head(self.model.norm(hidden[:, -1])).float()
        return logits, cache

    def _rope(self, parts: list) -> SequenceContext:
        """RoPE positions (1, L) and tables of a one-prompt row, as `HybridLM` gives them with a
        DocLayout (`DocLayout.position_ids`): shared tokens count every earlier token; with block
        document positions each document of a block starts at the block's first position."""
        positions, t = [], 0
        block = self.model.config.doc_positions == "block"
        for kind, value in parts:
            if kind == "shared":
                positions += range(t, t + len(value))
                t += len(value)
            else:
                for doc in value:
                    first = len(positions) if not block else t
                    positions += range(first, first + len(doc))
                t += sum(len(doc) for doc in value)
        positions = torch.tensor(positions, dtype=torch.int64, device=self.device)[None]
        cos, sin = rotary_cos_sin(positions, self.model.config.rope_dim, self.model.config.rope_theta)
        return SequenceContext(None, positions, cos, sin)

    def _restore(self, ids: list, doc_ids: list, limit: int, capacity: int, version: str) -> tuple[HybridCache, int]:
        """A cache holding the longest stored head of the prompt ids, doc_ids of at most `limit`
        tokens (empty when none is stored) and that head's length."""
        cache = _empty_cache(self.model, capacity, self.device)
        lengths = [n for n in self.cache.state_lengths if n <= limit] if self.keep_states else []
        if lengths:
            digests = prefix_digests(ids, doc_ids, lengths)
            for n in sorted(lengths, reverse=True):
                entry = self.cache.get_state(("state", digests[n]), version)
                if entry is not None:
                    _load_state(cache, entry)
                    stats = self.cache.stats
                    stats.state_hits += 1
                    stats.state_tokens += n
                    stats.state_documents += entry.documents
                    return cache, n
        return cache, 0

    def _save_state(self, cache: HybridCache, row: int, ids: list, doc_ids: list, version: str) -> None:
        """Store row `row` of the cache, which holds exactly the tokens ids, as a prompt-head state."""
        if not self.keep_states:
            return
        n = len(ids)
        key = ("state", prefix_digests(ids, doc_ids, [n])[n])
        if key in self.cache._entries:
            return
        layers = []
        for layer in cache.layers:
            if isinstance(layer, AttentionCache):
                keys = None if layer.key_conv_state is None else layer.key_conv_state[row:row + 1].clone()
                layers.append(AttentionCache(layer.k[row:row + 1, :n].clone(), layer.v[row:row + 1, :n].clone(), keys))
            else:
                layers.append(MambaCache(layer.conv_state[row:row + 1].clone(), layer.ssm_state[row:row + 1].clone()))
        documents = sum(1 for t, d in enumerate(doc_ids) if d != 0 and (t == 0 or doc_ids[t - 1] != d))
        self.cache.put(key, StateEntry(layers, n, version, documents))

    def _documents(self, cache: HybridCache, ids: list, doc_ids: list, start: int, documents: list,
                   rope, version: str) -> list[DocumentEntry]:
        """Cached or freshly encoded entries of a retrieval block starting at token `start`; the
        missing documents are encoded together (rows of one forward per length)."""
        prefix_key = token_digest(ids[:start], doc_ids[:start])
        entries, missing, offset = [], {}, start
        for i, doc in enumerate(documents):
            key = (token_digest(doc), prefix_key, self._position_key(rope, offset))
            if key in missing:  # the same document twice in the block: encoded once
                missing[key][0].append(i)
                self.cache.stats.hits += 1
                entries.append(None)
            else:
                entry = self.cache.get(key, version)
                if entry is None:
                    missing[key] = ([i], doc, offset)
                entries.append(entry)
            offset += len(doc)
        if missing:
            shared = torch.tensor([d == 0 for d in doc_ids[:start]], dtype=torch.bool, device=self.device)
            todo = [(key, doc, rope.cos[:, o:o + len(doc)], rope.sin[:, o:o + len(doc)])
                    for key, (_, doc, o) in missing.items()]
            for key, entry in zip(missing, self._encode(cache, shared, todo, version)):
                self.cache.put(key, entry)
                for i in missing[key][0]:
                    entries[i] = entry
        return entries

    def _encode(self, cache: HybridCache, shared: torch.Tensor, todo: list, version: str) -> list[DocumentEntry]:
        """Entries of documents todo [(key, ids, cos, sin)] encoded from the cache's state,
        documents of equal length together, at most max_batch per forward; in todo's order."""
        by_length = {}
        for i, (_, doc, cos, sin) in enumerate(todo):
            by_length.setdefault(len(doc), []).append(i)
        entries = [None] * len(todo)
        for group in by_length.values():
            for at in range(0, len(group), self.max_batch):
                rows = group[at:at + self.max_batch]
                ids = torch.tensor([todo[i][1] for i in rows], dtype=torch.int64, device=self.device)
                cos = torch.cat([todo[i][2] for i in rows])
                sin = torch.cat([todo[i][3] for i in rows])
                for i, entry in zip(rows, _encode_documents(self.model, cache, shared, ids, cos, sin, version)):
                    entries[i] = entry
        return entries

    def _position_key(self, rope, offset: int) -> int | str | None:
        """Position part of the cache key of a document starting at token `offset` (see the module doc)."""
        if not self._has_attention:
            return None
        if self.model.config.doc_positions == "block":
            return "block"
        return int(rope.positions[0, offset])

    @torch.no_grad()
    def add_documents(self, head: Sequence[int], documents: Sequence[Sequence[int]]) -> int:
        """Encode documents as the first documents of a retrieval block that follows the shared
        tokens `head`, into the cache, without composing them (offline indexing: every later
        prompt that starts with `head` and puts one of them in a block there hits). The documents
        are encoded together, max_batch at a time. Returns the number encoded (misses).

        Needs block document positions when the model has attention blocks (each document of
        a block starts at the block's first position, whatever its siblings).
        """
        if self._has_attention and self.model.config.doc_positions != "block":
            raise ValueError("add_documents needs doc_positions='block' (a document's positions must not depend "
                             "on the documents before it)")
        head, documents = list(head), [list(d) for d in documents]
        parts = _normalize_segments([head, documents, head[-1:]])  # validates; the tail token is never run
        version = self.model_version
        misses = self.cache.stats.misses
        longest = max(len(d) for d in parts[1][1])
        cache, resumed = self._restore(head, [0] * len(head), len(head), len(head), version)
        if resumed < len(head):
            ids_t = torch.tensor([head[resumed:]], dtype=torch.int64, device=self.device)
            positions = torch.arange(resumed, len(head), device=self.device)[None]
            cos, sin = rotary_cos_sin(positions, self.model.config.rope_dim, self.model.config.rope_theta)
            _run_tokens(self.model, cache, ids_t, cos, sin)
            self._save_state(cache, 0, head, [0] * len(head), version)
        positions = torch.arange(len(head), len(head) + longest, device=self.device)[None]
        cos, sin = rotary_cos_sin(positions, self.model.config.rope_dim, self.model.config.rope_theta)
        rope = SequenceContext(None, positions, cos, sin)
        prefix_key = token_digest(head, [0] * len(head))
        todo, seen = [], set()
        for doc in parts[1][1]:
            key = (token_digest(doc), prefix_key, self._position_key(rope, 0))
            if key in seen or self.cache.get(key, version) is not None:
                continue
            seen.add(key)
            todo.append((key, doc, cos[:, :len(doc)], sin[:, :len(doc)]))
        shared = torch.ones(len(head), dtype=torch.bool, device=self.device)
        for (key, *_), entry in zip(todo, self._encode(cache, shared, todo, version)):
            self.cache.put(key, entry)
        return self.cache.stats.misses - misses

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()  # generation only reads weights: no autograd bookkeeping (~15% per CPU decode step)
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 doc_ids: Sequence[Sequence[int]] | None = None, timings: dict | None = None) -> list[list[int]]:
        """`refrag.infer.Engine.generate` with cached document prefill; same arguments and result
        (timings: "prefill_seconds" covers the cache lookups, restores and compositions too).

        doc_ids (per prompt, per token; 0 shared, k >= 1 document k) delimit the documents
        whose encodings are looked up in (and added to) the cache. Each row's state after its
        turn (prompt + generated tokens but the last) is stored for the next turn.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; pass at least one prompt")
        if doc_ids is None:
            doc_ids = [[0] * len(p) for p in prompt_ids]
        if len(doc_ids) != len(prompt_ids):
            raise ValueError(f"doc_ids has {len(doc_ids)} rows for {len(prompt_ids)} prompts")
        outputs = [[] for _ in prompt_ids]
        if max_new_tokens == 0:
            return outputs
        with timed(timings, "prefill_seconds"):
            version = self.model_version
            prompts = [(list(p), list(d)) for p, d in zip(prompt_ids, doc_ids)]
            prefilled = [self._prefill(_normalize_segments(segments_from_doc_ids(p, d)), len(p) + max_new_tokens,
                                       version) for p, d in prompts]
            logits = torch.cat([logit for logit, _ in prefilled])
            cache = prefilled[0][1] if len(prefilled) == 1 else stack_caches([c for _, c in prefilled])

        def keep_state(row: int, output: list, cache: HybridCache) -> None:
            ids, docs = prompts[row]
            self._save_state(cache, row, ids + output[:-1], docs + [0] * (len(output) - 1), version)

        with timed(timings, "decode_seconds"):
            return decode_loop(self.model, logits, cache, max_new_tokens, temperature, top_p, seed, stop_token_ids,
                               on_finish=keep_state)


# ---------------------------------------------------------------------- segments


def _normalize_segments(segments: Sequence[Segment]) -> list[tuple[str, list]]:
    """[("shared", ids) | ("docs", [ids, ...])], validated; adjacent shared parts stay separate,
    adjacent retrieval blocks are one block (as the concatenated prompt's doc ids say)."""
    if not segments:
        raise ValueError("segments is empty; pass at least one shared-text segment")
    parts = []
    for i, seg in enumerate(segments):
        seg = list(seg)
        if not seg:
            raise ValueError(f"segment {i} is empty")
        if all(isinstance(t, int) for t in seg):
            parts.append(("shared", seg))
        elif all(isinstance(d, (list, tuple)) for d in seg):
            docs = [list(d) for d in seg]
            for j, d in enumerate(docs):
                if not d or not all(isinstance(t, int) for t in d):
                    raise ValueError(f"segment {i} document {j} must be a non-empty list of token ids")
            if parts and parts[-1][0] == "docs":  # adjacent documents form one retrieval block
                parts[-1][1].extend(docs)
            else:
                parts.append(("docs", docs))
        else:
            raise ValueError(f"segment {i} must be a list of token ids or a list of documents (lists of ids)")
    return parts


def _flatten(parts: list[tuple[str, list]]) -> tuple[list[int], list[int]]:
    """Concatenated token ids and per-token document ids (documents numbered 1, 2, ...)."""
    ids, doc_ids, k = [], [], 0
    for kind, value in parts:
        if kind == "shared":
            ids += value
            doc_ids += [0] * len(value)
        else:
            for doc in value:
                k += 1
                ids += doc
                doc_ids += [k] * len(doc)
    return ids, doc_ids


def segments_from_doc_ids(token_ids: Sequence[int], doc_ids: Sequence[int]) -> list:
    """Split a prompt into segments: runs of shared tokens and retrieval blocks of documents.

    token_ids, doc_ids: per-token lists of equal length (doc 0 = shared, k >= 1 document k).
    """
    token_ids, doc_ids = list(token_ids), list(doc_ids)
    if len(token_ids) != len(doc_ids):
        raise ValueError(f"doc_ids has {len(doc_ids)} entries for {len(token_ids)} tokens")
    segments, t = [], 0
    while t < len(token_ids):
        if doc_ids[t] == 0:
            end = t
            while end < len(token_ids) and doc_ids[end] == 0:
                end += 1
            segments.append(token_ids[t:end])
        else:
            block, end = [], t
            while end < len(token_ids) and doc_ids[end] != 0:
                run = end
                while end < len(token_ids) and doc_ids[end] == doc_ids[run]:
                    end += 1
                block.append(token_ids[run:end])
            segments.append(block)
        t = end
    return segments


# ---------------------------------------------------------------------- caches


def _empty_cache(model: HybridLM, capacity: int, device: torch.device) -> HybridCache:
    """A one-row HybridCache holding no tokens."""
    layers = []
    for block in model.blocks:
        if isinstance(block, AttentionBlock):
            k = torch.zeros(1, capacity, block.n_kv_head, block.head_dim, device=device,
                            dtype=block.qkv.weight.dtype)
            keys = (torch.zeros(1, block.n_kv_head * block.head_dim, block.key_conv_width - 1, device=device,
                                dtype=block.qkv.weight.dtype) if block.key_conv is not None else None)
            layers.append(AttentionCache(k, torch.zeros_like(k), keys))
        else:
            width = block.conv_weight.shape[1] - 1
            conv = torch.zeros(1, block.conv_dim, width, device=device, dtype=block.in_proj.weight.dtype)
            ssm = torch.zeros(1, block.n_heads, block.headdim, block.d_state, device=device, dtype=torch.float32)
            layers.append(MambaCache(conv, ssm))
    return HybridCache(layers, torch.zeros(1, dtype=torch.int64, device=device))


def stack_caches(caches: Sequence[HybridCache]) -> HybridCache:
    """One HybridCache whose rows are the rows of `caches` (KV capacities padded to the largest)."""
    capacity = max((layer.capacity for c in caches for layer in c.layers if isinstance(layer, AttentionCache)),
                   default=0)
    layers = []
    for per_cache in zip(*(c.layers for c in caches)):
        if isinstance(per_cache[0], AttentionCache):
            for layer in per_cache:
                layer.grow(capacity)
            keys = (torch.cat([l.key_conv_state for l in per_cache]) if per_cache[0].key_conv_state is not None
                    else None)
            layers.append(AttentionCache(torch.cat([l.k for l in per_cache]), torch.cat([l.v for l in per_cache]),
                                         keys))
        else:
            layers.append(MambaCache(torch.cat([l.conv_state for l in per_cache]),
                                     torch.cat([l.ssm_state for l in per_cache])))
    return HybridCache(layers, torch.cat([c.lengths for c in caches]))


# ---------------------------------------------------------------------- block math


def _attention_mask(visible_cached: torch.Tensor, n: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Visibility (1, n, cached + n) of n new tokens: the cached slots where visible_cached
    (cached,) bool is set, and each other causally.

    doc_ids (n,) int: the new tokens' document ids when they mix shared text and retrieval
    blocks (doc_mode, as the full prompt's mask): then visible_cached limits the document
    tokens only (shared tokens see every cached slot), and among the new tokens a document
    token sees the shared text before it and its own document."""
    causal = torch.ones(n, n, dtype=torch.bool, device=visible_cached.device).tril()
    if doc_ids is None:
        return torch.cat([visible_cached[None].expand(n, -1), causal], dim=1)[None]
    shared = doc_ids == 0
    to_cached = visible_cached[None, :] | shared[:, None]
    among = causal & (shared[:, None] | shared[None, :] | (doc_ids[:, None] == doc_ids[None, :]))
    return torch.cat([to_cached, among], dim=1)[None]


def _run_tokens(model: HybridLM, cache: HybridCache, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: torch.Tensor | None = None, cached_shared: torch.Tensor | None = None) -> torch.Tensor:
    """Append tokens ids (1, n) to the one-row cache in one forward; returns the last block's
    output (1, n, d_model). Shared text by default; doc_ids (n,) int (0 shared, k document k of
    the prompt) and cached_shared (cached,) bool (which cached slots are shared text) when the
    tokens hold retrieval blocks: doc_mode as in a forward over the whole prompt (a document
    sees the shared text before it, never an earlier block's documents; conv windows restart
    at each document; the scan's documents read their block's entry state)."""
    cached, n = int(cache.lengths[0]), ids.shape[1]
    cache.reserve(n)
    slots = torch.arange(cached, cached + n, device=ids.device)[None]
    if doc_ids is None:
        visible = _attention_mask(torch.ones(cached, dtype=torch.bool, device=ids.device), n)
    else:
        visible = _attention_mask(cached_shared, n, doc_ids)
    row_docs = None if doc_ids is None else doc_ids[None]
    x = model.embed(ids)
    for block, layer in zip(model.blocks, cache.layers):
        if isinstance(block, AttentionBlock):
            x = block.attend_cached(x, cos, sin, layer, slots, visible, doc_ids=row_docs)
        else:
            x = block.mix(x, cache=layer, doc_ids=row_docs).out
    cache.lengths += n
    return x


def _load_state(cache: HybridCache, entry: StateEntry) -> None:
    """Fill an empty one-row cache with a stored prompt-head state (copies: decoding updates in place)."""
    n = entry.num_tokens
    for layer, stored in zip(cache.layers, entry.layers):
        if isinstance(layer, AttentionCache):
            layer.k[:, :n] = stored.k
            layer.v[:, :n] = stored.v
            if stored.key_conv_state is not None:
                layer.key_conv_state = stored.key_conv_state.clone()
        else:
            layer.conv_state = stored.conv_state.clone()
            layer.ssm_state = stored.ssm_state.clone()
    cache.lengths.fill_(n)


def _encode_documents(model: HybridLM, cache: HybridCache, shared: torch.Tensor, ids: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, version: str) -> list[DocumentEntry]:
    """Encode b documents of equal length, ids (b, n), as rows of one forward from the cache's
    state (the block entry), doc_mode semantics: attention sees the cached shared tokens
    (shared (cached,) bool; documents of earlier blocks are hidden) and the document, the conv
    windows start at the document, the SSD scan starts from the block-entry state. cos, sin
    (b, n, head_dim/2): each row's RoPE tables. The cache is not modified: each block runs on
    scratch rows (the prefix keys and values, empty conv windows, the block-entry SSD state)."""
    cached, (b, n) = shared.shape[0], ids.shape
    slots = torch.arange(cached, cached + n, device=ids.device)[None].expand(b, n)
    visible = _attention_mask(shared, n)
    x = model.embed(ids)
    layers = []
    for block, layer in zip(model.blocks, cache.layers):
        if isinstance(block, AttentionBlock):
            empty = layer.k.new_zeros(b, n, *layer.k.shape[2:])
            keys = None if layer.key_conv_state is None else layer.key_conv_state.new_zeros(b, *layer.key_conv_state.shape[1:])
            scratch = AttentionCache(torch.cat([layer.k[:, :cached].expand(b, -1, -1, -1), empty], dim=1),
                                     torch.cat([layer.v[:, :cached].expand(b, -1, -1, -1), empty], dim=1), keys)
            x = block.attend_cached(x, cos, sin, scratch, slots, visible)
            tails = None if keys is None else _tails(scratch.key_conv_state, n)
            layers.append([AttentionDocState(scratch.k[r, cached:].clone(), scratch.v[r, cached:].clone(),
                                             None if tails is None else tails[r].clone()) for r in range(b)])
        else:
            scratch = MambaCache(layer.conv_state.new_zeros(b, *layer.conv_state.shape[1:]),
                                 layer.ssm_state.expand(b, -1, -1, -1).clone())
            result = block.mix(x, cache=scratch, return_log_decay=True)
            x = result.out
            tails = _tails(scratch.conv_state, n)
            layers.append([MambaDocState(scratch.ssm_state[r].clone(), result.log_decay[r].clone(),
                                         tails[r].clone())
                           for r in range(b)])
    return [DocumentEntry([per_layer[r] for per_layer in layers], n, version) for r in range(b)]


def _tails(conv_state: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's last min(n, w) raw inputs (b, t, C) of a conv state (b, C, w) that began empty n inputs ago."""
    return conv_state[:, :, -min(n, conv_state.shape[-1]):].transpose(1, 2).contiguous()


def _compose(cache: HybridCache, entries: Sequence[DocumentEntry]) -> None:
    """Append a retrieval block of encoded documents to the cache (DESIGN's state composition)."""
    total = sum(e.num_tokens for e in entries)
    cache.reserve(total)
    cached = int(cache.lengths[0])
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, AttentionCache):
            layer.k[0, cached:cached + total] = torch.cat([e.layers[i].k for e in entries])
            layer.v[0, cached:cached + total] = torch.cat([e.layers[i].v for e in entries])
            if layer.key_conv_state is not None:
                tails = torch.cat([e.layers[i].key_tail for e in entries])
                layer.key_conv_state = conv_state_after(layer.key_conv_state, tails[None])
        else:
            h0 = layer.ssm_state[0]
            h = h0
            for e in entries:
                decay = e.layers[i].log_decay.exp()[:, None, None]  # (h, 1, 1)
                h = decay * h + (e.layers[i].final - decay * h0)
            layer.ssm_state = h[None].contiguous()
            tails = torch.cat([e.layers[i].conv_tail for e in entries])
            layer.conv_state = conv_state_after(layer.conv_state, tails[None])
    cache.lengths += total


def precompute_documents(engine: CachedEngine, tokenizer, documents: Sequence[dict], slots: int,
                         max_doc_tokens: int, system: str = SYSTEM_PROMPT) -> int:
    """Encode documents ahead of questions (offline, as a KB is indexed) into engine's cache.

    Documents first, a hop-1 document's encoding depends only on the system prompt, so each
    document is encoded once per slot ``[DOC_k]`` (k = 1..slots) and every later question that
    retrieves it in that slot hits. The encodings run `engine.max_batch` documents per forward
    from the system prompt's state (stored too: every question resumes from it). Returns the
    number of encodings computed (cache misses). With attention blocks the model needs block
    document positions (every document of a block starts at the same RoPE position), else ValueError.
    """
    if engine.model.config.doc_positions != "block" and engine._has_attention:
        raise ValueError("precompute needs doc_positions='block' (a document's positions must not depend on "
                         "the documents before it)")
    head, marked = None, []
    for doc in documents:
        ref = {k: doc[k] for k in ("id", "title", "content", "source") if k in doc}
        for slot in range(1, slots + 1):
            conv = {"messages": [{"role": "system", "content": system},
                                 {"role": "retrieval", "documents": [ref] * slot}, {"role": "user", "content": "?"}]}
            rendered = render_for_generation(conv, tokenizer, max_doc_tokens)
            ids, doc_ids = rendered.input_ids.tolist(), rendered.doc_ids.tolist()
            first, start = doc_ids.index(1), doc_ids.index(slot)
            stop = len(doc_ids) - doc_ids[::-1].index(slot)
            head = head or ids[:first]  # the tokens before the block: the same for every document
            marked.append(ids[start:stop])  # the slot-k document with its [DOC_k] markers
    if not marked:
        return 0
    return engine.add_documents(head, marked)
