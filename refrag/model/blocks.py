"""Residual blocks of HybridLM: attention + MLP ("T") and Mamba-2 ("M").

Each block has three entry points: `forward` (training, full sequences), `prefill` (same
math, also returns the block's decode cache) and `step` (one token per row from the cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import DocLayout, causal_conv1d, causal_conv1d_update, doc_attention, ssd_scan, ssd_state_update
from refrag.model.cache import AttentionCache, MambaCache
from refrag.model.config import ModelConfig
from refrag.model.layers import (
    MLP,
    GatedRMSNorm,
    apply_rotary,
    init_input_linear,
    init_output_linear,
    rotary_cos_sin,
)


@dataclass
class SequenceContext:
    """Per-batch metadata every block reads; built once per forward by HybridLM.

    layout: the packed row's DocLayout, passed as ``layout=`` to every op (its tables are
    cached on it), or None (then each of the b rows is one example of shared text);
    positions (1|b, L) int64 RoPE positions (with block document positions they repeat across
    the documents of a retrieval block, so they never index the KV cache); cos, sin
    (1|b, L, head_dim/2) fp32.
    """

    layout: DocLayout | None
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        """(N+1,) int32 example offsets of the layout, or None."""
        return None if self.layout is None else self.layout.cu_seqlens

    @property
    def seq_idx(self) -> torch.Tensor | None:
        """(L,) int32 example of each token, or None."""
        return None if self.layout is None else self.layout.seq_idx


class AttentionBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). GQA, optional QK-norm, RoPE, doc_attention,
    optional causal conv over the keys (`ModelConfig.key_conv`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_norm, self.rope_theta, self.eps = config.qk_norm, config.rope_theta, config.norm_eps
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.mlp_hidden, config.mlp)
        self.key_conv = (nn.Parameter(torch.empty(self.n_kv_head * self.head_dim, config.key_conv))
                         if config.key_conv else None)

    def reset_parameters(self) -> None:
        for norm in (self.attn_norm, self.mlp_norm):
            norm.reset_parameters()
        init_input_linear(self.qkv)
        init_input_linear(self.mlp.up)
        init_output_linear(self.out)
        init_output_linear(self.mlp.down)
        if self.key_conv is not None:
            with torch.no_grad():  # each key starts as the mean of its own and its predecessor's
                self.key_conv.zero_()
                self.key_conv[:, -2:] = 0.5

    @property
    def key_conv_width(self) -> int:
        """Taps of the key convolution (0 without one)."""
        return 0 if self.key_conv is None else self.key_conv.shape[1]

    def _project(self, x: torch.Tensor):
        """x (b, l, d_model) -> q (b, l, n_head, hd), raw keys (b, l, n_kv_head * hd), v (b, l, n_kv_head, hd)."""
        b, l, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        return q.view(b, l, self.n_head, self.head_dim), k, v.view(b, l, self.n_kv_head, self.head_dim)

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (b, l, n_head, hd), keys (b, l, n_kv_head * hd) after the key conv -> QK-norm, RoPE."""
        k = k.reshape(*k.shape[:2], self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_dim,), eps=self.eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.eps)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _qkv(self, x: torch.Tensor, ctx: SequenceContext):
        """Full sequences x (b, l, d_model) -> q, k, v ready for attention, and the raw keys
        (b, l, n_kv_head * hd); the key conv restarts at each example and document."""
        q, raw, v = self._project(x)
        k = raw
        if self.key_conv is not None:
            k = causal_conv1d(raw, self.key_conv, None, activation=None, layout=ctx.layout)
        q, k = self._rotate(q, k, ctx.cos, ctx.sin)
        return q, k, v, raw

    def qkv_after(self, x: torch.Tensor, key_history: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        """New tokens x (1, n, d_model) that follow raw keys key_history (1, n_kv_head * hd,
        key_conv - 1) (zeros: a window start; None without a key conv) -> q, k, v and raw keys."""
        q, raw, v = self._project(x)
        k = raw
        if self.key_conv is not None:
            k = conv_continuing(key_history, raw, self.key_conv, None, activation=None)
        q, k = self._rotate(q, k, cos, sin)
        return q, k, v, raw

    def _attend_and_mlp(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual updates from the attention output o (b, l, n_head, hd)."""
        x = x + self.out(o.flatten(-2))
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x (b, L, d_model) -> (b, L, d_model)."""
        q, k, v, _ = self._qkv(x, ctx)
        o = doc_attention(q, k, v, causal=True, layout=ctx.layout)
        return self._attend_and_mlp(x, o)

    def prefill(self, x: torch.Tensor, ctx: SequenceContext, capacity: int):
        """Packed row x (1, L, d_model) -> (output, AttentionCache with one row per example).

        Cache slot of a token = its index in its example (not its RoPE position). The key conv
        state is the last key_conv - 1 raw keys of each example (the next token is shared text).
        """
        q, k, v, raw = self._qkv(x, ctx)
        o = doc_attention(q, k, v, causal=True, layout=ctx.layout)
        n_seqs = ctx.layout.num_seqs
        cache_k = k.new_zeros(n_seqs, capacity, self.n_kv_head, self.head_dim)
        cache_v = torch.zeros_like(cache_k)
        rows = ctx.seq_idx.long()
        slots = torch.arange(x.shape[1], device=x.device) - ctx.cu_seqlens.long()[rows]
        cache_k[rows, slots] = k[0]
        cache_v[rows, slots] = v[0]
        key_state = last_inputs(raw, ctx.cu_seqlens, self.key_conv_width - 1) if self.key_conv is not None else None
        return self._attend_and_mlp(x, o), AttentionCache(cache_k, cache_v, key_state)

    def step(self, x: torch.Tensor, cache: AttentionCache, lengths: torch.Tensor) -> torch.Tensor:
        """One token per row: x (b, d_model) after lengths (b,) cached tokens -> (b, d_model).

        The token is shared text: it attends to every cached key of its row, is stored in slot
        lengths, and its RoPE position is its example position, which counts every earlier
        token (= lengths with either doc_positions: documents never shift shared positions).
        """
        cos, sin = rotary_cos_sin(lengths[:, None], self.head_dim, self.rope_theta)
        q, k, v = self._project(x[:, None])
        if self.key_conv is not None:
            k = causal_conv1d_update(cache.key_conv_state, k[:, 0], self.key_conv, None, activation=None)[:, None]
        q, k = self._rotate(q, k, cos, sin)
        cache.append(k[:, 0], v[:, 0], lengths)
        visible = torch.arange(cache.capacity, device=x.device)[None, :] <= lengths[:, None]  # (b, capacity)
        groups = self.n_head // self.n_kv_head
        keys = cache.k.repeat_interleave(groups, dim=2).transpose(1, 2)  # (b, n_head, capacity, hd)
        values = cache.v.repeat_interleave(groups, dim=2).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None, None, :]
        )  # (b, n_head, 1, hd)
        return self._attend_and_mlp(x[:, None], o.transpose(1, 2))[:, 0]


