"""Answers as text: the abstention answer, question types, SQuAD normalization, abstention
detection (clean and degenerate), exact match and token F1. Shared by data generation, training
rewards, the multi-hop loop and evaluation (definitions: refrag.eval.answers)."""
from __future__ import annotations

import re
import string
from collections import Counter

IDK = "I don't know"
QUESTION_TYPES = ("single_hop", "two_hop", "contradictory", "unanswerable")
ABSTENTION_PHRASES = (
    "i dont know",
    "i do not know",
    "unknown",
    "no answer",
    "cannot answer",
    "cannot be answered",
    "not enough information",
    "documents do not say",
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Normalized whitespace tokens of `text`."""
    return normalize_answer(text).split()


_ABSTENTION_WORDS = re.compile(r"\b(dont|do not|know|unknown|cannot)\b")


def abstention_kind(text: str) -> str | None:
    """"clean" for an abstention ("I don't know" and its variants, optionally followed by words
    that repeat none of them), "degenerate" for other outputs built from abstention words
    ("I don't I don't know", "I don't know know"), None for everything else."""
    normalized = normalize_answer(text)
    for phrase in ABSTENTION_PHRASES:
        if normalized == phrase or (normalized.startswith(phrase + " ")
                                    and not _ABSTENTION_WORDS.search(normalized[len(phrase):])):
            return "clean"
    return "degenerate" if _ABSTENTION_WORDS.search(normalized) else None


def is_abstention(text: str) -> bool:
    """True when the answer cleanly declines to answer ("I don't know" and its variants)."""
    return abstention_kind(text) == "clean"


def is_degenerate_abstention(text: str) -> bool:
    """True for a broken abstention such as "I don't I don't know" (see `abstention_kind`)."""
    return abstention_kind(text) == "degenerate"


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are equal (abstention-aware for gold abstentions)."""
    if is_abstention(gold):
        return float(is_abstention(prediction))
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 on normalized tokens (abstention-aware for gold abstentions)."""
    if is_abstention(gold):
        return float(is_abstention(prediction))
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
