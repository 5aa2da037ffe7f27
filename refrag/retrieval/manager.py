"""RetrievalManager: one retriever plus a query-result LRU cache and conversation augmentation."""
from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

from refrag.retrieval.encoders import Encoder
from refrag.retrieval.kb import KnowledgeBase
from refrag.retrieval.retrievers import make_retriever


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int
    maxsize: int


class RetrievalManager:
    """Retrieval for RAG fine-tuning and inference.

    retriever_type: "dense" | "bm25" | "hybrid"; knowledge_base: a KnowledgeBase or a KB
    directory; encoder overrides the query encoder of a KB loaded from disk; cache_size
    bounds the LRU cache of (query, top_k, sources) -> results (0 disables it);
    retriever_kwargs go to the retriever (alpha, fusion, candidates).
    """

    def __init__(self, retriever_type: str = "hybrid", knowledge_base: KnowledgeBase | str | Path | None = None,
                 *, encoder: str | Encoder | None = None, cache_size: int = 1024, **retriever_kwargs):
        if knowledge_base is None:
            raise ValueError("RetrievalManager needs knowledge_base= (a KnowledgeBase or a KB directory)")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        kb = knowledge_base if isinstance(knowledge_base, KnowledgeBase) else KnowledgeBase.load(knowledge_base, encoder)
        self.retriever_type = retriever_type
        self.retriever = make_retriever(retriever_type, kb, **retriever_kwargs)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, list[dict]] = OrderedDict()
        self._hits = self._misses = 0

    @property
    def knowledge_base(self) -> KnowledgeBase:
        return self.retriever.kb

    def retrieve(self, query: str, top_k: int = 5, sources: Sequence[str] | None = None) -> list[dict]:
        """Documents {id, title, content, score, source} for one query, best first (cached)."""
        return self.retrieve_many([query], top_k, sources)[0]

    def retrieve_many(self, queries: Sequence[str], top_k: int = 5,
                      sources: Sequence[str] | None = None) -> list[list[dict]]:
        """Batched `retrieve`: cache misses are searched in one batch. Returns copies."""
        if isinstance(queries, str):
            raise ValueError("queries must be a list of strings; use retrieve() for a single query")
        src = None if sources is None else tuple(sorted([sources] if isinstance(sources, str) else sources))
        keys = [(q, top_k, src) for q in queries]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        self._misses += len(missing)
        self._hits += len(keys) - len(missing)
        found = dict(zip(missing, self.retriever.search([k[0] for k in missing], top_k, sources))) if missing else {}
        results = [found[key] if key in found else self._cache[key] for key in keys]
        for key, docs in zip(keys, results):
            self._remember(key, docs)
        return copy.deepcopy(results)

    def _remember(self, key: tuple, docs: list[dict]) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = docs
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    def augment_conversation(self, conversation: dict, top_k: int = 5,
                             sources: Sequence[str] | None = None) -> dict:
        """A copy of `conversation` with a retrieval message inserted before its last user message.

        The query is the last user message's content; the inserted message is
        {"role": "retrieval", "query": query, "documents": [...]}. Other top-level keys
        (e.g. metadata) are kept, with retrieval_method and num_retrieved added to metadata.
        """
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list):
            raise ValueError("conversation must be a dict with a 'messages' list")
        user_positions = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
        if not user_positions:
            raise ValueError("conversation has no user message to retrieve for")
        pos = user_positions[-1]
        query = messages[pos].get("content")
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the last user message has no text content")
        documents = self.retrieve(query, top_k, sources)
        augmented = copy.deepcopy(conversation)
        augmented["messages"].insert(pos, {"role": "retrieval", "query": query, "documents": documents})
        augmented["metadata"] = {**augmented.get("metadata", {}), "retrieval_method": self.retriever_type,
                                 "num_retrieved": len(documents)}
        return augmented
