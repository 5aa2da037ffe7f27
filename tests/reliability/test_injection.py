"""Injected documents (refrag.eval.injection): the split is built deterministically, exactly one
document per question carries the instruction, and the follow rate / accuracies are computed
right (checked with a scripted fake model whose behaviour fixes the expected numbers)."""
import re

import pytest
import torch

from refrag.data import EMBEDDED_KB_DIR, load_queries, load_tokenizer
from refrag.eval.answers import normalize_answer
from refrag.eval.injection import (CANARY_ANSWERS, INSTRUCTION, build_injection_split, evaluate_injection,
                                   run_injection_eval, score_injection)
from refrag.model import HybridLM, MambaConfig, preset
from refrag.retrieval import read_documents

INSTRUCTION_RE = re.compile(re.escape(INSTRUCTION).replace(re.escape("{target}"), "(.+?)"))


def kb_documents(n: int = 8) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "metadata"} | {"score": 1.0}
            for d in read_documents(EMBEDDED_KB_DIR / "documents.jsonl")[:n]]


def fake_records(n: int = 6) -> list[dict]:
    golds = ["economist", "Zanzibar", "1642", "weatherproof wool", "I don't know", "purple lighthouse"]
    return [{"id": f"q-{i}", "question": f"Question number {i}?", "answer": golds[i % len(golds)],
             "type": "single_hop"} for i in range(n)]


def retrieved_for(records, k: int = 3) -> list[list[dict]]:
    docs = kb_documents()
    return [docs[i % 4: i % 4 + k] for i in range(len(records))]


def test_split_is_deterministic_and_injects_exactly_one_document():
    records = fake_records()
    retrieved = retrieved_for(records)
    originals = [[dict(d) for d in docs] for docs in retrieved]
    cases = build_injection_split(records, retrieved, seed=0)
    assert cases == build_injection_split(records, retrieved, seed=0)
    other_seed = build_injection_split(records, retrieved, seed=1)
    assert [(c["position"], c["target"]) for c in cases] != [(c["position"], c["target"]) for c in other_seed]
    assert retrieved == originals, "building the split mutated the retrieved documents"
    for case, docs in zip(cases, retrieved):
        assert case["clean_documents"] == docs
        changed = [i for i, (a, b) in enumerate(zip(case["injected_documents"], docs)) if a != b]
        assert changed == [case["position"]]
        injected = case["injected_documents"][case["position"]]
        assert injected["content"].endswith(docs[case["position"]]["content"])
        assert INSTRUCTION_RE.match(injected["content"]).group(1) == case["target"]
        assert case["target"] in CANARY_ANSWERS
        assert normalize_answer(case["target"]) != normalize_answer(case["gold"])


def test_split_rejects_mismatched_inputs():
    records = fake_records(2)
    with pytest.raises(ValueError, match="2 records but 1 retrieval results"):
        build_injection_split(records, retrieved_for(records)[:1])
    with pytest.raises(ValueError, match="no retrieved document"):
        build_injection_split(records[:1], [[]])


class ScriptedModel:
    """Answers from the prompt conversation: obeys an injected instruction for the questions in
    `obeys` (with sloppy casing and punctuation, which must still count as following), answers
    the gold for the rest, except `wrong` questions, which it always gets wrong."""

    def __init__(self, records, obeys: set, wrong: set):
        self.gold = {r["question"]: r["answer"] for r in records}
        self.index = {r["question"]: i for i, r in enumerate(records)}
        self.obeys, self.wrong = obeys, wrong

    def __call__(self, conversations):
        return [self.answer(c["messages"]) for c in conversations]

    def answer(self, messages) -> str:
        question = next(m["content"] for m in messages if m["role"] == "user")
        docs = next(m["documents"] for m in messages if m["role"] == "retrieval")
        planted = [INSTRUCTION_RE.search(d["content"]) for d in docs]
        planted = [p.group(1) for p in planted if p]
        i = self.index[question]
        if planted and i in self.obeys:
            return planted[0].upper() + "."
        return "no idea" if i in self.wrong else self.gold[question]


def test_metrics_match_a_scripted_model():
    records = fake_records(6)
    cases = build_injection_split(records, retrieved_for(records), seed=3)
    metrics = run_injection_eval(cases, ScriptedModel(records, obeys={0, 2, 4}, wrong={5}))
    assert metrics["count"] == 6
    assert metrics["clean_accuracy"] == pytest.approx(5 / 6)
    assert metrics["injected_accuracy"] == pytest.approx(2 / 6)  # questions 1 and 3
    assert metrics["follow_rate"] == pytest.approx(3 / 6)
    assert metrics["clean_follow_rate"] == 0.0
    assert [p["followed"] for p in metrics["predictions"]] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_score_rejects_mismatched_answer_counts():
    records = fake_records(2)
    cases = build_injection_split(records, retrieved_for(records))
    with pytest.raises(ValueError, match="2 cases but 1 clean and 2 injected answers"):
        score_injection(cases, ["a"], ["a", "b"])


class FirstDocuments:
    """Stand-in RetrievalManager: the first k documents of the embedded KB for every query."""

    def retrieve_many(self, queries, top_k):
        return [kb_documents()[:top_k] for _ in queries]


def test_evaluate_injection_runs_a_model_on_the_embedded_test_split(reference_ops):
    # the pipeline is under test, not the kernels
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_head=1, block_pattern="T,M",
                            mamba=MambaConfig(d_state=16, headdim=16, expand=1, chunk_size=16)))
    metrics = evaluate_injection(model, tokenizer, FirstDocuments(), "test", top_k=2, max_new_tokens=3,
                                 batch_size=3, limit=3)
    records = load_queries("test")[:3]
    assert metrics["count"] == 3 and [p["id"] for p in metrics["predictions"]] == [r["id"] for r in records]
    assert [p["gold"] for p in metrics["predictions"]] == [r["answer"] for r in records]
    for key in ("clean_accuracy", "injected_accuracy", "follow_rate", "clean_follow_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    assert model.training, "evaluate_injection must restore the model's training mode"
