"""refrag.retrieval: knowledge bases and dense / BM25 / hybrid retrieval.

    kb = prepare_kb("documents.jsonl", "kb/", encoder="all-MiniLM-L6-v2")   # or KnowledgeBase.load("kb/")
    manager = RetrievalManager("hybrid", knowledge_base="kb/")
    docs = manager.retrieve("Who founded Lunor Systems?", top_k=5)        # [{id,title,content,score,source}]
    conv = manager.augment_conversation({"messages": [...]}, top_k=5)

CLI: python -m refrag.retrieval {prepare-kb,add,search,stats} --help
"""
from refrag.data.documents import read_documents, validate_document
from refrag.retrieval.encoders import DEFAULT_ENCODER, HashingEncoder, SentenceTransformerEncoder, load_encoder
from refrag.retrieval.kb import KnowledgeBase, add_documents, prepare_kb
from refrag.retrieval.manager import RetrievalManager
from refrag.retrieval.retrievers import BM25Retriever, DenseRetriever, HybridRetriever, make_retriever

__all__ = [
    "DEFAULT_ENCODER", "HashingEncoder", "SentenceTransformerEncoder", "load_encoder",
    "read_documents", "validate_document", "KnowledgeBase", "prepare_kb", "add_documents",
    "DenseRetriever", "BM25Retriever", "HybridRetriever", "make_retriever", "RetrievalManager",
]
