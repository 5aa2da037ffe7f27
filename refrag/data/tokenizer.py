"""Byte-level BPE tokenizer (HF `tokenizers`) with the structured RAG tokens as real special tokens.

Special tokens (ids 0..N-1, never produced from plain text: text that spells "[USER]" is
encoded byte by byte): [PAD] [BOS] [EOS] [SYS] [/SYS] [USER] [/USER] [ASST] [/ASST]
[QUERY] [/QUERY] [RETRIEVAL_START] [RETRIEVAL_END] [DOC_1]..[DOC_16] [/DOC_1]..[/DOC_16].

CLI: python -m refrag.data.tokenizer train --kb refrag/data/kb --out tokenizer.json [--vocab-size 4096]
(--kb is a KB source directory with documents.jsonl and optional queries/*.jsonl, or a documents.jsonl).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from refrag.data.schema import MAX_DOCS_PER_BLOCK
from refrag.fileio import jsonl_lines
from refrag.data.documents import document_text, read_documents, read_text_utf8
from refrag.validate import number_arg

ROLE_TOKENS = ["[SYS]", "[/SYS]", "[USER]", "[/USER]", "[ASST]", "[/ASST]", "[QUERY]", "[/QUERY]"]
SPECIAL_TOKENS = (["[PAD]", "[BOS]", "[EOS]"] + ROLE_TOKENS + ["[RETRIEVAL_START]", "[RETRIEVAL_END]"]
                  + [f"[DOC_{k}]" for k in range(1, MAX_DOCS_PER_BLOCK + 1)]
                  + [f"[/DOC_{k}]" for k in range(1, MAX_DOCS_PER_BLOCK + 1)])
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_TOKENIZER_PATH = Path(__file__).parent / "kb" / "tokenizer.json"


class RagTokenizer:
    """Wraps a `tokenizers.Tokenizer` that has every SPECIAL_TOKENS entry as an added special token."""

    def __init__(self, tokenizer: Tokenizer):
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        missing = [t for t in SPECIAL_TOKENS if t not in added]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.special_ids = {t: added[t] for t in SPECIAL_TOKENS}
        # Training data repeats texts (system prompt, documents, questions) many times over.
        self._encode = functools.lru_cache(maxsize=1 << 17)(
            lambda text: tuple(tokenizer.encode(text, add_special_tokens=False).ids))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2) -> "RagTokenizer":
        """Train byte-level BPE on `texts`; special tokens take ids 0..len(SPECIAL_TOKENS)-1."""
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_TOKENIZER_PATH) -> "RagTokenizer":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found (train one: python -m refrag.data.tokenizer train)")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer file ({e})") from None

    @classmethod
    def extend(cls, path: str | Path) -> "RagTokenizer":
        """Any `tokenizers` tokenizer.json (e.g. a transformers checkpoint's) with every missing
        SPECIAL_TOKENS entry added as a special token (new ids after its vocabulary, in
        SPECIAL_TOKENS order); its truncation and padding settings are switched off."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer file ({e})") from None
        tok.no_truncation()
        tok.no_padding()
        have = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS if t not in have])
        return cls(tok)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of a special token, e.g. token_id("[DOC_3]")."""
        if token not in self.special_ids:
            raise ValueError(f"{token!r} is not a special token")
        return self.special_ids[token]

    @property
    def pad_id(self) -> int:
        return self.special_ids["[PAD]"]

    @property
    def bos_id(self) -> int:
        return self.special_ids["[BOS]"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["[EOS]"]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token spellings in the text are encoded as ordinary bytes."""
        return list(self._encode(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path | None = None) -> RagTokenizer:
    """The tokenizer at `path`, default: the one shipped with the embedded KB."""
    return RagTokenizer.load(DEFAULT_TOKENIZER_PATH if path is None else path)


def corpus_texts(kb: str | Path) -> Iterator[str]:
    """Document texts, then the training questions and answers (queries/train.jsonl) when `kb` is
    a directory: validation and test questions are never part of a tokenizer's corpus."""
    kb = Path(kb)
    docs_path = kb / "documents.jsonl" if kb.is_dir() else kb
    for doc in read_documents(docs_path):
        yield document_text(doc)
    if kb.is_dir():
        for split in sorted((kb / "queries").glob("train.jsonl")):
            for line in jsonl_lines(read_text_utf8(split)):
                if line.strip():
                    record = json.loads(line)
                    yield record.get("question", "")
                    yield record.get("answer", "")
                    for hop in record.get("hops", []):
                        yield hop.get("query", "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refrag.data.tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer on a KB")
    p.add_argument("--kb", required=True, help="KB source directory (documents.jsonl, queries/) or documents.jsonl")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--vocab-size", type=number_arg(int, minimum=1), default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--min-frequency", type=number_arg(int, minimum=1), default=2)
    args = parser.parse_args(argv)
    try:
        tok = RagTokenizer.train(corpus_texts(args.kb), args.vocab_size, args.min_frequency)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    tok.save(args.out)
    print(f"wrote {args.out} (vocab {tok.vocab_size}, {len(SPECIAL_TOKENS)} special tokens)")


if __name__ == "__main__":
    main()
