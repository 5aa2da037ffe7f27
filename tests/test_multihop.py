"""REFRAG multi-hop loop: scripted fake model + fake retriever, and one run with a real tiny HybridLM."""
from __future__ import annotations

import pytest
import torch

from refrag.data import load_tokenizer, validate_conversation
from refrag.infer import Engine
from refrag.infer.multihop import (ABSTAINED, ANSWERED, EMPTY, MAX_HOPS, TRUNCATED, STATUSES, TurnParser,
                                   run_multihop)
from refrag.model import HybridLM, MambaConfig, ModelConfig

Q1 = "Where was the inventor of the Folding Sextant born?"
Q2 = "Which river flows through Gindvrask?"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def doc(doc_id: str, text: str) -> dict:
    return {"id": doc_id, "title": doc_id, "content": text, "source": "test", "score": 1.0}


class FakeRetriever:
    """Returns the documents listed for a query, nothing for an unknown query; records queries."""

    def __init__(self, table: dict):
        self.table = table
        self.queries = []

    def retrieve_many(self, queries, top_k):
        self.queries.append(list(queries))
        return [self.table.get(q, [])[:top_k] for q in queries]


class ScriptedGenerator:
    """Engine-like: each question (found in the decoded prompt) gets its scripted turns in order.

    A turn is ("query", text), ("answer", text) or ("raw", token ids) as generated after [ASST].
    """

    def __init__(self, tok, scripts: dict):
        self.tok, self.scripts = tok, {q: list(turns) for q, turns in scripts.items()}
        self.calls = []

    def ids(self, turn) -> list[int]:
        kind, value = turn
        t = self.tok
        if kind == "query":
            return [t.token_id("[QUERY]")] + t.encode(value) + [t.token_id("[/QUERY]"), t.token_id("[/ASST]")]
        if kind == "answer":
            return t.encode(value) + [t.token_id("[/ASST]")]
        return list(value)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, stop_token_ids=(),
                 doc_ids=None):
        self.calls.append({"prompts": [list(p) for p in prompt_ids], "doc_ids": [list(d) for d in doc_ids]})
        outputs = []
        for prompt in prompt_ids:
            text = self.tok.decode(prompt)
            question = next(q for q in self.scripts if q in text)
            outputs.append(self.ids(self.scripts[question].pop(0))[:max_new_tokens])
        return outputs


@pytest.fixture
def retriever():
    return FakeRetriever({
        Q1: [doc("invention-010", "The Folding Sextant was invented by Synstyl Merkstesk."),
             doc("city-001", "Pulbys is a port city.")],
        "In which city was Synstyl Merkstesk born?": [doc("person-116", "Synstyl Merkstesk was born in Pulbys.")],
        Q2: [doc("city-003", "The Ferro River flows through Gindvrask.")],
    })


def test_two_hop_trace_follows_the_seed_format(tok, retriever):
    gen = ScriptedGenerator(tok, {Q1: [("query", "In which city was Synstyl Merkstesk born?"), ("answer", "Pulbys")]})
    [trace] = run_multihop(gen, tok, retriever, [Q1], max_hops=3)
    assert trace.status == ANSWERED and trace.answer == "Pulbys"
    assert [h["query"] for h in trace.hops] == [Q1, "In which city was Synstyl Merkstesk born?"]
    assert trace.retrieved_doc_ids == ["invention-010", "city-001", "person-116"]
    validate_conversation({"messages": trace.messages})
    roles = [m["role"] for m in trace.messages]
    assert roles == ["system", "user", "retrieval", "assistant", "retrieval", "assistant"]
    assert [m.get("hop") for m in trace.messages if m["role"] == "retrieval"] == [1, 2]
    # the second prompt is the first prompt plus the generated query plus the new retrieval block
    first, second = gen.calls[0]["prompts"][0], gen.calls[1]["prompts"][0]
    query_ids = gen.ids(("query", "In which city was Synstyl Merkstesk born?"))
    assert second[:len(first) + len(query_ids)] == first + query_ids
    assert second[-1] == tok.token_id("[ASST]") and tok.token_id("[DOC_1]") in second[len(first):]
    assert max(gen.calls[1]["doc_ids"][0]) == 3  # two documents at hop 1, one at hop 2
    # exactly the generated tokens are marked as generated
    answer_ids = gen.ids(("answer", "Pulbys"))
    generated = [t for t, g in zip(trace.input_ids, trace.generated_mask) if g]
    assert generated == query_ids + answer_ids
    assert len(trace.input_ids) == len(trace.doc_ids) == len(trace.generated_mask)


