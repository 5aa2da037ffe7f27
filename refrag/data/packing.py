"""Best-fit-decreasing packing of rendered examples into fixed-length rows.

Each row of `max_len` tokens holds whole examples (never split) followed by padding.
targets[i] = input_ids[i + 1] when that next token is in the same example and has loss
mask 1, else -100 (the last token of every example, and all padding, predict nothing).
`row.layout()` is the row's `refrag_kernels.DocLayout`; padding is one extra document-free example.
A packing report on the embedded KB: `python -m bench.packing_report`.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from refrag_kernels import IGNORE_INDEX
from refrag.data.render import RenderedExample


@dataclass
class PackedRow:
    """input_ids, targets int64 (max_len,); doc_ids int32 (max_len,); examples: DocLayout.from_examples
    input, one (length, doc spans) per example plus a trailing (pad_len, []) when padded."""

    input_ids: np.ndarray
    targets: np.ndarray
    doc_ids: np.ndarray
    examples: list[tuple[int, list[tuple[int, int]]]]
    num_tokens: int

    @property
    def loss_mask(self) -> np.ndarray:
        """uint8 (max_len,): 1 where targets holds a token to learn."""
        return (self.targets != IGNORE_INDEX).astype(np.uint8)

    def layout(self, device=None):
        """The row's DocLayout (cu_seqlens over examples and padding, per-token doc ids)."""
        from refrag_kernels.layout import DocLayout

        return DocLayout.from_examples(self.examples, device=device)


def example_targets(ex: RenderedExample) -> np.ndarray:
    """int64 (T,): next token where its loss mask is 1, else -100; the last position is -100."""
    targets = np.full(len(ex), IGNORE_INDEX, dtype=np.int64)
    learn = ex.loss_mask[1:].astype(bool)
    targets[:-1][learn] = ex.input_ids[1:][learn]
    return targets


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest item first, each into the fullest bin it still fits.

    Deterministic (ties by index). Raises if an item is longer than `capacity`.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) longer than max_len={capacity} (first: #{too_long[0]} with "
                         f"{lengths[too_long[0]]} tokens); drop them when rendering")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            remaining, b = free.pop(pos)
            bins[b].append(i)
            bisect.insort(free, (remaining - lengths[i], b))
    return bins


def build_row(examples: list[RenderedExample], max_len: int, pad_id: int) -> PackedRow:
    ids = np.full(max_len, pad_id, dtype=np.int64)
    targets = np.full(max_len, IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros(max_len, dtype=np.int32)
    layout_examples = []
    offset = 0
    for ex in examples:
        end = offset + len(ex)
        ids[offset:end] = ex.input_ids
        targets[offset:end] = example_targets(ex)
        doc_ids[offset:end] = ex.doc_ids
        layout_examples.append((len(ex), ex.doc_spans()))
        offset = end
    if offset < max_len:
        layout_examples.append((max_len - offset, []))
    return PackedRow(ids, targets, doc_ids, layout_examples, offset)


def pack_examples(examples: Sequence[RenderedExample], max_len: int, pad_id: int) -> list[PackedRow]:
    """Pack examples into rows of exactly max_len tokens (best-fit decreasing)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    empty = [i for i, ex in enumerate(examples) if len(ex) == 0]
    if empty:
        raise ValueError(f"example #{empty[0]} is empty")
    bins = best_fit_decreasing([len(ex) for ex in examples], max_len)
    return [build_row([examples[i] for i in b], max_len, pad_id) for b in bins]


def packing_efficiency(rows: Sequence[PackedRow]) -> float:
    """Fraction of row slots holding example tokens (1.0 = no padding)."""
    if not rows:
        raise ValueError("no rows")
    return sum(r.num_tokens for r in rows) / sum(len(r.input_ids) for r in rows)
