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

Example::

    cache = DocumentCache(max_bytes=2 << 30)
    engine = CachedEngine(model, cache)                      # version: weight fingerprint
    logits, hybrid_cache = engine.prefill([prefix_ids, [doc_a_ids, doc_b_ids], suffix_ids])
    outputs = engine.generate([prompt_ids], 32, doc_ids=[prompt_doc_ids])   # Engine's signature
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from refrag_kernels import DocLayout
from refrag.data import SYSTEM_PROMPT, render_for_generation
from refrag.infer.engine import decode_loop
from refrag.model import AttentionCache, HybridCache, HybridLM, MambaCache
from refrag.model.blocks import AttentionBlock, conv_state_after

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
class CacheStats:
    """Counters of a DocumentCache: hits, misses, stale (other model version) rejections,
    evictions (LRU, memory budget) and entries too large to store at all."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0
    too_large: int = 0


@dataclass
class DocumentCache:
    """LRU map key -> DocumentEntry bounded by `max_bytes` of tensor memory."""

    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _nbytes: int = field(default=0, repr=False)

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
        entry = self._entries.get(key)
        if entry is not None and entry.model_version != model_version:
            self._remove(key)
            self.stats.stale += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: tuple, entry: DocumentEntry) -> None:
        """Store `entry`, evicting least recently used entries to stay within max_bytes."""
        if key in self._entries:
            self._remove(key)
        size = entry.nbytes
        if size > self.max_bytes:
            self.stats.too_large += 1
            return
        while self._nbytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.stats.evictions += 1
        self._entries[key] = entry
        self._nbytes += size

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._nbytes = 0

    def _remove(self, key: tuple) -> None:
        self._nbytes -= self._entries.pop(key).nbytes


def token_digest(token_ids: Sequence[int], doc_ids: Sequence[int] | None = None) -> str:
    """sha256 hex digest of token ids (and optionally their document ids)."""
    h = hashlib.sha256(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    if doc_ids is not None:
        h.update(b"|docs|")
        h.update(torch.tensor(list(doc_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


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
    """

    def __init__(self, model: HybridLM, cache: DocumentCache, model_version: str | None = None):
        if not isinstance(model, HybridLM):
            raise ValueError(f"model must be a HybridLM, got {type(model).__name__}")
        if not isinstance(cache, DocumentCache):
            raise ValueError(f"cache must be a DocumentCache, got {type(cache).__name__}")
        self.model = model
        self.cache = cache
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
        parts = _normalize_segments(segments)
        ids, doc_ids = _flatten(parts)
        if doc_ids[-1] != 0:
            raise ValueError("the prompt must end with shared text (e.g. [ASST]), not inside a retrieval block")
        layout = DocLayout.from_cu_seqlens(
            torch.tensor([0, len(ids)], dtype=torch.int32, device=self.device),
            torch.tensor(doc_ids, dtype=torch.int32, device=self.device))
        ids_t = torch.tensor(ids, dtype=torch.int64, device=self.device)[None]
        self.model._check_input(ids_t, layout)
        rope = self.model._context(ids_t, layout)
        cache = _empty_cache(self.model, max(len(ids), capacity or 0), self.device)
        version = self.model_version
        start, hidden = 0, None
        for kind, value in parts:
            if kind == "shared":
                stop = start + len(value)
                hidden = _run_shared(self.model, cache, ids_t[:, start:stop], rope.cos[:, start:stop],
                                     rope.sin[:, start:stop])
            else:
                stop = start + sum(len(d) for d in value)
                entries = self._documents(cache, ids, doc_ids, start, value, rope, version)
                _compose(cache, entries)
            start = stop
        logits = self.model.lm_head(self.model.norm(hidden[:, -1])).float()
        return logits, cache

    def _documents(self, cache: HybridCache, ids: list, doc_ids: list, start: int, documents: list,
                   rope, version: str) -> list[DocumentEntry]:
        """Cached or freshly encoded entries of a retrieval block starting at token `start`."""
        prefix_key = token_digest(ids[:start], doc_ids[:start])
        shared = torch.tensor([d == 0 for d in doc_ids[:start]], dtype=torch.bool, device=self.device)
        entries, offset = [], start
        for doc in documents:
            key = (token_digest(doc), prefix_key, self._position_key(rope, offset))
            entry = self.cache.get(key, version)
            if entry is None:
                stop = offset + len(doc)
                entry = _encode_document(self.model, cache, shared, torch.tensor(doc, device=self.device)[None],
                                         rope.cos[:, offset:stop], rope.sin[:, offset:stop], version)
                self.cache.put(key, entry)
            entries.append(entry)
            offset += len(doc)
        return entries

    def _position_key(self, rope, offset: int) -> int | str | None:
        """Position part of the cache key of a document starting at token `offset` (see the module doc)."""
        if not self._has_attention:
            return None
        if self.model.config.doc_positions == "block":
            return "block"
        return int(rope.positions[0, offset])

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 doc_ids: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
        """`refrag.infer.Engine.generate` with cached document prefill; same arguments and result.

        doc_ids (per prompt, per token; 0 shared, k >= 1 document k) delimit the documents
        whose encodings are looked up in (and added to) the cache.
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
        prefilled = [self.prefill(segments_from_doc_ids(p, d), capacity=len(p) + max_new_tokens)
                     for p, d in zip(prompt_ids, doc_ids)]
        logits = torch.cat([logit for logit, _ in prefilled])
        cache = stack_caches([c for _, c in prefilled])
        return decode_loop(self.model, logits, cache, max_new_tokens, temperature, top_p, seed, stop_token_ids)


# ---------------------------------------------------------------------- segments


def _normalize_segments(segments: Sequence[Segment]) -> list[tuple[str, list]]:
    """[("shared", ids) | ("docs", [ids, ...])], validated; adjacent shared parts stay separate."""
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


def _attention_mask(visible_cached: torch.Tensor, n: int) -> torch.Tensor:
    """Visibility (1, n, cached + n) of n new tokens: the cached slots where visible_cached
    (cached,) bool is set, and each other causally."""
    causal = torch.ones(n, n, dtype=torch.bool, device=visible_cached.device).tril()
    return torch.cat([visible_cached[None].expand(n, -1), causal], dim=1)[None]


def _run_shared(model: HybridLM, cache: HybridCache, ids: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """Append shared tokens ids (1, n) to the cache; returns the last block's output (1, n, d_model)."""
    cached, n = int(cache.lengths[0]), ids.shape[1]
    cache.reserve(n)
    slots = torch.arange(cached, cached + n, device=ids.device)[None]
    visible = _attention_mask(torch.ones(cached, dtype=torch.bool, device=ids.device), n)
    x = model.embed(ids)
    for block, layer in zip(model.blocks, cache.layers):
        if isinstance(block, AttentionBlock):
            x = block.attend_cached(x, cos, sin, layer, slots, visible)
        else:
            x = block.mix(x, cache=layer).out
    cache.lengths += n
    return x


