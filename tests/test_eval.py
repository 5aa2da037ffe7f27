"""Answer metrics on hand-made cases (refrag.eval.answers)."""
import pytest

from refrag.eval.answers import (
    IDK,
    abstention_kind,
    aggregate,
    exact_match,
    format_table,
    is_abstention,
    is_hallucination,
    normalize_answer,
    score_answer,
    token_f1,
)

DOCS = [
    "Nindzer Staexpysk is an economist who was born in Husfym in 1953.",
    "Brixdath census (2021): the population of Brixdath is 271,000.",
]


@pytest.mark.parametrize("text, expected", [
    pytest.param("The Glass Bridge!", "glass bridge", id="article-punct"),
    pytest.param("  an   Economist ", "economist", id="spaces"),
    pytest.param("271,000", "271000", id="digits-comma"),
    pytest.param("I don\u2019t know.", "i dont know", id="curly-apostrophe"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    pytest.param("I don't know", True, id="idk"),
    pytest.param("i do not know.", True, id="do-not"),
    pytest.param("Unknown", True, id="unknown"),
    pytest.param("I don't know, maybe Paris", True, id="idk-prefix"),
    pytest.param("economist", False, id="answer"),
    pytest.param("Known for nothing", False, id="known-not-unknown"),
    pytest.param("", False, id="empty"),
    pytest.param("I don't I don't know", False, id="degenerate-repeat"),
    pytest.param("I don't know know", False, id="degenerate-tail"),
])
def test_is_abstention(text, expected):
    assert is_abstention(text) is expected


@pytest.mark.parametrize("text, kind", [
    pytest.param("I don't know.", "clean", id="clean"),
    pytest.param("I don't know, maybe Paris", "clean", id="clean-with-words"),
    pytest.param("I don't I don't know", "degenerate", id="repeat"),
    pytest.param("I don't know know", "degenerate", id="tail"),
    pytest.param("don't know", "degenerate", id="fragment"),
    pytest.param("Kelb I don't know", "degenerate", id="name-then-idk"),
    pytest.param("Kelb Works", None, id="answer"),
    pytest.param("", None, id="empty"),
])
def test_abstention_kind(text, kind):
    assert abstention_kind(text) == kind


def test_degenerate_abstention_is_neither_abstention_nor_hallucination():
    score = score_answer("I don't I don't know", IDK, "unanswerable", ["Kelb Works makes lamps."])
    assert score["degenerate"] and not score["abstained"] and not score["hallucinated"]
    assert score["em"] == score["f1"] == 0.0
    metrics = aggregate([score, score_answer("I don't know", IDK, "unanswerable", [])])
    assert metrics["degenerate_abstention"] == 0.5 and metrics["abstention_accuracy"] == 0.5
    assert metrics["hallucination"] == 0.0


def test_exact_match_and_f1():
    assert exact_match("The economist.", "economist") == 1.0
    assert exact_match("economist too", "economist") == 0.0
    # pred {weatherproof, wool, coats} vs gold {weatherproof, wool}: P=2/3, R=1
    assert token_f1("weatherproof wool coats", "weatherproof wool") == pytest.approx(0.8)
    assert token_f1("lamp oils", "weatherproof wool") == 0.0
    assert token_f1("", "economist") == 0.0


def test_gold_abstention_scores_only_abstentions():
    assert exact_match("I do not know.", "I don't know") == 1.0
    assert token_f1("I don't know", "I don't know") == 1.0
    assert token_f1("know", "I don't know") == 0.0


@pytest.mark.parametrize("prediction, docs, expected", [
    pytest.param("economist", DOCS, False, id="in-doc"),
    pytest.param("271,000", DOCS, False, id="number-in-doc"),
    pytest.param("Husfym economist", DOCS, False, id="unordered-tokens-one-doc"),
    pytest.param("economist 271,000", DOCS, True, id="split-across-docs"),
    pytest.param("chemist", DOCS, True, id="not-in-docs"),
    pytest.param("economist", [], True, id="no-docs"),
    pytest.param("I don't know", [], False, id="abstains"),
    pytest.param("...", [], False, id="empty-after-normalization"),
])
def test_is_hallucination(prediction, docs, expected):
    assert is_hallucination(prediction, docs) is expected


def test_aggregate_per_type():
    records = [
        score_answer("economist", "economist", "single_hop", DOCS),
        score_answer("chemist", "economist", "single_hop", DOCS),
        score_answer("I don't know", "I don't know", "unanswerable", DOCS),
        score_answer("Paris", "I don't know", "unanswerable", DOCS),
        score_answer("I don't know", "271,000", "contradictory", DOCS),
    ]
    metrics = aggregate(records)
    assert metrics["count"] == 5
    assert metrics["em"] == pytest.approx(2 / 5)
    assert metrics["abstention_accuracy"] == pytest.approx(1 / 2)
    assert metrics["false_abstention"] == pytest.approx(1 / 3)
    assert metrics["hallucination"] == pytest.approx(2 / 5)  # chemist, Paris
    assert set(metrics["by_type"]) == {"single_hop", "unanswerable", "contradictory"}
    single = metrics["by_type"]["single_hop"]
    assert (single["count"], single["em"], single["abstention_accuracy"]) == (2, 0.5, None)
    table = format_table({"rag": metrics, "no_retrieval": metrics})
    assert "single_hop f1" in table and "two_hop em" in table and "0.400" in table


def test_bad_input():
    with pytest.raises(ValueError, match="question type 'three_hop'"):
        score_answer("x", "y", "three_hop", [])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


class FirstDocuments:
    """Stand-in RetrievalManager: the first k documents of the embedded KB for every query."""

    def __init__(self):
        from refrag.data import EMBEDDED_KB_DIR
        from refrag.retrieval import read_documents

        self.docs = [{**d, "score": 1.0} for d in read_documents(EMBEDDED_KB_DIR / "documents.jsonl")[:8]]

    def retrieve_many(self, queries, top_k):
        return [[{k: v for k, v in d.items() if k != "metadata"} for d in self.docs[:top_k]] for _ in queries]


@pytest.mark.parametrize("use_retrieval", [True, False], ids=["rag", "no-retrieval"])
def test_evaluate_model_end_to_end(use_retrieval, reference_ops):  # the pipeline is under test, not the kernels
    import torch

    from refrag.data import load_queries, load_tokenizer
    from refrag.data.prompt import PromptFormat
    from refrag.eval.evaluate import evaluate_model
    from refrag.model import HybridLM, MambaConfig, preset

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", vocab_size=tokenizer.vocab_size, d_model=64, n_head=2, block_pattern="T,M",
                            mamba=MambaConfig(d_state=16, headdim=16, chunk_size=16)))
    metrics = evaluate_model(model, tokenizer, FirstDocuments(), load_queries("test")[:5],
                             PromptFormat(retrieval=use_retrieval), top_k=2, max_new_tokens=3, batch_size=2)
    assert metrics["count"] == 5 and len(metrics["predictions"]) == 5
    first = metrics["predictions"][0]
    assert first["id"] == "test-0000" and first["retrieved"] == ["person-000", "person-001"]
    assert isinstance(first["prediction"], str) and first["gold"] == "economist"
    assert 0.0 <= metrics["f1"] <= 1.0 and set(metrics["by_type"]) <= set(("single_hop", "two_hop",
                                                                          "contradictory", "unanswerable"))


def test_answer_from_ids_stops_at_end_of_turn():
    from refrag.data import load_tokenizer
    from refrag.eval.evaluate import answer_from_ids

    tokenizer = load_tokenizer()
    answer = tokenizer.encode("weatherproof wool")
    end = [tokenizer.token_id("[/ASST]"), tokenizer.eos_id]
    assert answer_from_ids(answer + end + tokenizer.encode(" extra"), tokenizer) == "weatherproof wool"
    assert answer_from_ids(answer, tokenizer) == "weatherproof wool"  # ran out of tokens
    assert answer_from_ids([tokenizer.eos_id], tokenizer) == ""
