"""Serving API (refrag.serve.RagService) and the document cache on the multi-hop path.

The per-document cache key holds every token before a document's retrieval block: question
first, two questions over the same documents share nothing; documents first, the second
question reuses every document encoding. Answers never depend on the cache.
"""
from __future__ import annotations

import pytest
import torch

import refrag_kernels.common.dispatch as dispatch
from refrag.data import load_tokenizer
from refrag.serve import Answer, RagService
from refrag.model import HybridLM, MambaConfig, ModelConfig
from test_multihop import FakeRetriever, doc

QUESTIONS = ["Where was Synstyl Merkstesk born?", "Which river flows through Gindvrask?"]
DOCS = [doc("person-116", "Synstyl Merkstesk was born in Pulbys."),
        doc("city-003", "The Ferro River flows through Gindvrask."),
        doc("city-001", "Pulbys is a port city.")]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setattr(dispatch, "INTERPRET", False)  # the serving path, not the kernels


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def hybrid(vocab: int) -> HybridLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, d_model=64, n_layer=2, block_pattern="T,M", n_head=2, key_conv=3,
                         mamba=MambaConfig(d_state=16, headdim=16, chunk_size=16))
    return HybridLM(config).eval()


def service(tok, question_first: bool, cache_bytes: int = 64 << 20, **kwargs) -> RagService:
    retriever = FakeRetriever({q: DOCS for q in QUESTIONS})
    return RagService(hybrid(tok.vocab_size), tok, retriever, top_k=3, max_hops=1, max_new_tokens=4,
                      question_first=question_first, cache_bytes=cache_bytes, **kwargs)


@pytest.mark.parametrize("question_first, hits", [(True, 0), (False, 3)], ids=["question-first", "documents-first"])
def test_second_question_over_the_same_documents_hits_only_documents_first(tok, question_first, hits):
    server = service(tok, question_first)
    for question in QUESTIONS:
        reply = server.answer(question)
        assert isinstance(reply, Answer) and reply.question == question and reply.documents == [d["id"] for d in DOCS]
        assert reply.seconds > 0 and len(reply.hops) == 1
    stats = server.cache_stats()
    assert (stats["hits"], stats["misses"]) == (hits, 6 - hits)
    assert stats["entries"] == 6 - hits and stats["bytes"] > 0


@pytest.mark.parametrize("question_first", [True, False])
def test_cached_answers_equal_uncached_ones(tok, question_first):
    cached, plain = service(tok, question_first), service(tok, question_first, cache_bytes=0)
    assert plain.cache_stats() == {"enabled": False}
    for _ in range(2):  # the second round is served from the cache
        assert [r.text for r in cached.answer_many(QUESTIONS)] == [r.text for r in plain.answer_many(QUESTIONS)]
    assert cached.cache_stats()["hits"] >= 6


def test_later_turns_reuse_the_documents_of_earlier_hops(tok):
    """Turn 2's prompt is turn 1's row plus hop 2: it resumes from the state of turn 1's row, which
    holds hop 1's documents (served without a lookup); only hop 2's documents are looked up."""
    from refrag.infer.doc_cache import CachedEngine, DocumentCache
    from refrag.infer.multihop import run_multihop
    from test_multihop import ScriptedGenerator

    follow_up = "Which city is a port?"
    retriever = FakeRetriever({QUESTIONS[0]: DOCS[:2], follow_up: DOCS[2:]})
    engine = CachedEngine(hybrid(tok.vocab_size), DocumentCache(max_bytes=64 << 20))

    class Recorder(ScriptedGenerator):
        """Scripted turns, but every prompt is also prefilled by the cached engine."""

        def generate(self, prompt_ids, max_new_tokens, doc_ids=None, **kwargs):
            engine.generate(prompt_ids, 1, doc_ids=doc_ids)
            return super().generate(prompt_ids, max_new_tokens, doc_ids=doc_ids, **kwargs)

    gen = Recorder(tok, {QUESTIONS[0]: [("query", follow_up), ("answer", "Pulbys")]})
    [trace] = run_multihop(gen, tok, retriever, [QUESTIONS[0]], max_hops=2, question_first=False)
    assert trace.num_hops == 2
    stats = engine.cache.stats
    assert (stats.hits, stats.misses, stats.state_documents) == (0, 3, 2)
    assert engine.cache.summary()["document_hit_rate"] == 2 / 5


def test_bad_settings_are_named(tok):
    with pytest.raises(ValueError, match="max_hops"):
        RagService(hybrid(tok.vocab_size), tok, None, max_hops=0)


def test_precomputed_documents_serve_every_first_hop_from_the_cache(tok):
    server, plain = service(tok, question_first=False), service(tok, question_first=False, cache_bytes=0)
    assert server.precompute(DOCS) == 3 * 3  # three documents, each in slots 1..3
    assert server.precompute(DOCS) == 0  # already there
    hits = server.cache_stats()["hits"]
    assert [r.text for r in server.answer_many(QUESTIONS)] == [r.text for r in plain.answer_many(QUESTIONS)]
    stats = server.cache_stats()
    assert stats["hits"] - hits == 6 and stats["misses"] == 9
    with pytest.raises(ValueError, match="documents-first"):
        service(tok, question_first=True).precompute(DOCS)


@pytest.mark.parametrize("precompute", [False, True], ids=["cold", "precomputed"])
def test_compare_cache_counts_lookups_and_agrees_with_the_plain_engine(tok, precompute):
    from refrag.eval.multihop import compare_cache

    records = [{"id": f"q{i}", "question": q, "answer": "Pulbys", "type": "single_hop", "gold_doc_ids": []}
               for i, q in enumerate(QUESTIONS)]
    report = compare_cache(hybrid(tok.vocab_size), tok, FakeRetriever({q: DOCS for q in QUESTIONS}), records,
                           precompute=DOCS if precompute else None, max_hops=1, top_k=3, max_new_tokens=3,
                           question_first=False)
    assert (report["hits"], report["misses"]) == ((6, 0) if precompute else (3, 3))
    assert report["same_answers"] == 1.0 and report["latency_ratio"] > 0
    assert ("precompute_seconds" in report) == precompute
    for name in ("cached", "uncached"):  # the prefill and decode parts lie inside the wall time
        parts = report[f"prefill_seconds_{name}"] + report[f"decode_seconds_{name}"]
        assert 0 < report[f"prefill_seconds_{name}"] and parts <= report[f"seconds_{name}"]
    assert report["prefill_ratio"] == report["prefill_seconds_cached"] / report["prefill_seconds_uncached"]
