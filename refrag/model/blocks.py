"""Residual blocks of HybridLM: attention + MLP ("T") and Mamba-2 ("M").

Each block has three entry points: `forward` (training, full sequences), `prefill` (same
math, also returns the block's decode cache) and `step` (one token per row from the cache).
Every path runs through one public method per block, which the per-document cache
(refrag/infer/doc_cache.py) calls too:

- `MambaBlock.mix`: the Mamba-2 mixer over full sequences (forward, prefill) or over new
  tokens continuing a MambaCache, advanced in place (decode step, document cache);
- `AttentionBlock.attend_cached`: new tokens written to an AttentionCache attend to its
  visible slots, then the MLP (decode step, document cache); forward and prefill attend
  with doc_attention over the packed row and share the projections and the MLP with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refrag_kernels import DocLayout, causal_conv1d, causal_conv1d_update, doc_attention, ssd_scan, ssd_state_update
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
    (1|b, L, rope_dim/2) fp32.
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
        self.rope_dim = config.rope_dim
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

    def step_rope(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (b, 1, rope_dim/2) of a decode step's tokens at positions lengths (b,)."""
        return rotary_cos_sin(lengths[:, None], self.rope_dim, self.rope_theta)

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

    def attend_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache,
                      slots: torch.Tensor, visible: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cached attention, then the MLP: new tokens x (b, n, d_model) -> block output (b, n, d_model).

        The new tokens' keys and values (RoPE tables cos, sin (b|1, n, head_dim/2)) are written
        to `cache` (b rows) at slots (b, n) int64; then every new token attends to the cache's
        first m = visible.shape[-1] slots where visible (b|1, n, m) bool is set (its own slot
        and those of earlier new tokens included: the caller sets them). With a key conv the
        new raw keys continue the window cache.key_conv_state, which advances past them (in
        place for one token: the decode update kernel); doc_ids (b, n), the new tokens' document
        ids when they hold documents, restarts that window at each document (`conv_continuing`).
        """
        q, raw, v = self._project(x)
        k = raw
        if self.key_conv is not None:
            history = cache.key_conv_state
            if x.shape[1] == 1:
                k = causal_conv1d_update(history, raw[:, 0], self.key_conv, None, activation=None)[:, None]
            else:
                k = conv_continuing(history, raw, self.key_conv, None, activation=None, doc_ids=doc_ids)
                cache.key_conv_state = conv_state_after(history, raw)
        q, k = self._rotate(q, k, cos, sin)
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        cache.k[rows, slots] = k.to(cache.k.dtype)
        cache.v[rows, slots] = v.to(cache.v.dtype)
        m = visible.shape[-1]
        keys = cache.k[:, :m].transpose(1, 2)  # (b, n_kv_head, m, hd): GQA reads them in place, no copies
        values = cache.v[:, :m].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=visible[:, None],
            enable_gqa=self.n_head != self.n_kv_head,
        )  # (b, n_head, n, hd)
        return self._attend_and_mlp(x, o.transpose(1, 2))

    def step(self, x: torch.Tensor, cache: AttentionCache, lengths: torch.Tensor,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One token per row: x (b, d_model) after lengths (b,) cached tokens -> (b, d_model).

        The token is shared text: it attends to every cached key of its row, is stored in slot
        lengths, and its RoPE position is its example position, which counts every earlier
        token (= lengths with either doc_positions: documents never shift shared positions).
        rope: that position's tables `step_rope(lengths)` (the model computes them once per
        step for every attention block), else computed here.
        """
        cos, sin = rope if rope is not None else self.step_rope(lengths)
        visible = torch.arange(cache.capacity, device=x.device)[None, :] <= lengths[:, None]  # (b, capacity)
        return self.attend_cached(x[:, None], cos, sin, cache, lengths[:, None], visible[:, None])[:, 0]


