"""Issue 23: nothing lost, nothing silent in the knowledge-base tools.

Line-separator characters in documents (item 1), concurrent `add`s (item 2), a writer killed
between the two renames of the directory swap or while writing (item 3), dense search over an
HNSW index (item 6), accepted bad input (item 10) and internal tracebacks (item 11).
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

from refrag.retrieval import KnowledgeBase, add_documents, prepare_kb
from refrag.retrieval.__main__ import main as retrieval_main
from refrag.retrieval.encoders import HashingEncoder

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
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 6  # the new copy was complete before the first rename: the swap is finished
    assert kb_leftovers(kb_dir) == []
    assert KnowledgeBase.load(kb_dir).ids[-2:] == ["doc-10", "doc-11"]


def test_add_killed_while_writing_leaves_the_kb_and_its_temp_copy_is_cleaned(tmp_path, kb_dir, capsys):
    killed = run_python(KILL_WHILE_WRITING.format(kb=str(kb_dir), docs=write_docs(tmp_path / "n.jsonl", [doc(10)])))
    assert killed.returncode == 9, killed.stderr
    assert any(".tmp-" in name for name in kb_leftovers(kb_dir)), "the kill left no temp copy to clean"
    retrieval_main(["stats", "--kb", str(kb_dir)])
    assert json.loads(capsys.readouterr().out)["count"] == 4
    assert kb_leftovers(kb_dir) == []
