"""Answer metrics: SQuAD-style EM / token F1, abstention, hallucination, per-type breakdown.

Definitions (all on SQuAD-normalized text: lowercase, punctuation and the articles
a/an/the removed, whitespace collapsed):

- **exact match / F1** against the gold answer. When the gold answer is an abstention
  ("I don't know", unanswerable questions) both are 1 iff the prediction abstains, else 0.
- **abstention**: the normalized prediction starts with one of `ABSTENTION_PHRASES`
  ("i don't know", "i do not know", "unknown", ...) and the rest repeats no abstention word
  (see degenerate). Abstention accuracy is the share of unanswerable questions on which the
  model abstains; false abstention is the share of answerable questions on which it does.
- **degenerate abstention**: an output that is not a clean abstention but is made of
  abstention words ("I don't I don't know", "I don't know know", "don't know", "Kelb I don't
  know"): an abstention failure, counted neither as a correct abstention (its EM/F1 on an
  unanswerable question is 0) nor as a hallucination; reported as its own rate.
- **hallucination**: the prediction neither abstains nor is degenerate, has at least one
  normalized token, and no single retrieved document contains all of its normalized tokens
  (token-level containment, order ignored). The rates are over all questions, so
  ``abstention + degenerate + answered-and-supported + hallucinated + empty = 1`` per question.
  With no documents, every non-empty non-abstaining answer is a hallucination.

`score_answer` scores one prediction; `aggregate` turns a list of scored records into
the metrics dict (overall plus ``by_type`` for single_hop, two_hop, contradictory,
unanswerable).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from refrag.data.answers import (ABSTENTION_PHRASES, IDK, QUESTION_TYPES, abstention_kind,  # noqa: F401
                                 answer_tokens, exact_match, is_abstention, is_degenerate_abstention,
                                 normalize_answer, token_f1)


def is_supported(prediction: str, documents: Sequence[str]) -> bool:
    """True when some document's normalized tokens contain every normalized answer token."""
    needed = set(answer_tokens(prediction))
    return any(needed <= set(answer_tokens(doc)) for doc in documents)


def is_hallucination(prediction: str, documents: Sequence[str]) -> bool:
    """A non-empty answer, neither an abstention nor a degenerate one, that no single retrieved
    document supports."""
    if abstention_kind(prediction) is not None or not answer_tokens(prediction):
        return False
    return not is_supported(prediction, documents)


def score_answer(prediction: str, gold: str, question_type: str, documents: Sequence[str]) -> dict:
    """Score one prediction; `documents` are the texts retrieved for the question."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
    return {
        "type": question_type,
        "em": exact_match(prediction, gold),
        "f1": token_f1(prediction, gold),
        "abstained": is_abstention(prediction),
        "degenerate": is_degenerate_abstention(prediction),
        "answerable": not is_abstention(gold),
        "hallucinated": is_hallucination(prediction, documents),
    }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _summarize(records: list[dict]) -> dict:
    answerable = [r for r in records if r["answerable"]]
    unanswerable = [r for r in records if not r["answerable"]]
    return {
        "count": len(records),
        "em": _mean(r["em"] for r in records),
        "f1": _mean(r["f1"] for r in records),
        "abstention_accuracy": _mean(float(r["abstained"]) for r in unanswerable),
        "false_abstention": _mean(float(r["abstained"]) for r in answerable),
        "hallucination": _mean(float(r["hallucinated"]) for r in records),
        "degenerate_abstention": _mean(float(r.get("degenerate", False)) for r in records),
    }


def aggregate(records: Sequence[dict]) -> dict:
    """Overall metrics plus ``by_type``; a metric with no eligible question is None."""
    if not records:
        raise ValueError("aggregate needs at least one scored record")
    records = list(records)
    by_type = {t: _summarize([r for r in records if r["type"] == t]) for t in QUESTION_TYPES}
    return {**_summarize(records), "by_type": {t: m for t, m in by_type.items() if m["count"]}}


def format_table(results: dict[str, dict]) -> str:
    """Plain-text table of several runs' metrics, one column per run name."""
    names = list(results)
    rows = [("questions", "count")] + [(m, m) for m in
                                      ("em", "f1", "abstention_accuracy", "false_abstention", "hallucination",
                                       "degenerate_abstention")]
    for qtype in QUESTION_TYPES:
        rows += [(f"{qtype} {m}", (qtype, m)) for m in ("em", "f1")]

    def cell(metrics: dict, key) -> str:
        if isinstance(key, tuple):
            metrics, key = metrics["by_type"].get(key[0], {}), key[1]
        value = metrics.get(key)
        if value is None:
            return "-"
        return str(value) if isinstance(value, int) else f"{value:.3f}"

    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(n), 6) for n in names]
    lines = [" ".join([" " * label_width] + [n.rjust(w) for n, w in zip(names, widths)])]
    for label, key in rows:
        cells = [cell(results[n], key).rjust(w) for n, w in zip(names, widths)]
        lines.append(" ".join([label.ljust(label_width)] + cells))
    return "\n".join(lines)
