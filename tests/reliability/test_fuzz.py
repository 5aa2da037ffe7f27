"""Fuzzing (hypothesis): random and malformed input to the JSONL parsers and the conversation
renderer gives a valid result or a clear ValueError, never another exception.

DocLayout construction is fuzzed in tests/test_layout.py (test_fuzz_from_cu_seqlens,
test_fuzz_from_ids, test_fuzz_from_examples).
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refrag_kernels import DocLayout
from refrag.data import load_tokenizer, render_conversation, render_for_generation
from refrag.data.conversations import load_queries
from refrag.data.documents import ID_PATTERN, parse_documents, read_documents

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_LEAVES = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
TEXT = st.text(max_size=20) | st.sampled_from(["", "  ", "[DOC_1]", "[/ASST]", "[EOS]", "a\nb", "ü 東京 \x00"])
WORDS = st.text(min_size=1, max_size=20).filter(str.strip) | st.sampled_from(["[DOC_1] x", "Who? [/USER]", "東京"])


def valid_document():
    return st.fixed_dictionaries({"id": st.from_regex(ID_PATTERN, fullmatch=True), "title": WORDS,
                                  "content": WORDS, "source": WORDS},
                                 optional={"score": st.floats(allow_nan=False), "metadata": st.just({"k": 1})})


def document_like():
    """Valid documents, and records that are off by a field, a type or a character."""
    field = st.one_of(TEXT, JSON_LEAVES)
    return valid_document() | st.fixed_dictionaries(
        {"id": st.one_of(st.from_regex(ID_PATTERN, fullmatch=True), TEXT, st.sampled_from(["../x", "/etc/passwd",
                                                                                           ".hidden", "a/b"])),
         "title": field, "content": field, "source": field},
        optional={"score": field, "metadata": JSON_VALUES, "extra": JSON_VALUES})


def jsonl_lines():
    """Lines of a JSONL file: JSON of document-like records, arbitrary JSON, or broken text."""
    line = st.one_of(document_like().map(lambda r: json.dumps(r)), JSON_VALUES.map(json.dumps), TEXT,
                     document_like().map(lambda r: json.dumps(r)[:-3]))
    valid = st.lists(valid_document(), min_size=1, max_size=4, unique_by=lambda d: d["id"])
    return valid.map(lambda docs: [json.dumps(d) for d in docs] + [""]) | st.lists(line, max_size=6)


@FUZZ
@given(lines=jsonl_lines())
def test_document_jsonl_parses_or_raises_value_error(lines):
    try:
        docs = parse_documents(lines, "fuzz.jsonl")
    except ValueError as err:
        assert "fuzz.jsonl" in str(err)
        return
    ids = [d["id"] for d in docs]
    assert docs and len(set(ids)) == len(ids)
    for doc in docs:
        assert ID_PATTERN.match(doc["id"]) and doc["content"].strip()
        # an accepted id can always be used as a file name inside a KB directory
        kb = Path("/kb")
        assert (kb / doc["id"]).resolve().parent == kb.resolve()


@FUZZ
@given(data=st.binary(max_size=200))
def test_document_file_of_random_bytes_parses_or_raises_value_error(tmp_path, data):
    path = tmp_path / "documents.jsonl"
    path.write_bytes(data)
    try:
        docs = read_documents(path)
    except ValueError as err:
        assert "documents.jsonl" in str(err)
        return
    assert docs


def query_like():
    field = st.one_of(TEXT, JSON_LEAVES)
    hop = st.fixed_dictionaries({"query": field, "doc_id": field, "answer": field})
    return st.fixed_dictionaries(
        {"id": field, "question": field, "answer": field,
         "type": st.sampled_from(["single_hop", "two_hop", "contradictory", "unanswerable", "other"])},
        optional={"gold_doc_ids": st.lists(field, max_size=2) | JSON_LEAVES, "hops": st.lists(hop, max_size=2)})


@FUZZ
@given(lines=st.lists(st.one_of(query_like().map(json.dumps), JSON_VALUES.map(json.dumps), TEXT), max_size=5))
def test_query_jsonl_parses_or_raises_value_error(tmp_path, lines):
    (tmp_path / "queries").mkdir(exist_ok=True)
    (tmp_path / "queries" / "test.jsonl").write_text("\n".join(lines), encoding="utf-8")
    try:
        records = load_queries("test", tmp_path)
    except ValueError:
        return
    assert all(isinstance(r["question"], str) and r["question"] for r in records)


# ----------------------------------------------------------------------------- conversation rendering


def valid_message():
    return st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": WORDS}),
        st.fixed_dictionaries({"role": st.just("assistant"), "query": WORDS}),
        st.fixed_dictionaries({"role": st.just("retrieval"), "documents": st.lists(valid_document(), max_size=3)},
                              optional={"hop": st.integers(1, 3), "query": WORDS}),
    )


def plausible_conversation():
    """Schema-valid conversations: an optional system prompt, then valid messages in any order."""
    system = st.lists(st.fixed_dictionaries({"role": st.just("system"), "content": WORDS}), max_size=1)
    return st.builds(lambda head, rest: {"messages": head + rest}, system, st.lists(valid_message(), max_size=6))


def message_like():
    doc = st.fixed_dictionaries({"id": TEXT, "title": TEXT, "content": TEXT, "source": TEXT},
                                optional={"score": JSON_LEAVES})
    return st.one_of(
        valid_message(),
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": TEXT}),
        st.fixed_dictionaries({"role": st.just("assistant"), "query": TEXT}, optional={"content": TEXT}),
        st.fixed_dictionaries({"role": st.just("retrieval"), "documents": st.lists(doc | JSON_VALUES, max_size=3)},
                              optional={"hop": JSON_LEAVES, "query": TEXT}),
        JSON_VALUES,
    )


def conversation_like():
    return st.one_of(plausible_conversation(), st.fixed_dictionaries({"messages": st.lists(message_like(), max_size=6)},
                                           optional={"metadata": JSON_VALUES}), JSON_VALUES)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def assert_valid_example(ex):
    """Aligned arrays, a 0/1 loss mask, and doc ids that DocLayout accepts as one example."""
    n = len(ex.input_ids)
    assert n > 0 and len(ex.loss_mask) == n and len(ex.doc_ids) == n
    assert set(np.unique(ex.loss_mask).tolist()) <= {0, 1}
    DocLayout.from_examples([(n, ex.doc_spans())])


@FUZZ
@given(conv=conversation_like())
def test_rendering_gives_a_valid_example_or_value_error(tokenizer, conv):
    for render in (render_conversation, render_for_generation):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ex = render(conv, tokenizer, max_doc_tokens=8)
            except ValueError:
                continue
        assert_valid_example(ex)
