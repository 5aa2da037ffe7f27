"""CLI: python -m refrag.retrieval {prepare-kb,add,search,stats} ...

  prepare-kb --docs documents.jsonl --out DIR [--encoder all-MiniLM-L6-v2] [--batch-size 64]
  add        --kb DIR --docs more.jsonl
  search     --kb DIR --query TEXT [--query TEXT ...] [--top-k 5] [--retriever hybrid] [--source S]
  stats      --kb DIR
"""
from __future__ import annotations

import argparse
import json
import sys

from refrag.retrieval.encoders import DEFAULT_ENCODER
from refrag.retrieval.kb import HNSW_THRESHOLD, KnowledgeBase, add_documents, prepare_kb
from refrag.retrieval.retrievers import RETRIEVERS, make_retriever
from refrag.validate import number_arg

POSITIVE_INT = number_arg(int, minimum=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refrag.retrieval", description="Knowledge-base tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-kb", help="validate, embed and index documents.jsonl into a KB directory")
    p.add_argument("--docs", required=True, help="documents.jsonl (id, title, content, source, metadata?)")
    p.add_argument("--out", required=True, help="KB directory to write (replaced atomically)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER,
                   help="all-MiniLM-L6-v2 (default), a local sentence-transformers dir, or hashing:<dim>")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="embedding batch size")
    p.add_argument("--hnsw-threshold", type=POSITIVE_INT, default=HNSW_THRESHOLD,
                   help="use an HNSW index from this many documents on (exact flat index below)")

    p = sub.add_parser("add", help="append documents to a KB without re-embedding the existing ones")
    p.add_argument("--kb", required=True)
    p.add_argument("--docs", required=True)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)

    p = sub.add_parser("search", help="query a KB")
    p.add_argument("--kb", required=True)
    p.add_argument("--query", action="append", required=True, help="repeat for a batch")
    p.add_argument("--top-k", type=POSITIVE_INT, default=5)
    p.add_argument("--retriever", choices=sorted(RETRIEVERS), default="hybrid")
    p.add_argument("--fusion", choices=["minmax", "rrf"], default="minmax", help="hybrid score fusion")
    p.add_argument("--alpha", type=number_arg(float, minimum=0, maximum=1), default=0.7, help="hybrid dense weight (minmax fusion)")
    p.add_argument("--source", action="append", help="keep only documents from this source (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("stats", help="print KB statistics as JSON")
    p.add_argument("--kb", required=True)
    return parser


def run_search(args) -> None:
    kb = KnowledgeBase.load(args.kb)
    options = {"alpha": args.alpha, "fusion": args.fusion} if args.retriever == "hybrid" else {}
    results = make_retriever(args.retriever, kb, **options).search(args.query, args.top_k, args.source)
    if args.json:
        print(json.dumps([{"query": q, "documents": r} for q, r in zip(args.query, results)], indent=2))
        return
    for query, docs in zip(args.query, results):
        print(f"query: {query}")
        for rank, d in enumerate(docs, start=1):
            print(f"  {rank:2d}. {d['score']:.4f}  {d['id']}  [{d['source']}]  {d['title']}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare-kb":
            kb = prepare_kb(args.docs, args.out, args.encoder, batch_size=args.batch_size,
                            hnsw_threshold=args.hnsw_threshold)
            print(f"wrote {len(kb)} documents ({kb.meta()['index_type']}, dim {kb.dim}) to {kb.path}")
        elif args.command == "add":
            kb = add_documents(args.kb, args.docs, batch_size=args.batch_size)
            print(f"{kb.path} now holds {len(kb)} documents")
        elif args.command == "search":
            run_search(args)
        else:
            print(json.dumps(KnowledgeBase.load(args.kb).stats(), indent=2))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
