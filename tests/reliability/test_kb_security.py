"""Knowledge-base integrity on load and safe deserialization (KB files and checkpoints).

tests/test_retrieval.py already covers missing files, checksum mismatches of embeddings and
documents, a corrupt meta.json, a wrong count in meta.json, a meta.json entry with `..`, the
encoder-dimension override and path-like document ids. Here: damage to index.faiss itself
(truncated, bit-flipped, replaced by another index, with and without a re-hashed meta.json so
that the loader's own consistency checks are reached), meta.json dim / encoder edits, absolute
and symlinked file entries, pickled payloads in embeddings.npy and in checkpoints, and a source
scan that every loader in the project refuses pickle.
"""
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")  # the RAG extra; a GPU image without it skips these instead of failing

from refrag.retrieval import DenseRetriever, KnowledgeBase, prepare_kb
from refrag.retrieval.kb import overall_checksum, sha256_file
from refrag.train import checkpoint as ckpt

ENCODER = "hashing:32"
DOCS = [
    {"id": f"doc-{i}", "title": f"Entity {i}", "content": f"Entity {i} makes {word} in town {i % 3}.", "source": "s"}
    for i, word in enumerate(["lenses", "clocks", "turbines", "glass", "maps", "bells"])
]
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def kb_dir(tmp_path):
    docs = tmp_path / "documents.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    prepare_kb(docs, tmp_path / "kb", ENCODER, show_progress=False)
    return tmp_path / "kb"


def rehash_meta(kb_dir: Path, **changes) -> None:
    """Rewrite meta.json as a consistent one for the files now on disk (plus `changes`), so
    that only the loader's structural checks can catch the damage."""
    meta = json.loads((kb_dir / "meta.json").read_text())
    meta["files"] = {name: sha256_file(kb_dir / name) for name in meta["files"]}
    meta["checksum"] = overall_checksum(meta["files"])
    meta.update(changes)
    (kb_dir / "meta.json").write_text(json.dumps(meta))


def load_error(kb_dir: Path) -> str:
    with pytest.raises(ValueError) as err:
        KnowledgeBase.load(kb_dir)
    return str(err.value)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_byte(path: Path, offset_from_end: int = 12) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def write_index(path: Path, vectors: np.ndarray) -> None:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(path))


# ----------------------------------------------------------------------------- item 10: integrity


@pytest.mark.parametrize("damage", [pytest.param(truncate, id="truncated"), pytest.param(flip_byte, id="bit-flip")])
def test_damaged_index_is_caught_by_its_checksum(kb_dir, damage):
    damage(kb_dir / "index.faiss")
    assert "checksum mismatch for index.faiss" in load_error(kb_dir)


def test_truncated_index_with_consistent_meta_fails_with_a_clear_error(kb_dir):
    """Even when meta.json was regenerated for the damaged file, the FAISS reader's failure
    surfaces as a ValueError naming index.faiss (not a RuntimeError from the C++ reader)."""
    truncate(kb_dir / "index.faiss")
    rehash_meta(kb_dir)
    assert "index.faiss" in load_error(kb_dir)


def test_index_with_fewer_vectors_than_documents_is_refused(kb_dir):
    kb = KnowledgeBase.load(kb_dir)
    write_index(kb_dir / "index.faiss", kb.embeddings[:-1])
    rehash_meta(kb_dir)
    assert f"index.faiss holds {len(DOCS) - 1} vectors for {len(DOCS)} documents" in load_error(kb_dir)


def test_index_that_disagrees_with_the_embeddings_is_refused(kb_dir):
    """An index of the right size and dim holding other vectors (e.g. copied from another KB)
    would silently return the wrong documents: the loader must compare it to embeddings.npy."""
    kb = KnowledgeBase.load(kb_dir)
    write_index(kb_dir / "index.faiss", np.ascontiguousarray(kb.embeddings[::-1]))
    rehash_meta(kb_dir)
    assert "index.faiss" in load_error(kb_dir)


def test_meta_dim_that_disagrees_with_the_files_is_refused(kb_dir):
    rehash_meta(kb_dir, dim=64)
    error = load_error(kb_dir)
    assert "embeddings.npy has shape" in error and "index.faiss has dim 32, meta.json says 64" in error


def test_meta_encoder_of_another_dimension_fails_before_any_search(kb_dir):
    rehash_meta(kb_dir, encoder="hashing:48")
    kb = KnowledgeBase.load(kb_dir)
    with pytest.raises(ValueError, match="embedding-dimension mismatch: encoder hashing:48 produces 48-dim"):
        DenseRetriever(kb).retrieve("Entity 1 clocks", 1)


