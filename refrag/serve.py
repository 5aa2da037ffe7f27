"""Serving front end: ``answer(question)`` = retrieve, run the (multi-hop) loop with the document cache.

Example::

    from refrag.serve import RagService

    service = RagService.from_checkpoint("out/refrag/rl/checkpoints")   # or an SFT-RAG run
    reply = service.answer("Where was the inventor of the Folding Sextant born?")
    reply.text, reply.status, reply.hops, reply.documents, reply.seconds
    service.answer_many(questions)              # the same, several questions per generate call
    service.cache_stats()                       # {"hits", "misses", "hit_rate", "document_hit_rate", "entries", ...}
    service.precompute(kb_documents)            # documents first: encode the KB ahead of questions

Every question runs through `refrag.infer.multihop.run_multihop` with greedy decoding: a
REFRAG model may ask follow-up queries (up to ``max_hops`` retrievals), a single-shot RAG
model gets ``max_hops=1`` (one retrieval, then its answer; the rendered prompt is the one it
was trained with). The model's prompt format (question or documents first, document length)
comes from its checkpoint. Generation goes through `refrag.infer.doc_cache.CachedEngine`:
each retrieved document is encoded once per (document, tokens before its block) and reused;
documents first, the tokens before hop 1's block are the same for every question, so a
document retrieved again for another question, or again on a later turn of the same
question, is not encoded again. ``cache_bytes=0`` serves without the cache (plain `Engine`),
with the same answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from refrag.data import SYSTEM_PROMPT
from refrag.infer.doc_cache import CachedEngine, DocumentCache, precompute_documents
from refrag.infer.engine import Engine
from refrag.infer.multihop import run_multihop

DEFAULT_CACHE_BYTES = 512 << 20


@dataclass
class Answer:
    """One served question: the final answer text ("" when the loop ended without one), the loop's
    status (`refrag.infer.multihop.STATUSES`), its hops [{"hop", "query", "doc_ids"}], every
    retrieved document id (in order, no repeats) and the wall time of the call that served it."""

    question: str
    text: str
    status: str
    hops: list = field(default_factory=list)
    documents: list = field(default_factory=list)
    seconds: float = 0.0


class RagService:
    """Retrieval + generation for questions, with a per-document cache.

    model: a HybridLM (put in eval mode); tokenizer: its RagTokenizer; retriever: has
    ``retrieve_many(queries, top_k)`` (a `refrag.retrieval.RetrievalManager`); question_first,
    max_doc_tokens: the prompt format the model was trained with; max_hops: 1 for a single-shot
    RAG model; cache_bytes: memory budget of the document cache (0: no cache).
    """

    def __init__(self, model, tokenizer, retriever, *, top_k: int = 3, max_hops: int = 3, max_new_tokens: int = 32,
                 max_doc_tokens: int = 256, question_first: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 system: str = SYSTEM_PROMPT):
        for name, value in (("top_k", top_k), ("max_hops", max_hops), ("max_new_tokens", max_new_tokens),
                            ("max_doc_tokens", max_doc_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model = model.eval()
        self.tokenizer, self.retriever = tokenizer, retriever
        self.top_k, self.max_hops, self.max_new_tokens = top_k, max_hops, max_new_tokens
        self.max_doc_tokens, self.question_first, self.system = max_doc_tokens, question_first, system
        self.cache = DocumentCache(max_bytes=cache_bytes) if cache_bytes else None
        self.engine = CachedEngine(model, self.cache) if self.cache is not None else Engine(model, tokenizer)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device = "cpu", retriever=None,
                        **overrides) -> "RagService":
        """Service for a run's newest checkpoint (or a step directory): model, tokenizer, prompt
        format, top_k and retriever (its KB and kind) as trained; REFRAG checkpoints answer with
        up to 3 hops, single-shot ones with 1. overrides: any keyword of the constructor."""
        from refrag.eval.multihop import load_for_eval  # serving sits above evaluation (docs/architecture.md)
        from refrag.retrieval import RetrievalManager

        model, tokenizer, cfg, prompt, _ = load_for_eval(checkpoint, device)
        retriever = retriever or RetrievalManager(cfg.retriever, knowledge_base=cfg.kb_dir)
        settings = dict(top_k=cfg.top_k, max_hops=3 if prompt["multihop"] else 1,
                        max_doc_tokens=prompt["max_doc_tokens"], question_first=prompt["question_first"])
        return cls(model, tokenizer, retriever, **{**settings, **overrides})

    def answer(self, question: str) -> Answer:
        """Answer one question (retrieve, generate greedily, follow-up hops when the model asks)."""
        return self.answer_many([question])[0]

    def answer_many(self, questions: Sequence[str]) -> list[Answer]:
        """Answer several questions together (one generate call per turn); one Answer per question."""
        start = time.perf_counter()
        traces = run_multihop(self.engine, self.tokenizer, self.retriever, list(questions), max_hops=self.max_hops,
                              top_k=self.top_k, max_new_tokens=self.max_new_tokens,
                              max_doc_tokens=self.max_doc_tokens, system=self.system,
                              question_first=self.question_first)
        seconds = time.perf_counter() - start
        return [Answer(t.question, t.answer or "", t.status, t.hops, t.retrieved_doc_ids, seconds) for t in traces]

    def precompute(self, documents: Sequence[dict], slots: int | None = None) -> int:
        """Encode documents ahead of questions (`precompute_documents`, slots default top_k);
        returns the number of encodings computed."""
        if self.cache is None:
            raise ValueError("precompute needs the document cache (cache_bytes > 0)")
        if self.question_first:
            raise ValueError("precompute needs the documents-first layout: question first, the tokens before "
                             "a document include the question")
        return precompute_documents(self.engine, self.tokenizer, documents, slots or self.top_k,
                                    self.max_doc_tokens, self.system)

    def cache_stats(self) -> dict:
        """Counters of the document cache (`DocumentCache.summary`: hit_rate = document hits / lookups,
        None before any lookup; document_hit_rate counts the documents inside resumed states too)."""
        if self.cache is None:
            return {"enabled": False}
        return {"enabled": True, **self.cache.summary()}
