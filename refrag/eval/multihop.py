"""Multi-hop evaluation: EM / F1 through the REFRAG loop, hops used, abstention, vs single-shot RAG.

Each question of a split runs through `refrag.infer.multihop.run_multihop` with greedy
decoding (no gold documents inserted). An answer is scored with `refrag.eval.answers`
(`score_answer`, hallucination judged against every document retrieved over all hops); a
trajectory without a final answer (truncated, empty, out of hops) scores as the empty answer.
On top of `aggregate`'s metrics: ``hops`` (mean retrievals per question) and the share of each
outcome (``answered``, ``abstained``, ``max_hops``, ``truncated``, ``empty``).

CLI (one command, one table)::

    python -m refrag.eval.multihop --checkpoint out/refrag/rl/checkpoints \\
        [--rag-checkpoint out/sft/checkpoints] [--kb KB_DIR --queries FILE_OR_DIR] [--split test] \
        [--max-hops 3] [--top-k 3]

``--kb``/``--queries`` point both models at another prepared KB and its questions (questions
whose gold documents are not in that KB are refused).

The optional single-shot column evaluates an SFT-RAG checkpoint with
`refrag.eval.evaluate.evaluate_model` (one retrieval) on the same questions. Like is compared
with like: each model runs with the prompt format it was trained with (`checkpoint_prompt`:
question or documents first, document length), its own top_k, retriever and tokenizer; the
format used is part of each column's result (``prompt``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from refrag.data import EMBEDDED_KB_DIR, RagTokenizer, load_queries
from refrag.data.conversations import check_gold_documents
from refrag.eval.answers import aggregate, format_table, score_answer
from refrag.data.prompt import PromptFormat
from refrag.eval.evaluate import evaluate_model, load_trained_model
from refrag.infer import Engine
from refrag.infer.doc_cache import CachedEngine, DocumentCache, precompute_documents
from refrag.infer.multihop import STATUSES, run_multihop
from refrag.retrieval import RetrievalManager
from refrag.data.documents import document_text
from refrag.fileio import check_writable_file
from refrag.validate import number_arg


def retrieved_texts(messages: Sequence[dict]) -> list[str]:
    """Texts of every document in a conversation's retrieval messages."""
    return [document_text(d) for m in messages if m["role"] == "retrieval" for d in m["documents"]]


def evaluate_multihop(generator, tokenizer: RagTokenizer, retriever, records: Sequence[dict], *,
                      max_hops: int = 3, top_k: int = 3, max_new_tokens: int = 32, max_doc_tokens: int = 256,
                      batch_size: int = 32, question_first: bool = True) -> dict:
    """Metrics of `aggregate` plus ``hops``, one rate per outcome and ``predictions``.

    generator: `Engine(model)` of a model in eval mode (or a `CachedEngine`; anything with
    Engine.generate's signature), decoding greedily; records: query records {id, question,
    answer, type, gold_doc_ids}; questions run through the loop `batch_size` at a time;
    max_doc_tokens, question_first: the prompt format the model was trained with.
    """
    if not records:
        raise ValueError("evaluate_multihop needs at least one question record")
    traces = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        traces += run_multihop(generator, tokenizer, retriever, [r["question"] for r in batch], max_hops=max_hops,
                               top_k=top_k, max_new_tokens=max_new_tokens, max_doc_tokens=max_doc_tokens,
                               question_first=question_first)
    scored, predictions = [], []
    for record, trace in zip(records, traces):
        score = score_answer(trace.answer or "", record["answer"], record["type"], retrieved_texts(trace.messages))
        scored.append(score)
        predictions.append({"id": record["id"], "type": record["type"], "question": record["question"],
                            "gold": record["answer"], "prediction": trace.answer, "status": trace.status,
                            "queries": [h["query"] for h in trace.hops],
                            "retrieved": trace.retrieved_doc_ids, **score})
    n = len(traces)
    outcomes = {status: sum(t.status == status for t in traces) / n for status in STATUSES}
    return {**aggregate(scored), "hops": sum(t.num_hops for t in traces) / n, **outcomes,
            "predictions": predictions}


def cache_stats(cache: DocumentCache) -> dict:
    """`DocumentCache.summary`: hits, misses, hit_rate (hits / lookups), document_hit_rate, the
    state and LRU counters, entries, states and bytes."""
    return cache.summary()


