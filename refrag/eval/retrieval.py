"""Retrieval metrics (Recall@k, MRR, nDCG@k) and the evaluation of dense / BM25 / hybrid retrievers.

Per question type of a query split:
- single_hop, contradictory: gold = gold_doc_ids, retrieved with the question;
- two_hop: first-hop recall (question -> gold[0]), second-hop recall (the gold hop-2 query ->
  gold[1]), both-hop recall (both of those), and question-only recall of both gold docs;
- unanswerable questions have no gold documents and are skipped.

CLI: python -m refrag.eval.retrieval --kb DIR --queries FILE_OR_DIR [--split test] [--k 1 5 10] [--json FILE]
     (--kb embedded builds the embedded KB in memory, with --encoder or all-MiniLM-L6-v2;
     --queries defaults to the embedded KB's questions). Questions whose gold documents are not in the KB are
     refused: they belong to another KB and would score 0.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import numpy as np


def recall_at_k(retrieved: Sequence[str], gold: Sequence[str], k: int) -> float:
    """Fraction of gold ids among the first k retrieved ids."""
    if not gold:
        raise ValueError("recall needs at least one gold id")
    return len(set(retrieved[:k]) & set(gold)) / len(set(gold))


def reciprocal_rank(retrieved: Sequence[str], gold: Sequence[str]) -> float:
    """1 / rank of the first gold id in `retrieved` (ranks from 1), 0 when none is retrieved."""
    gold = set(gold)
    return next((1.0 / r for r, d in enumerate(retrieved, start=1) if d in gold), 0.0)


def ndcg_at_k(retrieved: Sequence[str], gold: Sequence[str], k: int) -> float:
    """Binary-relevance nDCG@k: sum over gold hits 1/log2(rank+1), over the ideal for min(|gold|, k)."""
    gold = set(gold)
    if not gold:
        raise ValueError("nDCG needs at least one gold id")
    dcg = sum(1.0 / math.log2(r + 1) for r, d in enumerate(retrieved[:k], start=1) if d in gold)
    ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(gold), k) + 1))
    return dcg / ideal


def ranking_metrics(retrieved: list[list[str]], gold: list[list[str]], ks: Sequence[int]) -> dict[str, float]:
    """Mean Recall@k, nDCG@k for each k and MRR over queries."""
    out = {f"recall@{k}": float(np.mean([recall_at_k(r, g, k) for r, g in zip(retrieved, gold)])) for k in ks}
    out.update({f"ndcg@{k}": float(np.mean([ndcg_at_k(r, g, k) for r, g in zip(retrieved, gold)])) for k in ks})
    out["mrr"] = float(np.mean([reciprocal_rank(r, g) for r, g in zip(retrieved, gold)]))
    out["n"] = len(retrieved)
    return out


def ids_of(results: list[list[dict]]) -> list[list[str]]:
    return [[d["id"] for d in docs] for docs in results]


def evaluate_retriever(retriever, records: list[dict], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
    """Metrics per question type for one retriever (anything with `search(queries, top_k)`)."""
    depth = max(ks)
    report: dict[str, dict] = {}
    for type_ in ("single_hop", "contradictory"):
        recs = [r for r in records if r["type"] == type_]
        if recs:
            found = ids_of(retriever.search([r["question"] for r in recs], depth))
            report[type_] = ranking_metrics(found, [r["gold_doc_ids"] for r in recs], ks)
    two = [r for r in records if r["type"] == "two_hop"]
    if two:
        first = ids_of(retriever.search([r["question"] for r in two], depth))
        second = ids_of(retriever.search([r["hops"][1]["query"] for r in two], depth))
        gold1 = [r["gold_doc_ids"][0] for r in two]
        gold2 = [r["gold_doc_ids"][1] for r in two]
        row: dict[str, float] = {"n": len(two)}
        for k in ks:
            hit1 = np.array([g in f[:k] for f, g in zip(first, gold1)])
            hit2 = np.array([g in s[:k] for s, g in zip(second, gold2)])
            row[f"first_hop_recall@{k}"] = float(hit1.mean())
            row[f"second_hop_recall@{k}"] = float(hit2.mean())
            row[f"both_hops_recall@{k}"] = float((hit1 & hit2).mean())
            row[f"question_both_recall@{k}"] = float(np.mean([recall_at_k(f, [a, b], k) == 1.0
                                                              for f, a, b in zip(first, gold1, gold2)]))
        report["two_hop"] = row
    return report


def format_table(results: dict[str, dict[str, dict]], ks: Sequence[int]) -> str:
    """Text table: one line per (retriever, question type)."""
    lines = []
    for type_, columns in (("single_hop", [f"recall@{k}" for k in ks] + ["mrr", f"ndcg@{max(ks)}"]),
                           ("contradictory", [f"recall@{k}" for k in ks] + ["mrr", f"ndcg@{max(ks)}"]),
                           ("two_hop", [f"first_hop_recall@{k}" for k in ks] + [f"both_hops_recall@{k}" for k in ks])):
        present = [(name, rep[type_]) for name, rep in results.items() if type_ in rep]
        if not present:
            continue
        lines.append(f"{type_} (n={present[0][1]['n']})")
        lines.append(f"  {'retriever':<10}" + "".join(f"{c:>22}" for c in columns))
        for name, row in present:
            lines.append(f"  {name:<10}" + "".join(f"{row[c]:>22.3f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from refrag.data.conversations import EMBEDDED_KB_DIR, check_gold_documents, load_queries
    from refrag.fileio import check_writable_file
    from refrag.retrieval import DEFAULT_ENCODER, KnowledgeBase, make_retriever, read_documents
    from refrag.validate import number_arg

    parser = argparse.ArgumentParser(prog="python -m refrag.eval.retrieval", description="Retrieval evaluation.")
    parser.add_argument("--kb", required=True, help="a KB directory from prepare-kb, or 'embedded'")
    parser.add_argument("--encoder", default=None,
                        help="query encoder (default: the KB's; with --kb embedded: all-MiniLM-L6-v2)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--queries", "--queries-dir", dest="queries", default=None,
                        help="questions: a .jsonl file, a folder with queries/{split}.jsonl or the queries/ folder "
                             "(default: the embedded KB's questions)")
    parser.add_argument("--retrievers", nargs="+", default=["dense", "bm25", "hybrid"])
    parser.add_argument("--k", type=number_arg(int, minimum=1), nargs="+", default=[1, 5, 10])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.json:
            check_writable_file(args.json, "--json")
        kb = (KnowledgeBase.build(read_documents(EMBEDDED_KB_DIR / "documents.jsonl"), args.encoder or DEFAULT_ENCODER)
              if args.kb == "embedded" else KnowledgeBase.load(args.kb, args.encoder))
        records = load_queries(args.split, args.queries or EMBEDDED_KB_DIR)
        check_gold_documents(records, kb.ids, f"the knowledge base {args.kb}")
        results = {name: evaluate_retriever(make_retriever(name, kb), records, args.k) for name in args.retrievers}
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(format_table(results, args.k))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