@pytest.mark.parametrize("max_hops", [0, -1, True, 1.5])
def test_max_hops_below_one_is_rejected(tok, retriever, max_hops):
    with pytest.raises(ValueError, match="max_hops"):
        run_multihop(ScriptedGenerator(tok, {}), tok, retriever, [Q1], max_hops=max_hops)


def test_query_after_the_last_hop_ends_with_max_hops(tok, retriever):
    gen = ScriptedGenerator(tok, {Q1: [("query", "In which city was Synstyl Merkstesk born?")]})
    [trace] = run_multihop(gen, tok, retriever, [Q1], max_hops=1)
    assert trace.status == MAX_HOPS and trace.answer is None and trace.num_hops == 1
    assert len(gen.calls) == 1


def test_query_that_retrieves_nothing_continues_with_an_empty_block(tok, retriever):
    gen = ScriptedGenerator(tok, {Q1: [("query", "no such thing"), ("answer", "I don't know")]})
    [trace] = run_multihop(gen, tok, retriever, [Q1])
    assert trace.status == ABSTAINED and trace.num_hops == 2
    assert trace.hops[1] == {"hop": 2, "query": "no such thing", "doc_ids": []}
    assert trace.messages[4] == {"role": "retrieval", "hop": 2, "query": "no such thing", "documents": []}
    block = gen.calls[1]["prompts"][0][-3:]
    assert block == [tok.token_id("[RETRIEVAL_START]"), tok.token_id("[RETRIEVAL_END]"), tok.token_id("[ASST]")]


@pytest.mark.parametrize("raw, status", [
    pytest.param(lambda t: t.encode(" Pulbys is a port"), TRUNCATED, id="answer-without-end"),
    pytest.param(lambda t: [t.token_id("[QUERY]")] + t.encode(" who"), TRUNCATED, id="query-without-close"),
    pytest.param(lambda t: [t.token_id("[/ASST]")], EMPTY, id="empty-answer"),
    pytest.param(lambda t: [t.token_id("[QUERY]"), t.token_id("[/QUERY]"), t.token_id("[/ASST]")], EMPTY,
                 id="empty-query"),
    pytest.param(lambda t: [], TRUNCATED, id="no-tokens"),
])
def test_truncated_and_empty_generations_are_recorded(tok, retriever, raw, status):
    gen = ScriptedGenerator(tok, {Q1: [("raw", raw(tok))]})
    [trace] = run_multihop(gen, tok, retriever, [Q1], max_new_tokens=8)
    assert trace.status == status and trace.answer is None and trace.num_hops == 1


def test_documents_first_layout_keeps_the_question_out_of_the_first_block(tok):
    """Documents first: everything up to [RETRIEVAL_END] of hop 1 is the same for two questions
    over the same documents (what lets a per-document cache reuse them across questions)."""
    shared = [doc("city-001", "Pulbys is a port city."), doc("city-003", "The Ferro River flows through Gindvrask.")]
    follow_up = "In which city was Synstyl Merkstesk born?"
    retriever = FakeRetriever({Q1: shared, Q2: shared, follow_up: [doc("person-116", "Born in Pulbys.")]})
    gen = ScriptedGenerator(tok, {Q1: [("query", follow_up), ("answer", "Pulbys")], Q2: [("answer", "Ferro")]})
    t1, t2 = run_multihop(gen, tok, retriever, [Q1, Q2], question_first=False)
    validate_conversation({"messages": t1.messages})
    assert [m["role"] for m in t1.messages] == ["system", "retrieval", "user", "assistant", "retrieval", "assistant"]
    assert [m["role"] for m in t2.messages] == ["system", "retrieval", "user", "assistant"]
    end = tok.token_id("[RETRIEVAL_END]")
    p1, p2 = gen.calls[0]["prompts"]
    assert p1[:p1.index(end) + 1] == p2[:p2.index(end) + 1]
    assert tok.token_id("[QUERY]") not in p1 and tok.decode(p1).index("[RETRIEVAL_END]") < tok.decode(p1).index(Q1)
    # hop 2 appends the follow-up turn and its block to the same row
    second = gen.calls[1]["prompts"][0]
    assert second[:len(p1)] == p1 and second[-1] == tok.token_id("[ASST]")
    assert t1.status == t2.status == ANSWERED and t1.num_hops == 2


