"""Conversation schema, tokenizer and rendering (token ids, loss mask, per-token doc ids)."""

import numpy as np
import pytest

from refrag.data import (SPECIAL_TOKENS, RagTokenizer, load_tokenizer, rag_conversation, refrag_conversation,
                         render_conversation, render_conversations, render_for_generation, validate_conversation)
from refrag.data.conversations import build_conversations, with_gold
from refrag.retrieval import KnowledgeBase, RetrievalManager


def doc(i, content="some words about it"):
    return {"id": f"d{i}", "title": f"Title {i}", "content": content, "source": "s", "score": 1.0 / (i + 1)}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def decode_where(tok, ex, mask):
    return tok.decode(ex.input_ids[mask].tolist())


# ---------------------------------------------------------------- schema

@pytest.mark.parametrize("conv, message", [
    pytest.param({"messages": []}, "no messages", id="empty"),
    pytest.param([], "dict with a 'messages' list", id="not-a-dict"),
    pytest.param({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
                 "system message must come first", id="late-system"),
    pytest.param({"messages": [{"role": "user", "content": " "}]}, "content must be a non-empty string",
                 id="empty-user"),
    pytest.param({"messages": [{"role": "assistant", "content": "a", "query": "q"}]}, "exactly one of",
                 id="assistant-answer-and-query"),
    pytest.param({"messages": [{"role": "retrieval", "documents": [{"id": "x"}]}]}, "needs a string 'title'",
                 id="doc-missing-title"),
    pytest.param({"messages": [{"role": "retrieval", "documents": [doc(i) for i in range(17)]}]},
                 "at most 16 per block", id="17-docs"),
    pytest.param({"messages": [{"role": "retrieval", "hop": 0, "documents": []}]}, "hop must be an integer >= 1",
                 id="hop-0"),
])
def test_invalid_conversations(conv, message):
    with pytest.raises(ValueError) as err:
        validate_conversation(conv)
    assert message in str(err.value)


# ---------------------------------------------------------------- tokenizer

def test_special_tokens_are_single_reserved_ids(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size > 2000


def test_plain_text_never_produces_special_tokens(tok):
    text = "Ignore this: [USER] [DOC_3] [EOS] [/ASST]"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text


def test_roundtrip_unicode(tok):
    text = "Zoë met Łukasz in Köln — 北京 2024!"
    assert tok.decode(tok.encode(text)) == text


def test_train_save_load_roundtrip(tmp_path):
    texts = ["Ada Quell was born in Varossa.", "Bram Toll works for Lunor Systems."] * 20
    tok = RagTokenizer.train(texts, vocab_size=400)
    tok.save(tmp_path / "t.json")
    again = RagTokenizer.load(tmp_path / "t.json")
    assert again.encode(texts[0]) == tok.encode(texts[0])
    assert again.token_id("[DOC_16]") == tok.token_id("[DOC_16]")
    with pytest.raises(ValueError, match="vocab_size must be >= 301"):
        RagTokenizer.train(texts, vocab_size=100)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="not a valid tokenizer file"):
        RagTokenizer.load(tmp_path / "bad.json")


def test_shipped_tokenizer_is_reproducible(tok):
    from refrag.data.conversations import EMBEDDED_KB_DIR
    from refrag.data.tokenizer import corpus_texts

    retrained = RagTokenizer.train(corpus_texts(EMBEDDED_KB_DIR))
    assert retrained.tokenizer.get_vocab() == tok.tokenizer.get_vocab()


def test_tokenizer_cli(tmp_path):
    from refrag.data.tokenizer import main

    docs = tmp_path / "documents.jsonl"
    docs.write_text('{"id": "a", "title": "T", "content": "hello world hello", "source": "s"}\n')
    main(["train", "--kb", str(docs), "--out", str(tmp_path / "tok.json"), "--vocab-size", "320"])
    assert RagTokenizer.load(tmp_path / "tok.json").vocab_size <= 320


# ---------------------------------------------------------------- rendering

def test_answer_tokens_equal_the_same_words_inside_a_document(tok):
    content = "Ada Lind was born in Varossa in 1901."
    conv = rag_conversation("Where was Ada Lind born?", "Varossa", [doc(0, content)])
    ex = render_conversation(conv, tok)
    answer = ex.input_ids[ex.loss_mask == 1][:-2].tolist()  # without [/ASST] [EOS]
    document = ex.input_ids[ex.doc_ids == 1].tolist()
    assert any(document[i:i + len(answer)] == answer for i in range(len(document)))


def test_single_hop_rendering(tok):
    conv = rag_conversation("Where was Ada born?", "Varossa", [doc(0), doc(1)])
    ex = render_conversation(conv, tok)
    ids = ex.input_ids.tolist()
    t = tok.token_id
    assert ids[0] == t("[BOS]") and ids[-1] == t("[EOS]")
    for marker in ("[RETRIEVAL_START]", "[DOC_1]", "[/DOC_1]", "[DOC_2]", "[/DOC_2]", "[RETRIEVAL_END]"):
        assert ids.count(t(marker)) == 1
    assert decode_where(tok, ex, ex.loss_mask == 1) == " Varossa[/ASST][EOS]"
    assert ids[np.flatnonzero(ex.loss_mask)[0] - 1] == t("[ASST]")
    spans = ex.doc_spans()
    assert [ids[s] for s, _ in spans] == [t("[DOC_1]"), t("[DOC_2]")]
    assert [ids[e - 1] for _, e in spans] == [t("[/DOC_1]"), t("[/DOC_2]")]
    assert spans[0][1] == spans[1][0], "documents of one block are adjacent"
    assert decode_where(tok, ex, ex.doc_ids == 2) == "[DOC_2]Title 1\nsome words about it[/DOC_2]"
    assert (ex.doc_ids[ex.loss_mask == 1] == 0).all()


def test_multi_hop_rendering_counts_docs_across_hops(tok):
    conv = refrag_conversation("Q?", "Answer", [("Q?", [doc(0), doc(1)]), ("follow up", [doc(2)])])
    ex = render_conversation(conv, tok)
    t = tok.token_id
    assert int(ex.doc_ids.max()) == 3
    assert decode_where(tok, ex, ex.doc_ids == 3).startswith("[DOC_1]Title 2")
    assert decode_where(tok, ex, ex.loss_mask == 1) == "[QUERY]follow up[/QUERY][/ASST] Answer[/ASST][EOS]"
    assert ex.input_ids.tolist().count(t("[QUERY]")) == 1, "hop queries already said are not repeated"
    (s1, e1), (s2, e2), (s3, e3) = ex.doc_spans()
    assert e1 == s2 < e2 < s3, "shared text (the follow-up query) separates the two blocks"


def test_precomputed_hop_query_is_rendered(tok):
    conv = {"messages": [{"role": "retrieval", "hop": 1, "query": "first", "documents": [doc(0)]},
                         {"role": "retrieval", "hop": 2, "query": "second", "documents": [doc(1)]},
                         {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    ex = render_conversation(conv, tok)
    shared = decode_where(tok, ex, ex.doc_ids == 0)
    assert "[QUERY]first[/QUERY]" in shared and "[QUERY]second[/QUERY]" in shared


def test_loss_mask_covers_every_assistant_turn(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    ex = render_conversation(conv, tok)
    assert decode_where(tok, ex, ex.loss_mask == 1) == " hello[/ASST] ciao[/ASST][EOS]"


def test_document_truncation_warns(tok):
    long_doc = doc(0, " ".join(f"word{i}" for i in range(300)))
    conv = rag_conversation("Q", "A", [long_doc, doc(1)])
    with pytest.warns(UserWarning, match="truncated 1 document"):
        ex = render_conversation(conv, tok, max_doc_tokens=20)
    assert ex.truncated_docs == 1
    (s1, e1), (s2, e2) = ex.doc_spans()
    assert e1 - s1 == 22, "20 content tokens plus the two markers"
    assert decode_where(tok, ex, ex.loss_mask == 1) == " A[/ASST][EOS]", "the answer is never cut"


def test_over_long_examples_are_dropped_and_counted(tok):
    short = rag_conversation("Q", "A", [doc(0)])
    long = rag_conversation("Q", "A", [doc(i, "many words " * 40) for i in range(8)])
    long["metadata"] = {"id": "long-one"}
    n_short = len(render_conversation(short, tok))
    with pytest.warns(UserWarning, match="dropped 1 example"):
        examples, stats = render_conversations([short, long, short], tok, max_len=n_short + 5)
    assert [len(e) for e in examples] == [n_short, n_short]
    assert (stats.rendered, stats.dropped_too_long, stats.dropped_ids) == (2, 1, ["long-one"])


def test_render_for_generation(tok):
    conv = refrag_conversation("Q?", "A", [("Q?", [doc(0)])])
    conv["messages"].pop()
    ex = render_for_generation(conv, tok)
    assert ex.input_ids[-1] == tok.token_id("[ASST]") and not ex.loss_mask.any()
    with pytest.raises(ValueError, match="already ends with an assistant message"):
        render_for_generation(rag_conversation("Q", "A", []), tok)
    with pytest.raises(ValueError, match="needs an assistant message"):
        render_conversation(conv, tok)


# ---------------------------------------------------------------- conversations from query records

KB_DOCS = [{"id": f"p{i}", "title": f"Person {i}", "content": f"Person {i} was born in City{i}.", "source": "bio"}
           for i in range(8)]


def test_build_conversations_ensures_gold_and_formats(tok):
    kb = KnowledgeBase.build(KB_DOCS, "hashing:32", show_progress=False)
    manager = RetrievalManager("bm25", knowledge_base=kb)
    records = [
        {"id": "a", "question": "Where was Person 3 born?", "answer": "City3", "type": "single_hop",
         "gold_doc_ids": ["p3"]},
        {"id": "b", "question": "zzz unrelated", "answer": "City7", "type": "single_hop", "gold_doc_ids": ["p7"]},
        {"id": "c", "question": "Where was the friend of Person 1 born?", "answer": "City5", "type": "two_hop",
         "gold_doc_ids": ["p1", "p5"], "hops": [{"query": "friend of Person 1", "doc_id": "p1", "answer": "Person 5"},
                                                {"query": "zzz", "doc_id": "p5", "answer": "City5"}]},
    ]
    convs = build_conversations(records, manager, top_k=2)
    for conv in convs:
        validate_conversation(conv)
        render_conversation(conv, tok)
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "retrieval", "user", "assistant"]
    assert "p7" in [d["id"] for d in convs[1]["messages"][1]["documents"]]
    roles = [m["role"] for m in convs[2]["messages"]]
    assert roles == ["system", "user", "retrieval", "assistant", "retrieval", "assistant"]
    hop2 = convs[2]["messages"][4]
    assert hop2["hop"] == 2 and hop2["query"] == "zzz" and "p5" in [d["id"] for d in hop2["documents"]]
    assert convs[2]["metadata"]["gold_doc_ids"] == ["p1", "p5"]
    no_gold = build_conversations(records[1:2], manager, top_k=2, ensure_gold=False)
    assert "p7" not in [d["id"] for d in no_gold[0]["messages"][1]["documents"]]


def test_with_gold_replaces_lowest_non_gold():
    import random

    docs = [doc(i) for i in range(4)]
    out = with_gold(docs, [doc(9), doc(0)], random.Random(0))
    assert sorted(d["id"] for d in out) == ["d0", "d1", "d2", "d9"]
    assert with_gold(docs, [doc(2)], random.Random(0)) is docs
