"""transformers' Bamba (hybrid Mamba-2 + attention) forward + backward on one packed 8K batch, as
`DataCollatorWithFlattening` builds it for padding-free training, with our kernels
(`refrag_kernels.compat.enable_for_transformers`) against the same model on mamba-ssm's kernels
when mamba-ssm is installed. transformers' own torch path refuses packed sequences, so without
mamba-ssm ours is the only packed option (recorded as `torch_path_packed: unsupported`); the
`padded` baseline is what remains then: the same sequences right-padded into a batch on
transformers' default path (its torch path without mamba-ssm), loss on the same tokens.

Model: d_model 1024, 8 layers (attention at layers 3 and 7), 32 Mamba heads of 64, d_state 128,
one group, chunk 256, vocabulary 32000, bf16; sequences of 256-2048 tokens filling 8192. Smoke
(CPU): a 2-layer d_model-32 Bamba, 64 tokens, fp32, interpreted kernels.
"""
import pytest
import torch

from bench.common import DEVICE, SMOKE, Case, run_case

transformers = pytest.importorskip("transformers")
from transformers import BambaConfig, BambaForCausalLM, DataCollatorWithFlattening  # noqa: E402

from refrag_kernels.compat import disable_for_transformers, enable_for_transformers  # noqa: E402

TOKENS = 64 if SMOKE else 8192
DTYPE = torch.float32 if SMOKE else torch.bfloat16
SEQ_RANGE = (8, 24) if SMOKE else (256, 2048)


def _config() -> "BambaConfig":
    if SMOKE:
        return BambaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, mamba_n_heads=4, mamba_d_head=16,
                           mamba_d_state=16, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=16,
                           attn_layer_indices=[1], mamba_d_conv=4)
    return BambaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4, mamba_n_heads=32, mamba_d_head=64,
                       mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=256,
                       attn_layer_indices=[3, 7], mamba_d_conv=4)


def _sequences(vocab: int) -> list:
    """Token lists of SEQ_RANGE tokens (the last one cut) that fill TOKENS."""
    g = torch.Generator().manual_seed(0)
    lengths, left = [], TOKENS
    while left > 0:
        n = min(left, int(torch.randint(SEQ_RANGE[0], SEQ_RANGE[1] + 1, (1,), generator=g)))
        lengths.append(n)
        left -= n
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _packed_batch(sequences: list) -> dict:
    """One row of TOKENS tokens, as DataCollatorWithFlattening builds it (seq_idx and cu_seq_lens)."""
    batch = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)(
        [{"input_ids": s} for s in sequences], return_tensors="pt")
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _padded_batch(sequences: list) -> dict:
    """The same sequences right-padded into rows of the longest length, pads masked from the loss."""
    longest = max(map(len, sequences))
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}


def _mamba_ssm_bound() -> bool:
    """transformers resolved mamba-ssm's kernels at import (it is installed and imports)."""
    import transformers.models.bamba.modeling_bamba as modeling
    return getattr(modeling, "mamba_chunk_scan_combined", None) is not None


def test_hf_bamba_packed_fwd_bwd(benchmark):
    torch.manual_seed(0)
    config = _config()
    config.use_cache = False  # packed training: transformers builds the packed mask only without a cache
    model = BambaForCausalLM(config).to(DEVICE, DTYPE).train()
    sequences = _sequences(config.vocab_size)
    batch, padded = _packed_batch(sequences), _padded_batch(sequences)

    def step(inputs=batch):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    disable_for_transformers()
    baselines = {"mamba_ssm": Case(step) if (_mamba_ssm_bound() and not SMOKE) else None,
                 "padded": Case(lambda: step(padded))}
    if baselines["mamba_ssm"] is not None:
        baselines["mamba_ssm"].fn()  # compile mamba-ssm's kernels before timing, as ours get below

    def ours():
        enable_for_transformers(["bamba"])
        try:
            step()
        finally:
            disable_for_transformers()

    benchmark.group = "hf_bamba-fwd_bwd"
    run_case(benchmark, Case(ours), baselines, tokens=TOKENS, op="hf_bamba", mode="fwd_bwd", L=TOKENS,
             examples=len(sequences), padded_tokens=padded["input_ids"].numel(), dtype=str(DTYPE), d_model=config.hidden_size,
             n_layer=config.num_hidden_layers, params=sum(p.numel() for p in model.parameters()),
             transformers=transformers.__version__,
             torch_path_packed="unsupported (transformers refuses packed sequences without mamba-ssm)",
             mamba_ssm="installed" if _mamba_ssm_bound() else "not installed")