def test_questions_advance_in_lockstep(tok, retriever):
    gen = ScriptedGenerator(tok, {
        Q1: [("query", "In which city was Synstyl Merkstesk born?"), ("answer", "Pulbys")],
        Q2: [("answer", "Ferro River")],
    })
    traces = run_multihop(gen, tok, retriever, [Q1, Q2])
    assert [t.status for t in traces] == [ANSWERED, ANSWERED]
    assert [t.num_hops for t in traces] == [2, 1]
    assert [len(c["prompts"]) for c in gen.calls] == [2, 1]
    assert retriever.queries == [[Q1, Q2], ["In which city was Synstyl Merkstesk born?"]]


def test_turn_parser_prefers_the_first_stop(tok):
    parser = TurnParser(tok)
    ids = tok.encode("Ferro River") + [tok.token_id("[/ASST]"), tok.eos_id]
    assert (parser.parse(ids).kind, parser.parse(ids).text) == ("answer", "Ferro River")


def test_real_model_runs_the_loop_without_crashing(tok, retriever):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=1, block_pattern="T", n_head=2,
                         mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16))
    engine = Engine(HybridLM(config).eval(), tok)
    traces = run_multihop(engine, tok, retriever, [Q1, Q2], max_hops=2, max_new_tokens=4, temperature=1.0,
                          seed=0)
    for trace in traces:
        assert trace.status in STATUSES and 1 <= trace.num_hops <= 2
        assert sum(trace.generated_mask) >= 1


def test_multihop_evaluation_scores_answers_hops_and_outcomes(tok, retriever):
    from refrag.eval.multihop import evaluate_multihop, format_comparison
    unanswerable = "In which country is Lethgrerk?"
    records = [
        {"id": "a", "question": Q1, "answer": "Pulbys", "type": "two_hop", "gold_doc_ids": ["invention-010"]},
        {"id": "b", "question": unanswerable, "answer": "I don't know", "type": "unanswerable", "gold_doc_ids": []},
        {"id": "c", "question": Q2, "answer": "Ferro River", "type": "single_hop", "gold_doc_ids": ["city-003"]},
    ]
    gen = ScriptedGenerator(tok, {
        Q1: [("query", "In which city was Synstyl Merkstesk born?"), ("answer", "Pulbys")],
        unanswerable: [("answer", "I don't know")],
        Q2: [("raw", tok.encode(" The Ferro"))],
    })
    metrics = evaluate_multihop(gen, tok, retriever, records, max_new_tokens=24, batch_size=2)
    assert metrics["em"] == pytest.approx(2 / 3) and metrics["hops"] == pytest.approx(4 / 3)
    assert metrics["abstention_accuracy"] == 1.0 and metrics["by_type"]["two_hop"]["em"] == 1.0
    assert (metrics["answered"], metrics["abstained"], metrics["truncated"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert metrics["hallucination"] == 0.0  # "Pulbys" is supported by the hop-2 document
    assert [p["status"] for p in metrics["predictions"]] == [ANSWERED, ABSTAINED, TRUNCATED]
    table = format_comparison({"refrag": metrics, "single_shot": {k: v for k, v in metrics.items() if k != "hops"}})
    assert "hops" in table and "two_hop em" in table
    hops_row = next(line for line in table.splitlines() if line.startswith("hops"))
    assert hops_row.split()[1:] == ["1.333", "-"]
