"""The embedded default knowledge base: determinism, size, structure and question semantics."""
import json
import re
from collections import Counter

import pytest

from refrag.data.conversations import EMBEDDED_KB_DIR, load_queries
from refrag.data.make_kb import IDK, generate
from refrag.retrieval import read_documents

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def docs():
    return {d["id"]: d for d in read_documents(EMBEDDED_KB_DIR / "documents.jsonl")}


@pytest.fixture(scope="module")
def queries():
    return {s: load_queries(s) for s in SPLITS}


def test_committed_kb_matches_generator(tmp_path):
    """The shipped files are exactly what make_kb writes (deterministic, up to date)."""
    generate(tmp_path)
    for rel in ["documents.jsonl"] + [f"queries/{s}.jsonl" for s in SPLITS]:
        assert (tmp_path / rel).read_bytes() == (EMBEDDED_KB_DIR / rel).read_bytes(), rel


def test_generator_seed_changes_output(tmp_path):
    generate(tmp_path / "a", seed=1)
    assert (tmp_path / "a" / "documents.jsonl").read_bytes() != (EMBEDDED_KB_DIR / "documents.jsonl").read_bytes()


def test_size_and_shape(docs, queries):
    total = sum(p.stat().st_size for p in EMBEDDED_KB_DIR.rglob("*") if p.is_file())
    assert total < 20 * 2**20
    assert 300 <= len(docs) <= 600
    words = [len(d["content"].split()) for d in docs.values()]
    assert min(words) >= 40 and max(words) <= 120
    assert 1400 <= len(queries["train"]) <= 1600
    assert 190 <= len(queries["val"]) <= 210 and 190 <= len(queries["test"]) <= 210


def test_every_split_has_every_type(queries):
    for split, recs in queries.items():
        assert set(Counter(r["type"] for r in recs)) == {"single_hop", "two_hop", "contradictory", "unanswerable"}, split


def test_ids_unique_and_questions_do_not_leak_across_splits(queries):
    ids = [r["id"] for recs in queries.values() for r in recs]
    assert len(ids) == len(set(ids))
    seen = [set(r["question"] for r in recs) for recs in queries.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_gold_documents_exist_and_contain_answers(docs, queries):
    for recs in queries.values():
        for r in recs:
            for doc_id in r["gold_doc_ids"]:
                assert doc_id in docs, r["id"]
            if r["type"] == "single_hop":
                assert r["answer"] in docs[r["gold_doc_ids"][0]]["content"], r["id"]


def test_two_hop_chains(docs, queries):
    for r in queries["train"]:
        if r["type"] != "two_hop":
            continue
        hops = r["hops"]
        assert [h["doc_id"] for h in hops] == r["gold_doc_ids"]
        assert hops[0]["answer"] in docs[hops[0]["doc_id"]]["content"]
        assert hops[0]["answer"] in hops[1]["query"], "hop 2 asks about hop 1's answer"
        assert hops[1]["answer"] == r["answer"] and r["answer"] in docs[hops[1]["doc_id"]]["content"]
        assert hops[0]["answer"] not in r["question"] and r["answer"] not in r["question"]


def test_contradictory_gold_is_the_most_recent_document(docs, queries):
    for r in queries["train"]:
        if r["type"] != "contradictory":
            continue
        newest, older = (docs[i] for i in r["gold_doc_ids"])
        assert newest["metadata"]["date"] > older["metadata"]["date"]
        assert newest["source"] != older["source"]
        assert r["answer"] in newest["content"] and r["answer"] not in older["content"]


def test_unanswerable_questions_have_no_supporting_document(docs, queries):
    names = {d["title"] for d in docs.values()}
    for r in queries["test"] + queries["val"]:
        if r["type"] != "unanswerable":
            continue
        assert r["answer"] == IDK and r["gold_doc_ids"] == []
        born = re.match(r"In what year was (.+) born\?$", r["question"])
        if born and born.group(1) in names:
            person = next(d for d in docs.values() if d["title"] == born.group(1))
            assert not re.search(r"\b1[89]\d\d\b", person["content"]), "birth year is stated after all"


def test_distractors_share_names(docs):
    surnames = Counter(d["title"].split()[-1] for d in docs.values() if d["source"] in ("biographies", "blogs"))
    assert sum(1 for c in surnames.values() if c > 1) >= 20
    assert sum(1 for d in docs.values() if d["id"].startswith("event-")) >= 30


def test_load_queries_rejects_bad_split_and_records(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_queries("dev")
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "test.jsonl").write_text(json.dumps(
        {"id": "q", "question": "?", "answer": "a", "type": "two_hop", "gold_doc_ids": ["x", "y"]}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: a two_hop question needs one hop"):
        load_queries("test", tmp_path)
    with pytest.raises(ValueError, match="no query file"):
        load_queries("val", tmp_path)


@pytest.mark.parametrize("names, seed, varied", [("training", 5, True), ("heldout", 777, False)])
def test_other_name_styles_build_consistent_worlds(names, seed, varied):
    """Training and held-out worlds: every gold document states its answer, names differ from
    the embedded KB's, and the held-out names use syllables the training style never draws."""
    from refrag.data.make_kb import NAME_STYLES, build_kb

    docs, splits = build_kb(seed, names, varied_documents=varied)
    by_id = {d["id"]: d for d in docs}
    embedded_titles = {d["title"] for d in read_documents(EMBEDDED_KB_DIR / "documents.jsonl")}
    people = [d["title"] for d in docs if d["id"].startswith("person-")]
    assert not set(people) & embedded_titles
    for q in [q for split in splits.values() for q in split if q["type"] == "single_hop"]:
        assert q["answer"] in by_id[q["gold_doc_ids"][0]]["content"], q
    if names == "heldout":
        training = NAME_STYLES["training"]
        for part in NAME_STYLES["heldout"].vowels:
            assert part not in training.vowels
    else:  # varied documents: the first sentence is not always the one naming the entity first
        assert sum(not d["content"].startswith(d["title"]) for d in docs if d["id"].startswith("person-")) > 30
        assert any("-" in p for p in people) and any(any(c.isdigit() for c in p) for p in people)


def test_unknown_name_style_is_an_error():
    from refrag.data.make_kb import build_kb

    with pytest.raises(ValueError, match="unknown name style 'fancy'"):
        build_kb(1, "fancy")
