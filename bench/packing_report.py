"""Packing report on the embedded KB: BM25-retrieved conversations rendered and packed into rows.

    python -m bench.packing_report --max-len 8192 [--split train] [--top-k 5] [--max-doc-tokens 256]

Also reports the SSD chunk fill (tokens / (chunks * chunk size) of `DocLayout.chunk_table`,
doc_mode and plain varlen; the SSD kernels pay per chunk) of the packed rows and of synthetic
RAG rows of the same length with 100-300-token documents (`bench.layouts.rag_examples`).
"""
from __future__ import annotations

import argparse

import numpy as np

from refrag.data import (EMBEDDED_KB_DIR, build_conversations, load_queries, load_tokenizer, pack_examples,
                         packing_efficiency, render_conversations)
from refrag.retrieval import HashingEncoder, KnowledgeBase, RetrievalManager, read_documents
from refrag.validate import number_arg
from refrag_kernels import DocLayout

from bench.layouts import rag_examples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.packing_report", description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=number_arg(int, minimum=1), default=8192)
    parser.add_argument("--split", default="train")
    parser.add_argument("--top-k", type=number_arg(int, minimum=1), default=5)
    parser.add_argument("--max-doc-tokens", type=number_arg(int, minimum=1), default=256)
    parser.add_argument("--chunk-size", type=number_arg(int, minimum=1), default=64, help="SSD chunk size")
    args = parser.parse_args(argv)
    kb = KnowledgeBase.build(read_documents(EMBEDDED_KB_DIR / "documents.jsonl"), HashingEncoder(64),
                             show_progress=False)
    manager = RetrievalManager("bm25", knowledge_base=kb)
    convs = build_conversations(load_queries(args.split), manager, args.top_k)
    examples, stats = render_conversations(convs, load_tokenizer(), max_len=args.max_len,
                                           max_doc_tokens=args.max_doc_tokens)
    rows = pack_examples(examples, args.max_len, load_tokenizer().pad_id)
    lengths = [len(e) for e in examples]
    print(f"examples {stats.rendered} (dropped {stats.dropped_too_long}, truncated docs {stats.truncated_docs}), "
          f"length min/mean/max {min(lengths)}/{np.mean(lengths):.0f}/{max(lengths)}")
    print(f"rows {len(rows)} x {args.max_len}: packing efficiency {packing_efficiency(rows):.4f}")
    print(f"SSD chunk fill (chunk {args.chunk_size}): doc_mode {chunk_fill(rows, args.chunk_size, True):.3f}, "
          f"varlen {chunk_fill(rows, args.chunk_size, False):.3f}")
    synthetic = [_Row(DocLayout.from_examples(rag_examples(args.max_len, docs_per_example=(3, 8), doc_len=(100, 300),
                                                           seed=seed))) for seed in range(8)]
    print(f"synthetic rows (8 x {args.max_len}, 3-8 documents of 100-300 tokens per example): SSD chunk fill "
          f"doc_mode {chunk_fill(synthetic, args.chunk_size, True):.3f}, "
          f"varlen {chunk_fill(synthetic, args.chunk_size, False):.3f}")


class _Row:
    def __init__(self, layout):
        self._layout = layout

    def layout(self):
        return self._layout


def chunk_fill(rows, chunk_size: int, doc_mode: bool) -> float:
    """Tokens / (chunks * chunk_size) over the rows' SSD chunk tables."""
    tokens = chunks = 0
    for row in rows:
        layout = row.layout()
        tokens += layout.total_tokens
        chunks += layout.chunk_table(chunk_size, doc_mode).num_chunks
    return tokens / max(chunks * chunk_size, 1)


if __name__ == "__main__":
    main()
