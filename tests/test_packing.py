"""Best-fit-decreasing packing, targets, DocLayout per row, the resumable sharded loader, end to end."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refrag.data import (IGNORE_INDEX, PackedLoader, load_queries, load_tokenizer, pack_examples, packing_efficiency,
                         render_conversations)
from refrag.data.conversations import EMBEDDED_KB_DIR, build_conversations
from refrag.data.packing import best_fit_decreasing, example_targets
from refrag.data.render import RenderedExample
from refrag.retrieval import KnowledgeBase, RetrievalManager, read_documents

PAD = 0


def example(length, docs=(), learn=None, start=100):
    """Synthetic example: ids start..start+length, documents at the given spans, loss on `learn` positions."""
    ids = np.arange(start, start + length, dtype=np.int32)
    doc_ids = np.zeros(length, np.int32)
    for k, (s, e) in enumerate(docs, start=1):
        doc_ids[s:e] = k
    mask = np.zeros(length, np.uint8)
    if learn is not None:
        mask[learn] = 1
    return RenderedExample(ids, mask, doc_ids)


@pytest.mark.parametrize("lengths, capacity, expected", [
    pytest.param([5, 3, 7, 1], 8, [[2, 3], [0, 1]], id="two-full-bins"),
    pytest.param([4, 4, 4], 8, [[0, 1], [2]], id="ties-by-index"),
    pytest.param([1], 1, [[0]], id="one-token"),
    pytest.param([6, 5, 4, 3, 2], 10, [[0, 2], [1, 3, 4]], id="fills-exactly"),
    pytest.param([7, 4, 4, 1], 10, [[0], [1, 2, 3]], id="best-fit-not-first-fit"),
])
def test_best_fit_decreasing(lengths, capacity, expected):
    assert best_fit_decreasing(lengths, capacity) == expected


def test_bfd_never_overfills_and_places_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=300).tolist()
    bins = best_fit_decreasing(lengths, 63 + 37)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= int(np.ceil(sum(lengths) / 100 * 11 / 9)) + 1


def test_too_long_example_is_an_error():
    with pytest.raises(ValueError, match="longer than max_len=8"):
        pack_examples([example(9)], max_len=8, pad_id=PAD)


def test_targets_shift_and_mask():
    ex = example(6, learn=[3, 4, 5])
    assert example_targets(ex).tolist() == [IGNORE_INDEX, IGNORE_INDEX, 103, 104, 105, IGNORE_INDEX]


def test_rows_targets_never_cross_examples_and_layout_validates():
    examples = [example(5, docs=[(1, 2), (2, 4)], learn=[4], start=100), example(1, start=200),
                example(4, learn=[1, 2, 3], start=300)]
    rows = pack_examples(examples, max_len=12, pad_id=PAD)
    assert len(rows) == 1
    row = rows[0]
    assert row.input_ids.tolist() == [100, 101, 102, 103, 104, 300, 301, 302, 303, 200, PAD, PAD]
    assert row.targets.tolist() == [-100, -100, -100, 104, -100, 301, 302, 303, -100, -100, -100, -100]
    assert row.loss_mask.tolist() == [0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert row.examples == [(5, [(1, 2), (2, 4)]), (4, []), (1, []), (2, [])]
    assert row.num_tokens == 10 and packing_efficiency(rows) == pytest.approx(10 / 12)
    layout = row.layout()
    assert layout.cu_seqlens.tolist() == [0, 5, 9, 10, 12]
    assert layout.doc_ids.tolist() == row.doc_ids.tolist() == [0, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]


def test_exactly_full_row_has_no_padding_example():
    rows = pack_examples([example(3), example(5)], max_len=8, pad_id=PAD)
    assert [r.examples for r in rows] == [[(5, []), (3, [])]]
    assert rows[0].layout().cu_seqlens.tolist() == [0, 5, 8]


# ---------------------------------------------------------------- loader

@pytest.fixture
def rows():
    return pack_examples([example(n, start=1000 * n) for n in range(1, 12)], max_len=11, pad_id=PAD)


def batches_ids(loader):
    return [b.input_ids[:, -1].tolist() + b.input_ids[:, 0].tolist() for b in loader]


def test_loader_epochs_are_seeded_permutations(rows):
    loader = PackedLoader(rows, batch_size=2, seed=3)
    epoch0, epoch1 = batches_ids(loader), batches_ids(loader)
    assert len(epoch0) == len(rows) // 2 and epoch0 != epoch1
    assert batches_ids(PackedLoader(rows, batch_size=2, seed=3)) == epoch0
    assert batches_ids(PackedLoader(rows, batch_size=2, seed=4)) != epoch0


def test_loader_resumes_exactly(rows):
    full = PackedLoader(rows, batch_size=1, seed=7)
    expected = batches_ids(full) + batches_ids(full)
    first = PackedLoader(rows, batch_size=1, seed=7)
    seen = []
    for i, batch in enumerate(first):
        seen.append(batch.input_ids[:, -1].tolist() + batch.input_ids[:, 0].tolist())
        if i == 2:
            break
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["position"]) == (0, 3)
    resumed = PackedLoader(rows, batch_size=1, seed=7)
    resumed.load_state_dict(state)
    assert seen + batches_ids(resumed) + batches_ids(resumed) == expected


def test_loader_shards_are_disjoint_and_equal(rows):
    shards = [PackedLoader(rows, batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    taken = [[tuple(b.input_ids[:, 0].tolist()) for b in s] for s in shards]
    assert len(taken[0]) == len(taken[1]) == len(rows) // 4
    flat = [x for t in taken for batch in t for x in batch]
    assert len(flat) == len(set(flat))


def test_loader_state_mismatch_and_bad_arguments(rows):
    state = PackedLoader(rows, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed is 1 in the checkpoint, 2 here"):
        PackedLoader(rows, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        PackedLoader(rows, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot fill one step"):
        PackedLoader(rows[:3], batch_size=2, world_size=2)


def test_batch_layout_is_the_flattened_rows(rows):
    batch = next(iter(PackedLoader(rows, batch_size=3, shuffle=False)))
    assert batch.input_ids.shape == batch.targets.shape == (3, 11) and batch.input_ids.dtype == torch.int64
    assert torch.equal(batch.loss_mask, batch.targets != IGNORE_INDEX)
    assert batch.num_tokens == int((batch.input_ids != PAD).sum())
    layout = batch.layout()
    assert layout.cu_seqlens[-1].item() == 33
    assert torch.equal(layout.doc_ids, batch.doc_ids.reshape(-1))


# ---------------------------------------------------------------- end to end

def test_end_to_end_prepare_search_augment_render_pack(tmp_path):
    """prepare-kb -> search -> augment -> render -> pack -> DocLayout, on a slice of the embedded KB."""
    tok = load_tokenizer()
    records = load_queries("val")[:40]
    wanted = {g for r in records for g in r["gold_doc_ids"]}
    docs = [d for d in read_documents(EMBEDDED_KB_DIR / "documents.jsonl") if d["id"] in wanted
            or d["id"].startswith("event-0")]
    docs_path = tmp_path / "documents.jsonl"
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    done = subprocess.run([sys.executable, "-m", "refrag.retrieval", "prepare-kb", "--docs", str(docs_path),
                           "--out", str(tmp_path / "kb"), "--encoder", "hashing:128"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    manager = RetrievalManager("hybrid", knowledge_base=tmp_path / "kb")
    single = next(r for r in records if r["type"] == "single_hop")
    conv = manager.augment_conversation({"messages": [{"role": "user", "content": single["question"]},
                                                      {"role": "assistant", "content": single["answer"]}]}, 1)
    assert conv["messages"][0]["role"] == "retrieval"
    conversations = build_conversations(records, manager, top_k=3)
    examples, stats = render_conversations(conversations, tok, max_len=2048)
    assert stats.rendered == len(records) and stats.dropped_too_long == 0
    rows = pack_examples(examples, max_len=2048, pad_id=tok.pad_id)
    assert sum(r.num_tokens for r in rows) == sum(len(e) for e in examples)
    for row in rows:
        layout = row.layout()
        assert layout.cu_seqlens[-1].item() == 2048
        assert torch.equal(layout.doc_ids, torch.from_numpy(row.doc_ids))
        learn = row.targets != IGNORE_INDEX
        assert np.isin(row.input_ids[1:][learn[:-1]], [tok.pad_id]).sum() == 0
    n_docs = sum(max((d for d in e.doc_ids), default=0) for e in examples)
    assert n_docs == sum(len(m["documents"]) for c in conversations for m in c["messages"] if m["role"] == "retrieval")
    batch = next(iter(PackedLoader(rows, batch_size=1)))
    assert batch.layout().num_seqs >= 2


@pytest.mark.slow
def test_packing_efficiency_on_embedded_kb_at_8k():
    """Train split, BM25 retrieval, top-5: packing efficiency above 95% at max_len 8192."""
    tok = load_tokenizer()
    kb = KnowledgeBase.build(read_documents(EMBEDDED_KB_DIR / "documents.jsonl"), "hashing:32", show_progress=False)
    conversations = build_conversations(load_queries("train"), RetrievalManager("bm25", knowledge_base=kb), top_k=5)
    examples, stats = render_conversations(conversations, tok, max_len=8192)
    assert stats.dropped_too_long == 0
    rows = pack_examples(examples, 8192, tok.pad_id)
    assert packing_efficiency(rows) > 0.95
