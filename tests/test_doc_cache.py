"""Per-document prefill cache: cached composition equals the full doc_mode prefill; LRU, versions, bad input.

Most cases run the ops' PyTorch references on CPU (the composition, not the kernels, is under
test here, and the Triton interpreter is slow); `test_cached_prefill_matches_on_the_kernel_path`
runs the Triton kernels (interpreter on CPU, compiled on CUDA).
"""
from __future__ import annotations

import pytest
import torch

from model_utils import VOCAB, tiny_model, tolerance
from refrag.infer import Engine
from refrag.infer.doc_cache import CachedEngine, DocumentCache, segments_from_doc_ids, weights_fingerprint

PATTERNS = [pytest.param("M,M", id="pure-M"), pytest.param("T,M", id="hybrid"), pytest.param("T,T", id="pure-T")]


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# prefix, three documents (7 tokens, a one-token document, 2 tokens: shorter than the conv window), suffix
PREFIX, SUFFIX = tokens(5, 1), tokens(4, 2)
DOCS = {"a": tokens(7, 3), "b": tokens(1, 4), "c": tokens(2, 5)}


def flat(segments) -> tuple[list[int], list[int]]:
    """Concatenated ids and doc ids (documents numbered 1, 2, ... in order)."""
    ids, doc_ids, k = [], [], 0
    for seg in segments:
        if isinstance(seg[0], int):
            ids += seg
            doc_ids += [0] * len(seg)
        else:
            for d in seg:
                k += 1
                ids += d
                doc_ids += [k] * len(d)
    return ids, doc_ids


def full_prefill(model, segments):
    ids, doc_ids = flat(segments)
    return model.prefill(torch.tensor([ids], device=model.embed.weight.device),
                         torch.tensor([doc_ids], device=model.embed.weight.device))


def assert_same_generation(model, engine, segments, max_new_tokens=6):
    ids, doc_ids = flat(segments)
    expected = Engine(model).generate([ids], max_new_tokens, doc_ids=[doc_ids])
    assert engine.generate([ids], max_new_tokens, doc_ids=[doc_ids]) == expected


def assert_cached_prefill_equals_full_prefill(model, engine, segments):
    """Logits and every cached tensor (KV up to the prompt length) equal the full prefill's."""
    device = model.embed.weight.device
    expected, expected_cache = full_prefill(model, segments)
    logits, cache = engine.prefill(segments)
    torch.testing.assert_close(logits, expected, **tolerance(device))
    for got, want in zip(cache.layers, expected_cache.layers):
        for name, tensor in vars(want).items():
            if tensor is None:  # no key conv
                assert getattr(got, name) is None
                continue
            n = int(cache.lengths[0]) if name in ("k", "v") else None
            torch.testing.assert_close(getattr(got, name)[:, :n], tensor[:, :n], **tolerance(device))


DOC_POSITIONS = [pytest.param("block", id="block-pos"), pytest.param("sequential", id="seq-pos")]


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cached_prefill_equals_full_prefill_for_any_document_order(pattern, doc_positions, device, reference_ops):
    model = tiny_model(pattern, device, doc_positions=doc_positions)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    for order in ("abc", "cab", "bca", "abc"):
        segments = [PREFIX, [DOCS[k] for k in order], SUFFIX]
        assert_cached_prefill_equals_full_prefill(model, engine, segments)
        assert_same_generation(model, engine, segments)
    stats = engine.cache.stats
    if pattern == "M,M" or doc_positions == "block":  # positions independent of siblings: any order reuses
        assert (stats.misses, stats.hits) == (3, 4 * 2 * 3 - 3)  # 4 orders x (prefill + generate) x 3 docs
    else:  # the key holds the first RoPE position: abc, cab, bca place every document at a new offset
        assert (stats.misses, stats.hits) == (9, 4 * 2 * 3 - 9)


