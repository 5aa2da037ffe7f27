"""DocLayout and kernels.common.index against plain Python loops over tokens."""
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refrag_kernels.common.index import prepare_lens, prepare_position_ids, prepare_seq_idx
from refrag_kernels.layout import DocLayout, TileSummary

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- references (token loops)


def loop_cu_seqlens(lengths):
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return cu


def loop_seq_ids(lengths):
    return [n for n, length in enumerate(lengths) for _ in range(length)]


def loop_doc_ids(examples):
    doc_ids = []
    for length, spans in examples:
        ids = [0] * length
        for k, (start, end) in enumerate(spans, start=1):
            for t in range(start, end):
                ids[t] = k
        doc_ids += ids
    return doc_ids


def loop_positions(lengths, doc_ids, per_document):
    """Example positions; per_document: a document token sits at its retrieval block's first
    position plus its offset in the document (sibling documents share the block's start)."""
    positions, t = [], 0
    for length in lengths:
        block_start = doc_start = None
        for p in range(length):
            doc = doc_ids[t]
            if doc == 0 or not per_document:
                positions.append(p)
            else:
                if p == 0 or doc_ids[t - 1] == 0:
                    block_start = p
                if p == 0 or doc_ids[t - 1] != doc:
                    doc_start = p
                positions.append(block_start + p - doc_start)
            t += 1
    return positions


def loop_chunks(lengths, chunk_size, doc_ids=None):
    """Chunk rows [bos, eos, enter_doc, entry_chunk] and per-example chunk offsets. Chunks of chunk_size
    tokens restart at each example and, with doc_ids (doc_mode), at a block opening fewer than
    chunk_size tokens after a document start of an earlier block of the example; enter_doc is
    the doc id of the token before the chunk (0 at an example start) and entry_chunk the last
    chunk so far that holds a block-opening token (0 before any, and without doc_ids)."""
    rows, offsets, start, entry = [], [0], 0, 0
    for length in lengths:
        end = start + length
        cuts, last_doc_start = [start], None
        for t in range(start, end):
            doc = 0 if doc_ids is None else doc_ids[t]
            if doc and (t == start or doc_ids[t - 1] != doc):
                opens = t == start or doc_ids[t - 1] == 0
                if opens and last_doc_start is not None and t - last_doc_start < chunk_size:
                    cuts.append(t)
                last_doc_start = t
        for seg_start, seg_end in zip(cuts, cuts[1:] + [end]):
            for bos in range(seg_start, seg_end, chunk_size):
                eos = min(bos + chunk_size, seg_end)
                enter = doc_ids[bos - 1] if doc_ids is not None and bos > start else 0
                if doc_ids is not None and any(doc_ids[t] and (t == start or doc_ids[t - 1] == 0)
                                               for t in range(bos, eos)):
                    entry = len(rows)  # the chunk holds a block-opening token
                rows.append([bos, eos, enter, entry])
        offsets.append(len(rows))
        start = end
    return rows, offsets


def loop_visible(seq_ids, doc_ids, i, j, causal):
    if causal and j > i:
        return False
    if seq_ids[i] != seq_ids[j]:
        return False
    return doc_ids[i] == 0 or doc_ids[j] == 0 or doc_ids[i] == doc_ids[j]


def loop_doc_spans(lengths, doc_ids):
    spans, t = [], 0
    for length in lengths:
        example = []
        for p in range(length):
            doc = doc_ids[t + p]
            if doc != 0 and (p == 0 or doc_ids[t + p - 1] != doc):
                example.append([p, p + 1])
            elif doc != 0:
                example[-1][1] = p + 1
        spans.append([tuple(span) for span in example])
        t += length
    return spans


