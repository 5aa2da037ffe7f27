"""CLI: python -m refrag.eval answers --checkpoint RUN [--kb KB_DIR --queries FILE_OR_DIR] [--split test]
     python -m refrag.eval multihop --checkpoint DIR [--rag-checkpoint DIR]   (refrag.eval.multihop)

Loads a training checkpoint (weights, model config, and the tokenizer and prompt format stored
inside it, so it runs from any folder), answers every question with greedy decoding, the
prompt laid out exactly as in training, and prints EM, F1, abstention, hallucination and the
per-type table. By default the questions are the split of the training KB source and the
documents come from the training KB; ``--kb`` points the model at any prepared KB
(``python -m refrag.retrieval prepare-kb``) and ``--queries`` at its questions (a .jsonl file,
a folder with queries/{split}.jsonl, or the queries/ folder). Questions whose gold documents
are not in the KB are refused. ``--json FILE`` also writes the metrics with every prediction.
Retrieval metrics: python -m refrag.eval.retrieval.
"""
from __future__ import annotations

import argparse
import sys

import torch

from refrag.data import EMBEDDED_KB_DIR, load_queries
from refrag.data.conversations import check_gold_documents
from refrag.eval.answers import format_table
from refrag.eval.evaluate import evaluate_model, load_trained_model, write_predictions
from refrag.fileio import check_writable_file
from refrag.retrieval import RetrievalManager
from refrag.validate import number_arg

POSITIVE_INT = number_arg(int, minimum=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refrag.eval", description="Answer-quality evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("multihop", help="multi-hop EM/F1, hops, abstention vs single-shot RAG (flags: multihop -h)")
    p = sub.add_parser("answers", help="EM / F1 / abstention / hallucination of a checkpoint on a query split")
    p.add_argument("--checkpoint", required=True,
                   help="a run's out_dir, its checkpoints/ directory (newest is used) or a step_NNNNNN directory")
    p.add_argument("--kb", help="prepared KB directory to retrieve from (default: the run's training KB)")
    p.add_argument("--queries", help="questions: a .jsonl file, a folder with queries/{split}.jsonl or the "
                                     "queries/ folder (default: the run's KB source; required with --kb)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split read from a --queries folder (default test)")
    p.add_argument("--max-doc-tokens", type=POSITIVE_INT, default=None,
                   help="cut documents at this many tokens instead of the trained cut (robustness checks)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=None, help="documents per question (default: the training top_k)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=24)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32 if torch.cuda.is_available() else 2,
                   help="prompts generated together (small on CPU: the reference attention is dense)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N questions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write metrics and predictions to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["multihop"]:
        from refrag.eval.multihop import main_multihop

        main_multihop(argv[1:])
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kb and not args.queries:
        parser.error("--kb needs --queries (the questions of that knowledge base)")
    try:
        if args.json:
            check_writable_file(args.json, "--json")
        trained = load_trained_model(args.checkpoint, args.device)
        cfg, prompt = trained.config, trained.prompt
        if args.max_doc_tokens is not None:
            prompt = prompt.replace(max_doc_tokens=args.max_doc_tokens)
        manager = RetrievalManager(cfg.retriever, knowledge_base=args.kb or cfg.kb_dir)
        records = load_queries(args.split, args.queries or cfg.kb_source or EMBEDDED_KB_DIR)[:args.limit]
        check_gold_documents(records, manager.knowledge_base.ids, f"the knowledge base {args.kb or cfg.kb_dir}")
    except ValueError as err:  # CheckpointError included
        parser.exit(2, f"error: {err}\n")
    metrics = evaluate_model(trained.model, trained.tokenizer, manager, records, prompt,
                             top_k=args.top_k or cfg.top_k, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)
    name = "rag" if prompt.retrieval else "no_retrieval"
    print(f"checkpoint {trained.path}, {len(records)} questions")
    print(format_table({name: metrics}))
    if args.json:
        write_predictions(args.json, metrics)

if __name__ == "__main__":
    main()
