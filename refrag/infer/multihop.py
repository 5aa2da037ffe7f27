"""REFRAG multi-hop loop: the model asks follow-up queries until it answers, abstains or runs out of hops.

Conversation (seed section 3.2, rendered by `refrag.data.render_for_generation`)::

    system, user(question), retrieval(hop 1, query = question),
    assistant(query 2), retrieval(hop 2), ..., assistant(answer)

or, documents first (``question_first=False``): system, retrieval(hop 1), user(question),
assistant(query 2), retrieval(hop 2), ... Documents first, the tokens before hop 1's block
are the same for every question, so a per-document cache (`refrag.infer.doc_cache`) reuses
hop 1's document encodings across questions; in both layouts every turn's row starts with the
previous turn's row, so `CachedEngine` resumes each turn from the state it kept after the last.

Each model turn starts after ``[ASST]``: ``[QUERY] text [/QUERY] [/ASST]`` is a follow-up
query (the engine retrieves with it and appends the next retrieval message), anything else
up to ``[/ASST]`` (or ``[EOS]``) is the answer. A hop is one retrieval; at most `max_hops`
happen, so the model may ask at most ``max_hops - 1`` follow-up queries. Outcomes
(`MultiHopTrace.status`):

- ``answered`` / ``abstained``: a final answer ("I don't know" variants abstain);
- ``max_hops``: the model asked for another retrieval after the last allowed hop;
- ``truncated``: max_new_tokens ran out before ``[/QUERY]`` or ``[/ASST]``;
- ``empty``: an empty answer or an empty query.

A query that retrieves nothing adds a retrieval message with no documents and the loop goes
on. Every trace keeps the exact token row the model saw and produced (``input_ids``,
``doc_ids``) with ``generated_mask`` = 1 on model-generated tokens, which is what the policy
gradient scores. All questions of a call advance in lockstep: one batched generate call and
one batched retrieval per turn.

`generator` is anything with `refrag.infer.Engine.generate`'s signature (Engine,
`refrag.infer.doc_cache.CachedEngine`, or a scripted fake); `retriever` has
``retrieve_many(queries, top_k) -> list[list[doc]]`` (`refrag.retrieval.RetrievalManager`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from refrag.data import SYSTEM_PROMPT, render_for_generation
from refrag.data.answers import is_abstention

ANSWERED, ABSTAINED, MAX_HOPS, TRUNCATED, EMPTY = "answered", "abstained", "max_hops", "truncated", "empty"
STATUSES = (ANSWERED, ABSTAINED, MAX_HOPS, TRUNCATED, EMPTY)


@dataclass
class Turn:
    """One parsed model turn: kind "query" | "answer" | "truncated" | "empty" and its text."""

    kind: str
    text: str


@dataclass
class MultiHopTrace:
    """One question's run of the loop.

    hops: [{"hop": k, "query": q, "doc_ids": [...]}] in order; answer: the final answer text
    or None; status: one of STATUSES; messages: the conversation in the seed's format;
    input_ids / doc_ids / generated_mask: per-token lists of the full row (prompt, turns and
    retrieval blocks), doc_ids as in training (0 shared, k document k of the example).
    """

    question: str
    messages: list
    hops: list = field(default_factory=list)
    answer: str | None = None
    status: str | None = None
    input_ids: list = field(default_factory=list)
    doc_ids: list = field(default_factory=list)
    generated_mask: list = field(default_factory=list)

    @property
    def num_hops(self) -> int:
        return len(self.hops)

    @property
    def retrieved_doc_ids(self) -> list[str]:
        """Ids of every retrieved document, hop by hop, without repeats."""
        return list(dict.fromkeys(d for hop in self.hops for d in hop["doc_ids"]))

    @property
    def done(self) -> bool:
        return self.status is not None

    def append(self, ids: Sequence[int], doc_ids: Sequence[int], generated: bool) -> None:
        self.input_ids += list(ids)
        self.doc_ids += list(doc_ids)
        self.generated_mask += [int(generated)] * len(ids)


class TurnParser:
    """Parses generated ids with the tokenizer's [QUERY] [/QUERY] [/ASST] [EOS] ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.query_open = tokenizer.token_id("[QUERY]")
        self.query_close = tokenizer.token_id("[/QUERY]")
        self.turn_end = tokenizer.token_id("[/ASST]")
        self.eos = tokenizer.eos_id

    @property
    def stop_ids(self) -> tuple[int, int]:
        return self.turn_end, self.eos

    def parse(self, ids: Sequence[int]) -> Turn:
        """ids: tokens generated after [ASST] (stop token included when one was produced)."""
        ids = list(ids)
        if ids and ids[0] == self.query_open:
            if self.query_close not in ids:
                return Turn("truncated", self.tokenizer.decode(ids[1:], skip_special_tokens=True))
            text = self.tokenizer.decode(ids[1:ids.index(self.query_close)], skip_special_tokens=True).strip()
            return Turn("query" if text else "empty", text)
        stops = [i for i, t in enumerate(ids) if t in self.stop_ids]
        if not stops:
            return Turn("truncated", self.tokenizer.decode(ids, skip_special_tokens=True))
        text = self.tokenizer.decode(ids[:stops[0]], skip_special_tokens=True).strip()
        return Turn("answer" if text else "empty", text)


