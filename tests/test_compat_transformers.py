"""transformers' Mamba-2 family on our kernels (refrag_kernels.compat): tiny random Mamba2 and Bamba
(a hybrid with attention) built from configs, no downloads. Reference: the same model on
transformers' own torch path (mamba-ssm and causal-conv1d are not installed here)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BambaConfig, BambaForCausalLM, DataCollatorWithFlattening,  # noqa: E402
                          Mamba2Config, Mamba2ForCausalLM)

from refrag_kernels.compat import disable_for_transformers, enable_for_transformers, enabled_models  # noqa: E402

VOCAB = 64


def bamba():
    return BambaForCausalLM(BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2,
        mamba_expand=2, mamba_chunk_size=16, attn_layer_indices=[1], mamba_d_conv=4))


def mamba2():
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=16, n_groups=1,
        num_hidden_layers=2, conv_kernel=4, chunk_size=16))


FAMILIES = {"mamba2": mamba2, "bamba": bamba}


@pytest.fixture(autouse=True)
def restore_transformers():
    yield
    disable_for_transformers()


def _logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    logits = model(ids, **kwargs).logits
    (logits.square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(ours, ref, ref64, scale=None):
    """2x rule: our error against the fp64 torch path within 2x that of transformers' fp32 path, plus
    fp32 rounding of the largest value involved (`scale`: of the whole gradient set, since a tiny
    gradient of a few elements is all cancellation)."""
    err = (ours.double() - ref64).abs().max().item()
    ref_err = (ref.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() if scale is None else scale
    assert err <= 2 * ref_err + 1e-5 * scale, (err, ref_err, scale)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("training", [True, False], ids=["train-fused", "eval-unfused"])
def test_logits_and_grads_equal_the_torch_path(family, training):
    torch.manual_seed(0)
    model = FAMILIES[family]().float().train(training)
    ids = torch.randint(0, VOCAB, (2, 40))
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    ref64_logits, ref64_grads = _logits_and_grads(model.double(), ids)
    model.float()
    assert enable_for_transformers([family]) == [family] and enabled_models() == [family]
    logits, grads = _logits_and_grads(model, ids)
    _close(logits, ref_logits, ref64_logits)
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref64_grads.values())
    for name in grads:
        _close(grads[name], ref_grads[name], ref64_grads[name], scale)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("collator_kwargs", [dict(return_seq_idx=True), dict(return_flash_attn_kwargs=True)],
                         ids=["seq_idx", "cu_seq_lens"])
def test_packed_batch_equals_each_sequence_alone(family, collator_kwargs):
    """A flattened batch (DataCollatorWithFlattening) keeps its sequences apart: the torch path
    refuses it, ours gives each sequence the logits it has alone."""
    torch.manual_seed(1)
    model = FAMILIES[family]().float().train()
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (11, 23, 6)]
    batch = DataCollatorWithFlattening(**collator_kwargs)([{"input_ids": s} for s in seqs], return_tensors="pt")
    enable_for_transformers([family])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # Mamba2ForCausalLM does not pass extra kwargs (seq_idx, cu_seq_lens_q) on to its backbone
    # (transformers 5.x), so a packed Mamba2 batch goes through Mamba2Model; Bamba's LM head passes them.
    run = model.backbone if family == "mamba2" else model.model
    # use_cache=False: with a cache transformers builds no packed attention mask (training never uses one)
    packed = run(**{k: v for k, v in inputs.items() if k != "position_ids" or family != "mamba2"}, use_cache=False)
    packed = packed.last_hidden_state[0]
    start = 0
    for s in seqs:
        alone = run(torch.tensor([s]), use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(packed[start:start + len(s)], alone, atol=2e-5, rtol=2e-5)
        start += len(s)
    # gradients flow through the packed path
    packed.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_with_the_cache_equals_the_torch_path(family):
    torch.manual_seed(2)
    model = FAMILIES[family]().float().eval()
    prompt = torch.randint(0, VOCAB, (2, 9))
    kwargs = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **kwargs)
        enable_for_transformers([family])
        ours = model.generate(prompt, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_enable_disable_round_trip_and_errors():
    from transformers.models.bamba import modeling_bamba

    original = modeling_bamba.mamba2_chunk_scan
    assert "bamba" in enable_for_transformers()
    assert modeling_bamba.mamba2_chunk_scan is not original
    enable_for_transformers(["bamba"])  # idempotent: disabling still restores transformers' own
    assert "bamba" in disable_for_transformers()
    assert modeling_bamba.mamba2_chunk_scan is original and enabled_models() == []
    with pytest.raises(ValueError, match="unknown model family"):
        enable_for_transformers(["llama"])


def test_hf_trainer_example_trains_bamba_on_packed_rag_rows():
    """examples/hf_trainer_bamba.py end to end for two steps (HF Trainer, DataCollatorWithFlattening,
    refrag.data conversations). The ops run their references here: the interpreter would take minutes;
    the compat layer, Trainer and collator plumbing are what this checks (the kernels are tested above)."""
    import sys
    from pathlib import Path

    import refrag_kernels

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import hf_trainer_bamba as example
        features = example.rag_features(example.load_tokenizer(), limit=4, max_doc_tokens=32)
        assert len(features) == 4
        for f in features:
            assert len(f["input_ids"]) == len(f["labels"]) and any(t != -100 for t in f["labels"])
        with refrag_kernels.use_backend("reference"):
            loss = example.main(["--steps", "2", "--examples", "8", "--batch-size", "4", "--hidden", "32"])
    finally:
        sys.path.pop(0)
    assert 0 < loss < 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_on_gpu_logits_grads_and_packing(family):
    """bf16 with the compiled kernels (the interpreter computes bf16 dots wrongly, so only here):
    logits and gradients within 2x the torch path's bf16 error against its fp64 result, and a packed
    batch equal to each sequence alone within bf16 rounding."""
    torch.manual_seed(3)
    model = FAMILIES[family]().cuda().train()
    ids = torch.randint(0, VOCAB, (2, 96), device="cuda")
    ref64_logits, ref64_grads = _logits_and_grads(model.double(), ids)
    ref_logits, ref_grads = _logits_and_grads(model.bfloat16(), ids)
    enable_for_transformers([family])
    logits, grads = _logits_and_grads(model, ids)
    scale = max(g.abs().max().item() for g in ref64_grads.values())
    _close(logits.float(), ref_logits.float(), ref64_logits, ref64_logits.abs().max().item() * 100)
    for name in grads:
        _close(grads[name].float(), ref_grads[name].float(), ref64_grads[name], scale * 100)
    seqs = [torch.randint(0, VOCAB, (n,)).tolist() for n in (37, 80, 19)]
    batch = DataCollatorWithFlattening(return_seq_idx=True)([{"input_ids": s} for s in seqs], return_tensors="pt")
    run = model.backbone if family == "mamba2" else model.model
    inputs = {k: v.cuda() for k, v in batch.items() if k != "labels" and (k != "position_ids" or family != "mamba2")}
    packed = run(**inputs, use_cache=False).last_hidden_state[0].float()
    start = 0
    for s in seqs:
        alone = run(torch.tensor([s], device="cuda"), use_cache=False).last_hidden_state[0].float()
        torch.testing.assert_close(packed[start:start + len(s)], alone, atol=3e-2, rtol=3e-2)
        start += len(s)
