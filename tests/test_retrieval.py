"""Knowledge base build/load/validation, retrievers, RetrievalManager and the retrieval CLI.

Unit tests use a tiny KB with the deterministic hashing encoder; one slow test checks
retrieval quality on the embedded KB with the real all-MiniLM-L6-v2 weights.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refrag.eval.retrieval import evaluate_retriever, ndcg_at_k, recall_at_k, reciprocal_rank
from refrag.retrieval import (BM25Retriever, DenseRetriever, HashingEncoder, HybridRetriever, KnowledgeBase,
                              RetrievalManager, add_documents, load_encoder, make_retriever, prepare_kb,
                              read_documents)

ENCODER = "hashing:64"
DOCS = [
    {"id": "ada", "title": "Ada Quell", "content": "Ada Quell is a glassmaker born in Varossa in 1950.", "source": "bio"},
    {"id": "bram", "title": "Bram Toll", "content": "Bram Toll is a chemist born in Kesmir in 1961.", "source": "bio"},
    {"id": "lunor", "title": "Lunor Systems", "content": "Lunor Systems builds tidal turbines in Varossa.",
     "source": "registry"},
    {"id": "varossa", "title": "Varossa", "content": "Varossa is a river city; the Ferro River flows through it.",
     "source": "atlas", "metadata": {"type": "city"}},
    {"id": "kesmir", "title": "Kesmir", "content": "Kesmir is a mountain town famous for its clock market.",
     "source": "atlas"},
    {"id": "fair", "title": "Kesmir fair", "content": "At the Kesmir fair, Ada Quell showed new lenses.",
     "source": "news"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def docs_file(tmp_path):
    return write_jsonl(tmp_path / "documents.jsonl", DOCS)


@pytest.fixture
def kb_dir(tmp_path, docs_file):
    prepare_kb(docs_file, tmp_path / "kb", ENCODER, show_progress=False)
    return tmp_path / "kb"


# ---------------------------------------------------------------- documents.jsonl validation

@pytest.mark.parametrize("lines, message", [
    pytest.param(['{"id": "a", "title": "t", "content": "c", "source": "s"}', '{"id": "b", "title"'],
                 "documents.jsonl:2: malformed JSON", id="malformed-json-line2"),
    pytest.param(['{"id": "a", "title": "t", "content": "c", "source": "s"}'] * 2,
                 "documents.jsonl:2: duplicate document id 'a' (first on line 1)", id="duplicate-id"),
    pytest.param(['{"id": "a", "title": "t", "content": "  ", "source": "s"}'], "empty content", id="empty-content"),
    pytest.param(['{"id": "a", "title": "t", "source": "s"}'], "missing field(s) content", id="missing-field"),
    pytest.param(['{"id": "../etc", "title": "t", "content": "c", "source": "s"}'], "invalid document id",
                 id="path-escaping-id"),
    pytest.param(['{"id": "a", "title": "t", "content": "c", "source": "s", "extra": 1}'], "unknown field(s) extra",
                 id="unknown-field"),
    pytest.param(['{"id": "a", "title": 3, "content": "c", "source": "s"}'], "'title' must be a string",
                 id="non-string-title"),
    pytest.param(["[1, 2]"], "expected a JSON object", id="not-an-object"),
    pytest.param(["", "   "], "no documents", id="empty-kb"),
])
def test_bad_documents_rejected_with_file_and_line(tmp_path, lines, message):
    path = tmp_path / "documents.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="documents.jsonl") as err:
        read_documents(path)
    assert message in str(err.value)


def test_non_utf8_documents_rejected_with_line(tmp_path):
    path = tmp_path / "documents.jsonl"
    path.write_bytes(b'{"id": "a", "title": "t", "content": "c", "source": "s"}\n{"id": "b", "title": "\xff"}\n')
    with pytest.raises(ValueError, match=r"documents.jsonl:2: not valid UTF-8"):
        read_documents(path)


def test_blank_lines_and_metadata_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(DOCS[3]) + "\n\n", encoding="utf-8")
    assert read_documents(path) == [DOCS[3]]


# ---------------------------------------------------------------- KB build / load / integrity

def test_prepare_kb_writes_all_files_and_meta(kb_dir):
    names = {p.relative_to(kb_dir).as_posix() for p in kb_dir.rglob("*") if p.is_file()}
    assert {"documents.jsonl", "embeddings.npy", "index.faiss", "meta.json"} <= names
    assert any(n.startswith("bm25/") for n in names)
    assert not any(n.endswith((".pkl", ".pickle")) for n in names)
    meta = json.loads((kb_dir / "meta.json").read_text())
    assert (meta["encoder"], meta["dim"], meta["count"], meta["index_type"]) == (ENCODER, 64, len(DOCS), "flat_ip")
    assert len(meta["checksum"]) == 64
    kb = KnowledgeBase.load(kb_dir)
    assert kb.ids == [d["id"] for d in DOCS]
    assert kb.embeddings.shape == (len(DOCS), 64) and kb.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(kb.embeddings, axis=1), 1.0, rtol=1e-5)
    assert kb.stats()["per_source"] == {"bio": 2, "registry": 1, "atlas": 2, "news": 1}
    leftovers = [p.name for p in kb_dir.parent.glob(".kb.*") if p.name != ".kb.lock"]  # the lock file stays
    assert not leftovers, "temp or old directories left behind"


def test_hnsw_index_above_threshold(tmp_path, docs_file):
    kb = prepare_kb(docs_file, tmp_path / "kb", ENCODER, hnsw_threshold=3, show_progress=False)
    assert kb.meta()["index_type"] == "hnsw_ip"
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert loaded.meta()["index_type"] == "hnsw_ip"
    assert DenseRetriever(loaded).retrieve("Ada Quell glassmaker", 1)[0]["id"] == "ada"
    new = {"id": "zed", "title": "Zed Orrin", "content": "Zed Orrin repairs pressure clocks.", "source": "bio"}
    grown = loaded.add_documents([new], show_progress=False)
    assert (grown.index.ntotal, grown.meta()["index_type"]) == (len(DOCS) + 1, "hnsw_ip")
    assert DenseRetriever(grown).retrieve("Zed Orrin pressure clocks", 1)[0]["id"] == "zed"


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda d: (d / "index.faiss").unlink(), "missing file(s): index.faiss", id="missing-index"),
    pytest.param(lambda d: (d / "meta.json").unlink(), "no meta.json", id="missing-meta"),
    pytest.param(lambda d: shutil.rmtree(d / "bm25"), "missing file(s): bm25/", id="missing-bm25"),
    pytest.param(lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:-40]),
                 "checksum mismatch for embeddings.npy", id="truncated-embeddings"),
    pytest.param(lambda d: (d / "documents.jsonl").write_text("{}\n"), "checksum mismatch for documents.jsonl",
                 id="edited-documents"),
    pytest.param(lambda d: (d / "meta.json").write_text("{not json"), "meta.json: corrupted", id="corrupt-meta"),
])
def test_damaged_kb_fails_loudly(kb_dir, damage, message):
    damage(kb_dir)
    with pytest.raises(ValueError) as err:
        KnowledgeBase.load(kb_dir)
    assert message in str(err.value)


def test_meta_count_mismatch_reported_exactly(kb_dir):
    """A consistent checksum but wrong count in meta.json: the loader names both numbers."""
    meta = json.loads((kb_dir / "meta.json").read_text())
    meta["count"] = len(DOCS) + 1
    (kb_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"documents.jsonl has {len(DOCS)} documents, meta.json says {len(DOCS) + 1}"):
        KnowledgeBase.load(kb_dir)


def test_meta_file_entry_outside_kb_rejected(kb_dir):
    meta = json.loads((kb_dir / "meta.json").read_text())
    meta["files"]["../outside.txt"] = "0" * 64
    (kb_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="points outside the KB directory"):
        KnowledgeBase.load(kb_dir)


def test_encoder_dimension_mismatch(kb_dir):
    with pytest.raises(ValueError, match="embedding-dimension mismatch: encoder hashing:32 produces 32-dim"):
        KnowledgeBase.load(kb_dir, encoder="hashing:32")


def test_failed_rebuild_leaves_old_kb_intact(tmp_path, kb_dir):
    before = {p.name: p.read_bytes() for p in kb_dir.iterdir() if p.is_file()}
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS + [DOCS[0]])
    with pytest.raises(ValueError, match="duplicate document id"):
        prepare_kb(bad, kb_dir, ENCODER, show_progress=False)

    class ExplodingEncoder(HashingEncoder):
        def encode(self, texts, batch_size=64):
            raise RuntimeError("crash while embedding")

    with pytest.raises(RuntimeError, match="crash while embedding"):
        prepare_kb(tmp_path / "documents.jsonl", kb_dir, ExplodingEncoder(64), show_progress=False)
    assert {p.name: p.read_bytes() for p in kb_dir.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kb.lock", "bad.jsonl", "documents.jsonl", "kb"]
    KnowledgeBase.load(kb_dir)


def test_crash_while_writing_leaves_old_kb_and_no_temp_files(tmp_path, kb_dir, monkeypatch):
    import faiss

    before = {p.name: p.read_bytes() for p in kb_dir.iterdir() if p.is_file()}

    def crash(index, path):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_kb(write_jsonl(tmp_path / "fewer.jsonl", DOCS[:2]), kb_dir, ENCODER, show_progress=False)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in kb_dir.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kb.lock", "documents.jsonl", "fewer.jsonl", "kb"]
    assert len(KnowledgeBase.load(kb_dir)) == len(DOCS)


def test_refuses_to_overwrite_a_non_kb_directory(tmp_path, docs_file):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        prepare_kb(docs_file, precious, ENCODER, show_progress=False)
    assert (precious / "todo.txt").read_text() == "keep me"


def test_rebuild_replaces_existing_kb(tmp_path, kb_dir):
    fewer = write_jsonl(tmp_path / "fewer.jsonl", DOCS[:2])
    prepare_kb(fewer, kb_dir, ENCODER, show_progress=False)
    assert len(KnowledgeBase.load(kb_dir)) == 2


def test_add_documents_embeds_only_new_ones(tmp_path, kb_dir):
    new = [{"id": "zed", "title": "Zed Orrin", "content": "Zed Orrin repairs pressure clocks in Kesmir.", "source": "bio"}]
    old = KnowledgeBase.load(kb_dir)
    calls = []

    class CountingEncoder(HashingEncoder):
        def encode(self, texts, batch_size=64):
            calls.append(len(texts))
            return super().encode(texts, batch_size)

    grown = KnowledgeBase.load(kb_dir, encoder=CountingEncoder(64)).add_documents(new, show_progress=False)
    assert calls == [1]
    grown.save(kb_dir)
    kb = KnowledgeBase.load(kb_dir)
    assert len(kb) == len(DOCS) + 1 and kb.index.ntotal == len(DOCS) + 1
    np.testing.assert_array_equal(kb.embeddings[:len(DOCS)], old.embeddings)
    assert HybridRetriever(kb).retrieve("Zed Orrin pressure clocks", 1)[0]["id"] == "zed"
    with pytest.raises(ValueError, match="already in the knowledge base: zed"):
        add_documents(kb_dir, write_jsonl(tmp_path / "again.jsonl", new), show_progress=False)


# ---------------------------------------------------------------- retrievers

@pytest.fixture
def kb(kb_dir):
    return KnowledgeBase.load(kb_dir)


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_retrievers_find_the_named_entity(kb, kind):
    retriever = make_retriever(kind, kb)
    results = retriever.search(["Where was Bram Toll born?", "Which river flows through Varossa?"], top_k=2)
    assert [r[0]["id"] for r in results] == ["bram", "varossa"]
    for docs in results:
        assert set(docs[0]) == {"id", "title", "content", "score", "source"}
        assert docs[0]["score"] >= docs[1]["score"]


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_top_k_larger_than_kb_returns_every_document(kb, kind):
    docs = make_retriever(kind, kb).retrieve("Kesmir", top_k=50)
    assert sorted(d["id"] for d in docs) == sorted(d["id"] for d in DOCS)


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_filter_by_source(kb, kind):
    docs = make_retriever(kind, kb).retrieve("Ada Quell Kesmir", top_k=10, sources=["atlas", "news"])
    assert sorted(d["id"] for d in docs) == ["fair", "kesmir", "varossa"]
    assert docs[0]["id"] in ("fair", "kesmir")


def test_dense_filter_widens_search_until_top_k_found(tmp_path):
    many = [{"id": f"d{i}", "title": f"Doc {i}", "content": f"shared words about lamps number {i}",
             "source": "s1" if i < 40 else "s2"} for i in range(48)]
    kb = KnowledgeBase.build(many, ENCODER, show_progress=False)
    docs = DenseRetriever(kb).retrieve("lamps", top_k=5, sources=["s2"])
    assert len(docs) == 5 and all(d["source"] == "s2" for d in docs)


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda r: r.retrieve("x", top_k=0), "top_k must be a positive integer", id="top_k-0"),
    pytest.param(lambda r: r.retrieve("x", top_k=2.5), "top_k must be a positive integer", id="top_k-float"),
    pytest.param(lambda r: r.search("just one string"), "queries must be a list", id="bare-string"),
    pytest.param(lambda r: r.search(["ok", 3]), "every query must be a string", id="non-string-query"),
    pytest.param(lambda r: r.retrieve("x", sources=["wiki"]), "unknown source(s) ['wiki']", id="unknown-source"),
])
def test_bad_search_arguments(kb, call, message):
    with pytest.raises(ValueError) as err:
        call(HybridRetriever(kb))
    assert message in str(err.value)


def test_hybrid_minmax_is_the_alpha_blend_of_normalized_scores(kb):
    query = "glassmaker born in Varossa"
    hybrid = HybridRetriever(kb, alpha=0.7, candidates=len(DOCS))
    dense = kb.embeddings @ kb.encoder.encode([query])[0]
    sparse = BM25Retriever(kb).scores(query)
    norm = lambda x: (x - x.min()) / (x.max() - x.min())
    expected = 0.7 * norm(dense) + 0.3 * norm(sparse)
    got = {d["id"]: d["score"] for d in hybrid.retrieve(query, top_k=len(DOCS))}
    np.testing.assert_allclose([got[i] for i in kb.ids], expected, rtol=1e-5, atol=1e-6)


def test_hybrid_alpha_extremes_follow_each_component(kb):
    query = "Kesmir clock market"
    assert [d["id"] for d in HybridRetriever(kb, alpha=1.0, candidates=10).retrieve(query, 3)] == \
           [d["id"] for d in DenseRetriever(kb).retrieve(query, 3)]
    assert [d["id"] for d in HybridRetriever(kb, alpha=0.0, candidates=10).retrieve(query, 3)] == \
           [d["id"] for d in BM25Retriever(kb).retrieve(query, 3)]


def test_rrf_fusion_scores(kb):
    query = "Ada Quell lenses"
    hybrid = HybridRetriever(kb, fusion="rrf", candidates=len(DOCS))
    dense_rank = {d["id"]: r for r, d in enumerate(DenseRetriever(kb).retrieve(query, len(DOCS)), start=1)}
    sparse_rank = {d["id"]: r for r, d in enumerate(BM25Retriever(kb).retrieve(query, len(DOCS)), start=1)}
    for d in hybrid.retrieve(query, len(DOCS)):
        assert d["score"] == pytest.approx(1 / (60 + dense_rank[d["id"]]) + 1 / (60 + sparse_rank[d["id"]]))


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"alpha": 1.5}, "alpha must be in [0, 1]", id="alpha"),
    pytest.param({"fusion": "max"}, "fusion must be 'minmax' or 'rrf'", id="fusion"),
])
def test_bad_hybrid_options(kb, kwargs, message):
    with pytest.raises(ValueError) as err:
        HybridRetriever(kb, **kwargs)
    assert message in str(err.value)


def test_unknown_encoder_spec_is_an_error():
    with pytest.raises(ValueError, match="hub downloads are disabled"):
        load_encoder("sentence-transformers/some-remote-model")


# ---------------------------------------------------------------- manager

def test_manager_cache_and_copies(kb):
    manager = RetrievalManager("hybrid", knowledge_base=kb, cache_size=2)
    first = manager.retrieve("Bram Toll", 2)
    first[0]["content"] = "mutated by caller"
    again = manager.retrieve("Bram Toll", 2)
    assert again[0]["content"] != "mutated by caller"
    assert manager.cache_info()[:2] == (1, 1)
    manager.retrieve_many(["Ada", "Kesmir", "Ada"], 2)
    info = manager.cache_info()
    assert (info.hits, info.misses, info.size, info.maxsize) == (2, 3, 2, 2)


def test_manager_loads_kb_directory_and_rejects_bad_arguments(kb_dir):
    assert RetrievalManager("bm25", knowledge_base=kb_dir).retrieve("Varossa river", 1)[0]["id"] == "varossa"
    with pytest.raises(ValueError, match="unknown retriever type 'sparse'"):
        RetrievalManager("sparse", knowledge_base=kb_dir)
    with pytest.raises(ValueError, match="needs knowledge_base="):
        RetrievalManager("dense")


def test_augment_conversation_inserts_before_last_user(kb):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Where was Ada Quell born?"}],
            "metadata": {"id": "q1"}}
    out = RetrievalManager("hybrid", knowledge_base=kb).augment_conversation(conv, top_k=3)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "retrieval", "user"]
    retrieval = out["messages"][3]
    assert retrieval["query"] == "Where was Ada Quell born?" and len(retrieval["documents"]) == 3
    assert retrieval["documents"][0]["id"] == "ada"
    assert out["metadata"] == {"id": "q1", "retrieval_method": "hybrid", "num_retrieved": 3}
    assert len(conv["messages"]) == 4, "input conversation must not be modified"
    with pytest.raises(ValueError, match="no user message"):
        RetrievalManager("bm25", knowledge_base=kb).augment_conversation({"messages": []})


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "refrag.retrieval", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)


def test_cli_prepare_search_stats_add(tmp_path, docs_file):
    out = tmp_path / "kb"
    done = run_cli("prepare-kb", "--docs", str(docs_file), "--out", str(out), "--encoder", ENCODER)
    assert done.returncode == 0, done.stderr
    done = run_cli("search", "--kb", str(out), "--query", "Bram Toll chemist", "--top-k", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["documents"][0]["id"] == "bram"
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "title": "N", "content": "new doc", "source": "bio"}])
    assert run_cli("add", "--kb", str(out), "--docs", str(more)).returncode == 0
    done = run_cli("stats", "--kb", str(out))
    assert json.loads(done.stdout)["count"] == len(DOCS) + 1
    bad = run_cli("prepare-kb", "--docs", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "kb2"))
    assert bad.returncode == 2 and "documents file not found" in bad.stderr


# ---------------------------------------------------------------- metrics

def test_metric_values():
    retrieved = ["a", "b", "c", "d"]
    assert recall_at_k(retrieved, ["c", "z"], 3) == 0.5
    assert recall_at_k(retrieved, ["c"], 2) == 0.0
    assert reciprocal_rank(retrieved, ["z", "c"]) == pytest.approx(1 / 3)
    assert reciprocal_rank(retrieved, ["z"]) == 0.0
    assert ndcg_at_k(retrieved, ["a"], 5) == 1.0
    assert ndcg_at_k(retrieved, ["b", "d"], 4) == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))
    with pytest.raises(ValueError, match="at least one gold id"):
        recall_at_k(retrieved, [], 1)


@pytest.mark.slow
def test_embedded_kb_quality_with_minilm():
    """Real all-MiniLM-L6-v2 on the embedded KB: hybrid Recall@5 >= 0.9 on single-hop test questions."""
    from refrag.data.conversations import EMBEDDED_KB_DIR, load_queries

    kb = KnowledgeBase.build(read_documents(EMBEDDED_KB_DIR / "documents.jsonl"), "all-MiniLM-L6-v2",
                             batch_size=128, show_progress=False)
    assert kb.dim == 384 and kb.encoder_name == "all-MiniLM-L6-v2"
    records = load_queries("test")
    hybrid = evaluate_retriever(HybridRetriever(kb), records, ks=(1, 5))
    dense = evaluate_retriever(DenseRetriever(kb), [r for r in records if r["type"] == "single_hop"], ks=(5,))
    assert hybrid["single_hop"]["recall@5"] >= 0.9
    assert hybrid["contradictory"]["recall@5"] >= 0.9
    assert hybrid["two_hop"]["first_hop_recall@5"] >= 0.85
    assert hybrid["two_hop"]["both_hops_recall@5"] >= 0.8
    assert dense["single_hop"]["recall@5"] >= 0.8
