"""Helpers of bench/: the train-step setup (reference-op swap, FLOP accounting), the scaling
estimate and the attention tile-density measures (checked against the dense mask)."""
import pytest
import torch

import refrag_kernels
import refrag.model.lm as lm
from bench import scaling_estimate, tile_density
from bench.train_setup import build_train_step, effective_seq_len
from refrag_kernels import DocLayout


def test_effective_seq_len_weights_examples_by_their_tokens():
    layout = DocLayout.from_examples([(3, []), (5, [(1, 4)])])
    assert effective_seq_len(layout) == round((3 * 3 + 5 * 5) / 8)


def test_train_step_baseline_computes_the_same_loss():
    step = build_train_step("T,M", 48, torch.device("cpu"), smoke=True)
    with torch.no_grad():
        ours = step.forward()
        with refrag_kernels.use_backend("reference"):
            baseline = step.forward()
    torch.testing.assert_close(ours, baseline, atol=1e-4, rtol=1e-4)
    assert step.flops() == step.model.flops_per_token(effective_seq_len(step.layout)) * 48
    assert bool((step.targets[0, step.layout.doc_ids.long() != 0] == lm.IGNORE_INDEX).all())


def test_train_step_runs_the_optimizer():
    step = build_train_step("T,M", 48, torch.device("cpu"), smoke=True)
    head = step.model.lm_head.weight.detach().clone()
    with refrag_kernels.use_backend("reference"):
        step.run()
    assert not torch.equal(head, step.model.lm_head.weight)
    assert all(p.grad is None for p in step.model.parameters())


def brute_force(layout: DocLayout, block_m: int, block_n: int):
    """Visible pairs and tiles with any visible pair, from the dense L x L mask."""
    mask = layout.dense_mask(causal=True)
    L = layout.total_tokens
    tiles = 0
    for i in range(0, L, block_m):
        for j in range(0, L, block_n):
            tiles += bool(mask[i:i + block_m, j:j + block_n].any())
    return int(mask.sum()), tiles


@pytest.mark.parametrize("length, examples, docs", [
    pytest.param(256, 2, 3, id="L256-2ex-3docs"),
    pytest.param(301, 3, 5, id="L301-3ex-5docs"),
    pytest.param(130, 1, 1, id="L130-one-doc"),
])
def test_density_matches_the_dense_mask(length, examples, docs):
    layout = tile_density.rag_row(length, examples, docs)
    assert layout.num_seqs == examples and layout.total_tokens == length
    pairs, tiles = brute_force(layout, 32, 16)
    row = tile_density.density_row(layout, 32, 16)
    varlen_chunks = sum(-(-n // tile_density.SSD_CHUNK) for n in layout.cu_seqlens.diff().tolist())
    assert row["ssd_fill_varlen"] == pytest.approx(length / (varlen_chunks * tile_density.SSD_CHUNK))
    assert 0 < row["ssd_fill_doc_mode"] <= row["ssd_fill_varlen"]
    assert row["pair_density"] == pytest.approx(pairs / (length * (length + 1) / 2))
    assert row["tiles"] == tiles
    assert row["tile_efficiency"] == pytest.approx(pairs / (tiles * 32 * 16))
    assert 0 < row["vs_varlen"] <= 1 and 0 < row["tiles_vs_varlen"] <= 1
    if docs == 1:  # one document per example hides nothing: tokens see all earlier example tokens
        assert row["vs_varlen"] == 1


def test_rag_row_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="cannot hold 100 documents"):
        tile_density.rag_row(64, 1, 100)
    with pytest.raises(ValueError, match="cannot hold 10 examples"):
        tile_density.rag_row(8, 10, 1)


def test_attention_flops_is_the_length_dependent_part_of_the_model_flops():
    model = scaling_estimate.model_on_meta("T*4+[T,M]*2+M*4")
    grown = model.flops_per_token(2000) - model.flops_per_token(1000)
    assert grown == scaling_estimate.attention_flops(model, 1000)


@pytest.mark.parametrize("link_gbps, overlap", [pytest.param(1e6, 0.0, id="instant-link"),
                                                pytest.param(10.0, 0.7, id="slow-link")])
def test_scaling_efficiency_falls_with_gradient_bytes(link_gbps, overlap):
    def efficiency(nbytes, gpus):
        return scaling_estimate.scaling_efficiency(0.01, 100_000_000, nbytes, gpus, link_gbps, overlap)

    assert efficiency(2, 1) == 1.0
    assert 0 < efficiency(4, 8) <= efficiency(2, 8) <= efficiency(2, 2) <= 1.0
    if link_gbps > 1e5:
        assert efficiency(4, 8) == pytest.approx(1.0, abs=1e-3)
    else:
        assert efficiency(4, 8) < efficiency(2, 8)


def test_recall_probe_examples_supervise_only_the_values():
    import torch

    from bench.recall_probe import batch, example

    gen = torch.Generator().manual_seed(0)
    ids, targets, spans = example(pairs=4, docs=2, fill=2, remap=True, gen=gen)
    assert spans == [(1, 5), (5, 9)] and len(ids) == 2 + 8 + 4 * 4
    context = dict(zip(ids[1:9:2].tolist(), ids[2:9:2].tolist()))
    learned = (targets != -100).nonzero().flatten().tolist()
    assert len(learned) == 4
    for position in learned:  # position holds the last filler; 2 + fill back is the remapped key
        assert targets[position] == ids[position + 1] == context[int(ids[position - 2]) - 2200]
    row, row_targets, layout = batch(3, pairs=4, docs=2, fill=0, remap=False, gen=gen)
    assert row.shape == row_targets.shape == (1, layout.total_tokens) and layout.total_tokens == 3 * 18


def test_recall_probe_runs(capsys):
    from bench.recall_probe import main
    import refrag_kernels


    main(["--steps", "0", "--rows", "2", "--pairs", "4"])
    assert "recall accuracy" in capsys.readouterr().out
    assert refrag_kernels.current_backend() == "auto"  # the probe's reference switch ends with it
