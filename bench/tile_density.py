"""How much of the L x L attention square the doc-attention kernel touches, on packed RAG rows.

    python -m bench.tile_density [--lengths 2048 4096 ...] [--examples 16] [--docs 10]
                                 [--block 128 64] [--out bench/tile_density.md]

The work of `refrag_kernels.doc_attention` is set by the layout, not by the device: the kernel visits
exactly the (block_m x block_n) tiles that `DocLayout.tile_summary` lists and skips mask math on
the tiles marked full. This script computes, exactly and on the CPU, for rows of `examples`
examples with `docs` equal documents each (shared prefix and suffix of 5% of the example each):

- pair density: visible (query, key) pairs / L(L+1)/2 (plain causal attention over the row);
- vs varlen: visible pairs / sum n_i(n_i+1)/2 (causal attention restricted to each example,
  what flash-attn varlen computes);
- tiles visited / tiles a varlen-causal kernel visits, and the fraction of visited tiles that
  are full (no mask needed);
- tile efficiency: visible pairs / (visited tiles * block_m * block_n), the share of the
  computed scores that are used;
- SSD chunk fill: L / (chunks * chunk_size) for the doc_mode chunk table of `refrag_kernels.ssd`
  (chunks restart at examples; documents are masked inside a chunk, and only a retrieval block
  opening within a chunk of an earlier block's document start restarts one), vs the same for
  plain varlen chunks: the SSD kernels pay per chunk, so a fill below 1 is padded work.

A second table sweeps the number of documents per example at the largest length.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from bench.layouts import visible_pairs
from refrag_kernels import DocLayout

DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
SSD_CHUNK = 64
SHARED_FRACTION = 0.05


def example_spans(length: int, docs: int) -> Tuple[int, List[Tuple[int, int]]]:
    """One example of `length` tokens: a 5% shared prefix, `docs` equal documents, a shared suffix."""
    shared = max(1, round(SHARED_FRACTION * length))
    doc_len = (length - 2 * shared) // docs
    if doc_len < 1:
        raise ValueError(f"an example of {length} tokens cannot hold {docs} documents")
    spans = [(shared + k * doc_len, shared + (k + 1) * doc_len) for k in range(docs)]
    return length, spans


def rag_row(length: int, examples: int, docs: int) -> DocLayout:
    """A packed row of `length` tokens split into `examples` near-equal examples of `docs` documents."""
    if length < examples:
        raise ValueError(f"a row of {length} tokens cannot hold {examples} examples")
    cuts = torch.linspace(0, length, examples + 1).round().long().tolist()
    return DocLayout.from_examples([example_spans(e - s, docs) for s, e in zip(cuts, cuts[1:])])


def visited_tiles(layout: DocLayout, block_m: int, block_n: int) -> Tuple[int, int]:
    """(tiles the kernel visits, of which full) for the layout's causal document mask."""
    tiles = layout.tile_summary(block_m, block_n, causal=True)
    return tiles.kv_indices.numel(), int(tiles.kv_full.sum())


def chunk_fill(layout: DocLayout, chunk_size: int, doc_mode: bool) -> float:
    """Tokens / (chunks * chunk_size) of the SSD chunk table, doc_mode or plain varlen."""
    chunks = layout.chunk_table(chunk_size, doc_mode).num_chunks
    return layout.total_tokens / (chunks * chunk_size)


def density_row(layout: DocLayout, block_m: int, block_n: int) -> Dict[str, float]:
    """The work measures of one layout (see the module docstring)."""
    L = layout.total_tokens
    lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
    pairs = visible_pairs(layout.cu_seqlens, layout.doc_ids)
    varlen_pairs = int((lengths * (lengths + 1) // 2).sum())
    tiles, full = visited_tiles(layout, block_m, block_n)
    varlen_tiles, _ = visited_tiles(DocLayout.from_cu_seqlens(layout.cu_seqlens), block_m, block_n)
    return {
        "L": L,
        "pair_density": pairs / (L * (L + 1) / 2),
        "vs_varlen": pairs / varlen_pairs,
        "tiles": tiles,
        "tiles_vs_varlen": tiles / varlen_tiles,
        "full_fraction": full / tiles,
        "tile_efficiency": pairs / (tiles * block_m * block_n),
        "ssd_fill_doc_mode": chunk_fill(layout, SSD_CHUNK, doc_mode=True),
        "ssd_fill_varlen": chunk_fill(layout, SSD_CHUNK, doc_mode=False),
    }


def markdown(rows: List[Dict[str, float]], first: str) -> str:
    head = [first, "pair density", "pairs vs varlen", "tiles visited", "tiles vs varlen", "full tiles",
            "tile efficiency", f"SSD chunk fill (Q={SSD_CHUNK}) doc_mode / varlen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r[first]} | {r['pair_density']:.4f} | {r['vs_varlen']:.3f} | {r['tiles']} | "
                     f"{r['tiles_vs_varlen']:.3f} | {r['full_fraction']:.3f} | {r['tile_efficiency']:.3f} | "
                     f"{r['ssd_fill_doc_mode']:.3f} / {r['ssd_fill_varlen']:.3f} |")
    return "\n".join(lines)


def report(lengths, examples: int, docs: int, doc_sweep, block_m: int, block_n: int) -> str:
    """Both tables as markdown: over lengths at fixed counts, and over document counts at max length."""
    by_length = [density_row(rag_row(L, examples, docs), block_m, block_n) for L in lengths]
    L_max = max(lengths)
    by_docs = []
    for d in doc_sweep:
        row = density_row(rag_row(L_max, examples, d), block_m, block_n)
        row["docs"] = d
        by_docs.append(row)
    return (f"Tiles {block_m} x {block_n}, causal; {examples} examples per row, shared prefix and suffix "
            f"{SHARED_FRACTION:.0%} of each example.\n\n"
            f"{docs} documents per example, by packed length:\n\n{markdown(by_length, 'L')}\n\n"
            f"L = {L_max}, by documents per example:\n\n{markdown(by_docs, 'docs')}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="packed lengths L")
    parser.add_argument("--examples", type=int, default=16, help="examples per packed row")
    parser.add_argument("--docs", type=int, default=10, help="documents per example")
    parser.add_argument("--doc-sweep", type=int, nargs="+", default=[1, 2, 5, 10, 20],
                        help="documents per example for the second table (at the largest L)")
    parser.add_argument("--block", type=int, nargs=2, default=[128, 64], metavar=("BLOCK_M", "BLOCK_N"),
                        help="attention tile (the forward kernel's first GPU config is 128 x 64)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    text = report(args.lengths, args.examples, args.docs, args.doc_sweep, *args.block)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
