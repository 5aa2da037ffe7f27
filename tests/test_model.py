"""HybridLM: block patterns, config validation, packed-row semantics, doc_mode, checkpointing, training."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from refrag_kernels import DocLayout
import refrag_kernels
from model_utils import (  # noqa: F401
    VOCAB,
    reference_ops_on_cpu,
    tiny_config,
    tiny_model,
    tiny_train_step,
    tolerance,
    triton_ops,
)
from refrag.model import HybridLM, ModelConfig, parse_block_pattern, preset

PATTERNS = [
    pytest.param("T,T", id="attention"),
    pytest.param("M,M", id="mamba"),
    pytest.param("T,M,T", id="hybrid"),
]


# ----------------------------------------------------------------------------- block patterns


@pytest.mark.parametrize(
    "pattern, expected",
    [
        pytest.param("M*12", ["M"] * 12, id="M*12"),
        pytest.param("T*12", ["T"] * 12, id="T*12"),
        pytest.param("T,T,M", ["T", "T", "M"], id="list"),
        pytest.param("[T,M]*3", ["T", "M"] * 3, id="bracket-repeat"),
        pytest.param("T*8+[T,M]*2+M*8", ["T"] * 8 + ["T", "M"] * 2 + ["M"] * 8, id="seed-d20"),
        pytest.param(" T * 2 + M ", ["T", "T", "M"], id="spaces"),
        pytest.param("M", ["M"], id="single"),
    ],
)
def test_parse_block_pattern(pattern, expected):
    assert parse_block_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern, message",
    [
        pytest.param("T*8+X*2", "unknown block 'X'", id="unknown-letter"),
        pytest.param("t,m", "unknown block 't'", id="lowercase"),
        pytest.param("T*0", "at least 1", id="zero-repeat"),
        pytest.param("T+", "empty term", id="trailing-plus"),
        pytest.param("[T,M*2", "unbalanced brackets", id="unbalanced"),
        pytest.param("T,,M", "unknown block ''", id="empty-letter"),
        pytest.param("T**2", "unknown block", id="double-star"),
        pytest.param("", "non-empty", id="empty"),
    ],
)
def test_parse_block_pattern_rejects(pattern, message):
    with pytest.raises(ValueError, match=message):
        parse_block_pattern(pattern)


# ----------------------------------------------------------------------------- config


def test_config_round_trips_through_dict():
    config = tiny_config("T,M", mlp="swiglu", tie_embeddings=True)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "key, value, message",
    [
        pytest.param("d_modle", 32, "unknown config key 'd_modle'", id="typo"),
        pytest.param("mamba", {"d_stat": 8}, "unknown config key 'mamba.d_stat'", id="nested-typo"),
        pytest.param("n_layer", 5, "has 2 blocks but n_layer is 5", id="pattern-length"),
        pytest.param("n_kv_head", 3, "multiple of n_kv_head", id="gqa-groups"),
        pytest.param("mlp", "gelu", "mlp must be one of", id="mlp-kind"),
        pytest.param("block_pattern", "T,Q", "unknown block 'Q'", id="bad-letter"),
        pytest.param("d_model", 0, "d_model must be a positive int", id="zero-width"),
        pytest.param("mamba", {"headdim": 48}, "multiple of mamba.headdim", id="mamba-heads"),
        pytest.param("doc_positions", "per_doc", "doc_positions must be one of", id="doc-positions"),
        pytest.param("key_conv", 1, "key_conv must be 0", id="key-conv-width-1"),
        pytest.param("key_conv", 5, "key_conv must be 0", id="key-conv-width-5"),
        pytest.param("key_conv", True, "key_conv must be 0", id="key-conv-bool"),
        pytest.param("rope_dim", 5, "rope_dim must be even and at most head_dim", id="rope-dim-odd"),
        pytest.param("rope_dim", 34, "rope_dim must be even and at most head_dim 32", id="rope-dim-wide"),
        pytest.param("rope_dim", 0, "rope_dim must be a positive int", id="rope-dim-zero"),
        pytest.param("mlp_dim", -4, "mlp_dim must be a positive int", id="mlp-dim"),
        pytest.param("mamba", {"mlp": 1}, "mamba.mlp must be true or false", id="mamba-mlp-bool"),
        pytest.param("mamba", {"conv_bias": "no"}, "mamba.conv_bias must be true or false", id="conv-bias-bool"),
    ],
)
def test_config_rejects(key, value, message):
    values = tiny_config("T,M").to_dict()
    values[key] = value
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize("name, depth", [("d12", 12), ("d16", 16), ("d20", 20)])
def test_depth_presets_take_width_from_depth(name, depth):
    config = preset(name, vocab_size=1000)
    assert config.n_layer == depth
    assert config.d_model == 64 * depth
    assert config.n_head == math.ceil(64 * depth / 128)
    assert config.head_dim * config.n_head == config.d_model
    assert len(config.layers) == depth and {"T", "M"} == set(config.layers)


def test_preset_overrides_and_rejects_unknown_name():
    assert preset("d12", 1000, block_pattern="M*12").layers == ["M"] * 12
    assert preset("tiny", 1000, block_pattern="T*2").n_layer == 2
    tiny, no_doc_mode = preset("tiny", 1000), preset("tiny", 1000, mamba={"doc_mode": False})
    assert no_doc_mode.mamba == dataclasses.replace(tiny.mamba, doc_mode=False)
    with pytest.raises(ValueError, match="unknown config key 'mamba.state'"):
        preset("tiny", 1000, mamba={"state": 3})
    with pytest.raises(ValueError, match="unknown preset 'd13'"):
        preset("d13", 1000)
    with pytest.raises(ValueError, match="unknown config key 'width'"):
        preset("tiny", 1000, width=3)


def test_tiny_preset_builds_and_trains_a_step(device):
    model = HybridLM(preset("tiny", vocab_size=64)).to(device)
    ids = torch.randint(0, 64, (2, 40), device=device)  # longer than one SSD chunk (32)
    loss = model(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(64)) < 0.5  # near-uniform at init


# ----------------------------------------------------------------------------- shapes, bad input


def test_forward_shapes(device):
    model = tiny_model("T,M", device)
    ids = torch.randint(0, VOCAB, (2, 11), device=device)
    assert model(ids).shape == (2, 11, VOCAB)
    layout = DocLayout.from_examples([(6, [(1, 3)]), (5, [])], device=device)
    packed = torch.randint(0, VOCAB, (1, 11), device=device)
    assert model(packed, layout=layout).shape == (1, 11, VOCAB)
    assert model.hidden_states(packed, layout=layout).shape == (1, 11, 64)
    loss = model(packed, layout=layout, targets=packed)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_forward_rejects_bad_input(device):
    model = tiny_model("T,M", device)
    ids = torch.randint(0, VOCAB, (1, 8), device=device)
    with pytest.raises(ValueError, match="2-D"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model(ids + VOCAB)
    with pytest.raises(ValueError, match="one packed row"):
        model(ids, layout=DocLayout.from_examples([(5, [])], device=device))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(ids, targets=ids[:, :4])


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="relu2-untied"),
        pytest.param(dict(mlp="swiglu", tie_embeddings=True, n_kv_head=2), id="swiglu-tied-mha"),
    ],
)
def test_loss_matches_logits_and_ignores_masked_targets(overrides, device):
    model = tiny_model("T,M", device, **overrides)
    ids = torch.randint(0, VOCAB, (2, 9), device=device)
    targets = torch.randint(0, VOCAB, (2, 9), device=device)
    targets[:, :4] = -100
    expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(ids, targets=targets), expected, **tolerance(device))


def test_loss_takes_the_host_counted_loss_tokens(device):
    """num_loss_tokens (the loader's CPU count) gives the same loss without the count's host sync;
    a wrong count is an error (checked on the CPU here; a device-side assert on CUDA)."""
    model = tiny_model("T,M", device)
    ids = torch.randint(0, VOCAB, (2, 9), device=device)
    targets = torch.randint(0, VOCAB, (2, 9), device=device)
    targets[:, :4] = -100
    n = int((targets != -100).sum())
    torch.testing.assert_close(model(ids, targets=targets, num_loss_tokens=n), model(ids, targets=targets),
                               atol=0, rtol=0)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="num_valid"):
            model(ids, targets=targets, num_loss_tokens=n - 1)


def test_bf16_autocast_loss_is_close_to_fp32(device):
    model = tiny_model("T,M", device)
    layout = DocLayout.from_examples([(7, [(1, 4)]), (6, [])], device=device)
    ids = torch.randint(0, VOCAB, (1, 13), device=device)
    expected = model(ids, layout=layout, targets=ids)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(ids, layout=layout, targets=ids)
    loss.backward()
    torch.testing.assert_close(loss.float(), expected, atol=0.05, rtol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- packed-row semantics


DOC_POSITIONS = [pytest.param("block", id="block-pos"), pytest.param("sequential", id="seq-pos")]


def test_doc_positions_default_to_block():
    assert tiny_config("T,M").doc_positions == "block"
    assert ModelConfig.from_dict(tiny_config("T,M", doc_positions="sequential").to_dict()).doc_positions == "sequential"


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_packed_examples_match_running_each_alone(pattern, doc_positions, device):
    model = tiny_model(pattern, device, doc_positions=doc_positions)
    examples = [(9, [(2, 4), (4, 7)]), (1, []), (7, [(0, 1)])]  # a one-token example and document
    layout = DocLayout.from_examples(examples, device=device)
    ids = torch.randint(0, VOCAB, (1, layout.total_tokens), device=device)
    packed = model(ids, layout=layout)
    cu = layout.cu_seqlens.tolist()
    for n, example in enumerate(examples):
        alone = model(ids[:, cu[n]:cu[n + 1]], layout=DocLayout.from_examples([example], device=device))
        torch.testing.assert_close(packed[:, cu[n]:cu[n + 1]], alone, **tolerance(device))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_batch_rows_match_single_rows(pattern, device):
    model = tiny_model(pattern, device)
    ids = torch.randint(0, VOCAB, (3, 10), device=device)
    batched = model(ids)
    for row in range(3):
        torch.testing.assert_close(batched[row:row + 1], model(ids[row:row + 1]), **tolerance(device))


def _perturb_first_document(pattern, device, doc_mode):
    """Hidden states of a row [shared 0:3 | doc1 3:8 | doc2 8:13 | shared 13:16] before and
    after replacing doc1's tokens."""
    model = tiny_model(pattern, device, mamba={"d_state": 16, "headdim": 32, "chunk_size": 16, "doc_mode": doc_mode})
    layout = DocLayout.from_examples([(16, [(3, 8), (8, 13)])], device=device)
    ids = torch.randint(0, VOCAB, (1, 16), device=device)
    other = ids.clone()
    other[:, 3:8] = (ids[:, 3:8] + 1 + torch.randint(0, VOCAB - 1, (1, 5), device=device)) % VOCAB
    return model.hidden_states(ids, layout=layout), model.hidden_states(other, layout=layout)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_doc_mode_makes_documents_independent_of_siblings(pattern, device):
    before, after = _perturb_first_document(pattern, device, doc_mode=True)
    torch.testing.assert_close(before[:, 8:13], after[:, 8:13], **tolerance(device))  # doc2 unaffected
    torch.testing.assert_close(before[:, :3], after[:, :3], **tolerance(device))
    assert not torch.allclose(before[:, 13:], after[:, 13:], atol=1e-3)  # shared suffix reads both


def _second_document_after_siblings_of_two_lengths(pattern, device, doc_positions):
    """Hidden states of doc2 (4 tokens) in rows [shared 3 | doc1 | doc2 | shared 2] whose doc1
    has 5 tokens, then 2 tokens; doc2 and the first shared tokens are the same in both rows."""
    model = tiny_model(pattern, device, doc_positions=doc_positions)
    prefix, doc2, suffix = (torch.randint(0, VOCAB, (1, n), device=device) for n in (3, 4, 2))
    states = []
    for doc1_len in (5, 2):
        doc1 = torch.randint(0, VOCAB, (1, doc1_len), device=device)
        ids = torch.cat([prefix, doc1, doc2, suffix], dim=1)
        layout = DocLayout.from_examples([(ids.shape[1], [(3, 3 + doc1_len), (3 + doc1_len, 7 + doc1_len)])],
                                         device=device)
        states.append(model.hidden_states(ids, layout=layout)[:, 3 + doc1_len:7 + doc1_len])
    return states


@pytest.mark.parametrize("pattern", PATTERNS)
def test_block_positions_make_a_document_independent_of_sibling_lengths(pattern, device):
    first, second = _second_document_after_siblings_of_two_lengths(pattern, device, "block")
    torch.testing.assert_close(first, second, **tolerance(device))


@pytest.mark.parametrize("pattern", [pytest.param("T,T", id="attention"), pytest.param("T,M,T", id="hybrid")])
def test_sequential_positions_shift_a_document_after_a_longer_sibling(pattern, device):
    first, second = _second_document_after_siblings_of_two_lengths(pattern, device, "sequential")
    assert not torch.allclose(first, second, atol=1e-3)


@pytest.mark.parametrize("width", [2, 4])
def test_key_conv_mixes_each_key_with_its_predecessors_within_a_window(width, device):
    """A key convolution changes the output after a token only within `width` tokens, never
    across an example or document start, and packed examples still equal running each alone."""
    model = tiny_model("T,T", device, key_conv=width)
    plain = tiny_model("T,T", device)
    assert tuple(model.blocks[0].key_conv.shape) == (model.config.n_kv_head * model.config.head_dim, width)
    examples = [(9, [(2, 4), (4, 7)]), (1, []), (7, [(0, 1)])]
    layout = DocLayout.from_examples(examples, device=device)
    ids = torch.randint(0, VOCAB, (1, layout.total_tokens), device=device)
    packed = model(ids, layout=layout)
    assert not torch.allclose(packed, plain(ids, layout=layout), atol=1e-3)
    cu = layout.cu_seqlens.tolist()
    for n, example in enumerate(examples):
        alone = model(ids[:, cu[n]:cu[n + 1]], layout=DocLayout.from_examples([example], device=device))
        torch.testing.assert_close(packed[:, cu[n]:cu[n + 1]], alone, **tolerance(device))


def test_key_conv_keeps_documents_independent_of_siblings(device):
    model = tiny_model("T,M,T", device, key_conv=3)
    layout = DocLayout.from_examples([(16, [(3, 8), (8, 13)])], device=device)
    ids = torch.randint(0, VOCAB, (1, 16), device=device)
    other = ids.clone()
    other[:, 3:8] = (ids[:, 3:8] + 1) % VOCAB
    before, after = model.hidden_states(ids, layout=layout), model.hidden_states(other, layout=layout)
    torch.testing.assert_close(before[:, 8:13], after[:, 8:13], **tolerance(device))
    assert not torch.allclose(before[:, 13:], after[:, 13:], atol=1e-3)


def test_key_conv_init_averages_each_key_with_its_predecessor():
    model = HybridLM(tiny_config("T,M", key_conv=3))
    weight = model.blocks[0].key_conv
    assert torch.equal(weight[:, 0], torch.zeros_like(weight[:, 0]))
    assert torch.equal(weight[:, 1:], torch.full_like(weight[:, 1:], 0.5))


def test_without_doc_mode_mamba_documents_see_their_siblings(device):
    before, after = _perturb_first_document("M,M", device, doc_mode=False)
    assert not torch.allclose(before[:, 8:13], after[:, 8:13], atol=1e-3)


# ----------------------------------------------------------------------------- training


def _loss_and_grads(model, ids, layout, targets):
    model.zero_grad()
    loss = model(ids, layout=layout, targets=targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_triton_ops_match_reference_ops(device, triton_ops):
    """Integration check: loss and grads on the dispatched kernels (interpreter on CPU, Triton on
    CUDA) equal those of the same model on CPU with the interpreter off (the references)."""
    model = tiny_model("T,M", device)
    layout = DocLayout.from_examples([(9, [(1, 4), (4, 6)]), (1, []), (6, [])], device=device)
    ids = torch.randint(0, VOCAB, (1, 16), device=device)
    targets = torch.randint(0, VOCAB, (1, 16), device=device)
    targets[:, :3] = -100
    loss, grads = _loss_and_grads(model, ids, layout, targets)
    model_cpu = model.cpu()
    ids, targets, layout = ids.cpu(), targets.cpu(), layout.to("cpu")
    with refrag_kernels.use_backend("reference"):
        expected_loss, expected_grads = _loss_and_grads(model_cpu, ids, layout, targets)
    torch.testing.assert_close(loss.cpu(), expected_loss, **tolerance(device))
    for name, grad in grads.items():
        torch.testing.assert_close(grad.cpu(), expected_grads[name], **tolerance(device), msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradient_checkpointing_gives_identical_grads(pattern, device):
    plain = tiny_model(pattern, device)
    checkpointed = HybridLM(tiny_config(pattern, grad_checkpoint=True)).to(device)
    checkpointed.load_state_dict(plain.state_dict())
    layout = DocLayout.from_examples([(7, [(1, 4)]), (6, [])], device=device)
    ids = torch.randint(0, VOCAB, (1, 13), device=device)
    targets = torch.randint(0, VOCAB, (1, 13), device=device)
    _, expected = _loss_and_grads(plain, ids, layout, targets)
    _, actual = _loss_and_grads(checkpointed, ids, layout, targets)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_loss_decreases_when_overfitting_a_fixed_batch(pattern, device):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).to(device)  # the real init, residual outputs at zero
    layout = DocLayout.from_examples([(10, [(2, 6)]), (8, [])], device=device)
    ids = torch.randint(0, VOCAB, (1, 18), device=device)
    targets = torch.roll(ids, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, layout=layout, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_init_follows_mamba2_ranges(device):
    model = HybridLM(tiny_config("M,M")).to(device)
    for block in model.blocks:
        assert torch.all((block.A_log.exp() >= 1) & (block.A_log.exp() <= 16))
        dt = F.softplus(block.dt_bias)
        assert torch.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
        assert torch.count_nonzero(block.out_proj.weight) == 0


# ----------------------------------------------------------------------------- accounting


def test_num_params_counts_tied_weights_once():
    untied = HybridLM(tiny_config("T,M"))
    tied = HybridLM(tiny_config("T,M", tie_embeddings=True))
    assert untied.num_params() == sum(p.numel() for p in untied.parameters())
    assert untied.num_params() - tied.num_params() == VOCAB * 64
    assert untied.num_params(exclude_embedding=True) == untied.num_params() - VOCAB * 64


def test_flops_per_token_grows_with_context_only_through_attention():
    hybrid = HybridLM(tiny_config("T,M,M"))
    mamba = HybridLM(tiny_config("M,M"))
    assert mamba.flops_per_token(2048) == mamba.flops_per_token(64)
    assert hybrid.flops_per_token(2048) - hybrid.flops_per_token(1024) == 12 * 1 * 2 * 32 * 1024
    with pytest.raises(ValueError, match="seq_len"):
        hybrid.flops_per_token(0)


# ----------------------------------------------------------------------------- no host syncs


@pytest.mark.gpu
def test_train_step_never_syncs_and_replays_in_a_cuda_graph(device):
    """With a layout built before the step, forward + backward read nothing from the GPU (sync
    debug mode "error") and the step captured in a CUDA graph replays to the eager result."""
    if device.type != "cuda":
        pytest.skip("needs a CUDA device")
    model, ids, targets, layout, num_loss_tokens = tiny_train_step(device)

    def step():
        loss = model(ids, layout=layout, targets=targets, num_loss_tokens=num_loss_tokens)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and the layout's first-use tables happen here
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            eager_loss = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    eager_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)

    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, eager_loss)
    for p, want in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, want)


