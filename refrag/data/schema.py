"""Conversation schema (domain design sections 3.1 and 3.2) and its validation.

A conversation is {"messages": [...], "metadata": {...} (optional)}. Message roles:

- {"role": "system", "content": str}                      only as the first message
- {"role": "user", "content": str}
- {"role": "retrieval", "documents": [doc, ...], "hop": int >= 1 (optional), "query": str (optional)}
  doc = {"id", "title", "content", "source": str, "score": number (optional)}; at most 16 per block
- {"role": "assistant", "content": str}                   an answer, or
  {"role": "assistant", "query": str}                     a follow-up retrieval query (multi-hop),
  rendered as [ASST] [QUERY] query [/QUERY] [/ASST]

Multi-hop (REFRAG) order: system, user, retrieval(hop=1), assistant(query), retrieval(hop=2), ...,
assistant(content). Single-hop order (seed 3.1): system, retrieval, user, assistant.
"""
from __future__ import annotations

from numbers import Real

ROLES = ("system", "retrieval", "user", "assistant")
MAX_DOCS_PER_BLOCK = 16
DOC_FIELDS = ("id", "title", "content", "source")


def _check_text(value: object, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string")


def validate_document_ref(doc: object, where: str) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be an object")
    for field in DOC_FIELDS:
        if not isinstance(doc.get(field), str):
            raise ValueError(f"{where} needs a string {field!r}")
    if "score" in doc and doc["score"] is not None and not isinstance(doc["score"], Real):
        raise ValueError(f"{where}: score must be a number")


def validate_message(msg: object, i: int) -> None:
    where = f"message {i}"
    if not isinstance(msg, dict):
        raise ValueError(f"{where} must be an object")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
    if role == "system" and i != 0:
        raise ValueError(f"{where}: a system message must come first")
    if role in ("system", "user"):
        _check_text(msg.get("content"), f"{where} ({role}) content")
    elif role == "assistant":
        has_content, has_query = bool(msg.get("content")), "query" in msg
        if has_content == has_query:
            raise ValueError(f"{where} (assistant) needs exactly one of a non-empty 'content' or a 'query'")
        _check_text(msg["query"] if has_query else msg["content"], f"{where} (assistant) {'query' if has_query else 'content'}")
    else:
        docs = msg.get("documents")
        if not isinstance(docs, list):
            raise ValueError(f"{where} (retrieval) needs a 'documents' list")
        if len(docs) > MAX_DOCS_PER_BLOCK:
            raise ValueError(f"{where} (retrieval) has {len(docs)} documents; at most {MAX_DOCS_PER_BLOCK} per block")
        for j, doc in enumerate(docs):
            validate_document_ref(doc, f"{where} document {j}")
        if "hop" in msg and (not isinstance(msg["hop"], int) or isinstance(msg["hop"], bool) or msg["hop"] < 1):
            raise ValueError(f"{where} (retrieval): hop must be an integer >= 1")
        if "query" in msg:
            _check_text(msg["query"], f"{where} (retrieval) query")


def validate_conversation(conv: object) -> dict:
    """Raise ValueError naming the first problem; returns the conversation unchanged."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise ValueError("a conversation must be a dict with a 'messages' list")
    if not conv["messages"]:
        raise ValueError("conversation has no messages")
    for i, msg in enumerate(conv["messages"]):
        validate_message(msg, i)
    if "metadata" in conv and not isinstance(conv["metadata"], dict):
        raise ValueError("conversation metadata must be an object")
    return conv