def compare_cache(model, tokenizer: RagTokenizer, retriever, records: Sequence[dict], *,
                  cache_bytes: int = 1 << 30, precompute: Sequence[dict] | None = None, **kwargs) -> dict:
    """Serve the questions one at a time (batch 1, as a server answers a user) through the loop
    with a `CachedEngine` and with the plain `Engine`; returns the cache's counters, both wall
    times and their ratio (latency_ratio), the prefill part of each (every turn's time to first
    token: what the cache shortens; decoding is the same work in both) with its ratio, and the
    share of questions whose answers agree.

    Each question is served by both engines back to back (the first one alternating), so a
    load change on a shared machine hits both sums alike. The cache starts cold, or holds
    `precompute` (documents, e.g. the whole KB) encoded ahead of the questions for every slot
    up to top_k (documents first only; the time it took is ``precompute_seconds``, not part of
    the ratio). kwargs: evaluate_multihop's settings (max_hops, top_k, max_doc_tokens,
    question_first, ...).
    """
    cache = DocumentCache(max_bytes=cache_bytes)
    extra = {}
    if precompute:
        if kwargs.get("question_first", True):
            raise ValueError("precomputing documents needs the documents-first layout")
        start = time.perf_counter()
        extra["precomputed"] = precompute_documents(CachedEngine(model, cache), tokenizer, precompute,
                                                    kwargs.get("top_k", 3), kwargs.get("max_doc_tokens", 256))
        extra["precompute_seconds"] = time.perf_counter() - start
        cache.stats = type(cache.stats)()  # count the questions' lookups only
    generators = {"uncached": _Timed(Engine(model, tokenizer)), "cached": _Timed(CachedEngine(model, cache))}
    seconds = dict.fromkeys(generators, 0.0)
    predictions = {name: [] for name in generators}
    for i, record in enumerate(records):
        for name in (("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")):
            start = time.perf_counter()
            result = evaluate_multihop(generators[name], tokenizer, retriever, [record], **{**kwargs, "batch_size": 1})
            seconds[name] += time.perf_counter() - start
            predictions[name] += result["predictions"]
    agree = [a["prediction"] == b["prediction"] for a, b in zip(predictions["cached"], predictions["uncached"])]
    prefill = {name: g.timings["prefill_seconds"] for name, g in generators.items()}
    return {**cache_stats(cache), "seconds_cached": seconds["cached"], "seconds_uncached": seconds["uncached"],
            "latency_ratio": seconds["cached"] / seconds["uncached"],
            "prefill_seconds_cached": prefill["cached"], "prefill_seconds_uncached": prefill["uncached"],
            "prefill_ratio": prefill["cached"] / prefill["uncached"],
            "decode_seconds_cached": generators["cached"].timings["decode_seconds"],
            "decode_seconds_uncached": generators["uncached"].timings["decode_seconds"],
            "same_answers": sum(agree) / len(agree), **extra}


class _Timed:
    """A generator whose generate calls add their prefill (time to first token) and decode wall
    seconds to `timings` (see `refrag.infer.Engine.generate`)."""

    def __init__(self, engine):
        self.engine = engine
        self.timings = {"prefill_seconds": 0.0, "decode_seconds": 0.0}

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, timings=self.timings, **kwargs)


def format_comparison(results: dict[str, dict]) -> str:
    """`format_table` of the runs plus rows for mean hops and outcome rates (multi-hop runs only)."""
    table = format_table(results)
    widths = [max(len(name), 6) for name in results]  # format_table's column widths
    label_width = len(table.splitlines()[0]) - sum(w + 1 for w in widths)
    lines = [table]
    for key in ("hops",) + STATUSES:
        cells = [("-" if key not in m else f"{m[key]:.3f}").rjust(w) for m, w in zip(results.values(), widths)]
        lines.append(" ".join([key.ljust(label_width)] + cells))
    return "\n".join(lines)


def checkpoint_prompt(config: dict, record: PromptFormat) -> dict:
    """Prompt format a checkpoint's model was trained with:
    {"multihop": bool, "question_first": bool, "max_doc_tokens": int}.

    REFRAG checkpoints store it in config.json (``prompt``); older REFRAG checkpoints were always
    rendered question first with the REFRAG ``max_doc_tokens``; SFT checkpoints take their
    `PromptFormat` record (prompt_format.json, see `refrag.eval.evaluate.load_trained_model`).
    """
    if "prompt" in config:
        return dict(config["prompt"])
    if "refrag" in config and "max_doc_tokens" in config["refrag"]:
        return {"multihop": True, "question_first": True, "max_doc_tokens": config["refrag"]["max_doc_tokens"]}
    return {"multihop": False, "question_first": record.question_first, "max_doc_tokens": record.max_doc_tokens}


