"""Training-time augmentations of single-retrieval RAG conversations (train split only).

A small model fine-tuned on a few thousand questions about a fixed KB can lower its loss by
memorising the KB's facts instead of reading the retrieved documents, and each question
teaches it only a few answer tokens. Two augmentations target exactly that:

* `add_questions`: further (question, answer) turns about the documents already shown, taken
  from other training records whose gold documents are all in the retrieval message. The
  context is paid for once and read several times, so a row carries several times more
  supervised answer tokens.
* `counterfactual`: a consistent rewrite of the conversation's world: every answer value that
  occurs in a shown document (final answers and two-hop bridge entities) is replaced, in the
  documents, questions and answers alike, by another answer of the same kind drawn from the
  training answers. Memorised facts are then wrong; only copying from the documents is right
  (the entity-substitution idea of Longpre et al., 2021, "Entity-based knowledge conflicts").
* `fresh_names`: every generated name of the conversation (people, companies, cities, countries,
  rivers: `refrag.data.make_kb.generated_names`) replaced, consistently, by a name never seen before,
  drawn from the "training" name style (1-3 syllables, hyphens, digits, two-word names: 1-20 BPE
  pieces where the KB's own names are 1-2). Names a model has seen as whole tokens can be matched
  and copied by token identity; fresh ones only by reading piece by piece, which is what a KB the
  model never saw asks for.

Neither touches the validation or test questions, whose facts stay unseen in training.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from refrag.data.answers import IDK
from refrag.data.make_kb import NameGenerator, generated_names

ANSWERABLE = ("single_hop", "two_hop", "contradictory")
# A kind keeps its own suffix word ("River", "Guild", ...) once this many answers share it.
SUFFIX_MIN_COUNT = 5


def shape(answer: str) -> str:
    """Coarse form of an answer: 'year', 'number', 'lowerN' or 'CapN' (N words)."""
    words = answer.split()
    if re.fullmatch(r"\d{4}", answer):
        return "year"
    if re.fullmatch(r"[\d,.]+", answer):
        return "number"
    return f"{'Cap' if answer[:1].isupper() else 'lower'}{len(words)}"


def answer_values(record: dict) -> list[str]:
    """The values of a record that documents state: its answer and, for two-hop, the bridge answers."""
    if record["type"] not in ANSWERABLE:
        return []
    values = [h["answer"] for h in record.get("hops", [])] + [record["answer"]]
    return list(dict.fromkeys(v for v in values if v and v != IDK))


class AnswerPools:
    """Distinct answer values of the training records, grouped by kind (shape plus a shared suffix)."""

    def __init__(self, records: list[dict]):
        values = sorted({v for r in records for v in answer_values(r)})
        suffixes = Counter(v.split()[-1] for v in values if len(v.split()) > 1)
        self._common = {s for s, n in suffixes.items() if n >= SUFFIX_MIN_COUNT}
        self.pools: dict[str, list[str]] = defaultdict(list)
        for v in values:
            self.pools[self.kind(v)].append(v)

    def kind(self, value: str) -> str:
        last = value.split()[-1] if value.split() else ""
        return f"{shape(value)}:{last if last in self._common else ''}"

    def substitute(self, value: str, rng: random.Random, avoid: str) -> str | None:
        """Another value of the same kind that does not occur in `avoid`, or None."""
        pool = self.pools.get(self.kind(value), [])
        for _ in range(8):
            candidate = rng.choice(pool) if pool else None
            if candidate is None:
                return None
            if candidate != value and not _mentions(avoid, candidate):
                return candidate
        return None


def whole_word(value: str) -> str:
    """Regex matching `value` where it is not part of a longer word."""
    return rf"(?<!\w){re.escape(value)}(?!\w)"


def _mentions(text: str, value: str) -> bool:
    return re.search(whole_word(value), text) is not None


def _texts(conv: dict) -> list[str]:
    out = []
    for m in conv["messages"]:
        out += [m[k] for k in ("content", "query") if isinstance(m.get(k), str)]
        for d in m.get("documents", []):
            out += [d["title"], d["content"]]
    return out


def _rewrite(conv: dict, mapping: dict[str, str]) -> dict:
    """Copy of `conv` with every whole-word occurrence of a mapping key replaced (longest first)."""
    pattern = re.compile("|".join(whole_word(k) for k in sorted(mapping, key=len, reverse=True)))

    def sub(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(0)], text)

    messages = []
    for m in conv["messages"]:
        m = {k: (sub(v) if k in ("content", "query") and isinstance(v, str) else v) for k, v in m.items()}
        if "documents" in m:
            m["documents"] = [{**d, "title": sub(d["title"]), "content": sub(d["content"])} for d in m["documents"]]
        messages.append(m)
    return {**conv, "messages": messages}


def shown_documents(conv: dict) -> list[dict]:
    """Documents of every retrieval message of the conversation, in order."""
    return [d for m in conv["messages"] if m["role"] == "retrieval" for d in m["documents"]]


def counterfactual(conv: dict, records: list[dict], pools: AnswerPools, rng: random.Random) -> dict:
    """`conv` with its answer values (of `records`, the questions it asks) swapped for others of the
    same kind, consistently everywhere; values that no shown document states are left alone."""
    documents = " ".join(f"{d['title']} {d['content']}" for d in shown_documents(conv))
    everything = " ".join(_texts(conv))
    mapping: dict[str, str] = {}
    for value in dict.fromkeys(v for r in records for v in answer_values(r)):
        if not _mentions(documents, value) or any(_mentions(value, k) or _mentions(k, value) for k in mapping):
            continue
        new = pools.substitute(value, rng, everything + " " + " ".join(mapping.values()))
        if new is not None:
            mapping[value] = new
    return _rewrite(conv, mapping) if mapping else conv


def fresh_names(conv: dict, rng: random.Random, style: str = "training") -> dict:
    """`conv` with every generated name word of its documents, questions, queries and answers replaced
    by a fresh name of `style`, the same word by the same name everywhere in the conversation."""
    words = list(dict.fromkeys(w for text in _texts(conv) for w in generated_names(text)))
    if not words:
        return conv
    names = NameGenerator(rng, style)
    names.used.update(words)
    return _rewrite(conv, {w: names.styled_word(short=False) for w in words})


class QuestionIndex:
    """Training records by gold document, to find further questions about shown documents."""

    def __init__(self, records: list[dict]):
        self.by_doc: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if r["type"] in ANSWERABLE and r["gold_doc_ids"]:
                self.by_doc[r["gold_doc_ids"][0]].append(r)

    def about(self, doc_ids: set[str], exclude: str) -> list[dict]:
        """Records (other than `exclude`) whose gold documents are all in `doc_ids`."""
        found = {r["id"]: r for d in sorted(doc_ids) for r in self.by_doc.get(d, [])
                 if r["id"] != exclude and set(r["gold_doc_ids"]) <= doc_ids}
        return list(found.values())


def add_questions(conv: dict, record: dict, index: QuestionIndex, extra: int,
                  rng: random.Random) -> tuple[dict, list[dict]]:
    """(`conv` plus up to `extra` user/assistant turns about its shown documents, the records asked).

    `conv` must be a single-retrieval conversation ending with the assistant's answer.
    """
    if conv["messages"][-1]["role"] != "assistant":
        raise ValueError("add_questions needs a conversation that ends with the assistant's answer")
    doc_ids = {d["id"] for d in shown_documents(conv)}
    candidates = index.about(doc_ids, exclude=record["id"])
    chosen = rng.sample(candidates, min(extra, len(candidates)))
    turns = [m for r in chosen for m in ({"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": r["answer"]})]
    return {**conv, "messages": conv["messages"] + turns}, [record] + chosen
