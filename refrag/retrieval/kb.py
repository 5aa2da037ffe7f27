"""On-disk knowledge base: documents, embeddings, FAISS index, BM25 index, meta.json.

Layout of a KB directory (written with `refrag.fileio.atomic_directory`: built in a temp
directory next to the target and swapped into place under the lock ``.NAME.lock``; a crash at
any point leaves the old or the new KB, and a swap interrupted between its two renames is
finished by the next `load`, `save` or `add_documents`; `add_documents` holds the lock from
reading the KB to writing it back, so concurrent adds queue instead of losing one another):

    documents.jsonl   validated documents, in index order
    embeddings.npy    float32 (count, dim), L2-normalized rows
    index.faiss       IndexFlatIP below `hnsw_threshold` documents, IndexHNSWFlat (inner product) above
    bm25/             bm25s index (numpy + json files, no pickle)
    meta.json         encoder, dim, count, index type, per-file sha256 and an overall checksum

`KnowledgeBase.load` verifies every file against meta.json and says exactly what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from refrag.fileio import atomic_directory, file_lock, jsonl_lines, lock_path, recover_directory, sha256_file
from refrag.data.documents import (check_no_overlap, document_text, parse_documents, read_documents,
                                        read_text_utf8, write_documents)
from refrag.retrieval.encoders import DEFAULT_ENCODER, Encoder, load_encoder

FORMAT_VERSION = 1
HNSW_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_SEARCH = 128
BM25_TOKENIZER = "lower-alnum-stopwords-v1"
STOPWORDS = frozenset(
    "a an and are as at be by for from has he her his in is it its of on or she that the their this "
    "to was were which who whom what where when how does did do with".split())
TOKEN_RE = re.compile(r"[a-z0-9]+")


def has_content(query: str) -> bool:
    """The query holds a word (any script) that is not an English stopword: something to search for."""
    return any(w not in STOPWORDS for w in re.findall(r"\w+", query.lower()))


def bm25_tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric words without English stopwords (the KB's BM25 analyzer)."""
    return [t for t in TOKEN_RE.findall(text.lower()) if t not in STOPWORDS]


