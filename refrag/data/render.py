"""Render conversations into token ids, a loss mask and per-token document ids.

Layout (one conversation = one example)::

    [BOS] [SYS] system [/SYS]
    [RETRIEVAL_START] ([QUERY] hop query [/QUERY])? [DOC_1] title \\n content [/DOC_1] ... [RETRIEVAL_END]
    [USER] question [/USER]
    [ASST] answer [/ASST] [EOS]                          (final answer)
    [ASST] [QUERY] follow-up [/QUERY] [/ASST]            (multi-hop follow-up query)

A final answer is encoded as " " + answer (`ANSWER_PREFIX`), so its first token has the id the
same word has inside a document. loss_mask is 1 on what the assistant generates: everything after [ASST] up to and including
[/ASST], plus the [EOS] after a final answer. doc_ids is 0 on shared tokens and k on the
tokens of the k-th document of the example (counting across retrieval blocks), its
[DOC_j]..[/DOC_j] markers included; markers restart at [DOC_1] in each block. A hop query is
rendered inside its block when the retrieval message has `hop` and the query is not the text
of the message right before it (the user's question or the assistant's follow-up query) nor
of the message right after it (the question of a documents-first conversation, so the block
and everything before it stay the same for every question). Documents longer than `max_doc_tokens` are truncated (warning).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from refrag.data.schema import validate_conversation
from refrag.data.tokenizer import RagTokenizer

DEFAULT_MAX_DOC_TOKENS = 256
# Answers are encoded after a space, as words inside a document are: byte-level BPE gives
# " Kavstav" and "Kavstav" different ids, so without it copying an answer out of a retrieved
# document is never token identity (decoding strips the space).
ANSWER_PREFIX = " "


@dataclass
class RenderedExample:
    """input_ids int32 (T,), loss_mask uint8 (T,), doc_ids int32 (T,) of one conversation."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    doc_ids: np.ndarray
    truncated_docs: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def doc_spans(self) -> list[tuple[int, int]]:
        """Half-open token spans of documents 1..K, in order (the DocLayout.from_examples format)."""
        k = int(self.doc_ids.max()) if len(self.doc_ids) else 0
        spans = []
        for doc in range(1, k + 1):
            where = np.flatnonzero(self.doc_ids == doc)
            spans.append((int(where[0]), int(where[-1]) + 1))
        return spans


@dataclass
class RenderStats:
    """Counts from `render_conversations`."""

    rendered: int = 0
    dropped_too_long: int = 0
    truncated_docs: int = 0
    tokens: int = 0
    dropped_ids: list = field(default_factory=list)


