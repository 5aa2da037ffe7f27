"""Dense (FAISS), sparse (BM25) and hybrid retrievers over a `KnowledgeBase`.

Every retriever has `search(queries, top_k=5, sources=None) -> list[list[dict]]` (batched)
and `retrieve(query, top_k=5, sources=None) -> list[dict]`. A result is
{"id", "title", "content", "score", "source"}, best first. `sources` keeps only documents
from those sources (an unknown source or an empty list is an error). A `top_k` larger than the
number of eligible documents returns all of them, ranked (an approximate HNSW index that returns
fewer is completed by exact search). An empty query, or one that is not valid Unicode, is an
error; a query without a content word (only stopwords or punctuation) finds nothing: [].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from refrag.retrieval.kb import KnowledgeBase, bm25_tokenize, has_content

RRF_K = 60


class Retriever(ABC):
    """Shared validation and result formatting; subclasses implement `rank`."""

    def __init__(self, kb: KnowledgeBase):
        if not isinstance(kb, KnowledgeBase):
            raise ValueError(f"expected a KnowledgeBase, got {type(kb).__name__}")
        self.kb = kb

    @abstractmethod
    def rank(self, queries: list[str], k: int, allowed: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (doc indices, scores), best first, at most k, only allowed documents."""

    def search(self, queries: Sequence[str], top_k: int = 5,
               sources: Sequence[str] | None = None) -> list[list[dict]]:
        """queries (q,) -> q lists of at most top_k documents with scores, best first."""
        queries = check_queries(queries)
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        allowed = self.kb.source_mask(sources)
        k = min(int(top_k), len(self.kb) if allowed is None else int(allowed.sum()))
        searchable = [j for j, q in enumerate(queries) if has_content(q)]
        ranked = dict(zip(searchable, self.rank([queries[j] for j in searchable], k, allowed))) if searchable else {}
        return [[self.result(i, s) for i, s in zip(*ranked[j])] if j in ranked else [] for j in range(len(queries))]

    def retrieve(self, query: str, top_k: int = 5, sources: Sequence[str] | None = None) -> list[dict]:
        """One query -> at most top_k documents with scores, best first."""
        return self.search([query], top_k, sources)[0]

    def result(self, i: int, score: float) -> dict:
        d = self.kb.documents[int(i)]
        return {"id": d["id"], "title": d["title"], "content": d["content"], "score": float(score),
                "source": d["source"]}


def check_queries(queries: Sequence[str]) -> list[str]:
    if isinstance(queries, str):
        raise ValueError("queries must be a list of strings; use retrieve() for a single query")
    queries = list(queries)
    bad = [type(q).__name__ for q in queries if not isinstance(q, str)]
    if bad:
        raise ValueError(f"every query must be a string, got {bad[0]}")
    for j, q in enumerate(queries):
        if not q.strip():
            raise ValueError(f"query {j} is empty")
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"query {j} is not valid Unicode ({e.reason} at character {e.start})") from None
    return queries