def _retrieval_message(hop: int, query: str, documents: list[dict]) -> dict:
    docs = [{k: d[k] for k in ("id", "title", "content", "source", "score") if k in d} for d in documents]
    return {"role": "retrieval", "hop": hop, "query": query, "documents": docs}


def _append_retrieval(trace: MultiHopTrace, query: str, documents: list[dict], tokenizer, max_doc_tokens: int,
                      follow_up: bool) -> None:
    """Add hop k's messages and its rendered tokens (retrieval block, the question when it
    follows the documents, then [ASST]) to the trace."""
    hop = trace.num_hops + 1
    if follow_up:
        trace.messages.append({"role": "assistant", "query": query})
    trace.messages.append(_retrieval_message(hop, query, documents))
    if not any(m["role"] == "user" for m in trace.messages):  # documents first: the question follows hop 1
        trace.messages.append({"role": "user", "content": trace.question})
    trace.hops.append({"hop": hop, "query": query, "doc_ids": [d["id"] for d in documents]})
    rendered = render_for_generation({"messages": trace.messages}, tokenizer, max_doc_tokens)
    ids = rendered.input_ids.tolist()
    start = 0 if not trace.input_ids else len(ids) - 1 - ids[::-1].index(tokenizer.token_id("[RETRIEVAL_START]"))
    trace.append(ids[start:], rendered.doc_ids.tolist()[start:], generated=False)


def _finish(trace: MultiHopTrace, turn: Turn, max_hops: int) -> bool:
    """Record a final turn; returns False when the turn is a query that gets another hop."""
    if turn.kind == "query":
        if trace.num_hops < max_hops:
            return False
        trace.status = MAX_HOPS
    elif turn.kind == "answer":
        trace.answer = turn.text
        trace.status = ABSTAINED if is_abstention(turn.text) else ANSWERED
        trace.messages.append({"role": "assistant", "content": turn.text})
    else:
        trace.status = TRUNCATED if turn.kind == "truncated" else EMPTY
    return True


def run_multihop(generator, tokenizer, retriever, questions: Sequence[str], *, max_hops: int = 3, top_k: int = 5,
                 max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 max_doc_tokens: int = 256, system: str = SYSTEM_PROMPT,
                 question_first: bool = True) -> list[MultiHopTrace]:
    """Run the multi-hop loop for every question; returns one MultiHopTrace per question, in order.

    max_hops >= 1 retrievals per question (hop 1 retrieves with the question itself);
    max_new_tokens bounds each model turn; temperature / top_p / seed go to the generator
    (seed + turn index per turn, so turns draw different samples); question_first: the
    layout the model was trained with (False: documents first, see the module doc).
    """
    if isinstance(max_hops, bool) or not isinstance(max_hops, int) or max_hops < 1:
        raise ValueError(f"max_hops must be an integer >= 1, got {max_hops!r}")
    if isinstance(questions, str) or not questions:
        raise ValueError("questions must be a non-empty list of strings")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question {i} must be a non-empty string, got {q!r}")
    parser = TurnParser(tokenizer)
    traces = [MultiHopTrace(q, [{"role": "system", "content": system}]
                            + ([{"role": "user", "content": q}] if question_first else [])) for q in questions]
    for trace, docs in zip(traces, retriever.retrieve_many(list(questions), top_k)):
        _append_retrieval(trace, trace.question, docs, tokenizer, max_doc_tokens, follow_up=False)
    turn_index = 0
    active = traces
    while active:
        outputs = generator.generate([t.input_ids for t in active], max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=None if seed is None else seed + turn_index,
                                     stop_token_ids=parser.stop_ids, doc_ids=[t.doc_ids for t in active])
        turn_index += 1
        asking = []
        for trace, ids in zip(active, outputs):
            trace.append(ids, [0] * len(ids), generated=True)
            turn = parser.parse(ids)
            if not _finish(trace, turn, max_hops):
                asking.append((trace, turn.text))
        if asking:
            found = retriever.retrieve_many([q for _, q in asking], top_k)
            for (trace, query), docs in zip(asking, found):
                _append_retrieval(trace, query, docs, tokenizer, max_doc_tokens, follow_up=True)
        active = [t for t, _ in asking]
    return traces