def brute_tiles(mask, block_m, block_n):
    """(any visible, all valid pairs visible) per tile, from the dense mask."""
    L = mask.shape[0]
    n_q, n_k = -(-L // block_m), -(-L // block_n)
    padded = torch.zeros(n_q * block_m, n_k * block_n, dtype=torch.bool)
    padded[:L, :L] = mask
    valid = torch.zeros_like(padded)
    valid[:L, :L] = True
    tiles = padded.view(n_q, block_m, n_k, block_n)
    any_tile = tiles.any(3).any(1)
    full_tile = (tiles | ~valid.view_as(tiles)).all(3).all(1)
    return any_tile, full_tile


def dense_from_csr(indptr, indices, full, n_rows, n_cols):
    any_tile = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    full_tile = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    for r in range(n_rows):
        cols = indices[indptr[r]:indptr[r + 1]].long()
        assert bool((cols[1:] > cols[:-1]).all()), "indices must increase within a row"
        any_tile[r, cols] = True
        full_tile[r, cols] = full[indptr[r]:indptr[r + 1]]
    return any_tile, full_tile


def assert_tiles_exact(layout, block_m, block_n, causal):
    summary = layout.tile_summary(block_m, block_n, causal)
    L = layout.total_tokens
    n_q, n_k = -(-L // block_m), -(-L // block_n)
    any_ref, full_ref = brute_tiles(layout.dense_mask(causal), block_m, block_n)
    any_kv, full_kv = dense_from_csr(summary.kv_indptr, summary.kv_indices, summary.kv_full, n_q, n_k)
    any_q, full_q = dense_from_csr(summary.q_indptr, summary.q_indices, summary.q_full, n_k, n_q)
    assert torch.equal(any_kv, any_ref)
    assert torch.equal(full_kv, full_ref & any_ref)
    assert torch.equal(any_q, any_ref.t())
    assert torch.equal(full_q, (full_ref & any_ref).t())
    for t in (summary.kv_indptr, summary.kv_indices, summary.q_indptr, summary.q_indices):
        assert t.dtype == torch.int32
    assert summary.kv_full.dtype == torch.bool and summary.q_full.dtype == torch.bool


def assert_matches_loops(layout, lengths, doc_ids):
    """Every table of the layout equals the token-loop reference."""
    assert layout.cu_seqlens.tolist() == loop_cu_seqlens(lengths)
    assert layout.seq_idx.tolist() == loop_seq_ids(lengths)
    assert layout.doc_ids.tolist() == doc_ids
    assert layout.cu_seqlens.dtype == layout.seq_idx.dtype == layout.doc_ids.dtype == torch.int32
    assert layout.num_seqs == len(lengths)
    assert layout.total_tokens == sum(lengths)
    assert layout.max_seqlen == max(lengths, default=0)
    assert layout.has_documents == any(doc_ids)
    for per_document in (False, True):
        positions = layout.position_ids(per_document=per_document)
        assert positions.dtype == torch.int64
        assert positions.tolist() == loop_positions(lengths, doc_ids, per_document)
    assert layout.doc_spans() == loop_doc_spans(lengths, doc_ids)


# ---------------------------------------------------------------- random layouts


def random_examples(rng, max_examples=6, max_length=40):
    """(length, spans) examples; documents never start at token 0 (an example opens with text)."""
    examples = []
    for _ in range(rng.randint(1, max_examples)):
        length = rng.choice([1, 2, rng.randint(1, max_length)])
        spans, t = [], 1
        while t < length and rng.random() < 0.7:
            start = t + rng.choice([0, 0, rng.randint(0, 4)])
            end = min(length, start + rng.choice([1, rng.randint(1, 9)]))
            if start >= end:
                break
            spans.append((start, end))
            t = end
        examples.append((length, spans))
    return examples


def random_ids(rng, max_examples=6, max_length=40):
    """(lengths, doc_ids) with empty examples, unordered doc ids, examples opening with a document."""
    lengths, doc_ids = [], []
    for _ in range(rng.randint(0, max_examples)):
        length = rng.choice([0, 1, rng.randint(0, max_length)])
        free_ids = list(range(1, 12))
        if doc_ids and doc_ids[-1] in free_ids:
            free_ids.remove(doc_ids[-1])
        rng.shuffle(free_ids)
        ids = []
        while len(ids) < length:
            doc = free_ids.pop() if free_ids and rng.random() < 0.5 else 0
            if doc == 0 and ids and ids[-1] == 0:
                doc = free_ids.pop() if free_ids else 0
            ids += [doc] * rng.randint(1, 6)
            if doc == 0 and not free_ids:
                ids += [0] * length
        lengths.append(length)
        doc_ids += ids[:length]
    return lengths, doc_ids


def layout_from_ids(lengths, doc_ids):
    cu = torch.tensor(loop_cu_seqlens(lengths), dtype=torch.int64)
    return DocLayout.from_cu_seqlens(cu, torch.tensor(doc_ids, dtype=torch.int64))


SEEDS = [pytest.param(seed, id=f"seed{seed}") for seed in range(12)]


# ---------------------------------------------------------------- worked examples


def test_module_docstring_example():
    layout = DocLayout.from_examples([(6, [(1, 3), (3, 5)]), (3, [])])
    assert layout.cu_seqlens.tolist() == [0, 6, 9]
    assert layout.seq_idx.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert layout.doc_ids.tolist() == [0, 1, 1, 2, 2, 0, 0, 0, 0]
    assert layout.position_ids().tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert layout.position_ids(per_document=True).tolist() == [0, 1, 2, 1, 2, 5, 0, 1, 2]
    assert layout.dense_mask()[4].tolist() == [True, False, False, True, True] + [False] * 4
    assert layout.doc_spans() == [[(1, 3), (3, 5)], []]
    assert layout.retrieval_blocks() == [[(1, 5)], []]


def test_index_docstring_example():
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    assert prepare_lens(cu).tolist() == [3, 0, 5]
    assert prepare_seq_idx(cu).tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    assert prepare_position_ids(cu).tolist() == [0, 1, 2, 0, 1, 2, 3, 4]


def test_chunk_table_docstring_example():
    layout = DocLayout.from_cu_seqlens(torch.tensor([0, 5, 9]), torch.tensor([0, 1, 1, 1, 2, 0, 0, 0, 0]))
    table = layout.chunk_table(2, doc_mode=True)
    assert table.chunks.tolist() == [[0, 2, 0, 0], [2, 4, 1, 0], [4, 5, 1, 0], [5, 7, 0, 0], [7, 9, 0, 0]]
    assert table.seq_chunk_offsets.tolist() == [0, 3, 5] and table.num_chunks == 5 and table.chunk_size == 2
    plain = layout.chunk_table(2)
    assert plain.chunks.tolist() == [[0, 2, 0, 0], [2, 4, 0, 0], [4, 5, 0, 0], [5, 7, 0, 0], [7, 9, 0, 0]]


def test_chunk_table_ends_a_chunk_before_a_second_block():
    """doc_mode: the documents that start in one chunk belong to one retrieval block."""
    docs = torch.tensor([1, 1, 2, 0, 3, 4, 0, 0, 5, 0])
    layout = DocLayout.from_cu_seqlens(torch.tensor([0, 10]), docs)
    assert layout.chunk_table(8, doc_mode=True).chunks.tolist() == [[0, 4, 0, 0], [4, 8, 0, 1], [8, 10, 0, 2]]
    assert layout.chunk_table(4, doc_mode=True).chunks.tolist() == [[0, 4, 0, 0], [4, 8, 0, 1], [8, 10, 0, 2]]
    assert layout.chunk_table(3, doc_mode=True).chunks.tolist() == [[0, 3, 0, 0], [3, 4, 2, 0], [4, 7, 0, 2],
                                                                    [7, 10, 0, 3]]
    assert layout.chunk_table(8).chunks.tolist() == [[0, 8, 0, 0], [8, 10, 0, 0]]


def test_empty_row():
    layout = DocLayout.from_examples([])
    assert layout.cu_seqlens.tolist() == [0] and layout.total_tokens == 0 and layout.num_seqs == 0
    assert layout.max_seqlen == 0 and not layout.has_documents
    assert layout.doc_spans() == [] and layout.retrieval_blocks() == []
    assert layout.chunk_table(4).chunks.shape == (0, 4)
    assert layout.chunk_table(4, doc_mode=True).seq_chunk_offsets.tolist() == [0]
    summary = layout.tile_summary(16, 16)
    assert summary.kv_indptr.tolist() == [0] and summary.q_indices.numel() == 0


# ---------------------------------------------------------------- constructors vs loops


@pytest.mark.parametrize("seed", SEEDS)
def test_from_examples_matches_loops_and_from_ids(seed):
    rng = random.Random(seed)
    examples = random_examples(rng)
    lengths = [length for length, _ in examples]
    doc_ids = loop_doc_ids(examples)
    layout = DocLayout.from_examples(examples)
    assert_matches_loops(layout, lengths, doc_ids)
    assert layout.doc_spans() == [spans for _, spans in examples]
    by_ids = DocLayout.from_ids(torch.tensor(loop_seq_ids(lengths)), torch.tensor(doc_ids))
    by_cu = layout_from_ids(lengths, doc_ids)
    for other in (by_ids, by_cu):
        for name in ("cu_seqlens", "seq_idx", "doc_ids"):
            assert torch.equal(getattr(layout, name), getattr(other, name)), name
        assert (other.max_seqlen, other.has_documents) == (layout.max_seqlen, layout.has_documents)


@pytest.mark.parametrize("seed", SEEDS)
def test_from_cu_seqlens_with_empty_examples_and_unordered_ids(seed):
    lengths, doc_ids = random_ids(random.Random(100 + seed))
    layout = layout_from_ids(lengths, doc_ids)
    assert_matches_loops(layout, lengths, doc_ids)


def test_from_cu_seqlens_without_doc_ids_is_all_shared():
    layout = DocLayout.from_cu_seqlens(torch.tensor([0, 0, 5, 7]), total=7)
    assert layout.doc_ids.tolist() == [0] * 7 and not layout.has_documents
    assert layout.position_ids(per_document=True).tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert torch.equal(layout.dense_mask(), layout.dense_mask(causal=True))


def test_retrieval_blocks():
    layout = DocLayout.from_cu_seqlens(
        torch.tensor([0, 8, 11]), torch.tensor([0, 1, 2, 2, 0, 3, 0, 4, 5, 0, 0])
    )
    assert layout.retrieval_blocks() == [[(1, 4), (5, 6), (7, 8)], [(0, 1)]]
    assert layout.doc_spans() == [[(1, 2), (2, 4), (5, 6), (7, 8)], [(0, 1)]]


def test_per_document_positions_start_at_their_retrieval_block():
    layout = DocLayout.from_cu_seqlens(
        torch.tensor([0, 8, 11]), torch.tensor([0, 1, 2, 2, 0, 3, 0, 4, 5, 0, 0])
    )
    assert layout.position_ids(per_document=True).tolist() == [0, 1, 1, 2, 4, 5, 6, 7, 0, 1, 2]


def test_per_document_positions_do_not_depend_on_sibling_documents():
    """Swapping two documents of different lengths moves neither's positions; shared text after
    the block keeps its example position."""
    ab = DocLayout.from_examples([(12, [(2, 5), (5, 10)])]).position_ids(per_document=True)
    ba = DocLayout.from_examples([(12, [(2, 7), (7, 10)])]).position_ids(per_document=True)
    assert ab[2:5].tolist() == ba[7:10].tolist() == [2, 3, 4]
    assert ab[5:10].tolist() == ba[2:7].tolist() == [2, 3, 4, 5, 6]
    assert ab[10:].tolist() == ba[10:].tolist() == [10, 11]


def test_to_device_keeps_tables():
    layout = DocLayout.from_examples([(5, [(1, 3)]), (4, [(2, 3)])])
    moved = layout.to("cpu")
    for name in ("cu_seqlens", "seq_idx", "doc_ids"):
        assert torch.equal(getattr(moved, name), getattr(layout, name))
    assert moved.max_seqlen == 5 and moved.has_documents


@pytest.mark.gpu
def test_cuda_layout_matches_cpu():
    layout = DocLayout.from_examples(random_examples(random.Random(7), max_length=300))
    on_gpu = layout.to("cuda")
    assert on_gpu.device.type == "cuda"
    for per_document in (False, True):
        assert torch.equal(on_gpu.position_ids(per_document).cpu(), layout.position_ids(per_document))
    got, want = on_gpu.tile_summary(64, 32), layout.tile_summary(64, 32)
    for name in ("kv_indptr", "kv_indices", "kv_full", "q_indptr", "q_indices", "q_full"):
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    cuda_built = DocLayout.from_cu_seqlens(layout.cu_seqlens.cuda(), layout.doc_ids.cuda())
    assert torch.equal(cuda_built.seq_idx.cpu(), layout.seq_idx)


# ---------------------------------------------------------------- chunk tables


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("seed", SEEDS[:6])
def test_chunk_table_matches_loop(seed, chunk_size):
    lengths, doc_ids = random_ids(random.Random(200 + seed), max_length=150)
    layout = layout_from_ids(lengths, doc_ids)
    for doc_mode in (False, True):
        table = layout.chunk_table(chunk_size, doc_mode=doc_mode)
        rows, offsets = loop_chunks(lengths, chunk_size, doc_ids if doc_mode else None)
        assert table.chunks.tolist() == rows
        assert table.chunks.shape == (len(rows), 4)
        assert table.seq_chunk_offsets.tolist() == offsets
        assert table.chunks.dtype == table.seq_chunk_offsets.dtype == torch.int32
        assert layout.chunk_table(chunk_size, doc_mode=doc_mode) is table


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([0, 0, 5], id="leading-empty"),
        pytest.param([1, 1, 1], id="length-1"),
        pytest.param([64, 65, 63], id="around-chunk"),
        pytest.param([0], id="single-empty"),
    ],
)
def test_chunk_table_awkward_lengths(lengths):
    layout = DocLayout.from_cu_seqlens(torch.tensor(loop_cu_seqlens(lengths)))
    rows, offsets = loop_chunks(lengths, 64)
    assert layout.chunk_table(64).chunks.tolist() == rows
    assert layout.chunk_table(64).seq_chunk_offsets.tolist() == offsets


