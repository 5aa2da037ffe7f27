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

import refrag_kernels  # noqa: E402
from test_demo import small_kb  # noqa: E402,F401  (fixture)
from refrag.model import HybridLM, ModelConfig  # noqa: E402
from refrag.model.hf_import import (convert_state, import_transformers, resize_vocab,  # noqa: E402
                                    transformers_config)

VOCAB = 61


def save_mamba2(path, seed=0, **overrides):
    """A random tiny Mamba2ForCausalLM saved to path; its weights are perturbed from the init
    (norm weights 1, D 1, zero biases would hide a mapping error)."""
    values = dict(vocab_size=VOCAB, hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=8, n_groups=1,
                  num_hidden_layers=2, conv_kernel=4, chunk_size=16)
    return _save_random(path, seed, lambda: Mamba2ForCausalLM(Mamba2Config(**{**values, **overrides})))


def _save_random(path, seed, build):
    """build() seeded, in fp32 eval mode, every weight perturbed from its init, saved to path."""
    torch.manual_seed(seed)
    model = build().float().eval()
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


# Triton (interpreter) once: the kernels have their own tests; the import is under test here.
@pytest.mark.parametrize("n_groups, tie, backend", [(1, False, "reference"), (2, True, "reference"),
                                                    (2, True, "triton")])