def conv_continuing(history: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str | None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """causal_conv1d of new inputs x (b, n, C) whose window continues from the raw inputs
    history (b, C, w) before them (oldest first; zeros for a window start) -> (b, n, C).

    doc_ids (b, n): document ids of the new inputs (0 shared text; the history is shared
    text): a document's windows restart at its first token (doc_mode), shared text's do not."""
    w = history.shape[-1]
    window = torch.cat([history.transpose(1, 2).to(x.dtype), x], dim=1)
    if doc_ids is not None:
        doc_ids = torch.cat([doc_ids.new_zeros(doc_ids.shape[0], w), doc_ids], dim=1)
    return causal_conv1d(window, weight, bias, doc_ids=doc_ids, activation=activation)[:, w:]


def conv_state_after(history: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Conv state after raw inputs raw (b, n, C) that follow the state history (b, C, w): the
    last w inputs of history then raw, oldest first, in history's dtype -> (b, C, w)."""
    joined = torch.cat([history, raw.transpose(1, 2).to(history.dtype)], dim=-1)
    return joined[:, :, -history.shape[-1]:].contiguous()


def last_inputs(raw: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Decode conv state per example: the last `width` rows of raw (1, L, C) before each end of
    cu_seqlens (N+1,), oldest first, zeros before the example's start -> (N, C, width)."""
    ends = cu_seqlens[1:].long()
    starts = cu_seqlens[:-1].long()
    idx = ends[:, None] - width + torch.arange(width, device=raw.device)[None, :]  # (N, width)
    valid = (idx >= starts[:, None])[:, :, None]
    tail = raw[0, idx.clamp(min=0)]  # (N, width, C)
    return torch.where(valid, tail, torch.zeros_like(tail)).transpose(1, 2).contiguous()


@dataclass
class MambaMix:
    """Result of `MambaBlock.mix`: out (b, L, d_model) the block output (residual included);
    state the MambaCache after the tokens (see mix) or None; log_decay (b, h) fp32, each row's
    total log decay sum_t dt_t * A (the SSD state is scaled by its exp), or None."""

    out: torch.Tensor
    state: MambaCache | None = None
    log_decay: torch.Tensor | None = None


class MambaBlock(nn.Module):
    """x + mamba2(norm(x)): in_proj -> (z, xBC, dt); causal_conv1d(xBC) -> ssd_scan -> gated norm -> out_proj;
    with `MambaConfig.mlp` then x + mlp(mlp_norm(x)) (part of `mix`, so of every path).

    Shapes: d_inner = expand * d_model, h = d_inner / p heads, g groups of B and C with
    state size n, conv over xBC (conv_dim = d_inner + 2 g n channels). The gated norm spans
    all of d_inner unless `MambaConfig.norm_per_group` (then each of the g slices, as mamba-ssm).
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
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim)) if m.conv_bias else None
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        for p in (self.A_log, self.dt_bias, self.D):
            p._no_weight_decay = True
        self.out_norm = GatedRMSNorm(self.d_inner, eps=config.norm_eps,
                                     group_size=self.d_inner // self.ngroups if m.norm_per_group else None)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        if m.mlp:  # Bamba-style: the mixer, then an MLP with its own pre-norm
            self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = MLP(config.d_model, config.mlp_hidden, config.mlp)
        else:
            self.mlp_norm = self.mlp = None

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-2 init: A ~ U[1, 16] (stored as log), softplus(dt_bias) log-uniform in [dt_min, dt_max], D = 1."""
        self.norm.reset_parameters()
        nn.init.ones_(self.out_norm.weight)
        init_input_linear(self.in_proj)
        init_output_linear(self.out_proj)
        if self.mlp is not None:
            self.mlp_norm.reset_parameters()
            init_input_linear(self.mlp.up)
            init_output_linear(self.mlp.down)
        bound = 1.0 / math.sqrt(self.conv_weight.shape[1])
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if self.conv_bias is not None:
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

    def mix(self, x: torch.Tensor, ctx: SequenceContext | None = None, cache: MambaCache | None = None, *,
            return_state: bool = False, return_log_decay: bool = False,
            doc_ids: torch.Tensor | None = None) -> MambaMix:
        """The Mamba-2 mixer, x (b, L, d_model) -> MambaMix; exactly one of ctx and cache.

        ctx (forward, prefill): full sequences laid out by ctx; each example (and in doc_mode
        each document) starts with an empty conv window and a zero SSD state. return_state:
        also a MambaCache with one row per example of ctx's layout (conv state: the last
        d_conv - 1 raw xBC inputs, zeros before the example's start; final SSD state fp32).

        cache (decode step, document cache): each row continues from the state in cache (conv
        window cache.conv_state, SSD state cache.ssm_state), which advances past the new
        tokens (one token: in place by the decode update kernels; more: chunked scan from the
        state, then the cache's tensors are replaced); MambaMix.state is the cache.

        doc_ids (b, L), with cache only: the new tokens' document ids when they hold retrieval
        blocks (doc_mode as in a forward: conv windows restart at each document, a document
        reads the state entering its block).

        return_log_decay: each row's total log decay (b, h), what composing an SSD state
        started elsewhere needs.
        """
        if (ctx is None) == (cache is None):
            raise ValueError("MambaBlock.mix takes exactly one of ctx (full sequences) and cache (continuing rows)")
        b, L, _ = x.shape
        z, xBC_raw, dt = self._split(self.in_proj(self.norm(x)))
        A = -torch.exp(self.A_log.float())
        if ctx is None:
            y = self._continue(cache, xBC_raw, dt, A, doc_ids)
            state = cache
        else:
            y, state = self._scan_packed(xBC_raw, dt, A, ctx, return_state)
        out = x + self.out_proj(self.out_norm(y.reshape(b, L, self.d_inner), z))
        if self.mlp is not None:
            out = out + self.mlp(self.mlp_norm(out))
        log_decay = (F.softplus(dt.float() + self.dt_bias.float()) * A).sum(1) if return_log_decay else None
        return MambaMix(out, state, log_decay)

    def _continue(self, cache: MambaCache, xBC_raw: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                  doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Conv + SSD of new rows (b, n, .) from cache's state, advancing it -> y (b, n, h, p);
        doc_ids (b, n) or None: the new tokens' documents (see mix)."""
        if not self.doc_mode:  # without doc_mode the block ignores documents, as in a forward
            doc_ids = None
        if xBC_raw.shape[1] == 1 and doc_ids is None:
            xBC = causal_conv1d_update(cache.conv_state, xBC_raw[:, 0], self.conv_weight, self.conv_bias,
                                       activation="silu")
            xs, B, C = self._split_xbc(xBC)
            return ssd_state_update(cache.ssm_state, xs, dt[:, 0], A, B, C, D=self.D, dt_bias=self.dt_bias,
                                    dt_softplus=True)
        xBC = conv_continuing(cache.conv_state, xBC_raw, self.conv_weight, self.conv_bias, activation="silu",
                              doc_ids=doc_ids)
        xs, B, C = self._split_xbc(xBC)
        y, final = ssd_scan(xs, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                            dt_softplus=True, initial_states=cache.ssm_state, return_final_states=True,
                            doc_ids=doc_ids, doc_mode=doc_ids is not None)
        cache.conv_state = conv_state_after(cache.conv_state, xBC_raw)
        cache.ssm_state = final.float()
        return y

    def _scan_packed(self, xBC_raw: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, ctx: SequenceContext,
                     return_state: bool):
        """Conv + SSD of full sequences laid out by ctx -> (y (b, L, h, p), MambaCache per example or None)."""
        # Without doc_mode the block ignores documents: its conv windows restart at examples only.
        layout = ctx.layout
        doc_mode = self.doc_mode and layout is not None and layout.has_documents
        if layout is not None and not doc_mode:
            layout = layout.examples_only()
        xBC = causal_conv1d(xBC_raw, self.conv_weight, self.conv_bias, activation="silu", layout=layout)
        xs, B, C = self._split_xbc(xBC)
        result = ssd_scan(xs, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                          dt_softplus=True, doc_mode=doc_mode, return_final_states=return_state, layout=layout)
        if not return_state:
            return result, None
        y, final = result
        return y, MambaCache(last_inputs(xBC_raw, ctx.cu_seqlens, self.conv_weight.shape[1] - 1), final.float())

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x (b, L, d_model) -> (b, L, d_model)."""
        return self.mix(x, ctx).out

    def prefill(self, x: torch.Tensor, ctx: SequenceContext, capacity: int):
        """Packed row x (1, L, d_model) -> (output, MambaCache with one row per example).

        The conv state is the last d_conv - 1 raw xBC inputs of each example (zeros before
        its start): the next token is shared text, whose conv window spans documents too.
        capacity is unused (the state has a fixed size); every block's prefill takes it.
        """
        result = self.mix(x, ctx, return_state=True)
        return result.out, result.state

    def step(self, x: torch.Tensor, cache: MambaCache, lengths: torch.Tensor, rope=None) -> torch.Tensor:
        """One token per row: x (b, d_model) -> (b, d_model); updates cache in place.

        lengths and rope are unused (the state carries the position); every block's step takes them.
        """
        return self.mix(x[:, None], cache=cache).out[:, 0]
