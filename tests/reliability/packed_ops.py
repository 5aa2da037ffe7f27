"""Packed-row op cases shared by the reliability tests: one packed row, every op, its loop.

The packed row holds a 5-token sequence, a zero-length one, a one-token one, a 17-token one
with a retrieval block (a one-token document, then a 5-token one) and a 6-token one that
starts with a one-token document, followed by 3 padding tokens past cu_seqlens[-1].

Each `OpCase` runs one public op on the packed row (`packed`) and, with the same leaves, the
loop that calls the same op on each piece alone, without cu_seqlens or doc_ids (`looped`):
- a sequence without documents: the op on the whole sequence;
- a retrieval block (SSM doc_mode, conv1d, attention): the shared prefix alone, each document
  from the state / context entering the block (SSD: the prefix's final state as initial state;
  attention: prefix + document; conv1d: the document alone), and the shared suffix as part of
  the whole sequence with documents treated as ordinary tokens.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from refrag_kernels import causal_conv1d, doc_attention, fused_linear_cross_entropy, selective_scan, ssd_scan

EXAMPLES = [(5, []), (0, []), (1, []), (17, [(3, 4), (4, 9)]), (6, [(0, 1), (1, 3)])]
PADDING = 3
TOTAL = sum(n for n, _ in EXAMPLES)
LENGTH = TOTAL + PADDING
GARBAGE_SCALE = 30.0


def sequence_bounds():
    """(start, end, doc spans relative to start) of every example in the packed row."""
    bounds, start = [], 0
    for length, spans in EXAMPLES:
        bounds.append((start, start + length, spans))
        start += length
    return bounds


def packed_cu_seqlens(device) -> torch.Tensor:
    """(N+1,) int32 offsets of EXAMPLES."""
    return torch.tensor([0] + [end for _, end, _ in sequence_bounds()], dtype=torch.int32, device=device)


def packed_doc_ids(device) -> torch.Tensor:
    """(LENGTH,) int64: k on the k-th document of each example, 0 on shared text and padding."""
    docs = torch.zeros(LENGTH, dtype=torch.int64)
    for start, _, spans in sequence_bounds():
        for k, (s, e) in enumerate(spans, start=1):
            docs[start + s:start + e] = k
    return docs.to(device)


def token_tensor(shape, axis: int, seed: int, garbage_seed: Optional[int], scale=1.0, shift=0.0):
    """Random tensor with LENGTH entries along `axis`: the first TOTAL from `seed`, the padding
    zero (garbage_seed None) or large garbage drawn from garbage_seed."""
    real_shape, pad_shape = list(shape), list(shape)
    real_shape.insert(axis, TOTAL)
    pad_shape.insert(axis, PADDING)
    real = torch.randn(real_shape, generator=torch.Generator().manual_seed(seed)) * scale + shift
    if garbage_seed is None:
        pad = torch.zeros(pad_shape)
    else:
        pad = torch.randn(pad_shape, generator=torch.Generator().manual_seed(garbage_seed)) * GARBAGE_SCALE
    return torch.cat([real, pad], axis)


def param_tensor(shape, seed: int, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def pieces(start: int, end: int, spans):
    """Split one example into (kind, begin, end) absolute ranges: 'whole' without documents;
    else 'prefix' (maybe empty), one 'doc' per document and 'suffix' (maybe empty)."""
    if not spans:
        return [("whole", start, end)]
    block_start, block_end = start + spans[0][0], start + spans[-1][1]
    out = [("prefix", start, block_start)]
    out += [("doc", start + s, start + e) for s, e in spans]
    return out + [("suffix", block_end, end)]


@dataclass
class OpCase:
    """One op under test. make_leaves(garbage_seed) -> dict of fp32 leaves; token_axes names the
    token axis of each leaf (None: a parameter); packed/looped map the leaves to a tuple of
    outputs whose token axes are out_axes (None: per-sequence output such as final states)."""

    make_leaves: Callable[[Optional[int], torch.device], dict]
    token_axes: dict
    packed: Callable[[dict, torch.device], tuple]
    looped: Callable[[dict, torch.device], tuple]
    out_axes: tuple


# ----------------------------------------------------------------------------- SSD (Mamba-2)

SSD_H, SSD_P, SSD_G, SSD_N, SSD_CHUNK = 2, 16, 1, 16, 16


def ssd_leaves(garbage, device):
    leaves = dict(
        x=token_tensor((1, SSD_H, SSD_P), 1, 1, garbage),
        dt=token_tensor((1, SSD_H), 1, 2, garbage, scale=0.5, shift=-1.0),
        B=token_tensor((1, SSD_G, SSD_N), 1, 3, garbage),
        C=token_tensor((1, SSD_G, SSD_N), 1, 4, garbage),
        z=token_tensor((1, SSD_H, SSD_P), 1, 5, garbage),
        A=-param_tensor(SSD_H, 6).abs() - 0.2,
        D=param_tensor(SSD_H, 7),
        dt_bias=param_tensor(SSD_H, 8, scale=0.3),
        h0=param_tensor((len(EXAMPLES), SSD_H, SSD_P, SSD_N), 9, scale=0.5),
    )
    return {k: v.to(device).requires_grad_() for k, v in leaves.items()}


SSD_AXES = dict(x=1, dt=1, B=1, C=1, z=1, A=None, D=None, dt_bias=None, h0=None)


def ssd_call(t, s, e, h0, **varlen):
    """ssd_scan on tokens [s, e) of the leaves from initial state h0 (N, h, p, n)."""
    cut = lambda name: t[name][:, s:e]  # noqa: E731
    return ssd_scan(cut("x"), cut("dt"), t["A"], cut("B"), cut("C"), chunk_size=SSD_CHUNK, D=t["D"], z=cut("z"),
                    dt_bias=t["dt_bias"], dt_softplus=True, initial_states=h0, return_final_states=True, **varlen)


def ssd_packed(doc_mode: bool):
    def run(t, device):
        docs = dict(doc_ids=packed_doc_ids(device), doc_mode=True) if doc_mode else {}
        return ssd_call(t, 0, LENGTH, t["h0"], cu_seqlens=packed_cu_seqlens(device), **docs)
    return run


def ssd_example_loop(t, i, start, end, spans, doc_mode):
    """Outputs (list of (1, len, h, p) pieces) and final state (h, p, n) of example i alone."""
    h0 = t["h0"][i:i + 1]
    if end == start:
        return [], h0[0]
    y_whole, final = ssd_call(t, start, end, h0)
    if not doc_mode or not spans:
        return [y_whole], final[0]
    ys, entering = [], h0
    for kind, s, e in pieces(start, end, spans):
        if kind == "prefix" and e > s:
            y, entering = ssd_call(t, s, e, h0)
            ys.append(y)
        elif kind == "doc":
            ys.append(ssd_call(t, s, e, entering)[0])
        elif kind == "suffix":
            ys.append(y_whole[:, s - start:])
    return ys, final[0]


def ssd_looped(doc_mode: bool):
    def run(t, device):
        ys, finals = [], []
        for i, (start, end, spans) in enumerate(sequence_bounds()):
            pieces_y, final = ssd_example_loop(t, i, start, end, spans, doc_mode)
            ys += pieces_y
            finals.append(final)
        pad = torch.zeros(1, PADDING, SSD_H, SSD_P, device=device)
        return torch.cat(ys + [pad], 1), torch.stack(finals)
    return run


# ----------------------------------------------------------------------------- selective scan (Mamba-1)

SS_D, SS_N = 4, 8


def ss_leaves(garbage, device):
    leaves = dict(
        u=token_tensor((1, SS_D), 2, 11, garbage),
        delta=token_tensor((1, SS_D), 2, 12, garbage, scale=0.5, shift=-1.0),
        B=token_tensor((1, SS_N), 2, 13, garbage),
        C=token_tensor((1, SS_N), 2, 14, garbage),
        z=token_tensor((1, SS_D), 2, 15, garbage),
        A=-param_tensor((SS_D, SS_N), 16).abs() - 0.2,
        D=param_tensor(SS_D, 17),
        delta_bias=param_tensor(SS_D, 18, scale=0.3),
        h0=param_tensor((len(EXAMPLES), SS_D, SS_N), 19, scale=0.5),
    )
    return {k: v.to(device).requires_grad_() for k, v in leaves.items()}


SS_AXES = dict(u=2, delta=2, B=2, C=2, z=2, A=None, D=None, delta_bias=None, h0=None)


def ss_call(t, s, e, h0, **varlen):
    cut = lambda name: t[name][..., s:e]  # noqa: E731
    return selective_scan(cut("u"), cut("delta"), t["A"], cut("B"), cut("C"), D=t["D"], z=cut("z"),
                          delta_bias=t["delta_bias"], delta_softplus=True, initial_state=h0,
                          return_last_state=True, **varlen)


def ss_packed(t, device):
    return ss_call(t, 0, LENGTH, t["h0"], cu_seqlens=packed_cu_seqlens(device))


def ss_looped(t, device):
    ys, lasts = [], []
    for i, (start, end, _) in enumerate(sequence_bounds()):
        if end == start:
            lasts.append(t["h0"][i])
            continue
        y, last = ss_call(t, start, end, t["h0"][i:i + 1])
        ys.append(y)
        lasts.append(last[0])
    pad = torch.zeros(1, SS_D, PADDING, device=device)
    return torch.cat(ys + [pad], 2), torch.stack(lasts)


# ----------------------------------------------------------------------------- causal conv1d

CONV_D, CONV_W = 8, 4


def conv_leaves(garbage, device):
    leaves = dict(x=token_tensor((1, CONV_D), 1, 21, garbage), weight=param_tensor((CONV_D, CONV_W), 22),
                  bias=param_tensor(CONV_D, 23))
    return {k: v.to(device).requires_grad_() for k, v in leaves.items()}


CONV_AXES = dict(x=1, weight=None, bias=None)


def conv_call(t, s, e, **varlen):
    return causal_conv1d(t["x"][:, s:e], t["weight"], t["bias"], activation="silu", **varlen)


def conv_packed(with_docs: bool):
    def run(t, device):
        docs = packed_doc_ids(device) if with_docs else None
        return (conv_call(t, 0, LENGTH, cu_seqlens=packed_cu_seqlens(device), doc_ids=docs),)
    return run


def conv_looped(with_docs: bool):
    def run(t, device):
        ys = []
        for start, end, spans in sequence_bounds():
            if end == start:
                continue
            for kind, s, e in pieces(start, end, spans if with_docs else []):
                if kind == "suffix" and e > s:
                    ys.append(conv_call(t, start, end)[:, s - start:])
                elif kind in ("whole", "prefix", "doc") and e > s:
                    ys.append(conv_call(t, s, e))
        return (torch.cat(ys + [torch.zeros(1, PADDING, CONV_D, device=device)], 1),)
    return run


# ----------------------------------------------------------------------------- doc attention

ATT_HQ, ATT_HK, ATT_D = 2, 1, 32


def attention_leaves(garbage, device):
    leaves = dict(q=token_tensor((1, ATT_HQ, ATT_D), 1, 31, garbage),
                  k=token_tensor((1, ATT_HK, ATT_D), 1, 32, garbage),
                  v=token_tensor((1, ATT_HK, ATT_D), 1, 33, garbage))
    return {k: v.to(device).requires_grad_() for k, v in leaves.items()}


ATTENTION_AXES = dict(q=1, k=1, v=1)


def attention_on(t, ranges):
    """Plain causal attention over the concatenation of token ranges [(s, e), ...]."""
    q, k, v = (torch.cat([t[n][:, s:e] for s, e in ranges], 1) for n in ("q", "k", "v"))
    return doc_attention(q, k, v)


def attention_packed(t, device):
    return (doc_attention(t["q"], t["k"], t["v"], cu_seqlens=packed_cu_seqlens(device),
                          doc_ids=packed_doc_ids(device)),)


def attention_looped(t, device):
    ys = []
    for start, end, spans in sequence_bounds():
        if end == start:
            continue
        parts = pieces(start, end, spans)
        prefix = [(s, e) for kind, s, e in parts if kind == "prefix"]
        for kind, s, e in parts:
            if e == s:
                continue
            if kind in ("whole", "prefix"):
                ys.append(attention_on(t, [(s, e)]))
            elif kind == "doc":  # a document sees the shared prefix and itself only
                ys.append(attention_on(t, prefix + [(s, e)])[:, -(e - s):])
            else:  # shared tokens after the block see every earlier token of the example
                ys.append(attention_on(t, [(start, end)])[:, s - start:])
    return (torch.cat(ys + [torch.zeros(1, PADDING, ATT_HQ, ATT_D, device=device)], 1),)


# ----------------------------------------------------------------------------- fused linear cross-entropy

CE_H, CE_V = 32, 50


def ce_targets(device) -> torch.Tensor:
    """(LENGTH,) targets: random classes, every 4th real token and all padding ignored (-100)."""
    targets = torch.randint(0, CE_V, (LENGTH,), generator=torch.Generator().manual_seed(41))
    targets[::4] = -100
    targets[TOTAL:] = -100
    return targets.to(device)


def ce_leaves(garbage, device):
    leaves = dict(hidden=token_tensor((CE_H,), 0, 42, garbage), weight=param_tensor((CE_V, CE_H), 43, scale=0.2))
    return {k: v.to(device).requires_grad_() for k, v in leaves.items()}


CE_AXES = dict(hidden=0, weight=None)


def ce_packed(t, device):
    targets = ce_targets(device)
    return (fused_linear_cross_entropy(t["hidden"], t["weight"], targets, reduction="none"),
            fused_linear_cross_entropy(t["hidden"], t["weight"], targets, reduction="sum"))


def ce_looped(t, device):
    targets = ce_targets(device)
    per_token = [fused_linear_cross_entropy(t["hidden"][s:e], t["weight"], targets[s:e], reduction="none")
                 for s, e, _ in sequence_bounds() if e > s]
    sums = [fused_linear_cross_entropy(t["hidden"][s:e], t["weight"], targets[s:e], reduction="sum")
            for s, e, _ in sequence_bounds() if e > s]
    return torch.cat(per_token + [torch.zeros(PADDING, device=device)]), torch.stack(sums).sum()


CASES = [
    pytest.param(OpCase(ssd_leaves, SSD_AXES, ssd_packed(False), ssd_looped(False), (1, None)), id="ssd_scan"),
    pytest.param(OpCase(ssd_leaves, SSD_AXES, ssd_packed(True), ssd_looped(True), (1, None)), id="ssd_scan-doc_mode"),
    pytest.param(OpCase(ss_leaves, SS_AXES, ss_packed, ss_looped, (2, None)), id="selective_scan"),
    pytest.param(OpCase(conv_leaves, CONV_AXES, conv_packed(False), conv_looped(False), (1,)), id="conv1d"),
    pytest.param(OpCase(conv_leaves, CONV_AXES, conv_packed(True), conv_looped(True), (1,)), id="conv1d-docs"),
    pytest.param(OpCase(attention_leaves, ATTENTION_AXES, attention_packed, attention_looped, (1,)),
                 id="doc_attention"),
    pytest.param(OpCase(ce_leaves, CE_AXES, ce_packed, ce_looped, (0, None)), id="cross_entropy"),
]


# ----------------------------------------------------------------------------- running a case


def cotangents(outputs, device):
    """Fixed random upstream gradients, one per output (padding positions included)."""
    gen = torch.Generator().manual_seed(99)
    return [torch.randn(o.shape, generator=gen).to(device) for o in outputs]


def forward_backward(run, leaves, device):
    """Outputs of run(leaves, device) (detached) and the gradient of every leaf for fixed cotangents."""
    outputs = run(leaves, device)
    grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents(outputs, device), allow_unused=True)
    grads = {name: torch.zeros_like(leaf) if g is None else g for (name, leaf), g in zip(leaves.items(), grads)}
    return [o.detach() for o in outputs], grads


def real_part(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    return t if axis is None else t.narrow(axis, 0, TOTAL)


def padding_part(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.narrow(axis, TOTAL, PADDING)


def assert_close(actual, expected, what: str):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")