@pytest.mark.parametrize("width", [2, 4])
def test_cached_prefill_with_a_key_conv_equals_full_prefill(width, device, reference_ops):
    """Key-conv windows restart at each document (a cached document's keys ignore its siblings)
    and the shared suffix continues from the raw keys of the last documents (DOCS["b"] and
    DOCS["c"] are shorter than a width-4 window)."""
    model = tiny_model("T,M,T", device, key_conv=width)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    for order in ("abc", "cab", "bca"):
        segments = [PREFIX, [DOCS[k] for k in order], SUFFIX, [DOCS["a"]], SUFFIX]
        assert_cached_prefill_equals_full_prefill(model, engine, segments)
        assert_same_generation(model, engine, segments)


def test_shared_text_in_pieces_of_one_and_more_tokens_equals_full_prefill(device, reference_ops):
    """Shared text continuing the cache one token at a time (the blocks' decode update kernels)
    or several tokens at once (conv window and chunked scan from the cached state) gives the
    full prefill: MambaBlock.mix and AttentionBlock.attend_cached on both of their paths."""
    model = tiny_model("T,M,T", device, key_conv=3)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    segments = [PREFIX[:1], PREFIX[1:2], PREFIX[2:], [DOCS["a"], DOCS["b"]], SUFFIX[:1], SUFFIX[1:]]
    assert_cached_prefill_equals_full_prefill(model, engine, segments)


def test_mamba_mix_takes_exactly_one_of_ctx_and_cache(device):
    block = tiny_model("M", device).blocks[0]
    with pytest.raises(ValueError, match="exactly one of ctx"):
        block.mix(torch.zeros(1, 3, block.norm.normalized_shape[0], device=device))


def marked(body: list[int], slot: int) -> list[int]:
    """A document as rendered in slot `slot`: ids 1, 2 stand for [DOC_1], [DOC_2], id 0 for its closer."""
    return [slot] + body + [0]


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_document_in_the_same_slot_after_other_siblings(pattern, doc_positions, device, reference_ops):
    """The slot-2 document keeps its marked tokens and prefix while the slot-1 sibling before it
    changes length: with block positions (or no attention) its entry is a hit, with sequential
    positions it moved and is a miss; either way the composition equals the full prefill."""
    model = tiny_model(pattern, device, doc_positions=doc_positions)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    second = marked(DOCS["c"], slot=2)
    for first in (DOCS["a"], DOCS["b"]):
        assert_cached_prefill_equals_full_prefill(model, engine, [PREFIX, [marked(first, slot=1), second], SUFFIX])
    reused = pattern == "M,M" or doc_positions == "block"
    assert (engine.cache.stats.hits, engine.cache.stats.misses) == ((1, 3) if reused else (0, 4))


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
def test_cached_prefill_composes_several_retrieval_blocks(doc_positions, device, reference_ops):
    model = tiny_model("T,M,M", device, doc_positions=doc_positions)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    segments = [PREFIX, [DOCS["a"], DOCS["b"]], tokens(3, 6), [DOCS["c"], DOCS["a"]], SUFFIX]
    expected, _ = full_prefill(model, segments)
    logits, _ = engine.prefill(segments)
    torch.testing.assert_close(logits, expected, **tolerance(device))
    assert_same_generation(model, engine, segments)
    stats = engine.cache.stats  # generate resumed from the second block's entry, which holds the first block
    assert (stats.hits, stats.state_hits, stats.state_documents) == (2, 1, 2)


def test_cached_prefill_matches_on_the_kernel_path(device):
    model = tiny_model("T,M", device)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    segments = [PREFIX, [DOCS["c"], DOCS["a"]], SUFFIX]
    expected, _ = full_prefill(model, segments)
    logits, _ = engine.prefill(segments)
    torch.testing.assert_close(logits, expected, **tolerance(device))


def test_batched_generate_matches_engine(device, reference_ops):
    model = tiny_model("T,M", device)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    prompts = [flat([PREFIX, [DOCS["a"], DOCS["b"]], SUFFIX]), flat([tokens(2, 7), [DOCS["c"]], tokens(9, 8)])]
    ids, doc_ids = [p[0] for p in prompts], [p[1] for p in prompts]
    expected = Engine(model).generate(ids, 5, doc_ids=doc_ids)
    assert engine.generate(ids, 5, doc_ids=doc_ids) == expected