def test_logits_loss_and_grads_equal_transformers(tmp_path, n_groups, tie, backend):
    hf = save_mamba2(tmp_path, n_groups=n_groups, tie_word_embeddings=tie)
    ids = torch.randint(0, VOCAB, (2, 24))
    targets = torch.randint(0, VOCAB, (2, 24))
    targets[:, :5] = -100
    ref_logits, ref_loss, ref_grads = _loss_and_grads(hf, ids, targets, hf=True)
    ref64_logits, ref64_loss, ref64_grads = _loss_and_grads(hf.double(), ids, targets, hf=True)
    model = import_transformers(tmp_path)
    assert model.config.mamba.ngroups == n_groups and model.config.tie_embeddings == tie
    with refrag_kernels.use_backend(backend):
        logits, loss, grads = _loss_and_grads(model, ids, targets, hf=False)
    _close(logits, ref_logits, ref64_logits, ref64_logits.abs().max().item())
    _close(loss, ref_loss, ref64_loss, ref64_loss.abs().item())
    # transformers' gradients under HybridLM's names: the importer's own renaming
    config = model.config
    ref_grads, ref64_grads = convert_state(ref_grads, config, "mamba2"), convert_state(ref64_grads, config, "mamba2")
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
    with torch.no_grad(), refrag_kernels.use_backend("reference"):
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
    with torch.no_grad(), refrag_kernels.use_backend("reference"):
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
    with torch.no_grad(), refrag_kernels.use_backend("reference"):
        assert torch.allclose(grown(ids)[..., :VOCAB], model(ids), atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size must be an int >= the model's 61"):
        resize_vocab(model, VOCAB - 1)


def save_bamba(path, seed=0, **overrides):
    """A random tiny BambaForCausalLM (layers M, T, M; GQA; 2 B/C groups) saved to path."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2,
                  mamba_chunk_size=16, attn_layer_indices=[1])
    return _save_random(path, seed, lambda: BambaForCausalLM(BambaConfig(**{**values, **overrides})))


@pytest.mark.parametrize("backend", ["reference"])
def test_bamba_logits_loss_and_grads_equal_transformers(tmp_path, backend):
    hf = save_bamba(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 21))
    targets = torch.randint(0, VOCAB, (2, 21))
    ref_logits, ref_loss, ref_grads = _loss_and_grads(hf, ids, targets, hf=True)
    ref64_logits, ref64_loss, ref64_grads = _loss_and_grads(hf.double(), ids, targets, hf=True)
    model = import_transformers(tmp_path)
    c = model.config
    assert (c.block_pattern, c.n_head, c.n_kv_head, c.head_dim, c.rope_dim, c.mlp, c.mlp_dim, c.qk_norm) == \
        ("M,T,M", 2, 1, 32, 16, "swiglu", 48, False)
    assert c.mamba.mlp and c.mamba.norm_per_group and c.mamba.ngroups == 2
    with refrag_kernels.use_backend(backend):
        logits, loss, grads = _loss_and_grads(model, ids, targets, hf=False)
    _close(logits, ref_logits, ref64_logits, ref64_logits.abs().max().item())
    _close(loss, ref_loss, ref64_loss, ref64_loss.abs().item())
    ref_grads, ref64_grads = convert_state(ref_grads, c, "bamba"), convert_state(ref64_grads, c, "bamba")
    assert set(grads) == set(ref_grads)
    scale = max(g.abs().max().item() for g in ref64_grads.values())
    for name in grads:
        _close(grads[name], ref_grads[name], ref64_grads[name].double(), scale)


def test_bamba_decode_and_packed_rows_match_the_forward(tmp_path, reference_ops):
    """Partial RoPE and the MLP after Mamba blocks run on every path: prefill + decode steps and a
    packed row of two examples give the logits of the plain forward."""
    from refrag_kernels import DocLayout

    save_bamba(tmp_path)
    model = import_transformers(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids)
        last, cache = model.prefill(ids[:, :9])
        steps = [last] + [model.step(ids[:, t], cache) for t in range(9, 11)]
        assert torch.allclose(torch.stack(steps, 1), full[:, 8:11], atol=1e-4)
        packed = model(ids.reshape(1, 24), layout=DocLayout.from_cu_seqlens(torch.tensor([0, 12, 24], dtype=torch.int32)))
        assert torch.allclose(packed.view(2, 12, -1), full, atol=1e-4)


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
    (dict(model_type="bamba", attention_bias=True), "attention_bias=True is not supported"),
    (dict(model_type="bamba", mlp_bias=True), "mlp_bias=True is not supported"),
    (dict(model_type="bamba", mamba_proj_bias=True), "mamba_proj_bias=True is not supported"),
    (dict(model_type="bamba", rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type='linear'"),
    (dict(model_type="bamba", rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.1}),
     "partial_rotary_factor=0.1 is not supported: it rotates 3 of 32"),
    (dict(model_type="bamba", attn_layer_indices=[7]), "attn_layer_indices=\\[7\\]"),
])
def test_unmappable_configs_are_refused_naming_the_field(tmp_path, changes, message):
    (save_bamba if changes.get("model_type") == "bamba" else save_mamba2)(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        import_transformers(tmp_path)


def test_other_model_types_are_refused(tmp_path):
    save_mamba2(tmp_path)
    _edit_config(tmp_path, model_type="mamba")
    with pytest.raises(ValueError, match="'mamba' does not map onto HybridLM: Mamba-1"):
        import_transformers(tmp_path)
    _edit_config(tmp_path, model_type="falcon_h1")
    with pytest.raises(ValueError, match="'falcon_h1' is not supported; supported: mamba2, bamba"):
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


def _plain_tokenizer(path, texts):
    """A byte-level BPE tokenizer.json with none of refrag's special tokens (like a transformers
    checkpoint's), truncation on (the import must switch it off); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.enable_truncation(8)
    tok.save(str(path))
    return tok.get_vocab_size()


def test_sft_init_from_fine_tunes_the_imported_weights(tmp_path, small_kb, reference_ops):  # noqa: F811
    """`python -m refrag.train sft --init-from DIR`: the checkpoint's tokenizer gains the special
    tokens (new embedding rows), training starts from the imported weights, and the run's
    checkpoint is self-contained (config, extended tokenizer)."""
    from refrag.data import RagTokenizer, SPECIAL_TOKENS
    from refrag.data.tokenizer import corpus_texts
    from refrag.train import checkpoint as ckpt
    from refrag.train.__main__ import main

    source, kb_dir = small_kb
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    vocab = _plain_tokenizer(hf_dir / "tokenizer.json", list(corpus_texts(source))[:200])
    hf = save_mamba2(hf_dir, vocab_size=vocab, n_groups=2)
    out = tmp_path / "run"
    main(["sft", "--init-from", str(hf_dir), "--kb_source", str(source), "--kb_dir", str(kb_dir), "--device", "cpu",
          "--seq_len", "256", "--max_doc_tokens", "24", "--val_rows", "1", "--max_steps", "2", "--warmup_steps", "0",
          "--lr", "1e-5", "--out_dir", str(out), "--model.grad_checkpoint", "true"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    path = ckpt.latest_checkpoint(out / "checkpoints")
    state = ckpt.load_checkpoint(path)
    model_config = state["config"]["model"]
    assert model_config["vocab_size"] == vocab + len(SPECIAL_TOKENS) and model_config["block_pattern"] == "M*2"
    assert model_config["mamba"]["norm_per_group"] and model_config["grad_checkpoint"]
    tokenizer = RagTokenizer.load(path / "tokenizer.json")
    assert tokenizer.vocab_size == vocab + len(SPECIAL_TOKENS) and tokenizer.token_id("[DOC_1]") >= vocab
    assert len(tokenizer.encode("a sentence much longer than eight tokens, truncation is off")) > 8
    # two steps at lr 1e-5 barely move the weights: training started from the import, not a fresh init
    trained, imported = state["model"], hf.state_dict()
    moved = (trained["blocks.1.in_proj.weight"] - imported["backbone.layers.1.mixer.in_proj.weight"]).abs().max()
    assert moved < 1e-3
    assert (trained["embed.weight"][vocab:] - imported["backbone.embeddings.weight"].mean(0)).abs().max() < 1e-3


def test_sft_init_from_without_tokenizer_needs_one_that_fits(tmp_path, small_kb, capsys):  # noqa: F811
    from refrag.data import EMBEDDED_KB_DIR
    from refrag.train.__main__ import main

    source, kb_dir = small_kb
    save_mamba2(tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--init-from", str(tmp_path / "hf"), "--kb_source", str(source), "--kb_dir", str(kb_dir),
              "--device", "cpu", "--tokenizer", str(EMBEDDED_KB_DIR / "tokenizer.json"),
              "--out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert "has no tokenizer.json and config key tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sft", "--init-from", str(tmp_path / "hf"), "--model.block_pattern", "M*3", "--out_dir",
              str(tmp_path / "run")])
    assert "model key block_pattern is fixed by the imported checkpoint" in capsys.readouterr().err
