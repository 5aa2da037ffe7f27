"""Weight import of transformers checkpoints into HybridLM (refrag.model.hf_import): tiny random
Mamba2 models built from configs and saved with save_pretrained (no downloads). Reference: the
same checkpoint in transformers on its torch path (mamba-ssm is not installed here), in fp32 and
fp64 (2x rule); then `python -m refrag.train sft --init-from DIR` fine-tunes one."""
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import BambaConfig, BambaForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: E402

import kernels  # noqa: E402
from refrag.model import HybridLM, ModelConfig  # noqa: E402
from refrag.model.hf_import import (convert_mamba2_state, import_transformers, resize_vocab,  # noqa: E402
                                    transformers_config)

VOCAB = 61


def save_mamba2(path, seed=0, **overrides):
    """A random tiny Mamba2ForCausalLM saved to path; its weights are perturbed from the init
    (norm weights 1, D 1, zero biases would hide a mapping error)."""
    values = dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=1,
                  num_hidden_layers=2, conv_kernel=4, chunk_size=16)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**{**values, **overrides})).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _loss_and_grads(model, ids, targets, hf: bool):
    model.zero_grad()
    if hf:
        logits = model(ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    else:
        logits = model(ids)
        loss = model(ids, targets=targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def _close(ours, ref, ref64, scale):
    """2x rule against transformers' fp64 torch path, plus fp32 rounding of the largest value."""
    err = (ours.double() - ref64).abs().max().item()
    ref_err = (ref.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + 1e-5 * scale, (err, ref_err, scale)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("n_groups, tie", [(1, False), (2, True)])
def test_logits_loss_and_grads_equal_transformers(tmp_path, n_groups, tie, backend):
    hf = save_mamba2(tmp_path, n_groups=n_groups, tie_word_embeddings=tie)
    ids = torch.randint(0, VOCAB, (2, 37))
    targets = torch.randint(0, VOCAB, (2, 37))
    targets[:, :5] = -100
    ref_logits, ref_loss, ref_grads = _loss_and_grads(hf, ids, targets, hf=True)
    ref64_logits, ref64_loss, ref64_grads = _loss_and_grads(hf.double(), ids, targets, hf=True)
    model = import_transformers(tmp_path)
    assert model.config.mamba.ngroups == n_groups and model.config.tie_embeddings == tie
    with kernels.use_backend(backend):
        logits, loss, grads = _loss_and_grads(model, ids, targets, hf=False)
    _close(logits, ref_logits, ref64_logits, ref64_logits.abs().max().item())
    _close(loss, ref_loss, ref64_loss, ref64_loss.abs().item())
    # transformers' gradients under HybridLM's names: the importer's own renaming
    config = model.config
    ref_grads, ref64_grads = convert_mamba2_state(ref_grads, config), convert_mamba2_state(ref64_grads, config)
    assert set(grads) == set(ref_grads) - ({"lm_head.weight"} if tie else set())
    scale = max(g.abs().max().item() for g in ref64_grads.values())
    for name in grads:
        _close(grads[name], ref_grads[name], ref64_grads[name].double(), scale)


def test_per_group_norm_is_what_makes_groups_match(tmp_path):
    """With n_groups 2 the gated norm must run per group (mamba.norm_per_group): one norm over
    all of d_inner gives other logits, so the logit test above can fail."""
    hf = save_mamba2(tmp_path, n_groups=2)
    ids = torch.randint(0, VOCAB, (1, 20))
    model = import_transformers(tmp_path)
    whole = HybridLM(ModelConfig.from_dict({**model.config.to_dict(),
                                            "mamba": {**model.config.to_dict()["mamba"], "norm_per_group": False}}))
    whole.load_state_dict(model.state_dict())
    with torch.no_grad(), kernels.use_backend("reference"):
        ref = hf(ids, use_cache=False).logits
        assert (model(ids) - ref).abs().max() < 1e-4
        assert (whole(ids) - ref).abs().max() > 1e-2


def test_config_mapping_and_no_conv_bias(tmp_path):
    hf = save_mamba2(tmp_path, use_conv_bias=False, layer_norm_epsilon=1e-3, conv_kernel=3)
    config = transformers_config(tmp_path)
    assert (config.d_model, config.n_layer, config.block_pattern, config.vocab_size) == (32, 2, "M*2", VOCAB)
    assert config.norm_eps == 1e-3 and not config.tie_embeddings
    m = config.mamba
    assert (m.d_state, m.headdim, m.expand, m.d_conv, m.ngroups, m.conv_bias) == (8, 16, 2, 3, 1, False)
    model = import_transformers(tmp_path, overrides={"grad_checkpoint": True, "mamba": {"doc_mode": False}})
    assert model.blocks[0].conv_bias is None and model.config.grad_checkpoint and not model.config.mamba.doc_mode
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad(), kernels.use_backend("reference"):
        assert (model(ids) - hf(ids, use_cache=False).logits).abs().max() < 1e-4


def test_resize_vocab_keeps_old_rows_and_adds_mean_rows(tmp_path):
    save_mamba2(tmp_path)
    model = import_transformers(tmp_path)
    grown = import_transformers(tmp_path, vocab_size=VOCAB + 3)
    assert grown.config.vocab_size == VOCAB + 3
    for name in ("embed.weight", "lm_head.weight"):
        old, new = model.state_dict()[name], grown.state_dict()[name]
        assert torch.equal(new[:VOCAB], old) and torch.allclose(new[VOCAB:], old.mean(0).expand(3, -1))
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad(), kernels.use_backend("reference"):
        assert torch.allclose(grown(ids)[..., :VOCAB], model(ids), atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size must be an int >= the model's 61"):
        resize_vocab(model, VOCAB - 1)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(use_bias=True), "use_bias=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(time_step_limit=[0.0, 10.0]), "time_step_limit=.* HybridLM does not clamp dt"),
    (dict(num_heads=2), "num_heads \\* head_dim"),
    (dict(expand=1.5), "expand=1.5 is not supported"),
    (dict(model_type="llama"), "model_type 'llama' is not supported; supported: mamba2"),
    (dict(conv_kernel=1), "mamba.d_conv must be at least 2"),
])
def test_unmappable_configs_are_refused_naming_the_field(tmp_path, changes, message):
    save_mamba2(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        import_transformers(tmp_path)


def test_bamba_is_refused_with_the_reason(tmp_path):
    BambaForCausalLM(BambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16,
                                 mamba_d_state=8, attn_layer_indices=[1])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bamba' does not map onto HybridLM: .*MLP after its Mamba mixer.*"
                                         "partial_rotary_factor 0.5"):
        import_transformers(tmp_path)


def test_bad_directories_and_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        import_transformers(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        import_transformers(tmp_path)
    save_mamba2(tmp_path)
    with pytest.raises(ValueError, match="model key block_pattern is fixed by the imported checkpoint"):
        import_transformers(tmp_path, overrides={"block_pattern": "M*3"})
    with pytest.raises(ValueError, match="model key mamba.d_state is fixed"):
        import_transformers(tmp_path, overrides={"mamba": {"d_state": 16}})
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "backbone.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="HybridLM has no place for: backbone.extra.weight"):
        import_transformers(tmp_path)
    save_file({k: v for k, v in weights.items() if k != "backbone.layers.1.mixer.D"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no tensor 'backbone.layers.1.mixer.D'"):
        import_transformers(tmp_path)
    save_file({**weights, "backbone.layers.0.mixer.D": torch.zeros(5)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="the weights do not fit the config"):
        import_transformers(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="has no model.safetensors.*found pytorch_model.bin"):
        import_transformers(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_mamba2(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, sharded = import_transformers(tmp_path / "one"), import_transformers(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), sharded.state_dict().values()))