def test_entries_of_another_model_version_are_never_used(device, reference_ops):
    model = tiny_model("T,M", device)
    cache = DocumentCache(max_bytes=1 << 30)
    segments = [PREFIX, [DOCS["a"], DOCS["c"]], SUFFIX]
    CachedEngine(model, cache, model_version="step-1").prefill(segments)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected, _ = full_prefill(model, segments)
    logits, _ = CachedEngine(model, cache, model_version="step-2").prefill(segments)
    assert cache.stats.stale == 3 and cache.stats.hits == 0  # two documents and the state at the block entry
    torch.testing.assert_close(logits, expected, **tolerance(device))


def test_default_version_follows_in_place_weight_updates(device, reference_ops):
    model = tiny_model("M", device)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    segments = [PREFIX, [DOCS["a"]], SUFFIX]
    engine.prefill(segments)
    version = engine.model_version
    assert version == weights_fingerprint(model)
    with torch.no_grad():
        model.blocks[0].D.add_(0.5)
    assert engine.model_version != version
    expected, _ = full_prefill(model, segments)
    logits, _ = engine.prefill(segments)
    assert engine.cache.stats.stale == 2  # the document and the state at the block entry
    torch.testing.assert_close(logits, expected, **tolerance(device))


def test_lru_keeps_within_the_memory_budget(device, reference_ops):
    model = tiny_model("M", device)
    probe = CachedEngine(model, DocumentCache(max_bytes=1 << 30), keep_states=False)  # documents only
    docs = [tokens(4, 10 + i) for i in range(3)]  # equal lengths: equal entry sizes
    probe.prefill([PREFIX, [docs[0]], SUFFIX])
    one_entry = probe.cache.nbytes
    cache = DocumentCache(max_bytes=2 * one_entry)
    engine = CachedEngine(model, cache, keep_states=False)
    for doc in docs:
        engine.prefill([PREFIX, [doc], SUFFIX])
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and cache.stats.evictions == 1
    engine.prefill([PREFIX, [docs[2]], SUFFIX])
    engine.prefill([PREFIX, [docs[0]], SUFFIX])  # evicted first (least recently used)
    assert (cache.stats.hits, cache.stats.misses) == (1, 4)
    tiny = CachedEngine(model, DocumentCache(max_bytes=one_entry - 1), keep_states=False)
    tiny.prefill([PREFIX, [docs[0]], SUFFIX])
    assert len(tiny.cache) == 0 and tiny.cache.stats.too_large == 1


def test_bad_input_is_rejected(device):
    model = tiny_model("M", device)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 20))
    with pytest.raises(ValueError, match="end with shared text"):
        engine.prefill([PREFIX, [DOCS["a"]]])
    with pytest.raises(ValueError, match="segment 1 is empty"):
        engine.prefill([PREFIX, [], SUFFIX])
    with pytest.raises(ValueError, match="max_bytes"):
        DocumentCache(max_bytes=-1)
    with pytest.raises(ValueError, match="DocumentCache"):
        CachedEngine(model, {})


def test_segments_from_doc_ids_round_trip():
    segments = [PREFIX, [DOCS["a"], DOCS["b"]], tokens(3, 6), [DOCS["c"]], SUFFIX]
    ids, doc_ids = flat(segments)
    assert segments_from_doc_ids(ids, doc_ids) == segments
    with pytest.raises(ValueError, match="doc_ids"):
        segments_from_doc_ids(ids, doc_ids[:-1])


def test_multihop_loop_gives_the_same_traces_with_the_cached_engine(reference_ops):
    from refrag.data import load_tokenizer
    from refrag.infer.multihop import run_multihop
    from test_multihop import Q1, Q2, FakeRetriever, doc

    tok = load_tokenizer()
    model = tiny_model("T,M", "cpu", vocab_size=tok.vocab_size)
    retriever = FakeRetriever({Q1: [doc("d1", "The Folding Sextant was invented by Synstyl Merkstesk."),
                                    doc("d2", "Pulbys is a port city.")],
                               Q2: [doc("d3", "The Ferro River flows through Gindvrask.")]})
    kwargs = dict(max_hops=2, max_new_tokens=5, temperature=1.0, seed=3)
    expected = run_multihop(Engine(model), tok, retriever, [Q1, Q2], **kwargs)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    for _ in range(2):  # the second run hits the cache
        got = run_multihop(engine, tok, retriever, [Q1, Q2], **kwargs)
        assert [t.input_ids for t in got] == [t.input_ids for t in expected]
    assert engine.cache.stats.hits >= 3


