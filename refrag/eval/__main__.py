"""CLI: python -m refrag.eval answers --checkpoint DIR [--split test] [--top-k 3]
     python -m refrag.eval multihop --checkpoint DIR [--rag-checkpoint DIR]   (refrag.eval.multihop)

Loads a training checkpoint (model config, weights, tokenizer path, KB paths from its
config), answers every question of the split with greedy decoding and prints EM, F1,
abstention, hallucination and the per-type table. ``--json FILE`` also writes the metrics
with every prediction. Retrieval metrics: python -m refrag.eval.retrieval.
"""
from __future__ import annotations

import argparse
import sys

import torch

from refrag.data import EMBEDDED_KB_DIR
from refrag.eval.answers import format_table
from refrag.eval.evaluate import evaluate_model, load_trained_model, write_predictions
from refrag.fileio import check_writable_file
from refrag.retrieval import RetrievalManager
from refrag.train.checkpoint import latest_checkpoint
from refrag.validate import number_arg

POSITIVE_INT = number_arg(int, minimum=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refrag.eval", description="Answer-quality evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("multihop", help="multi-hop EM/F1, hops, abstention vs single-shot RAG (flags: multihop -h)")
    p = sub.add_parser("answers", help="EM / F1 / abstention / hallucination of a checkpoint on a query split")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (step_NNNNNN) or a run's checkpoints/ directory (newest is used)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
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
    try:
        if args.json:
            check_writable_file(args.json, "--json")
        path = latest_checkpoint(args.checkpoint) or args.checkpoint
        model, tokenizer, train_cfg = load_trained_model(path, args.device)
    except ValueError as err:  # CheckpointError included
        parser.exit(2, f"error: {err}\n")
    manager = RetrievalManager(train_cfg.retriever, knowledge_base=train_cfg.kb_dir)
    metrics = evaluate_model(model, tokenizer, manager, args.split, args.top_k or train_cfg.top_k,
                             args.max_new_tokens, use_retrieval=train_cfg.retrieval,
                             kb_source=train_cfg.kb_source or EMBEDDED_KB_DIR, batch_size=args.batch_size,
                             max_doc_tokens=train_cfg.max_doc_tokens, question_first=train_cfg.question_first,
                             limit=args.limit)
    name = "rag" if train_cfg.retrieval else "no_retrieval"
    print(f"checkpoint {path}, split {args.split}")
    print(format_table({name: metrics}))
    if args.json:
        write_predictions(args.json, metrics)


if __name__ == "__main__":
    main()
