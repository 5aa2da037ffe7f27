"""Knowledge-base documents: the `documents.jsonl` record format and its validation.

One JSON object per line: {"id": str, "title": str, "content": str, "source": str,
"metadata": {...} (optional, finite numbers only, at most 100 levels deep)}. Ids are short
path-safe names (letters, digits and `_ . : -`, starting with a letter or digit), so no id can
name a path outside a KB. Lines end at ``\n`` only (`refrag.fileio.jsonl_lines`: U+2028 and
friends inside a string are content); NaN/Infinity and duplicate keys are refused
(`refrag.fileio.loads_strict`). Every error names the file and line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from refrag.fileio import check_finite_tree, jsonl_lines, parse_jsonl, write_jsonl

ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
REQUIRED_FIELDS = ("id", "title", "content", "source")
OPTIONAL_FIELDS = ("metadata",)


def validate_document(record: object, where: str) -> dict:
    """Check one parsed record; returns it as a dict with only the known fields.

    `where` prefixes every error message (e.g. "docs.jsonl:12").
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    for field in REQUIRED_FIELDS:
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    if not ID_PATTERN.match(record["id"]):
        raise ValueError(f"{where}: invalid document id {record['id']!r}: use 1-128 characters from "
                         "letters, digits and _ . : - starting with a letter or digit")
    if not record["content"].strip():
        raise ValueError(f"{where}: document {record['id']!r} has empty content")
    if not record["source"].strip():
        raise ValueError(f"{where}: document {record['id']!r} has an empty source")
    if "metadata" in record:
        if not isinstance(record["metadata"], dict):
            raise ValueError(f"{where}: field 'metadata' must be an object")
        check_finite_tree(record["metadata"], f"{where}: field 'metadata'")
    return {f: record[f] for f in REQUIRED_FIELDS + OPTIONAL_FIELDS if f in record}


def parse_documents(lines: Iterable[str], name: str) -> list[dict]:
    """Validate JSON lines (blank lines skipped); duplicate ids and an empty list are errors.
    Split text into lines with `refrag.fileio.jsonl_lines` (`\n` only)."""
    docs: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, record in parse_jsonl(lines, name):
        where = f"{name}:{lineno}"
        doc = validate_document(record, where)
        if doc["id"] in first_line:
            raise ValueError(f"{where}: duplicate document id {doc['id']!r} (first on line {first_line[doc['id']]})")
        first_line[doc["id"]] = lineno
        docs.append(doc)
    if not docs:
        raise ValueError(f"{name}: no documents (an empty knowledge base cannot be built)")
    return docs


def read_text_utf8(path: Path) -> str:
    """The file's text; a clear error names the line of the first invalid UTF-8 byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


def read_documents(path: str | Path) -> list[dict]:
    """Read and validate a documents.jsonl file. Returns the list of document dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: documents file not found")
    return parse_documents(jsonl_lines(read_text_utf8(path)), str(path))


def check_no_overlap(existing: Iterable[str], new_docs: list[dict]) -> None:
    """Raise if a new document reuses an id already in the knowledge base."""
    taken = set(existing)
    clash = [d["id"] for d in new_docs if d["id"] in taken]
    if clash:
        raise ValueError(f"document id(s) already in the knowledge base: {', '.join(clash[:10])}")


def document_text(doc: dict) -> str:
    """The text that is embedded and BM25-indexed for a document: title, newline, content."""
    return f"{doc['title']}\n{doc['content']}"


def write_documents(path: Path, docs: list[dict]) -> None:
    """documents.jsonl as `parse_documents(jsonl_lines(...))` reads it back."""
    write_jsonl(path, docs)