# The tiny T,M,T,M step of `tiny_train_step`, forward + backward, counted by bench.meter with its
# layout's tables cached (the layout is built once per batch; every layer and the backward reuse
# it). Before one DocLayout carried the row's metadata, the same step made 44 host reads and 11
# syncing nonzero calls. Lower these numbers when a change removes work, never raise them.
STEP_LAUNCHES = 33
STEP_ATEN_OPS = 427


@pytest.mark.slow
def test_tiny_train_step_reads_nothing_from_the_device(triton_ops, device):
    """0 host reads and 0 syncing ops per forward + backward given a layout, a bounded number of
    aten ops, and the same Triton launches (interpreter; counted by bench.meter)."""
    if device.type != "cpu" or not refrag_kernels.common.dispatch.INTERPRET:
        pytest.skip("counts the Triton interpreter's launches")
    from bench.meter import measure

    model, ids, targets, layout, num_loss_tokens = tiny_train_step(device)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, layout=layout, targets=targets, num_loss_tokens=num_loss_tokens).backward()

    first = measure(step, kernels=False)  # builds the layout's tables (on its CPU copy)
    assert first.num_host_reads == 0, dict(first.host_reads)
    steady = measure(step)
    assert steady.num_host_reads == 0, dict(steady.host_reads)
    assert steady.num_sync_ops == 0, dict(steady.sync_ops)
    assert steady.launches <= STEP_LAUNCHES, {name: k.launches for name, k in steady.kernels.items()}
    assert steady.num_aten_ops <= STEP_ATEN_OPS, steady.aten_ops.most_common()