def embed_texts(encoder: Encoder, texts: Sequence[str], batch_size: int, show_progress: bool) -> np.ndarray:
    """Encode in batches with a progress bar (shown once it runs 10 s): texts (n,) -> float32 (n, encoder.dim)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress, delay=10):
        chunks.append(encoder.encode(texts[start:start + batch_size], batch_size=batch_size))
    emb = np.concatenate(chunks, axis=0).astype(np.float32)
    if emb.shape != (len(texts), encoder.dim):
        raise ValueError(f"encoder {encoder.name} returned shape {emb.shape}, expected ({len(texts)}, {encoder.dim})")
    return emb


def build_faiss_index(embeddings: np.ndarray, hnsw_threshold: int):
    """IndexFlatIP (exact) for small KBs, IndexHNSWFlat with inner product above the threshold."""
    import faiss

    dim = embeddings.shape[1]
    if len(embeddings) < hnsw_threshold:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(embeddings)
    return index


def faiss_index_type(index) -> str:
    import faiss

    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw_ip"
    if isinstance(index, faiss.IndexFlatIP):
        return "flat_ip"
    return type(index).__name__


def search_index(index):
    """The index to search with: a GPU copy of a flat index when faiss has GPU support, else itself."""
    import faiss

    if faiss_index_type(index) == "flat_ip" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def build_bm25(documents: list[dict]):
    import bm25s

    bm25 = bm25s.BM25()
    bm25.index([bm25_tokenize(document_text(d)) for d in documents], show_progress=False)
    return bm25


@dataclass
class KnowledgeBase:
    """Documents plus their dense and sparse indexes. Build with `build`, persist with `save`,
    reopen with `load`; `add_documents` extends it without re-embedding existing documents."""

    documents: list[dict]
    embeddings: np.ndarray
    index: object
    bm25: object
    encoder_name: str
    path: Path | None = None
    _encoder: Encoder | None = field(default=None, repr=False)
    _search_index: object = field(default=None, repr=False)
    _positions: dict | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def encoder(self) -> Encoder:
        """The query encoder (loaded on first use from the spec in meta.json)."""
        if self._encoder is None:
            self._encoder = checked_encoder(load_encoder(self.encoder_name), self.dim, self.path)
        return self._encoder

    @property
    def faiss_index(self):
        if self._search_index is None:
            self._search_index = search_index(self.index)
        return self._search_index

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def ids(self) -> list[str]:
        return [d["id"] for d in self.documents]

    def document(self, doc_id: str) -> dict:
        """The document with this id (ValueError if absent)."""
        if self._positions is None:
            self._positions = {d["id"]: i for i, d in enumerate(self.documents)}
        if doc_id not in self._positions:
            raise ValueError(f"document id {doc_id!r} is not in the knowledge base")
        return self.documents[self._positions[doc_id]]

    @property
    def sources(self) -> list[str]:
        return sorted({d["source"] for d in self.documents})

    def source_mask(self, sources: Sequence[str] | None) -> np.ndarray | None:
        """bool (count,) of documents whose source is in `sources`; None means no filter."""
        if sources is None:
            return None
        if isinstance(sources, str):
            sources = [sources]
        if not sources:
            raise ValueError("sources is empty: name at least one source, or pass None to search all of them")
        unknown = sorted(set(sources) - set(self.sources))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; this KB has {self.sources}")
        wanted = set(sources)
        return np.array([d["source"] in wanted for d in self.documents], dtype=bool)

    @classmethod
    def build(cls, documents: list[dict], encoder: str | Encoder = DEFAULT_ENCODER, *, batch_size: int = 64,
              hnsw_threshold: int = HNSW_THRESHOLD, show_progress: bool = True) -> "KnowledgeBase":
        """Embed validated documents and build both indexes in memory."""
        if not documents:
            raise ValueError("no documents (an empty knowledge base cannot be built)")
        encoder = load_encoder(encoder)
        emb = embed_texts(encoder, [document_text(d) for d in documents], batch_size, show_progress)
        return cls(documents=list(documents), embeddings=emb, index=build_faiss_index(emb, hnsw_threshold),
                   bm25=build_bm25(documents), encoder_name=encoder.name, _encoder=encoder)

    def add_documents(self, documents: list[dict], *, batch_size: int = 64,
                      show_progress: bool = True) -> "KnowledgeBase":
        """A new KB with `documents` appended: only they are embedded and added to the FAISS index
        (index type unchanged); the BM25 index, cheap to build, is rebuilt over all documents."""
        check_no_overlap(self.ids, documents)
        import faiss

        emb = embed_texts(self.encoder, [document_text(d) for d in documents], batch_size, show_progress)
        index = faiss.clone_index(self.index)
        index.add(emb)
        all_docs = self.documents + list(documents)
        return KnowledgeBase(documents=all_docs, embeddings=np.concatenate([self.embeddings, emb]), index=index,
                             bm25=build_bm25(all_docs), encoder_name=self.encoder_name, path=self.path,
                             _encoder=self._encoder)

    def meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, "encoder": self.encoder_name, "dim": self.dim,
                "count": len(self), "index_type": faiss_index_type(self.index),
                "bm25_tokenizer": BM25_TOKENIZER, "sources": self.sources}

    def save(self, out: str | Path) -> Path:
        """Write the KB to `out` atomically (`refrag.fileio.atomic_directory`). Refuses to replace a
        non-empty directory that is not a KB. Returns the resolved path."""
        import faiss

        out = Path(out).resolve()
        check_writable_target(out)
        with atomic_directory(out) as tmp:
            write_documents(tmp / "documents.jsonl", self.documents)
            np.save(tmp / "embeddings.npy", self.embeddings, allow_pickle=False)
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            self.bm25.save(str(tmp / "bm25"), show_progress=False)
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            checksums = {name: sha256_file(tmp / name) for name in files}
            meta = {**self.meta(), "files": checksums, "checksum": overall_checksum(checksums)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path, encoder: str | Encoder | None = None) -> "KnowledgeBase":
        """Open a KB directory, verifying files, checksums, shapes and counts against meta.json.

        `encoder` overrides the query encoder named in meta.json; its dim must match the KB's.
        """
        import bm25s
        import faiss

        path = Path(path).resolve()
        for action in recover_directory(path):  # said, not silent: the user learns what a crash left
            print(f"note: {action}", file=sys.stderr)
        meta = read_meta(path)
        verify_files(path, meta)
        docs = parse_documents(jsonl_lines(read_text_utf8(path / "documents.jsonl")),
                               str(path / "documents.jsonl"))
        emb = load_embeddings(path / "embeddings.npy")
        index = read_faiss_index(path / "index.faiss")
        bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False, verbosity=0)
        check_consistency(path, meta, docs, emb, index, bm25)
        enc = None if encoder is None else checked_encoder(load_encoder(encoder), meta["dim"], path)
        return cls(documents=docs, embeddings=emb, index=index, bm25=bm25, encoder_name=meta["encoder"],
                   path=path, _encoder=enc)

    def stats(self) -> dict:
        """Summary: meta fields plus documents per source and content length statistics (words)."""
        words = np.array([len(d["content"].split()) for d in self.documents])
        per_source: dict[str, int] = {}
        for d in self.documents:
            per_source[d["source"]] = per_source.get(d["source"], 0) + 1
        return {**self.meta(), "path": str(self.path) if self.path else None, "per_source": per_source,
                "content_words": {"min": int(words.min()), "mean": round(float(words.mean()), 1),
                                  "max": int(words.max())}}


def overall_checksum(checksums: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(checksums.items())).encode()).hexdigest()


def checked_encoder(encoder: Encoder, dim: int, path: Path | None) -> Encoder:
    if encoder.dim != dim:
        raise ValueError(f"embedding-dimension mismatch: encoder {encoder.name} produces {encoder.dim}-dim "
                         f"vectors but the KB {path or '(in memory)'} holds {dim}-dim embeddings")
    return encoder


def check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise ValueError(f"refusing to replace {out}: it exists and is not a knowledge base directory")


def check_writable_target(out: Path) -> None:
    """`out` can be (re)written as a KB: replaceable, and its parent a writable directory (checked by
    creating its lock file, so an unwritable target fails before any embedding)."""
    check_replaceable(out)
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ValueError(f"cannot write the knowledge base to {out}: {parent} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the knowledge base to {out}: {e.strerror} ({e.filename})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK | os.X_OK)):
        raise ValueError(f"cannot write the knowledge base to {out}: permission denied")
    with file_lock(lock_path(out), what=f"knowledge base {out}"):
        pass


def read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"knowledge base directory {path} does not exist")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{path} has no meta.json: not a KB written by prepare-kb (or its build was interrupted)")
    try:
        meta = json.loads(read_text_utf8(meta_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: corrupted ({e.msg} at line {e.lineno})") from None
    required = ("format_version", "encoder", "dim", "count", "index_type", "files", "checksum")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta['format_version']} is not supported "
                         f"(expected {FORMAT_VERSION}); rebuild with prepare-kb")
    return meta


def verify_files(path: Path, meta: dict) -> None:
    """Every file listed in meta.json exists inside `path` and matches its sha256."""
    files: dict = meta["files"]
    for name in files:
        target = (path / name).resolve()
        if Path(name).is_absolute() or path not in target.parents:
            raise ValueError(f"{path / 'meta.json'}: file entry {name!r} points outside the KB directory")
    needed = ["documents.jsonl", "embeddings.npy", "index.faiss"]
    absent = [n for n in needed if n not in files] + [n for n in files if not (path / n).is_file()]
    if not any(n.startswith("bm25/") for n in files):
        absent.append("bm25/")
    if absent:
        raise ValueError(f"KB {path} is missing file(s): {', '.join(absent)}; rebuild with prepare-kb")
    if overall_checksum(files) != meta["checksum"]:
        raise ValueError(f"{path / 'meta.json'}: checksum does not match its file list (meta.json was edited)")
    for name, digest in files.items():
        if sha256_file(path / name) != digest:
            raise ValueError(f"checksum mismatch for {name} in KB {path}: the file is corrupted or changed "
                             "since meta.json was written; rebuild with prepare-kb")


def load_embeddings(path: Path) -> np.ndarray:
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable embeddings ({e})") from None
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise ValueError(f"{path}: expected a float32 (count, dim) array, got {emb.dtype} {emb.shape}")
    return emb


def read_faiss_index(path: Path):
    """faiss.read_index with FAISS's C++ errors (truncated or corrupted file) turned into a ValueError."""
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
        raise ValueError(f"{path}: unreadable FAISS index ({first_line})") from None


