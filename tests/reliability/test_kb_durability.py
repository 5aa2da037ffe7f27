"""Issue 23: nothing lost, nothing silent in the knowledge-base, retrieval and eval tools.

Line-separator characters in documents (item 1), concurrent `add`s (item 2), a writer killed
between the two renames of the directory swap or while writing (item 3), dense search over an
HNSW index (item 6), accepted bad input (item 10) and internal tracebacks instead of clear
errors (item 11).
Encoders are `hashing:<dim>` (no model download); killed writers are real subprocesses.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from refrag.retrieval import (DenseRetriever, KnowledgeBase, RetrievalManager, add_documents, make_retriever,
                              prepare_kb, read_documents)
from refrag.retrieval.__main__ import main as retrieval_main
from refrag.retrieval.encoders import HashingEncoder, load_encoder

ENCODER = "hashing:32"
SUBPROCESS_TIMEOUT_S = 120


def doc(i: int, content: str | None = None, source: str = "s") -> dict:
    return {"id": f"doc-{i}", "title": f"Entity {i}", "content": content or f"Entity {i} makes item {i}.",
            "source": source}


def write_docs(path, docs) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return str(path)


@pytest.fixture
def kb_dir(tmp_path):
    prepare_kb(write_docs(tmp_path / "base.jsonl", [doc(i) for i in range(4)]), tmp_path / "kb", ENCODER,
               show_progress=False)
    return tmp_path / "kb"


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (PYTHONPATH inherited) and return the finished process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, env={**os.environ, "TRITON_INTERPRET": "0"})


# ---------------------------------------------------------------------------------- item 1


def test_line_separator_characters_survive_prepare_add_and_load(tmp_path):
    """U+2028, U+2029 and U+0085 (JSON escapes, or raw inside a string) are content, not line ends."""
    odd = "first\u2028second\u2029third\u0085fourth"
    escaped = tmp_path / "escaped.jsonl"
    escaped.write_text(json.dumps(doc(0, odd)) + "\n" + json.dumps(doc(1)) + "\n", encoding="utf-8")
    kb = prepare_kb(escaped, tmp_path / "kb", ENCODER, show_progress=False)
    raw = tmp_path / "raw.jsonl"  # the same characters unescaped inside the JSON string
    raw.write_text(json.dumps(doc(2, odd), ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in raw.read_text(encoding="utf-8")
    add_documents(tmp_path / "kb", raw, show_progress=False)
    add_documents(tmp_path / "kb", write_docs(tmp_path / "more.jsonl", [doc(3)]), show_progress=False)
    kb = KnowledgeBase.load(tmp_path / "kb")
    assert kb.ids == ["doc-0", "doc-1", "doc-2", "doc-3"]
    assert kb.document("doc-0")["content"] == odd and kb.document("doc-2")["content"] == odd


# ---------------------------------------------------------------------------------- item 2


def test_concurrent_adds_keep_both_updates(tmp_path, kb_dir, monkeypatch):
    """Two adds that both read the KB before either writes it back: both documents survive."""
    real_encode = HashingEncoder.encode

    def slow_encode(self, texts, batch_size=64):
        time.sleep(0.5)  # both adds are past their load before either saves (without the lock)
        return real_encode(self, texts, batch_size)

    monkeypatch.setattr(HashingEncoder, "encode", slow_encode)
    errors = []

    def add(i):
        try:
            add_documents(kb_dir, write_docs(tmp_path / f"new{i}.jsonl", [doc(10 + i)]), show_progress=False)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SUBPROCESS_TIMEOUT_S)
    assert not errors, errors
    assert sorted(KnowledgeBase.load(kb_dir).ids) == sorted([f"doc-{i}" for i in range(4)] + ["doc-10", "doc-11"])


# ---------------------------------------------------------------------------------- item 3

KILL_BETWEEN_RENAMES = """
    import os, sys
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in os.fspath(dst):  # the KB was moved aside; the new copy is not in place yet
            os._exit(9)
    os.rename = rename
    from refrag.retrieval.__main__ import main
    main(["add", "--kb", {kb!r}, "--docs", {docs!r}])
"""

KILL_WHILE_WRITING = """
    import os
    import faiss
    faiss.write_index = lambda index, path: os._exit(9)  # killed half way through writing the new copy
    from refrag.retrieval.__main__ import main
    main(["add", "--kb", {kb!r}, "--docs", {docs!r}])
