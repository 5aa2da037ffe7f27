"""Generation cache of a HybridLM: KV cache per attention block, conv + SSM state per Mamba block."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionCache:
    """Keys and values (after QK-norm and RoPE) of one attention block.

    k, v: (b, capacity, n_kv_head, head_dim); row r holds its first `lengths[r]` tokens.
    key_conv_state: (b, n_kv_head * head_dim, key_conv - 1), the last raw (unconvolved) keys,
    oldest first, when the block has a key convolution; else None.
    """

    k: torch.Tensor
    v: torch.Tensor
    key_conv_state: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def grow(self, capacity: int) -> None:
        """Reallocate to `capacity` tokens per row, keeping the cached ones."""
        extra = capacity - self.capacity
        if extra > 0:
            pad = self.k.new_zeros(self.k.shape[0], extra, *self.k.shape[2:])
            self.k = torch.cat([self.k, pad], dim=1)
            self.v = torch.cat([self.v, pad], dim=1)


@dataclass
class MambaCache:
    """Decode state of one Mamba-2 block.

    conv_state: (b, conv_dim, d_conv - 1), the last d_conv - 1 conv inputs, oldest first.
    ssm_state:  (b, h, p, n) fp32, the SSD state after the last token.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class HybridCache:
    """Per-layer caches of a batch of b sequences plus their lengths (b,) int64 (tokens seen).

    `layers[i]` is the AttentionCache or MambaCache of block i. Built by
    `HybridLM.prefill` / `prefill_packed` and advanced in place by `HybridLM.step`.
    """

    def __init__(self, layers: list, lengths: torch.Tensor):
        self.layers = layers
        self.lengths = lengths

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def reserve(self, extra_tokens: int) -> None:
        """Make room for `extra_tokens` more tokens in every row (doubling the KV buffers)."""
        needed = int(self.lengths.max()) + extra_tokens
        for layer in self.layers:
            if isinstance(layer, AttentionCache) and layer.capacity < needed:
                layer.grow(max(needed, 2 * layer.capacity))