def index_matches_embeddings(index, emb: np.ndarray, samples: int = 64) -> bool:
    """Spot-check that evenly spaced index vectors equal the rows of embeddings.npy."""
    if index.ntotal == 0:
        return True
    rows = np.unique(np.linspace(0, index.ntotal - 1, num=min(samples, index.ntotal)).astype(np.int64))
    stored = np.stack([index.reconstruct(int(i)) for i in rows])
    return bool(np.allclose(stored, emb[rows], atol=1e-5))


def check_consistency(path: Path, meta: dict, docs: list[dict], emb: np.ndarray, index, bm25) -> None:
    """Counts and dims agree across documents, embeddings, FAISS, BM25 and meta.json."""
    problems = []
    if len(docs) != meta["count"]:
        problems.append(f"documents.jsonl has {len(docs)} documents, meta.json says {meta['count']}")
    if emb.shape != (meta["count"], meta["dim"]):
        problems.append(f"embeddings.npy has shape {emb.shape}, meta.json says ({meta['count']}, {meta['dim']})")
    if index.d != meta["dim"]:
        problems.append(f"index.faiss has dim {index.d}, meta.json says {meta['dim']}")
    if index.ntotal != len(docs):
        problems.append(f"index.faiss holds {index.ntotal} vectors for {len(docs)} documents")
    elif emb.shape == (index.ntotal, index.d) and not index_matches_embeddings(index, emb):
        problems.append("index.faiss vectors differ from embeddings.npy (index from another KB?)")
    n_bm25 = int(bm25.scores["num_docs"])
    if n_bm25 != len(docs):
        problems.append(f"bm25 index holds {n_bm25} documents for {len(docs)} documents")
    if problems:
        raise ValueError(f"inconsistent KB {path}: " + "; ".join(problems))


