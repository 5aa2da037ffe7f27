"""HybridLM: token embedding, a stack of attention / Mamba-2 blocks, final RMSNorm, LM head."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from refrag_kernels import IGNORE_INDEX, DocLayout, fused_linear_cross_entropy
from refrag_kernels.common.checks import assert_on_device
from refrag.model.blocks import AttentionBlock, MambaBlock, SequenceContext
from refrag.model.cache import HybridCache
from refrag.model.config import ModelConfig
from refrag.model.layers import rotary_cos_sin



class HybridLM(nn.Module):
    """Decoder LM whose blocks follow `config.block_pattern` (T attention + MLP, M Mamba-2).

    Input is either one packed row (1, L) with a `refrag_kernels.DocLayout` (examples restart RoPE
    positions, attention and SSM state; documents follow docs/architecture.md's doc semantics and take
    RoPE positions by `config.doc_positions`), or (b, L) without a layout, each row one
    example of shared text. Weights are fp32.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            AttentionBlock(config) if letter == "T" else MambaBlock(config) for letter in config.layers
        )
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanochat-style init: untied embedding std 1 and LM head std 1e-3; tied: std d_model^-1/2.

        Blocks: input projections U(+-sqrt(3/fan_in)), residual output projections zero.
        """
        if self.config.tie_embeddings:
            nn.init.normal_(self.embed.weight, std=self.config.d_model ** -0.5)
        else:
            nn.init.normal_(self.embed.weight, std=1.0)
            nn.init.normal_(self.lm_head.weight, std=1e-3)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    # ------------------------------------------------------------------ training forward

    def forward(self, input_ids: torch.Tensor, layout: DocLayout | None = None,
                targets: torch.Tensor | None = None, num_loss_tokens: int | None = None) -> torch.Tensor:
        """Mean loss over targets != -100 when targets (same shape as input_ids) are given,
        else fp32 logits (b, L, vocab). input_ids (1, L) with layout, or (b, L) without.
        num_loss_tokens: the number of targets != -100 when the caller counted them on the host
        (the loader's ``PackedBatch.num_loss_tokens``); it spares the loss its one host sync.

        Packed example::

            layout = DocLayout.from_examples([(6, [(1, 3), (3, 5)]), (3, [])])
            loss = model(ids.view(1, 9), layout=layout, targets=tgt.view(1, 9))
        """
        hidden = self.hidden_states(input_ids, layout)
        if targets is None:
            return self.lm_head(hidden).float()
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(targets.shape)}")
        hidden, weight = self._head_operands(hidden)
        return fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                          num_valid=num_loss_tokens)

    def _head_operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden in the dtype nn.Linear would compute in: the autocast dtype when autocast is on,
        else the weight's. An fp32 weight stays fp32 (the loss casts it for its GEMMs and returns
        its gradient accumulated in fp32, with no bf16 round trip); any other is cast too."""
        device_type = hidden.device.type
        weight = self.lm_head.weight
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return hidden.to(dtype), (weight if weight.dtype == torch.float32 else weight.to(dtype))

    def hidden_states(self, input_ids: torch.Tensor, layout: DocLayout | None = None) -> torch.Tensor:
        """Final-norm hidden states (b, L, d_model) for input_ids (1, L) + layout or (b, L)."""
        self._check_input(input_ids, layout)
        ctx = self._context(input_ids, layout)
        x = self.embed(input_ids)
        for block in self.blocks:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, ctx, use_reentrant=False)
            else:
                x = block(x, ctx)
        return self.norm(x)

    def _check_input(self, input_ids: torch.Tensor, layout: DocLayout | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor (b, L), got {getattr(input_ids, 'shape', input_ids)}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        # No host read: a CPU tensor raises at once, a CUDA one trips a device-side assert.
        vocab = self.config.vocab_size
        assert_on_device(((input_ids >= 0) & (input_ids < vocab)).all(), f"token ids must lie in [0, {vocab})")
        if layout is None:
            return
        if not isinstance(layout, DocLayout):
            raise ValueError(f"layout must be a refrag_kernels.DocLayout, got {type(layout).__name__}")
        if input_ids.shape[0] != 1 or input_ids.shape[1] != layout.total_tokens:
            raise ValueError(f"with a layout input_ids must be one packed row (1, {layout.total_tokens}), "
                             f"got {tuple(input_ids.shape)}")
        if layout.device != input_ids.device:
            raise ValueError(f"layout is on {layout.device} but input_ids on {input_ids.device}")

    def _context(self, input_ids: torch.Tensor, layout: DocLayout | None) -> SequenceContext:
        c = self.config
        if layout is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            cos, sin = rotary_cos_sin(positions, c.rope_dim, c.rope_theta)
            return SequenceContext(layout, positions, cos, sin)

        def rope(layout: DocLayout):  # once per layout (batch), shared by every layer and call
            positions = layout.position_ids(per_document=c.doc_positions == "block")[None]
            return (positions, *rotary_cos_sin(positions, c.rope_dim, c.rope_theta))

        return SequenceContext(layout, *layout.memo(("rope", c.doc_positions, c.rope_dim, c.rope_theta), rope))

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                capacity: int | None = None) -> tuple[torch.Tensor, HybridCache]:
        """Run b equal-length prompts input_ids (b, L) and build their decode cache.

        doc_ids (b, L) optional per-token document ids (doc_mode semantics as in training).
        capacity: KV slots to preallocate per row (default L; the cache grows when needed).
        Returns the logits after each prompt's last token (b, vocab) fp32 and the cache.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D tensor (b, L), got {getattr(input_ids, 'shape', input_ids)}")
        b, L = input_ids.shape
        if doc_ids is not None and tuple(doc_ids.shape) != (b, L):
            raise ValueError(f"doc_ids must have the shape of input_ids {(b, L)}, got {tuple(doc_ids.shape)}")
        cu_seqlens = torch.arange(b + 1, device=input_ids.device, dtype=torch.int32) * L
        layout = DocLayout.from_cu_seqlens(cu_seqlens, None if doc_ids is None else doc_ids.reshape(-1))
        return self.prefill_packed(input_ids.reshape(1, b * L), layout, capacity)

    @torch.no_grad()
    def prefill_packed(self, input_ids: torch.Tensor, layout: DocLayout,
                       capacity: int | None = None) -> tuple[torch.Tensor, HybridCache]:
        """Run a packed row (1, L) of N prompts (one example each, any lengths >= 1).

        Returns last-token logits (N, vocab) fp32 and a HybridCache with one row per example.
        """
        if layout is None:
            raise ValueError("prefill_packed needs a DocLayout")
        self._check_input(input_ids, layout)
        lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
        if bool((lengths == 0).any()):
            raise ValueError("every prompt needs at least one token; the layout has an empty example")
        capacity = max(layout.max_seqlen, capacity or 0)
        ctx = self._context(input_ids, layout)
        x = self.embed(input_ids)
        layers = []
        for block in self.blocks:
            x, entry = block.prefill(x, ctx, capacity)
            layers.append(entry)
        last = self.norm(x)[0, layout.cu_seqlens[1:].long() - 1]
        return self.lm_head(last).float(), HybridCache(layers, lengths)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """Feed one token per row, tokens (b,), and advance the cache; returns logits (b, vocab) fp32."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.shape[0] != cache.batch_size:
            raise ValueError(f"tokens must be a 1-D tensor of {cache.batch_size} ids (one per cache row), "
                             f"got {getattr(tokens, 'shape', tokens)}")
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.layers)} layers but the model has {len(self.blocks)}")
        cache.reserve(1)
        x = self.embed(tokens)
        rope = None
        for block, entry in zip(self.blocks, cache.layers):
            if rope is None and isinstance(block, AttentionBlock):  # one position per row: shared by every block
                rope = block.step_rope(cache.lengths)
            x = block.step(x, entry, cache.lengths, rope)
        cache.lengths += 1
        return self.lm_head(self.norm(x)).float()

    # ------------------------------------------------------------------ accounting

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (a tied embedding / LM head counted once).

        exclude_embedding drops the input embedding table unless it is tied to the LM head.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.config.tie_embeddings:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context length seq_len.

        6 * N_matmul (every >= 2-D parameter except the embedding lookup; the LM head counts)
        + attention 12 * n_attn * n_head * head_dim * seq_len (QK^T and PV; the causal mask is
        not discounted, as in nanochat / PaLM)
        + SSD 3 * n_mamba * (2 * chunk * h * (n + p) + 4 * h * p * n) (intra-chunk C B^T and
        scores @ x, chunk state in and out; fwd cost x 3 for fwd + bwd).
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        c = self.config
        matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        if not c.tie_embeddings:
            matmul -= self.embed.weight.numel()
        n_attn = c.layers.count("T")
        n_mamba = c.layers.count("M")
        attention = 12 * n_attn * c.n_head * c.head_dim * seq_len
        m = c.mamba
        h = c.mamba_heads
        ssd = 3 * n_mamba * (2 * m.chunk_size * h * (m.d_state + m.headdim) + 4 * h * m.headdim * m.d_state)
        return 6 * matmul + attention + ssd

