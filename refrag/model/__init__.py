"""refrag.model: HybridLM, a decoder of attention ("T") and Mamba-2 ("M") blocks on `kernels` ops.

Public API::

    from refrag.model import ModelConfig, MambaConfig, HybridLM, HybridCache, parse_block_pattern, preset

    config = preset("tiny", vocab_size=512)              # or "d12" | "d16" | "d20"; **overrides
    config = ModelConfig.from_dict({...})                # unknown keys -> ValueError naming the key
    config.to_dict()                                     # plain dict (checkpoints compare it)
    parse_block_pattern("T*8+[T,M]*2+M*8")               # -> ["T", ..., "M"] (20 letters)

    model = HybridLM(config)                             # fp32 weights; autocast is the trainer's job
    loss = model(input_ids, layout=layout, targets=targets)   # (1, L) packed row + refrag_kernels.DocLayout
    loss = model(input_ids, layout=layout, targets=targets, num_loss_tokens=batch.num_loss_tokens)  # no host sync
    loss = model(input_ids, targets=targets)                  # (b, L): each row one example, no docs
    logits = model(input_ids, layout=layout)                  # no targets -> (b, L, V) fp32 logits
    hidden = model.hidden_states(input_ids, layout=layout)    # (b, L, d_model) after the final norm
    model.num_params(), model.flops_per_token(seq_len)

    # Generation (refrag.infer.Engine wraps these):
    last_logits, cache = model.prefill(input_ids, doc_ids=None)   # (b, L) equal-length prompts
    last_logits, cache = model.prefill_packed(input_ids, layout)  # (1, L) row, one cache row per example
    logits = model.step(tokens, cache)                            # tokens (b,) -> (b, V); cache advances

    # A transformers Mamba2 / Bamba checkpoint directory (refrag.model.hf_import; README "Fine-tune a
    # transformers Mamba2 checkpoint"): same logits as transformers; unmappable fields raise ValueError.
    from refrag.model.hf_import import import_transformers
    model = import_transformers("mamba2-dir", overrides={"grad_checkpoint": True})

HybridCache.layers holds one AttentionCache (k, v: (b, capacity, n_kv_head, head_dim)) or
MambaCache (conv_state (b, conv_dim, d_conv - 1), ssm_state (b, h, p, n) fp32) per block;
HybridCache.lengths (b,) counts the tokens of each row.

Targets use IGNORE_INDEX = -100 (loss only on assistant tokens). Under autocast the loss runs
in the autocast dtype. A_log, dt_bias and D carry `_no_weight_decay = True` (Mamba-2 convention). With a layout, RoPE positions
restart per example (documents of a retrieval block all start at the block's first position
unless `config.doc_positions == "sequential"`), attention follows the document rule of
docs/architecture.md, and Mamba blocks use doc_mode when `config.mamba.doc_mode`. KV cache slots are
token indices, never RoPE positions.
"""
from refrag.model.cache import AttentionCache, HybridCache, MambaCache
from refrag.model.config import MambaConfig, ModelConfig, parse_block_pattern, preset
from refrag.model.lm import IGNORE_INDEX, HybridLM

__all__ = [
    "AttentionCache",
    "HybridCache",
    "HybridLM",
    "IGNORE_INDEX",
    "MambaCache",
    "MambaConfig",
    "ModelConfig",
    "parse_block_pattern",
    "preset",
]