def prepare_kb(docs_path: str | Path, out: str | Path, encoder: str | Encoder = DEFAULT_ENCODER, *,
               batch_size: int = 64, hnsw_threshold: int = HNSW_THRESHOLD,
               show_progress: bool = True) -> KnowledgeBase:
    """Validate `docs_path` (documents.jsonl), embed, index and write the KB to `out` atomically.
    `out` is checked writable before any embedding."""
    out = Path(out).resolve()
    check_writable_target(out)
    documents = read_documents(docs_path)
    encoder = load_encoder(encoder)
    with file_lock(lock_path(out), what=f"knowledge base {out}"):
        kb = KnowledgeBase.build(documents, encoder, batch_size=batch_size,
                                 hnsw_threshold=hnsw_threshold, show_progress=show_progress)
        kb.save(out)
    return kb


def add_documents(kb_path: str | Path, docs_path: str | Path, *, batch_size: int = 64,
                  show_progress: bool = True) -> KnowledgeBase:
    """Append the documents of `docs_path` to the KB at `kb_path` (embedding only them), atomically.
    The KB's lock is held from reading to writing back, so concurrent adds are serialized."""
    new_docs = read_documents(docs_path)
    kb_path = Path(kb_path).resolve()
    with file_lock(lock_path(kb_path), what=f"knowledge base {kb_path}"):
        kb = KnowledgeBase.load(kb_path).add_documents(new_docs, batch_size=batch_size,
                                                       show_progress=show_progress)
        kb.save(kb_path)
    return kb