# equal lengths: encoded together as rows of one forward (DOCS["a"] has 7 tokens too)
SAME_LENGTH = {"d": tokens(7, 11), "e": tokens(7, 12), "f": tokens(1, 13)}


@pytest.mark.parametrize("max_batch", [2, 64])
@pytest.mark.parametrize("pattern, doc_positions", [("T,M", "block"), ("T,M", "sequential"), ("T,T", "sequential"),
                                                    ("M,M", "block")])
def test_documents_encoded_together_equal_full_prefill(pattern, doc_positions, max_batch, device, reference_ops):
    """A block's missing documents of equal length run as rows of one forward (max_batch rows at
    most; lengths 7, 7, 7 and 1, 1 here: 2 rows + 1 row, or all at once): the composition still
    equals the full prefill, each row its own RoPE positions (sequential) and conv tails."""
    model = tiny_model(pattern, device, doc_positions=doc_positions, key_conv=3 if "T" in pattern else 0)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30), max_batch=max_batch, keep_states=False)
    block = [DOCS["a"], SAME_LENGTH["d"], DOCS["b"], SAME_LENGTH["e"], SAME_LENGTH["f"]]
    segments = [PREFIX, block, SUFFIX, [SAME_LENGTH["e"], SAME_LENGTH["d"]], SUFFIX]
    assert_cached_prefill_equals_full_prefill(model, engine, segments)
    assert (engine.cache.stats.hits, engine.cache.stats.misses) == (0, 7)
    assert_same_generation(model, engine, segments)
    assert (engine.cache.stats.hits, engine.cache.stats.misses) == (7, 7)


def check_a_later_turn(pattern, device):
    model = tiny_model(pattern, device, key_conv=3 if "T" in pattern else 0)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    first = [PREFIX, [DOCS["a"], DOCS["b"]], SUFFIX]
    ids, doc_ids = flat(first)
    [output] = engine.generate([ids], 5, doc_ids=[doc_ids])
    assert len(output) == 5 and engine.cache.num_states == 2  # the block entry and the row after the turn
    second = first + [output + tokens(2, 21), [DOCS["c"], SAME_LENGTH["d"]], SUFFIX]
    before = engine.cache.stats.misses
    assert_cached_prefill_equals_full_prefill(model, engine, second)
    stats = engine.cache.stats
    assert stats.state_hits == 1 and stats.state_tokens == len(ids) + 4 and stats.state_documents == 2
    assert stats.misses - before == 2
    assert_same_generation(model, engine, second)


@pytest.mark.parametrize("pattern", ["T,M", "M,M", "T,T"])
def test_a_later_turn_resumes_from_the_generated_row(pattern, device, reference_ops):
    """generate keeps each row's state after its turn (prompt + generated tokens but the last);
    the next turn's prompt (that row, the last token, a new block, shared text) resumes from it,
    runs everything new (documents included, doc_mode masks, windows and block-entry states) in
    one forward, counts the new block's documents as misses, and equals the full prefill and
    Engine's generation."""
    check_a_later_turn(pattern, device)


@pytest.mark.parametrize("pattern", ["T,M", "M,M"])
def test_a_later_turn_on_the_cpu_torch_paths(pattern):
    """The same on what CPU inference runs by default (the ops' "torch" paths: the row paths of
    ssd_scan and causal_conv1d for shared text, their document paths for a later turn's block)."""
    import refrag_kernels

    with refrag_kernels.use_backend("torch"):
        check_a_later_turn(pattern, torch.device("cpu"))