# ---------------------------------------------------------------- masks and tile summaries


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("seed", SEEDS[:6])
def test_dense_mask_matches_rule(seed, causal):
    lengths, doc_ids = random_ids(random.Random(300 + seed), max_length=12)
    layout = layout_from_ids(lengths, doc_ids)
    seq_ids = loop_seq_ids(lengths)
    L = len(doc_ids)
    expected = [[loop_visible(seq_ids, doc_ids, i, j, causal) for j in range(L)] for i in range(L)]
    assert layout.dense_mask(causal).tolist() == expected


BLOCKS = [
    pytest.param(16, 16, id="16x16"),
    pytest.param(32, 32, id="32x32"),
    pytest.param(64, 64, id="64x64"),
    pytest.param(16, 64, id="16x64"),
    pytest.param(64, 32, id="64x32"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("block_m,block_n", BLOCKS)
@pytest.mark.parametrize("seed", SEEDS[:8])
def test_tile_summary_exact(seed, block_m, block_n, causal):
    rng = random.Random(400 + seed)
    if seed % 2:
        layout = DocLayout.from_examples(random_examples(rng, max_examples=5, max_length=90))
    else:
        layout = layout_from_ids(*random_ids(rng, max_examples=5, max_length=90))
    assert_tiles_exact(layout, block_m, block_n, causal)


@pytest.mark.parametrize(
    "examples",
    [
        pytest.param([(63, [(5, 6), (6, 40)])], id="T63-one-token-doc"),
        pytest.param([(1, []), (1, []), (70, [(1, 70)])], id="length-1-then-doc-to-end"),
        pytest.param([(64, [(10, 20), (20, 30), (30, 64)])], id="T64-docs-to-block-end"),
        pytest.param([(130, [])], id="T130-plain-causal"),
    ],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_tile_summary_awkward(examples, causal):
    layout = DocLayout.from_examples(examples)
    for block_m, block_n in [(16, 16), (32, 16), (1, 1), (7, 5)]:
        assert_tiles_exact(layout, block_m, block_n, causal)


def test_tile_summary_plain_causal_full_tiles():
    summary = DocLayout.from_examples([(64, [])]).tile_summary(16, 16)
    assert summary.kv_indptr.tolist() == [0, 1, 3, 6, 10]
    assert summary.kv_indices.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    diagonal = [False, True, False, True, True, False, True, True, True, False]
    assert summary.kv_full.tolist() == diagonal


def test_tile_summary_is_cached_and_typed():
    layout = DocLayout.from_examples([(40, [(2, 20)])])
    summary = layout.tile_summary(16, 32)
    assert isinstance(summary, TileSummary)
    assert (summary.block_m, summary.block_n, summary.causal) == (16, 32, True)
    assert layout.tile_summary(16, 32) is summary
    assert layout.tile_summary(16, 32, causal=False) is not summary


def _big_examples(rng, total=32768, num_docs=500, num_examples=8):
    """Examples filling `total` tokens holding `num_docs` documents in retrieval blocks."""
    length = total // num_examples
    docs_per_example = num_docs // num_examples + 1
    examples, placed = [], 0
    for _ in range(num_examples):
        spans, t = [], 100
        for _ in range(min(docs_per_example, num_docs - placed)):
            size = rng.randint(20, 60)
            spans.append((t, t + size))
            t += size
        placed += len(spans)
        examples.append((length, spans))
    return examples


@pytest.fixture
def one_thread():
    """Time algorithmic cost, not oversubscription: the CPU test machines are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_32k_row_with_500_docs_is_cheap():
    examples = _big_examples(random.Random(0))
    assert sum(len(spans) for _, spans in examples) == 500

    def build():
        layout = DocLayout.from_examples(examples)
        layout.tile_summary(128, 128)
        layout.chunk_table(64)
        layout.position_ids(per_document=True)
        return layout

    build()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        layout = build()
        best = min(best, time.perf_counter() - start)
    assert layout.total_tokens == 32768
    assert best < 0.5, f"building a 32K layout took {best:.3f} s"


def test_32k_tile_summary_spot_check():
    """Exactness at scale on one example of the 32K row, against its dense mask."""
    examples = _big_examples(random.Random(1), total=4096, num_docs=60, num_examples=1)
    assert_tiles_exact(DocLayout.from_examples(examples), 128, 128, causal=True)


# ---------------------------------------------------------------- bad inputs


def t(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


BAD_CU_SEQLENS = [
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([1, 3])), "start at 0", id="cu-not-from-0"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 3, 2])), "non-decreasing", id="cu-decreasing"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 3]), total=4), "end at the token count", id="cu-total"),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 3]), t([0, 0, 0, 0])), "end at the token count", id="cu-vs-docs"
    ),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 3]), t([0, 0, 0]), total=4), "end at the token count",
        id="docs-vs-total",
    ),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0.0, 3.0], torch.float32)), "integer", id="cu-float"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 1], torch.bool)), "integer", id="cu-bool"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([[0, 3]])), "1-D", id="cu-2d"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([])), "at least one entry", id="cu-empty"),
    pytest.param(lambda: DocLayout.from_cu_seqlens([0, 3]), "torch.Tensor", id="cu-list"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 2**31])), "int32", id="cu-overflow"),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 3]), total=3.0), "total must be an int", id="total-float"),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 2]), torch.zeros(2, dtype=torch.int64, device="meta")),
        "one device", id="device-mismatch",
    ),
]

BAD_DOC_IDS = [
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 3]), t([0, -1, 0])), "doc_ids must be >= 0", id="doc-negative"),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 5]), t([0, 1, 0, 1, 0])),
        "document 1 of example 0 is not contiguous", id="doc-split",
    ),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 2, 4]), t([0, 3, 3, 0])),
        "document 3 crosses the boundary between example 0 and example 1", id="doc-crosses-example",
    ),
    pytest.param(
        lambda: DocLayout.from_cu_seqlens(t([0, 2]), t([0.0, 1.0], torch.float64)), "integer", id="doc-float"
    ),
    pytest.param(lambda: DocLayout.from_cu_seqlens(t([0, 2]), t([[0, 1]])), "1-D", id="doc-2d"),
]

BAD_SEQ_IDS = [
    pytest.param(lambda: DocLayout.from_ids(t([0, 1, 0]), t([0, 0, 0])), "seq_ids decrease at token 2", id="seq-decrease"),
    pytest.param(lambda: DocLayout.from_ids(t([0, 2]), t([0, 0])), "contiguous", id="seq-gap"),
    pytest.param(lambda: DocLayout.from_ids(t([1, 1]), t([0, 0])), "seq_ids must start at 0", id="seq-not-from-0"),
    pytest.param(lambda: DocLayout.from_ids(t([0.0, 0.0], torch.float32), t([0, 0])), "integer", id="seq-float"),
    pytest.param(lambda: DocLayout.from_ids(t([0, 0]), t([0, 0, 0])), "but doc_ids has 3", id="seq-doc-length"),
    pytest.param(lambda: DocLayout.from_ids(t([0, 0]), None), "doc_ids must be a torch.Tensor", id="seq-no-docs"),
]

BAD_EXAMPLES = [
    pytest.param([(-1, [])], "length must be >= 0", id="ex-negative-length"),
    pytest.param([(3.0, [])], "length must be an int", id="ex-float-length"),
    pytest.param([(True, [])], "length must be an int", id="ex-bool-length"),
    pytest.param([(5, [(3, 2)])], r"0 <= start < end <= length", id="ex-reversed-span"),
    pytest.param([(5, [(2, 2)])], r"0 <= start < end <= length", id="ex-empty-span"),
    pytest.param([(5, [(3, 6)])], r"0 <= start < end <= length", id="ex-span-past-end"),
    pytest.param([(5, [(1, 3), (2, 4)])], "overlaps or precedes", id="ex-overlap"),
    pytest.param([(5, [(3, 4), (1, 2)])], "overlaps or precedes", id="ex-unordered"),
    pytest.param([(5,)], "example 0 must be a pair", id="ex-not-pair"),
    pytest.param([(5, [(1, 2, 3)])], "span must be a pair", id="ex-span-triple"),
    pytest.param([(5, 3)], "sequence of", id="ex-spans-not-list"),
    pytest.param([(2**31, [])], "int32", id="ex-too-long"),
    pytest.param([(2, [(1, 2)]), (2, [(0, 1)])], "crosses the boundary", id="ex-doc-crosses-example"),
    pytest.param(7, "examples must be a sequence", id="ex-not-list"),
]


@pytest.mark.parametrize("build,match", BAD_CU_SEQLENS + BAD_DOC_IDS + BAD_SEQ_IDS)
def test_bad_ids_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("examples,match", BAD_EXAMPLES)
def test_bad_examples_raise(examples, match):
    with pytest.raises(ValueError, match=match):
        DocLayout.from_examples(examples)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda layout: layout.chunk_table(0), "chunk_size", id="chunk-0"),
        pytest.param(lambda layout: layout.chunk_table(2.5), "chunk_size", id="chunk-float"),
        pytest.param(lambda layout: layout.tile_summary(0, 16), "block_m must be positive", id="block-m-0"),
        pytest.param(lambda layout: layout.tile_summary(16, "16"), "block_n must be an int", id="block-n-str"),
    ],
)
def test_bad_table_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(DocLayout.from_examples([(4, [(1, 2)])]))


# ---------------------------------------------------------------- fuzz: layout or ValueError


def reference_valid(cu, doc_ids, total):
    """Whether (cu_seqlens, doc_ids, total) lists form a valid layout, by token loops."""
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        return False
    if cu[-1] != len(doc_ids) or (total is not None and total != len(doc_ids)):
        return False
    if any(d < 0 for d in doc_ids):
        return False
    seen = set()
    for n in range(len(cu) - 1):
        for p in range(cu[n], cu[n + 1]):
            doc = doc_ids[p]
            if doc == 0:
                continue
            if p > 0 and doc_ids[p - 1] == doc:
                if p == cu[n]:
                    return False
                continue
            if (n, doc) in seen:
                return False
            seen.add((n, doc))
    return True


def assert_valid_layout_tables(layout, lengths, doc_ids):
    assert_matches_loops(layout, lengths, doc_ids)
    for doc_mode in (False, True):
        rows, offsets = loop_chunks(lengths, 3, doc_ids if doc_mode else None)
        assert layout.chunk_table(3, doc_mode).chunks.tolist() == rows
        assert layout.chunk_table(3, doc_mode).seq_chunk_offsets.tolist() == offsets
    assert_tiles_exact(layout, 3, 2, causal=True)
    assert_tiles_exact(layout, 4, 5, causal=False)


@st.composite
def cu_and_doc_ids(draw):
    lengths = draw(st.lists(st.integers(0, 5), max_size=5))
    cu = loop_cu_seqlens(lengths)
    if draw(st.booleans()):
        cu = draw(st.lists(st.integers(-2, 14), max_size=6))
    size = draw(st.sampled_from([max(cu[-1], 0) if cu else 0, draw(st.integers(0, 14))]))
    doc_ids = draw(st.lists(st.integers(-1, 3), min_size=size, max_size=size))
    total = draw(st.one_of(st.none(), st.just(size), st.integers(-1, 14)))
    return cu, doc_ids, total


@FUZZ
@given(case=cu_and_doc_ids(), dtype=st.sampled_from([torch.int32, torch.int64, torch.int16, torch.float32, torch.bool]))
def test_fuzz_from_cu_seqlens(case, dtype):
    cu, doc_ids, total = case
    valid = dtype not in (torch.float32, torch.bool) and reference_valid(cu, doc_ids, total)
    try:
        layout = DocLayout.from_cu_seqlens(t(cu, dtype), t(doc_ids, dtype), total=total)
    except ValueError:
        assert not valid, "a valid layout was rejected"
        return
    assert valid, "an invalid layout was accepted"
    assert_valid_layout_tables(layout, [b - a for a, b in zip(cu, cu[1:])], doc_ids)


@FUZZ
@given(
    steps=st.lists(st.integers(-1, 2), max_size=16),
    first=st.sampled_from([0, 0, 0, 1]),
    docs=st.lists(st.integers(-1, 3), max_size=17),
)
def test_fuzz_from_ids(steps, first, docs):
    seq_ids = [first]
    for step in steps:
        seq_ids.append(seq_ids[-1] + step)
    docs = docs[: len(seq_ids)]
    lengths = [seq_ids.count(n) for n in range(max(seq_ids) + 1)] if seq_ids and min(seq_ids) >= 0 else []
    valid = (
        first == 0
        and all(0 <= s <= 1 for s in steps)
        and len(docs) == len(seq_ids)
        and reference_valid(loop_cu_seqlens(lengths), docs, None)
    )
    try:
        layout = DocLayout.from_ids(t(seq_ids), t(docs))
    except ValueError:
        assert not valid, "a valid layout was rejected"
        return
    assert valid, "an invalid layout was accepted"
    assert_valid_layout_tables(layout, lengths, docs)


@st.composite
def well_formed_example(draw):
    length = draw(st.integers(0, 9))
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=6, unique=True)))
    return length, list(zip(cuts[::2], cuts[1::2]))


garbage = st.one_of(st.none(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=2))
span = st.one_of(st.tuples(st.integers(-1, 9), st.integers(-1, 9)), garbage, st.tuples(st.integers(0, 9)))
example = st.one_of(
    well_formed_example(),
    well_formed_example(),
    well_formed_example(),
    st.tuples(st.integers(-1, 9), st.lists(span, max_size=3)),
    st.tuples(st.one_of(st.integers(-1, 9), garbage), st.one_of(st.lists(span, max_size=3), garbage)),
    garbage,
)


def reference_examples_valid(examples):
    for item in examples:
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        length, spans = item
        if type(length) is not int or length < 0 or not isinstance(spans, list):
            return False
        previous_end = 0
        for s in spans:
            if not isinstance(s, tuple) or len(s) != 2 or any(type(v) is not int for v in s):
                return False
            if not previous_end <= s[0] < s[1] <= length:
                return False
            previous_end = s[1]
    return True


@FUZZ
@given(examples=st.lists(example, max_size=5))
def test_fuzz_from_examples(examples):
    valid = reference_examples_valid(examples)
    if valid:
        lengths = [length for length, _ in examples]
        doc_ids = loop_doc_ids(examples)
        valid = reference_valid(loop_cu_seqlens(lengths), doc_ids, None)
    try:
        layout = DocLayout.from_examples(examples)
    except ValueError:
        assert not valid, "valid examples were rejected"
        return
    assert valid, "invalid examples were accepted"
    assert_valid_layout_tables(layout, lengths, doc_ids)