def conv_continuing(history: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str | None) -> torch.Tensor:
    """causal_conv1d of new inputs x (1, n, C) whose window continues from the raw inputs
    history (1, C, w) before them (oldest first; zeros for a window start) -> (1, n, C)."""
    window = torch.cat([history.transpose(1, 2).to(x.dtype), x], dim=1)
    return causal_conv1d(window, weight, bias, activation=activation)[:, history.shape[-1]:]


def last_inputs(raw: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Decode conv state per example: the last `width` rows of raw (1, L, C) before each end of
    cu_seqlens (N+1,), oldest first, zeros before the example's start -> (N, C, width)."""
    ends = cu_seqlens[1:].long()
    starts = cu_seqlens[:-1].long()
    idx = ends[:, None] - width + torch.arange(width, device=raw.device)[None, :]  # (N, width)
    valid = (idx >= starts[:, None])[:, :, None]
    tail = raw[0, idx.clamp(min=0)]  # (N, width, C)
    return torch.where(valid, tail, torch.zeros_like(tail)).transpose(1, 2).contiguous()


class MambaBlock(nn.Module):
    """x + mamba2(norm(x)): in_proj -> (z, xBC, dt); causal_conv1d(xBC) -> ssd_scan -> gated norm -> out_proj.

    Shapes: d_inner = expand * d_model, h = d_inner / p heads, g groups of B and C with
    state size n, conv over xBC (conv_dim = d_inner + 2 g n channels). The gated norm spans
    all of d_inner (mamba-ssm normalizes per group when g > 1).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.mamba
        self.d_inner, self.n_heads, self.headdim = config.d_inner, config.mamba_heads, m.headdim
        self.ngroups, self.d_state, self.chunk_size, self.doc_mode = m.ngroups, m.d_state, m.chunk_size, m.doc_mode
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.in_proj = nn.Linear(config.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, m.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        self.out_norm = GatedRMSNorm(self.d_inner, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-2 init: A ~ U[1, 16] (stored as log), softplus(dt_bias) log-uniform in [dt_min, dt_max], D = 1."""
        self.norm.reset_parameters()
        nn.init.ones_(self.out_norm.weight)
        init_input_linear(self.in_proj)
        init_output_linear(self.out_proj)
        bound = 1.0 / math.sqrt(self.conv_weight.shape[1])
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        with torch.no_grad():
            self.A_log.copy_(torch.empty(self.n_heads).uniform_(1.0, 16.0).log())
            log_dt = torch.empty(self.n_heads).uniform_(math.log(dt_min), math.log(dt_max))
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.D.fill_(1.0)

    def _split(self, zxbcdt: torch.Tensor):
        """(..., d_inner + conv_dim + h) -> z (..., d_inner), xBC (..., conv_dim), dt (..., h)."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_xbc(self, xBC: torch.Tensor):
        """(..., conv_dim) -> x (..., h, p), B, C (..., g, n)."""
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        lead = xBC.shape[:-1]
        return (x.reshape(*lead, self.n_heads, self.headdim),
                B.reshape(*lead, self.ngroups, self.d_state), C.reshape(*lead, self.ngroups, self.d_state))

    def _mix(self, x: torch.Tensor, ctx: SequenceContext, return_final_states: bool):
        """Mixer over full sequences: returns (residual output, raw xBC, final SSD states or None)."""
        b, L, _ = x.shape
        z, xBC_raw, dt = self._split(self.in_proj(self.norm(x)))
        # Without doc_mode the block ignores documents: its conv windows restart at examples only.
        layout = ctx.layout
        doc_mode = self.doc_mode and layout is not None and layout.has_documents
        if layout is not None and not doc_mode:
            layout = layout.examples_only()
        xBC = causal_conv1d(xBC_raw, self.conv_weight, self.conv_bias, activation="silu", layout=layout)
        xs, B, C = self._split_xbc(xBC)
        result = ssd_scan(xs, dt, -torch.exp(self.A_log.float()), B, C, chunk_size=self.chunk_size, D=self.D,
                          dt_bias=self.dt_bias, dt_softplus=True, doc_mode=doc_mode,
                          return_final_states=return_final_states, layout=layout)
        y, final = result if return_final_states else (result, None)
        out = x + self.out_proj(self.out_norm(y.reshape(b, L, self.d_inner), z))
        return out, xBC_raw, final

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x (b, L, d_model) -> (b, L, d_model)."""
        return self._mix(x, ctx, return_final_states=False)[0]

    def prefill(self, x: torch.Tensor, ctx: SequenceContext, capacity: int):
        """Packed row x (1, L, d_model) -> (output, MambaCache with one row per example).

        The conv state is the last d_conv - 1 raw xBC inputs of each example (zeros before
        its start): the next token is shared text, whose conv window spans documents too.
        capacity is unused (the state has a fixed size); every block's prefill takes it.
        """
        out, xBC_raw, final = self._mix(x, ctx, return_final_states=True)
        conv_state = last_inputs(xBC_raw, ctx.cu_seqlens, self.conv_weight.shape[1] - 1)
        return out, MambaCache(conv_state, final.float())

    def step(self, x: torch.Tensor, cache: MambaCache, lengths: torch.Tensor) -> torch.Tensor:
        """One token per row: x (b, d_model) -> (b, d_model); updates cache in place.

        lengths is unused (the state carries the position); every block's step takes it.
        """
        z, xBC, dt = self._split(self.in_proj(self.norm(x)))
        xBC = causal_conv1d_update(cache.conv_state, xBC, self.conv_weight, self.conv_bias, activation="silu")
        xs, B, C = self._split_xbc(xBC)
        y = ssd_state_update(cache.ssm_state, xs, dt, -torch.exp(self.A_log.float()), B, C, D=self.D,
                             dt_bias=self.dt_bias, dt_softplus=True)
        return x + self.out_proj(self.out_norm(y.reshape(x.shape[0], self.d_inner), z))