class _Builder:
    def __init__(self, tokenizer: RagTokenizer, max_doc_tokens: int):
        if max_doc_tokens < 1:
            raise ValueError(f"max_doc_tokens must be >= 1, got {max_doc_tokens}")
        self.tok, self.max_doc_tokens = tokenizer, max_doc_tokens
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.docs: list[int] = []
        self.num_docs = 0
        self.truncated = 0

    def special(self, name: str, loss: int = 0, doc: int = 0) -> None:
        self.add([self.tok.token_id(name)], loss, doc)

    def text(self, text: str, loss: int = 0, doc: int = 0) -> None:
        self.add(self.tok.encode(text), loss, doc)

    def add(self, ids: list[int], loss: int, doc: int) -> None:
        self.ids += ids
        self.mask += [loss] * len(ids)
        self.docs += [doc] * len(ids)

    def document(self, slot: int, doc: dict) -> None:
        self.num_docs += 1
        ids = self.tok.encode(f"{doc['title']}\n{doc['content']}")
        if len(ids) > self.max_doc_tokens:
            ids = ids[:self.max_doc_tokens]
            self.truncated += 1
        self.special(f"[DOC_{slot}]", doc=self.num_docs)
        self.add(ids, 0, self.num_docs)
        self.special(f"[/DOC_{slot}]", doc=self.num_docs)

    def message(self, msg: dict, previous: dict | None, following: dict | None) -> None:
        is_last = following is None
        role = msg["role"]
        if role == "system":
            self.special("[SYS]"), self.text(msg["content"]), self.special("[/SYS]")
        elif role == "user":
            self.special("[USER]"), self.text(msg["content"]), self.special("[/USER]")
        elif role == "retrieval":
            self.special("[RETRIEVAL_START]")
            said = [m.get(k) for m in (previous, following) if m is not None for k in ("content", "query")]
            just_said = msg.get("query") in said
            if "hop" in msg and "query" in msg and not just_said:
                self.special("[QUERY]"), self.text(msg["query"]), self.special("[/QUERY]")
            for slot, doc in enumerate(msg["documents"], start=1):
                self.document(slot, doc)
            self.special("[RETRIEVAL_END]")
        else:
            self.special("[ASST]")
            if "query" in msg:
                self.special("[QUERY]", 1), self.text(msg["query"], 1), self.special("[/QUERY]", 1)
            else:
                self.text(ANSWER_PREFIX + msg["content"], 1)
            self.special("[/ASST]", 1)
            if is_last and "query" not in msg:
                self.special("[EOS]", 1)

    def render(self, messages: list[dict]) -> None:
        self.special("[BOS]")
        for i, msg in enumerate(messages):
            self.message(msg, messages[i - 1] if i else None, messages[i + 1] if i + 1 < len(messages) else None)

    def example(self) -> RenderedExample:
        if self.truncated:
            warnings.warn(f"truncated {self.truncated} document(s) to max_doc_tokens={self.max_doc_tokens}",
                          stacklevel=3)
        return RenderedExample(np.array(self.ids, dtype=np.int32), np.array(self.mask, dtype=np.uint8),
                               np.array(self.docs, dtype=np.int32), self.truncated)


def render_conversation(conv: dict, tokenizer: RagTokenizer,
                        max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS) -> RenderedExample:
    """Training example of a conversation that contains at least one assistant message."""
    validate_conversation(conv)
    if not any(m["role"] == "assistant" for m in conv["messages"]):
        raise ValueError("a training conversation needs an assistant message (use render_for_generation)")
    builder = _Builder(tokenizer, max_doc_tokens)
    builder.render(conv["messages"])
    return builder.example()


def render_for_generation(conv: dict, tokenizer: RagTokenizer,
                          max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS) -> RenderedExample:
    """Prompt ending with [ASST] for a conversation whose last message is not the assistant's.

    The model continues with an answer ("... [/ASST] [EOS]") or a follow-up query
    ("[QUERY] ... [/QUERY] [/ASST]"). loss_mask is all zeros.
    """
    validate_conversation(conv)
    if conv["messages"][-1]["role"] == "assistant":
        raise ValueError("the conversation already ends with an assistant message")
    builder = _Builder(tokenizer, max_doc_tokens)
    builder.render(conv["messages"])
    builder.special("[ASST]")
    example = builder.example()
    example.loss_mask[:] = 0
    return example


def render_conversations(conversations: Iterable[dict], tokenizer: RagTokenizer, *, max_len: int,
                         max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS) -> tuple[list[RenderedExample], RenderStats]:
    """Render many conversations; examples longer than max_len are dropped and counted, never cut.

    Returns (examples, stats); dropped conversations are identified by metadata.id or index.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    stats, examples = RenderStats(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, conv in enumerate(conversations):
            ex = render_conversation(conv, tokenizer, max_doc_tokens)
            stats.truncated_docs += ex.truncated_docs
            if len(ex) > max_len:
                stats.dropped_too_long += 1
                stats.dropped_ids.append(conv.get("metadata", {}).get("id", i))
                continue
            examples.append(ex)
            stats.rendered += 1
            stats.tokens += len(ex)
    if stats.truncated_docs:
        warnings.warn(f"truncated {stats.truncated_docs} document(s) to max_doc_tokens={max_doc_tokens}", stacklevel=2)
    if stats.dropped_too_long:
        warnings.warn(f"dropped {stats.dropped_too_long} example(s) longer than max_len={max_len}", stacklevel=2)
    return examples, stats