def test_batched_generate_keeps_each_row_state_when_it_stops(device, reference_ops):
    """Rows of one generate call stop at different steps; each row's state is taken when it stops
    (later steps feed its row more tokens), so its next turn resumes from exactly its own tokens."""
    model = tiny_model("T,M", device)
    prompts = [flat([PREFIX, [DOCS["a"]], SUFFIX]), flat([tokens(3, 7), [DOCS["c"]], tokens(9, 8)])]
    ids, doc_ids = [p[0] for p in prompts], [p[1] for p in prompts]
    free = Engine(model).generate(ids, 6, doc_ids=doc_ids)
    stop = free[0][1]  # row 0 stops after 2 tokens, row 1 later (or at the same step)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30))
    outputs = engine.generate(ids, 6, doc_ids=doc_ids, stop_token_ids=[stop])
    assert outputs == Engine(model).generate(ids, 6, doc_ids=doc_ids, stop_token_ids=[stop])
    for (p, d), out in zip(prompts, outputs):
        nxt = [p + out + tokens(2, 30), d + [0] * (len(out) + 2)]
        segments = segments_from_doc_ids(*nxt)
        hits = engine.cache.stats.state_hits
        assert_cached_prefill_equals_full_prefill(model, engine, segments)
        assert engine.cache.stats.state_hits == hits + 1
        assert_same_generation(model, engine, segments)


@pytest.mark.parametrize("pattern", ["T,M", "M,M"])
def test_added_documents_serve_every_slot_of_a_later_block(pattern, device, reference_ops):
    """add_documents encodes documents (several per forward) after a shared head without composing
    them; any later block after that head holding them, in any order, hits every document and
    equals the full prefill. Sequential positions are refused (a document's keys would depend on
    its siblings)."""
    model = tiny_model(pattern, device, key_conv=3 if "T" in pattern else 0)
    engine = CachedEngine(model, DocumentCache(max_bytes=1 << 30), max_batch=2)
    docs = [marked(DOCS["a"], 1), marked(SAME_LENGTH["d"], 2), marked(SAME_LENGTH["e"], 1), marked(DOCS["b"], 2)]
    assert engine.add_documents(PREFIX, docs + docs[:1]) == 4  # the repeat is encoded once
    assert engine.add_documents(PREFIX, docs) == 0
    hits = engine.cache.stats.hits
    for block in ([docs[0], docs[1]], [docs[2], docs[3]], [docs[2], docs[1]]):
        assert_cached_prefill_equals_full_prefill(model, engine, [PREFIX, block, SUFFIX])
    assert engine.cache.stats.hits - hits == 6 and engine.cache.stats.misses == 4
    if pattern == "T,M":
        sequential = CachedEngine(tiny_model(pattern, device, doc_positions="sequential"), DocumentCache(1 << 20))
        with pytest.raises(ValueError, match="doc_positions"):
            sequential.add_documents(PREFIX, docs)


def test_states_evict_only_states_and_documents_any_entry():
    """Per-question states share the memory budget but never push documents (a precomputed KB)
    out: a state evicts the oldest states, or is not stored; a document evicts in LRU order."""
    from refrag.infer.doc_cache import AttentionDocState, DocumentEntry, MambaCache, StateEntry

    def document(n):  # 2 n fp32 values: 8 n bytes
        return DocumentEntry([AttentionDocState(torch.zeros(n), torch.zeros(n))], 1, "v")

    def state(n):
        return StateEntry([MambaCache(torch.zeros(n), torch.zeros(n))], n, "v")

    cache = DocumentCache(max_bytes=1000)
    cache.put("d1", document(50))
    cache.put("s1", state(50))
    cache.put("s2", state(50))  # full: evicts s1, not the older d1
    assert list(cache._entries) == ["d1", "s2"] and cache.num_states == 1 and cache.stats.evictions == 1
    cache.put("s3", state(90))  # 720 B: more than the 600 B the documents leave
    assert list(cache._entries) == ["d1", "s2"] and cache.stats.too_large == 1
    assert cache.get("d1", "v") is not None  # d1 is now the most recently used
    cache.put("d2", document(50))  # a document evicts the least recently used entry: s2
    assert list(cache._entries) == ["d1", "d2"] and cache.num_states == 0 and cache.nbytes == 800
    assert cache.state_lengths == []