def top_of(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k best allowed scores (ties broken by index), and those scores."""
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


class DenseRetriever(Retriever):
    """Inner product of normalized encoder embeddings, searched with the KB's FAISS index."""

    def query_embeddings(self, queries: list[str]) -> np.ndarray:
        return self.kb.encoder.encode(queries)

    def rank(self, queries, k, allowed):
        if not queries or k == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
        return self.rank_embeddings(self.query_embeddings(queries), k, allowed)

    def rank_embeddings(self, q: np.ndarray, k: int, allowed: np.ndarray | None):
        """q (nq, dim) query embeddings -> per query (indices, scores) of the k best allowed docs."""
        n = len(self.kb)
        search_k = k if allowed is None else min(n, 4 * k)
        while True:
            scores, idx = self.kb.faiss_index.search(q, search_k)
            ranked = [self.keep(i, s, allowed, k) for i, s in zip(idx, scores)]
            if search_k == n or all(len(r[0]) == k for r in ranked):
                break
            search_k = min(n, 4 * search_k)
        # An approximate (HNSW) index can return fewer than k hits even for search_k == n (efSearch
        # bounds its candidates): those queries are ranked exactly on the stored embeddings.
        return [r if len(r[0]) == k else top_of(self.kb.embeddings @ q_vec, k, allowed)
                for r, q_vec in zip(ranked, q)]

    @staticmethod
    def keep(idx: np.ndarray, scores: np.ndarray, allowed: np.ndarray | None, k: int):
        ok = idx >= 0
        if allowed is not None:
            ok &= allowed[np.maximum(idx, 0)]
        return idx[ok][:k].astype(np.int64), scores[ok][:k]


class BM25Retriever(Retriever):
    """Okapi BM25 (bm25s) over the KB's lowercase/stopword analyzer."""

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query`: (count,) float32."""
        tokens = bm25_tokenize(query)
        if not tokens:
            return np.zeros(len(self.kb), dtype=np.float32)
        return np.asarray(self.kb.bm25.get_scores(tokens), dtype=np.float32)

    def rank(self, queries, k, allowed):
        return [top_of(self.scores(q), k, allowed) for q in queries]


def min_max(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


class HybridRetriever(Retriever):
    """Fuses dense and BM25 rankings over the union of their top `candidates` documents.

    fusion="minmax": score = alpha * minmax(dense) + (1 - alpha) * minmax(bm25) over the
    candidates (exact dense scores from the stored embeddings). fusion="rrf": reciprocal-rank
    fusion, score = sum over the two rankings of 1 / (rrf_k + rank), ranks from 1.
    """

    def __init__(self, kb: KnowledgeBase, alpha: float = 0.7, fusion: str = "minmax",
                 candidates: int = 50, rrf_k: int = RRF_K):
        super().__init__(kb)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if fusion not in ("minmax", "rrf"):
            raise ValueError(f"fusion must be 'minmax' or 'rrf', got {fusion!r}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.alpha, self.fusion, self.candidates, self.rrf_k = alpha, fusion, candidates, rrf_k
        self.dense, self.sparse = DenseRetriever(kb), BM25Retriever(kb)

    def rank(self, queries, k, allowed):
        if not queries or k == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
        m = min(max(k, self.candidates), len(self.kb) if allowed is None else int(allowed.sum()))
        q_emb = self.dense.query_embeddings(queries)
        dense_ranked = self.dense.rank_embeddings(q_emb, m, allowed)
        out = []
        for query, q_vec, (dense_idx, _) in zip(queries, q_emb, dense_ranked):
            bm25_all = self.sparse.scores(query)
            sparse_idx, _ = top_of(bm25_all, m, allowed)
            cand = np.unique(np.concatenate([dense_idx, sparse_idx]))
            fused = self.fuse(cand, q_vec, bm25_all, dense_idx, sparse_idx)
            order = np.lexsort((cand, -fused))[:k]
            out.append((cand[order], fused[order].astype(np.float32)))
        return out

    def fuse(self, cand: np.ndarray, q_vec: np.ndarray, bm25_all: np.ndarray, dense_idx: np.ndarray,
             sparse_idx: np.ndarray) -> np.ndarray:
        """Fused score of each candidate document index (higher is better)."""
        if self.fusion == "rrf":
            return self.rrf(cand, dense_idx, sparse_idx)
        dense_scores = self.kb.embeddings[cand] @ q_vec  # [C, dim] @ [dim] -> [C]
        return self.alpha * min_max(dense_scores) + (1 - self.alpha) * min_max(bm25_all[cand])

    def rrf(self, cand: np.ndarray, dense_idx: np.ndarray, sparse_idx: np.ndarray) -> np.ndarray:
        fused = np.zeros(len(cand), dtype=np.float64)
        for ranking in (dense_idx, sparse_idx):
            rank_of = {int(d): r for r, d in enumerate(ranking, start=1)}
            fused += np.array([1.0 / (self.rrf_k + rank_of[int(c)]) if int(c) in rank_of else 0.0 for c in cand])
        return fused


RETRIEVERS = {"dense": DenseRetriever, "bm25": BM25Retriever, "hybrid": HybridRetriever}


def make_retriever(kind: str, kb: KnowledgeBase, **kwargs) -> Retriever:
    """kind in {"dense", "bm25", "hybrid"}; kwargs go to the retriever (e.g. alpha, fusion)."""
    if kind not in RETRIEVERS:
        raise ValueError(f"unknown retriever type {kind!r}; choose from {sorted(RETRIEVERS)}")
    return RETRIEVERS[kind](kb, **kwargs)