def _encode_document(model: HybridLM, cache: HybridCache, shared: torch.Tensor, ids: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, version: str) -> DocumentEntry:
    """Encode one document ids (1, n) from the cache's state (the block entry), doc_mode semantics:
    attention sees the cached shared tokens (shared (cached,) bool; documents of earlier blocks
    are hidden) and the document, the conv window starts at the document, the SSD scan starts
    from the block-entry state. The cache is not modified: each block runs on a scratch copy of
    its layer (prefix keys and values, empty conv windows, the block-entry SSD state)."""
    cached, n = shared.shape[0], ids.shape[1]
    slots = torch.arange(cached, cached + n, device=ids.device)[None]
    visible = _attention_mask(shared, n)
    x = model.embed(ids)
    layers = []
    for block, layer in zip(model.blocks, cache.layers):
        if isinstance(block, AttentionBlock):
            empty = layer.k.new_zeros(1, n, *layer.k.shape[2:])
            keys = None if layer.key_conv_state is None else torch.zeros_like(layer.key_conv_state)
            scratch = AttentionCache(torch.cat([layer.k[:, :cached], empty], dim=1),
                                     torch.cat([layer.v[:, :cached], empty], dim=1), keys)
            x = block.attend_cached(x, cos, sin, scratch, slots, visible)
            tail = None if keys is None else _tail(scratch.key_conv_state, n)
            layers.append(AttentionDocState(scratch.k[0, cached:], scratch.v[0, cached:], tail))
        else:
            scratch = MambaCache(torch.zeros_like(layer.conv_state), layer.ssm_state.clone())
            result = block.mix(x, cache=scratch, return_log_decay=True)
            x = result.out
            layers.append(MambaDocState(scratch.ssm_state[0], result.log_decay[0], _tail(scratch.conv_state, n)))
    return DocumentEntry(layers, n, version)


def _tail(conv_state: torch.Tensor, n: int) -> torch.Tensor:
    """The last min(n, w) raw inputs (t, C) of a conv state (1, C, w) that began empty n inputs ago."""
    return conv_state[0, :, -min(n, conv_state.shape[-1]):].t().contiguous()


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
    retrieves it in that slot hits. Returns the number of encodings computed (cache misses).
    With attention blocks the model needs block document positions (every document of a block
    starts at the same RoPE position), else ValueError.
    """
    if engine.model.config.doc_positions != "block" and engine._has_attention:
        raise ValueError("precompute needs doc_positions='block' (a document's positions must not depend on "
                         "the documents before it)")
    misses = engine.cache.stats.misses
    for doc in documents:
        ref = {k: doc[k] for k in ("id", "title", "content", "source") if k in doc}
        for slot in range(1, slots + 1):
            conv = {"messages": [{"role": "system", "content": system},
                                 {"role": "retrieval", "documents": [ref] * slot}, {"role": "user", "content": "?"}]}
            rendered = render_for_generation(conv, tokenizer, max_doc_tokens)
            ids, doc_ids = rendered.input_ids.tolist(), rendered.doc_ids.tolist()
            first, start = doc_ids.index(1), doc_ids.index(slot)
            stop = len(doc_ids) - doc_ids[::-1].index(slot)
            # prefix, the slot-k document alone, one shared token: the document's cache key (its
            # tokens, the tokens before the block, the block position) is the one a real block gives
            engine.prefill([ids[:first], [ids[start:stop]], [ids[stop]]])
    return engine.cache.stats.misses - misses