def load_for_eval(checkpoint: str | Path, device: str) -> tuple:
    """(model, tokenizer, TrainConfig, prompt format dict, checkpoint dir) of a run's newest
    checkpoint (or a step directory); CheckpointError when missing, partial or corrupt."""
    trained = load_trained_model(checkpoint, device)
    prompt = checkpoint_prompt(json.loads((trained.path / "config.json").read_text()), trained.prompt)
    return trained.model, trained.tokenizer, trained.config, prompt, trained.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refrag.eval.multihop",
                                     description="Multi-hop (REFRAG) answer evaluation vs single-shot RAG.")
    parser.add_argument("--checkpoint", required=True, help="REFRAG checkpoint (step dir or checkpoints/ dir)")
    parser.add_argument("--rag-checkpoint", help="single-shot SFT-RAG checkpoint of the same model size")
    parser.add_argument("--kb", help="prepared KB directory for both models (default: each run's training KB)")
    parser.add_argument("--queries", help="questions: a .jsonl file, a folder with queries/{split}.jsonl or the "
                                          "queries/ folder (default: the run's KB source; required with --kb)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--max-hops", type=int, default=3)
    parser.add_argument("--top-k", type=number_arg(int, minimum=1), default=None,
                        help="documents per hop for both models (default: each model's training top_k)")
    parser.add_argument("--max-new-tokens", type=number_arg(int, minimum=1), default=32)
    parser.add_argument("--batch-size", type=number_arg(int, minimum=1), default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-cache", action="store_true",
                        help="generate without the per-document cache (refrag.infer.doc_cache); same answers")
    parser.add_argument("--compare-cache", action="store_true",
                        help="also serve the questions one at a time with and without the cache and report "
                             "hit rate, both wall times and their ratio (key 'cache')")
    parser.add_argument("--precompute-kb", action="store_true",
                        help="with --compare-cache: encode every KB document (each slot up to top_k) before the "
                             "questions, as a server does offline (documents-first checkpoints only)")
    parser.add_argument("--json", help="also write metrics and predictions to this file")
    return parser


def main_multihop(argv: list[str] | None = None) -> dict:
    """Entry point: evaluate the REFRAG checkpoint (and the single-shot one), print one table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_hops < 1:
        parser.error(f"--max-hops must be at least 1, got {args.max_hops}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    if args.kb and not args.queries:
        parser.error("--kb needs --queries (the questions of that knowledge base)")
    try:
        if args.json:
            check_writable_file(args.json, "--json")
        model, tokenizer, train_cfg, prompt, path = load_for_eval(args.checkpoint, args.device)
        rag = load_trained_model(args.rag_checkpoint, args.device) if args.rag_checkpoint else None
        top_k = args.top_k or train_cfg.top_k
        manager = RetrievalManager(train_cfg.retriever, knowledge_base=args.kb or train_cfg.kb_dir)
        records = load_queries(args.split, args.queries or train_cfg.kb_source or EMBEDDED_KB_DIR)[:args.limit]
        check_gold_documents(records, manager.knowledge_base.ids, f"the knowledge base {args.kb or train_cfg.kb_dir}")
    except ValueError as err:  # CheckpointError, unwritable --json
        parser.exit(2, f"error: {err}\n")
    settings = dict(max_hops=args.max_hops, top_k=top_k, max_new_tokens=args.max_new_tokens,
                    max_doc_tokens=prompt["max_doc_tokens"], question_first=prompt["question_first"])
    cache = None if args.no_cache else DocumentCache(max_bytes=1 << 30)
    generator = Engine(model, tokenizer) if cache is None else CachedEngine(model, cache)
    results = {"refrag": evaluate_multihop(generator, tokenizer, manager, records, batch_size=args.batch_size,
                                           **settings)}
    results["refrag"].update(checkpoint=str(path), prompt=prompt, top_k=top_k)
    if cache is not None:
        results["refrag"]["doc_cache"] = cache_stats(cache)
    if rag is not None:
        rag_cfg = rag.config
        rag_top_k = args.top_k or rag_cfg.top_k
        rag_kb = args.kb or rag_cfg.kb_dir
        same_index = (rag_cfg.retriever, rag_kb) == (train_cfg.retriever, args.kb or train_cfg.kb_dir)
        rag_manager = manager if same_index else RetrievalManager(rag_cfg.retriever, knowledge_base=rag_kb)
        results["single_shot"] = evaluate_model(rag.model, rag.tokenizer, rag_manager, records, rag.prompt,
                                                top_k=rag_top_k, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size)
        results["single_shot"].update(checkpoint=str(rag.path), prompt=checkpoint_prompt({}, rag.prompt),
                                      top_k=rag_top_k)
    print(f"split {args.split}, {len(records)} questions, max_hops {args.max_hops}")
    for name, result in results.items():
        print(f"{name}: {result['checkpoint']} (top_k {result['top_k']}, {result['prompt']})")
    print(format_comparison(results))
    if cache is not None:
        print(f"document cache: {results['refrag']['doc_cache']}")
    if args.compare_cache:
        documents = None
        if args.precompute_kb:
            documents = list(manager.knowledge_base.documents)
        results["cache"] = compare_cache(model, tokenizer, manager, records, precompute=documents, **settings)
        print("serving one question at a time, cached vs uncached: "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results["cache"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main_multihop()