def test_unknown_meta_encoder_is_a_clear_error(kb_dir):
    rehash_meta(kb_dir, encoder="sentence-transformers/some-hub-model")
    kb = KnowledgeBase.load(kb_dir)
    with pytest.raises(ValueError, match="hub downloads are disabled"):
        DenseRetriever(kb).retrieve("Entity 1 clocks", 1)


def test_intact_kb_returns_the_right_documents(kb_dir):
    """Guard for the tests above: the undamaged KB loads and retrieves by content."""
    kb = KnowledgeBase.load(kb_dir)
    assert kb.index.ntotal == len(DOCS) == json.loads((kb_dir / "meta.json").read_text())["count"]
    assert DenseRetriever(kb).retrieve(DOCS[2]["content"], 1)[0]["id"] == DOCS[2]["id"]


# ----------------------------------------------------------------------------- item 11: paths


def test_absolute_file_entry_in_meta_is_refused(kb_dir, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    meta = json.loads((kb_dir / "meta.json").read_text())
    meta["files"][str(outside)] = sha256_file(outside)
    meta["checksum"] = overall_checksum(meta["files"])
    (kb_dir / "meta.json").write_text(json.dumps(meta))
    assert "points outside the KB directory" in load_error(kb_dir)


def test_symlink_to_a_file_outside_the_kb_is_refused(kb_dir, tmp_path):
    """documents.jsonl replaced by a symlink to an identical file outside the KB: same bytes, same
    checksum, but the KB would read outside its directory."""
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_bytes((kb_dir / "documents.jsonl").read_bytes())
    (kb_dir / "documents.jsonl").unlink()
    (kb_dir / "documents.jsonl").symlink_to(outside)
    assert "points outside the KB directory" in load_error(kb_dir)


def test_symlinked_kb_directory_loads_from_its_target(kb_dir, tmp_path):
    link = tmp_path / "kb-link"
    link.symlink_to(kb_dir, target_is_directory=True)
    assert KnowledgeBase.load(link).path == kb_dir.resolve()


# ----------------------------------------------------------------------------- item 11: no pickle


class WritesMarker:
    """Unpickling this object would create `path`: proof that pickled code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_embeddings_are_refused_without_unpickling(kb_dir, tmp_path):
    marker = tmp_path / "pwned"
    np.save(kb_dir / "embeddings.npy", np.array([WritesMarker(marker)], dtype=object), allow_pickle=True)
    rehash_meta(kb_dir)
    assert "unreadable embeddings" in load_error(kb_dir)
    assert not marker.exists()


def test_checkpoint_with_a_pickled_object_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = ckpt.save_checkpoint(tmp_path / "ckpts", 1, model_state={"w": torch.zeros(2), "evil": WritesMarker(marker)},
                                optimizer_state={}, trainer_state={}, config={"train": {}, "model": {}})
    ckpt.verify_checkpoint(path)  # the manifest is valid: only weights_only loading stands in the way
    with pytest.raises((ckpt.CheckpointError, pickle.UnpicklingError)):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


LOADERS = re.compile(r"\b(torch\.load|np\.load|numpy\.load|pickle\.loads?|joblib\.load|dill\.loads?|"
                     r"cloudpickle\.loads?|shelve\.open|faiss\.deserialize_index)\s*\(")


def loader_calls():
    """(file, line number, call text through its closing line) of every deserializing call in
    kernels/ and refrag/."""
    calls = []
    for path in sorted((PROJECT / "kernels").rglob("*.py")) + sorted((PROJECT / "refrag").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if LOADERS.search(line):
                calls.append((path.relative_to(PROJECT), i + 1, " ".join(lines[i:i + 3])))
    return calls


def test_every_loader_in_the_project_refuses_pickle():
    calls = loader_calls()
    assert calls, "no loader found: the scan is broken"
    for path, lineno, text in calls:
        where = f"{path}:{lineno}"
        assert not re.search(r"pickle\.|joblib|dill|cloudpickle|shelve", text), f"{where}: pickle-based loader"
        if "torch.load" in text:
            assert "weights_only=True" in text, f"{where}: torch.load without weights_only=True"
        if re.search(r"\bn(p|umpy)\.load", text):
            assert "allow_pickle=False" in text, f"{where}: np.load without allow_pickle=False"