"""


def kb_leftovers(kb_dir) -> list[str]:
    return sorted(p.name for p in kb_dir.parent.iterdir() if p.name.startswith(f".{kb_dir.name}.")
                  and not p.name.endswith(".lock"))


def test_add_killed_between_the_two_renames_is_recovered_by_the_next_stats(tmp_path, kb_dir, capsys):
    docs = write_docs(tmp_path / "new.jsonl", [doc(10), doc(11)])
    killed = run_python(KILL_BETWEEN_RENAMES.format(kb=str(kb_dir), docs=docs))
    assert killed.returncode == 9, killed.stderr
    assert not kb_dir.exists() and kb_leftovers(kb_dir), "the kill did not land between the renames"
    retrieval_main(["stats", "--kb", str(kb_dir)])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] == 6  # the new copy was complete before the first rename
    assert "finished the interrupted swap" in captured.err
    assert kb_leftovers(kb_dir) == []
    assert KnowledgeBase.load(kb_dir).ids[-2:] == ["doc-10", "doc-11"]


def test_add_killed_while_writing_leaves_the_kb_and_its_temp_copy_is_cleaned(tmp_path, kb_dir, capsys):
    killed = run_python(KILL_WHILE_WRITING.format(kb=str(kb_dir), docs=write_docs(tmp_path / "n.jsonl", [doc(10)])))
    assert killed.returncode == 9, killed.stderr
    assert any(".tmp-" in name for name in kb_leftovers(kb_dir)), "the kill left no temp copy to clean"
    retrieval_main(["stats", "--kb", str(kb_dir)])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["count"] == 4 and "deleted stale .kb.tmp-" in captured.err
    assert kb_leftovers(kb_dir) == []


# ---------------------------------------------------------------------------------- item 6


def test_dense_search_over_hnsw_returns_top_k(tmp_path):
    """HNSW may return fewer hits than asked (efSearch bounds its candidates): exact search completes them."""
    docs = [doc(i, f"entity {i} word{i % 7} thing{i % 13}", source="rare" if i % 40 == 0 else "common")
            for i in range(400)]
    kb = KnowledgeBase.build(docs, ENCODER, hnsw_threshold=1, show_progress=False)
    assert kb.meta()["index_type"] == "hnsw_ip"
    dense = DenseRetriever(kb)
    assert len(dense.retrieve("entity word3", top_k=400)) == 400
    ranked = dense.retrieve("entity word3", top_k=1000, sources=["rare"])
    assert sorted(d["id"] for d in ranked) == sorted(d["id"] for d in docs if d["source"] == "rare")
    exact = np.argsort(-(kb.embeddings @ kb.encoder.encode(["entity word3"])[0]), kind="stable")[:400]
    assert {d["id"] for d in dense.retrieve("entity word3", top_k=400)} == {docs[i]["id"] for i in exact}


# ---------------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("line, match", [
    ('{"id": "abc\\n", "title": "t", "content": "c", "source": "s"}', "invalid document id"),
    ('{"id": "a", "id": "b", "title": "t", "content": "c", "source": "s"}', "duplicate key 'id'"),
    ('{"id": "a", "title": "t", "content": "c", "source": "s", "metadata": {"score": NaN}}', "NaN"),
    ('{"id": "a", "title": "t", "content": "c", "source": "s", "metadata": {"w": [-Infinity]}}', "Infinity"),
], ids=["id-with-trailing-newline", "duplicate-key", "nan-metadata", "infinity-metadata"])
def test_bad_document_lines_are_refused_with_file_and_line(tmp_path, line, match):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(doc(0)) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"docs\.jsonl:2: .*{match}"):
        read_documents(path)


def test_empty_and_content_free_queries(kb_dir):
    kb = KnowledgeBase.load(kb_dir)
    for kind in ("dense", "bm25", "hybrid"):
        retriever = make_retriever(kind, kb)
        for query in ("", "   \n"):
            with pytest.raises(ValueError, match="query 0 is empty"):
                retriever.retrieve(query)
        assert retriever.search(["the of and", "?!", "Entity 2"], top_k=3)[:2] == [[], []]
        with pytest.raises(ValueError, match="sources is empty"):
            retriever.retrieve("Entity 2", sources=[])
    with pytest.raises(ValueError, match="list of strings"):
        RetrievalManager("bm25", knowledge_base=kb).retrieve_many("abc")


@pytest.mark.parametrize("flag", [["--limit", "-1"], ["--limit", "0"], ["--top-k", "0"], ["--max-new-tokens", "0"],
                                  ["--batch-size", "0"]], ids=lambda flag: "".join(flag))
def test_eval_cli_refuses_non_positive_counts(flag, capsys):
    from refrag.eval.__main__ import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["answers", "--checkpoint", "ckpt", *flag])
    assert exit_info.value.code == 2 and flag[0] in capsys.readouterr().err


def test_huge_hashing_encoder_is_refused():
    with pytest.raises(ValueError, match="hashing encoder dim must be 1..4096"):
        load_encoder("hashing:100000000")


# ---------------------------------------------------------------------------------- item 11


def test_deeply_nested_metadata_is_a_clear_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    nested = '{"a": ' * 100_000 + "1" + "}" * 100_000
    path.write_text(f'{{"id": "a", "title": "t", "content": "c", "source": "s", "metadata": {nested}}}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: JSON nested too deeply"):
        read_documents(path)


def test_unwritable_kb_target_fails_before_embedding(tmp_path, monkeypatch):
    import refrag.retrieval.kb as kb_module

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking that the output can be written")

    monkeypatch.setattr(kb_module, "embed_texts", no_embedding)
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write the knowledge base"):
        prepare_kb(write_docs(tmp_path / "d.jsonl", [doc(0)]), tmp_path / "a_file" / "kb", ENCODER, show_progress=False)


def test_query_with_a_lone_surrogate_is_a_clear_error(kb_dir):
    for kind in ("dense", "bm25", "hybrid"):
        with pytest.raises(ValueError, match="query 0 is not valid Unicode"):
            make_retriever(kind, KnowledgeBase.load(kb_dir)).retrieve("Entity \ud800 2")


def test_unwritable_json_output_fails_before_any_evaluation(tmp_path, capsys):
    from refrag.eval.__main__ import main as eval_main

    with pytest.raises(SystemExit) as exit_info:
        eval_main(["answers", "--checkpoint", str(tmp_path / "no-such-run"), "--json", str(tmp_path / "no-dir" / "m.json")])
    assert exit_info.value.code == 2 and "--json" in capsys.readouterr().err


def test_tokenizer_path_that_is_a_folder_is_a_clear_error(tmp_path):
    from refrag.train.config import TrainConfig
    from refrag.train.data import prepare_tokenizer
    from refrag.train.shims import init_distributed

    with pytest.raises(ValueError, match="is a directory"):
        prepare_tokenizer(TrainConfig(tokenizer=str(tmp_path)), init_distributed("cpu"))
