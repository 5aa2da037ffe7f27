"""Query splits of a KB and their conversations in the seed's format.

Query records (`queries/{split}.jsonl`): id, question, answer, type (single_hop | two_hop |
contradictory | unanswerable), gold_doc_ids (hop order), hops [{query, doc_id, answer}] for two-hop.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from refrag.data.answers import QUESTION_TYPES
from refrag.fileio import jsonl_lines, parse_jsonl
from refrag.data.documents import read_text_utf8

EMBEDDED_KB_DIR = Path(__file__).parent / "kb"
SYSTEM_PROMPT = ("Answer the question using only the provided documents. Reply with a short answer, "
                 "or \"I don't know\" if the documents do not contain it.")
SPLITS = ("train", "val", "test")


def validate_query(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for field in ("id", "question", "answer", "type"):
        if not isinstance(record.get(field), str) or not record[field]:
            raise ValueError(f"{where}: missing or empty string field {field!r}")
    if record["type"] not in QUESTION_TYPES:
        raise ValueError(f"{where}: unknown type {record['type']!r}; expected one of {QUESTION_TYPES}")
    gold = record.get("gold_doc_ids")
    if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
        raise ValueError(f"{where}: gold_doc_ids must be a list of strings")
    if record["type"] == "two_hop":
        hops = record.get("hops")
        if not isinstance(hops, list) or len(hops) != len(gold) or not hops:
            raise ValueError(f"{where}: a two_hop question needs one hop {{query, doc_id, answer}} per gold doc")
        for h, hop in enumerate(hops):
            if not isinstance(hop, dict) or not all(isinstance(hop.get(f), str) for f in ("query", "doc_id", "answer")):
                raise ValueError(f"{where}: hop {h} needs string query, doc_id and answer")
    return record


def query_file(location: str | Path = EMBEDDED_KB_DIR, split: str = "train") -> Path:
    """The query file of `split` at `location`: a .jsonl file itself, or a directory holding
    ``queries/{split}.jsonl`` (a KB source folder) or ``{split}.jsonl`` (its queries/ folder)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    location = Path(location)
    if location.is_file():
        return location
    for path in (location / "queries" / f"{split}.jsonl", location / f"{split}.jsonl"):
        if path.is_file():
            return path
    raise ValueError(f"{location}: no query file (expected a .jsonl file, or a directory with "
                     f"queries/{split}.jsonl or {split}.jsonl)")


def load_queries(split: str = "train", kb_dir: str | Path = EMBEDDED_KB_DIR) -> list[dict]:
    """Validated query records of `query_file(kb_dir, split)` (default: the embedded KB's split)."""
    path = query_file(kb_dir, split)
    return [validate_query(record, f"{path}:{lineno}")
            for lineno, record in parse_jsonl(jsonl_lines(read_text_utf8(path)), path)]


def check_gold_documents(records: Sequence[dict], doc_ids, where: str = "the knowledge base") -> None:
    """ValueError when some question's gold documents are not among `doc_ids` (questions of
    another KB scored against this one would silently score 0)."""
    known = set(doc_ids)
    missing = [(r["id"], g) for r in records for g in r["gold_doc_ids"] if g not in known]
    if missing:
        examples = ", ".join(f"{q} -> {g}" for q, g in missing[:3])
        raise ValueError(f"{len(missing)} gold document(s) of these questions are not in {where} "
                         f"(e.g. {examples}): the questions belong to another KB")


def rag_conversation(question: str, answer: str, documents: list[dict], system: str = SYSTEM_PROMPT) -> dict:
    """Single-hop conversation: system, retrieval, user, assistant (seed 3.1)."""
    return {"messages": [{"role": "system", "content": system},
                         {"role": "retrieval", "documents": documents},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def refrag_conversation(question: str, answer: str, hops: Sequence[tuple[str, list[dict]]],
                        system: str = SYSTEM_PROMPT, question_first: bool = True) -> dict:
    """Multi-hop conversation: the model asks each follow-up query itself.

    hops: [(query, documents), ...]; hop 1's query is normally the question. Messages:
    system, user, retrieval(hop 1), assistant(query 2), retrieval(hop 2), ..., assistant(answer);
    with question_first=False (documents first) hop 1's retrieval comes before the user
    message: system, retrieval(hop 1), user, assistant(query 2), retrieval(hop 2), ...
    """
    messages = [{"role": "system", "content": system}]
    user = {"role": "user", "content": question}
    if question_first:
        messages.append(user)
    for h, (query, docs) in enumerate(hops, start=1):
        if h > 1:
            messages.append({"role": "assistant", "query": query})
        messages.append({"role": "retrieval", "hop": h, "query": query, "documents": docs})
        if h == 1 and not question_first:
            messages.append(user)
    messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def with_gold(documents: list[dict], golds: list[dict], rng: random.Random) -> list[dict]:
    """`documents` with every gold document present: missing ones replace the lowest-ranked
    non-gold documents and are inserted at random positions (rank must not reveal gold)."""
    gold_ids = {g["id"] for g in golds}
    present = {d["id"] for d in documents}
    missing = [g for g in golds if g["id"] not in present]
    if not missing:
        return documents
    droppable = [i for i, d in enumerate(documents) if d["id"] not in gold_ids][-len(missing):]
    kept = [d for i, d in enumerate(documents) if i not in droppable]
    score = min((d["score"] for d in documents), default=0.0)
    for g in missing:
        kept.insert(rng.randrange(len(kept) + 1), {**g, "score": score})
    return kept


def gold_documents(manager, doc_ids: list[str]) -> list[dict]:
    kb = manager.knowledge_base
    return [{k: v for k, v in kb.document(i).items() if k != "metadata"} for i in doc_ids]


def build_conversations(records: list[dict], manager, top_k: int = 5, *, ensure_gold: bool = True,
                        multi_hop: bool = True, seed: int = 0) -> list[dict]:
    """Conversations for query records, retrieving with `manager` (a RetrievalManager).

    ensure_gold puts each hop's gold document into its retrieved list (training data);
    multi_hop renders two-hop questions as REFRAG conversations (hop queries from the
    record), otherwise every question is single-hop with its own retrieval. The record id,
    type and gold ids go to the conversation's metadata.
    """
    conversations = []
    for rec in records:
        rng = random.Random(f"{seed}:{rec['id']}")
        hops = rec.get("hops") if multi_hop and rec["type"] == "two_hop" else None
        if hops:
            queries = [rec["question"]] + [h["query"] for h in hops[1:]]
            found = manager.retrieve_many(queries, top_k)
            if ensure_gold:
                found = [with_gold(docs, gold_documents(manager, [h["doc_id"]]), rng) for docs, h in zip(found, hops)]
            conv = refrag_conversation(rec["question"], rec["answer"], list(zip(queries, found)))
        else:
            docs = manager.retrieve(rec["question"], top_k)
            if ensure_gold:
                docs = with_gold(docs, gold_documents(manager, rec["gold_doc_ids"]), rng)
            conv = rag_conversation(rec["question"], rec["answer"], docs)
        conv["metadata"] = {"id": rec["id"], "type": rec["type"], "gold_doc_ids": rec["gold_doc_ids"],
                            "retrieval_method": manager.retriever_type, "num_retrieved": top_k}
        conversations.append(conv)
    return conversations
