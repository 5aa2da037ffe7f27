"""Synthetic packed RAG rows for benchmarks: examples of [shared question | k documents | shared answer]."""
from __future__ import annotations

import random
from typing import List, Tuple

import torch

from refrag_kernels import reference

Example = Tuple[int, List[Tuple[int, int]]]


def rag_examples(total: int, docs_per_example=(5, 15), doc_len=(200, 800), shared=(32, 96), seed=0) -> List[Example]:
    """Fill `total` tokens with examples of a shared prefix, documents and a shared suffix;
    the last example is cut to fit. Spans are relative to each example's start."""
    rng = random.Random(seed)
    examples, used = [], 0
    while used < total:
        pos, spans = rng.randint(*shared), []
        for _ in range(rng.randint(*docs_per_example)):
            n = rng.randint(*doc_len)
            spans.append((pos, pos + n))
            pos += n
        length = min(pos + rng.randint(*shared), total - used)
        spans = [(s, min(e, length)) for s, e in spans if s < length]
        examples.append((length, spans))
        used += length
    return examples


def examples_to_tensors(examples: List[Example], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens (int32) and per-token doc ids (int32) for a packed row."""
    lengths = torch.tensor([n for n, _ in examples])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    docs = torch.zeros(int(cu[-1]), dtype=torch.int32)
    for (_, spans), start in zip(examples, cu.tolist()):
        for k, (s, e) in enumerate(spans, start=1):
            docs[start + s:start + e] = k
    return cu.to(device), docs.to(device)


def visible_pairs(cu_seqlens: torch.Tensor, doc_ids: torch.Tensor) -> int:
    """Number of (query, key) pairs the causal doc mask allows, computed in O(L)."""
    L = doc_ids.numel()
    seq_start = reference.conv_window_starts(1, L, cu_seqlens.cpu(), None)[0]
    own_start = reference.conv_window_starts(1, L, cu_seqlens.cpu(), doc_ids.cpu())[0]
    pos = torch.arange(L)
    shared = (doc_ids.cpu() == 0).to(torch.int64)
    shared_upto = shared.cumsum(0)
    shared_before_seq = torch.where(seq_start > 0, shared_upto[(seq_start - 1).clamp(min=0)], 0)
    is_doc = doc_ids.cpu() > 0
    per_query = torch.where(is_doc, shared_upto - shared_before_seq + pos - own_start + 1, pos - seq_start + 1)
    return int(per_query.sum())
