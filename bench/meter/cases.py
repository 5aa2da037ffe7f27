"""The meter's cases: every public op forward and forward+backward in fp16 at two lengths with
the options the model uses, both blocks, one `tiny` HybridLM train step, and the baselines
that run under the interpreter.

Adding a case is one entry in `CASES`: a name, a variant label, the lengths, and a builder
`build(L) -> Setup` returning the forward callable, the tensors it reads (the minimum bytes
count each once) and the op's minimum FLOPs from bench.costs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from bench import costs
from bench.common import optional_import, torch_linear_cross_entropy
from bench.layouts import examples_to_tensors, rag_examples, visible_pairs

LENGTHS = (128, 512)
MODEL_L = 128  # blocks and the train step (one length: they cost the most to interpret)
DTYPE = torch.float16  # bf16 tl.dot is wrong in the interpreter; fp16 has the same byte counts
SEED = 0
# Packed RAG rows at meter lengths: examples of 2-5 documents of 32-128 tokens.
LAYOUT = dict(docs_per_example=(2, 5), doc_len=(32, 128), shared=(16, 48))


@dataclass
class Setup:
    """A ready-to-meter op. forward() runs it (autograd recording); inputs are what it reads.

    flops: minimum (forward, backward) FLOPs; dot: whether they are GEMM FLOPs (tensor cores).
    step: forward() is a whole train step (forward + backward + optimizer); min_bytes then
    gives its minimum bytes, as tensors alone do not name the optimizer's traffic.
    """

    forward: Callable[[], object]
    inputs: Sequence[object]
    flops: Tuple[float, float] = (0.0, 0.0)
    dot: bool = True
    step: bool = False
    min_bytes: Optional[float] = None


@dataclass(frozen=True)
class Case:
    name: str  # op or baseline name, e.g. "ssd_scan", "reference.ssd_scan"
    variant: str  # the options, e.g. "D,z,dt_bias,softplus,varlen,doc_mode"
    L: int
    build: Callable[[int], Setup] = field(compare=False)
    modes: Tuple[str, ...] = ("fwd", "fwd_bwd")

    @property
    def key(self) -> str:
        return f"{self.name} [{self.variant}] L={self.L}"


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, scale=1.0, dtype=DTYPE, grad=True):
    t = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return t.requires_grad_(grad)


def _packed_row(L: int, seed: int = SEED):
    """cu_seqlens, doc ids (int32) and the DocLayout of a synthetic packed RAG row of L tokens."""
    from refrag_kernels import DocLayout

    examples = rag_examples(L, seed=seed, **LAYOUT)
    cu, docs = examples_to_tensors(examples, "cpu")
    return cu, docs, DocLayout.from_examples(examples)


# ------------------------------------------------------------------------------------ ssd_scan
SSD_HEADS, SSD_P, SSD_N, SSD_CHUNK = 4, 64, 64, 64


def _ssd_inputs(L: int):
    g = _gen()
    x, z = _rand(g, 1, L, SSD_HEADS, SSD_P), _rand(g, 1, L, SSD_HEADS, SSD_P)
    B, C = _rand(g, 1, L, 1, SSD_N, scale=0.3), _rand(g, 1, L, 1, SSD_N, scale=0.3)
    dt = _rand(g, 1, L, SSD_HEADS, scale=0.5)
    A = (-torch.rand(SSD_HEADS, generator=g) - 0.5).requires_grad_()
    D = torch.ones(SSD_HEADS, requires_grad=True)
    dt_bias = (torch.rand(SSD_HEADS, generator=g) - 2.0).requires_grad_()
    return x, dt, A, B, C, D, z, dt_bias


def ssd_setup(L: int, doc_mode: bool, num_seqs: Optional[int] = None, impl=None) -> Setup:
    """ssd_scan with D, z, dt_bias, softplus on a packed row (RAG layout, or num_seqs equal cuts)."""
    from refrag_kernels import ssd_scan

    impl = impl or ssd_scan
    x, dt, A, B, C, D, z, dt_bias = _ssd_inputs(L)
    if num_seqs is None:
        cu, docs, _ = _packed_row(L)
    else:
        cu, docs = torch.linspace(0, L, num_seqs + 1).round().to(torch.int32), None
    kwargs = dict(chunk_size=SSD_CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, cu_seqlens=cu)
    if doc_mode:
        kwargs.update(doc_ids=docs, doc_mode=True)
    inputs = [x, dt, A, B, C, D, z, dt_bias, cu] + ([docs] if doc_mode else [])
    return Setup(lambda: impl(x, dt, A, B, C, **kwargs), inputs,
                 costs.ssd_flops(L, SSD_HEADS, SSD_P, SSD_N, SSD_CHUNK))


def fla_simple_gla_setup(L: int) -> Setup:
    """flash-linear-attention's chunk_simple_gla on the same scan (q = C, k = B, v = x dt, g = dt A)."""
    chunk_simple_gla = optional_import("fla.ops.simple_gla", "chunk_simple_gla")
    x, dt, A, B, C, *_ = _ssd_inputs(L)
    cu, _, _ = _packed_row(L)

    def forward():
        q, k = C.expand(-1, -1, SSD_HEADS, -1), B.expand(-1, -1, SSD_HEADS, -1)
        v = x * dt.unsqueeze(-1)
        return chunk_simple_gla(q, k, v, g=dt.float() * A, scale=1.0, cu_seqlens=cu.long())[0]

    return Setup(forward, [x, dt, A, B, C, cu], costs.ssd_flops(L, SSD_HEADS, SSD_P, SSD_N, SSD_CHUNK))


# ------------------------------------------------------------------------------- doc_attention
ATTN_HQ, ATTN_HK, ATTN_D = 2, 1, 64


def attention_setup(L: int, impl=None) -> Setup:
    """doc_attention (causal, documents, GQA 2:1) on a packed RAG row, with its DocLayout."""
    from refrag_kernels import doc_attention

    g = _gen()
    q = _rand(g, 1, L, ATTN_HQ, ATTN_D)
    k, v = _rand(g, 1, L, ATTN_HK, ATTN_D), _rand(g, 1, L, ATTN_HK, ATTN_D)
    cu, docs, layout = _packed_row(L)
    if impl is None:
        forward = lambda: doc_attention(q, k, v, layout=layout)  # noqa: E731
    else:
        forward = lambda: impl(q, k, v, cu_seqlens=cu, doc_ids=docs)  # noqa: E731
    return Setup(forward, [q, k, v, cu, docs], costs.attention_flops(visible_pairs(cu, docs), ATTN_D, ATTN_HQ))


# ------------------------------------------------------------------------- causal_conv1d
CONV_CHANNELS, CONV_WIDTH = 128, 4


def conv_setup(L: int, impl=None) -> Setup:
    from refrag_kernels import causal_conv1d

    impl = impl or causal_conv1d
    g = _gen()
    x = _rand(g, 1, L, CONV_CHANNELS)
    weight, bias = _rand(g, CONV_CHANNELS, CONV_WIDTH, scale=0.3), _rand(g, CONV_CHANNELS, scale=0.1)
    cu, docs, _ = _packed_row(L)
    return Setup(lambda: impl(x, weight, bias, cu_seqlens=cu, doc_ids=docs, activation="silu"),
                 [x, weight, bias, cu, docs], costs.conv1d_flops(L, CONV_CHANNELS, CONV_WIDTH), dot=False)


# ------------------------------------------------------------------------ selective_scan
SCAN_DIM, SCAN_N = 8, 16
SCAN_LENGTHS = (64, 256)  # the interpreter runs this scan's chunk loop slowly; the model does not use it


def selective_scan_setup(L: int, impl=None) -> Setup:
    """Mamba-1 scan with D, z, delta_bias, softplus, varlen."""
    from refrag_kernels import selective_scan

    impl = impl or selective_scan
    g = _gen()
    u, z = _rand(g, 1, SCAN_DIM, L), _rand(g, 1, SCAN_DIM, L)
    delta = _rand(g, 1, SCAN_DIM, L, scale=0.5)
    A = (-torch.rand(SCAN_DIM, SCAN_N, generator=g) - 0.5).requires_grad_()
    B, C = _rand(g, 1, SCAN_N, L, scale=0.3), _rand(g, 1, SCAN_N, L, scale=0.3)
    D, delta_bias = torch.ones(SCAN_DIM, requires_grad=True), (torch.rand(SCAN_DIM, generator=g) - 2).requires_grad_()
    cu, _, _ = _packed_row(L)
    return Setup(lambda: impl(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                              cu_seqlens=cu),
                 [u, delta, A, B, C, D, z, delta_bias, cu], costs.selective_scan_flops(L, SCAN_DIM, SCAN_N), dot=False)


# ------------------------------------------------------------- fused_linear_cross_entropy
CE_HIDDEN, CE_VOCAB = 256, 2048


def cross_entropy_setup(L: int, valid: float, impl=None) -> Setup:
    """Loss over the first `valid` share of the tokens (the rest ignore_index, as document tokens)."""
    from refrag_kernels import fused_linear_cross_entropy

    g = _gen()
    hidden, weight = _rand(g, L, CE_HIDDEN, scale=0.5), _rand(g, CE_VOCAB, CE_HIDDEN, scale=0.05)
    targets = torch.randint(0, CE_VOCAB, (L,), generator=g)
    counted = round(valid * L)
    targets[counted:] = -100
    if impl is None:  # the model passes the loss-token count its loader counted on the host
        forward = lambda: fused_linear_cross_entropy(hidden, weight, targets, num_valid=counted)  # noqa: E731
    else:
        forward = lambda: impl(hidden, weight, targets)  # noqa: E731
    return Setup(forward, [hidden, weight, targets],
                 costs.linear_cross_entropy_flops(L, CE_HIDDEN, CE_VOCAB, counted))


def liger_setup(L: int, valid: float) -> Setup:
    liger = optional_import("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
    return cross_entropy_setup(L, valid, impl=lambda h, w, t: liger.apply(h, w, t)[0])


# --------------------------------------------------------------------------- gated_rms_norm
NORM_DIM = 256  # the tiny model's d_inner


def gated_rms_norm_setup(L: int, impl=None) -> Setup:
    """Mamba-2's output norm rmsnorm(y * silu(z)) * weight over d_inner (one group), as the model calls it."""
    from refrag_kernels import gated_rms_norm

    impl = impl or gated_rms_norm
    g = _gen()
    y, z = _rand(g, 1, L, NORM_DIM), _rand(g, 1, L, NORM_DIM)
    weight = (1 + 0.1 * torch.randn(NORM_DIM, generator=g)).requires_grad_()
    return Setup(lambda: impl(y, z, weight, 1e-5), [y, z, weight], costs.gated_rms_norm_flops(L, NORM_DIM),
                 dot=False)


# --------------------------------------------------------------------------- decode steps
DECODE_ROWS = 8


def ssd_update_setup(L: int) -> Setup:
    """One SSD decode step for DECODE_ROWS rows (L unused: a step has no length)."""
    from refrag_kernels import ssd_state_update

    g = _gen()
    state = torch.randn(DECODE_ROWS, SSD_HEADS, SSD_P, SSD_N, generator=g)
    x, z = _rand(g, DECODE_ROWS, SSD_HEADS, SSD_P, grad=False), _rand(g, DECODE_ROWS, SSD_HEADS, SSD_P, grad=False)
    dt = _rand(g, DECODE_ROWS, SSD_HEADS, grad=False)
    B, C = _rand(g, DECODE_ROWS, 1, SSD_N, grad=False), _rand(g, DECODE_ROWS, 1, SSD_N, grad=False)
    A, D, dt_bias = -torch.rand(SSD_HEADS, generator=g) - 0.5, torch.ones(SSD_HEADS), torch.zeros(SSD_HEADS)
    # the state is read and written in place: count it twice
    return Setup(lambda: ssd_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True),
                 [state, state.clone(), x, dt, A, B, C, D, z, dt_bias], (4.0 * DECODE_ROWS * SSD_HEADS * SSD_P * SSD_N,
                                                                          0.0), dot=False)


def conv_update_setup(L: int) -> Setup:
    from refrag_kernels import causal_conv1d_update

    g = _gen()
    conv_state = _rand(g, DECODE_ROWS, CONV_CHANNELS, CONV_WIDTH - 1, grad=False)
    x = _rand(g, DECODE_ROWS, CONV_CHANNELS, grad=False)
    weight, bias = _rand(g, CONV_CHANNELS, CONV_WIDTH, grad=False), _rand(g, CONV_CHANNELS, grad=False)
    return Setup(lambda: causal_conv1d_update(conv_state, x, weight, bias, activation="silu"),
                 [conv_state, conv_state.clone(), x, weight, bias],
                 (2.0 * DECODE_ROWS * CONV_CHANNELS * CONV_WIDTH, 0.0), dot=False)


# ------------------------------------------------------------------------ blocks and model
def tiny_config(vocab: int = 4096):
    """The CPU demo's model: preset tiny (d_model 128, T,M,T,M, 4 heads of 32, Mamba d_state 32,
    headdim 32, chunk 32) with its demo options (key_conv 3, tied embeddings)."""
    from refrag.model import preset

    return preset("tiny", vocab_size=vocab, key_conv=3, tie_embeddings=True)


def _autocast():
    """fp16 autocast: the model's bf16 autocast on GPU, in the dtype the interpreter dots exactly."""
    return torch.autocast("cpu", dtype=DTYPE)


def block_setup(L: int, kind: str) -> Setup:
    """One residual block of the tiny model ("T" attention + MLP, "M" Mamba-2) on a packed row."""
    from refrag.model import HybridLM
    from refrag.model.blocks import AttentionBlock, MambaBlock

    torch.manual_seed(SEED)
    config = tiny_config()
    model = HybridLM(config)  # builds the sequence context exactly as training does
    block = next(b for b in model.blocks if isinstance(b, AttentionBlock if kind == "T" else MambaBlock))
    _, _, layout = _packed_row(L)
    ids = torch.zeros(1, L, dtype=torch.long)
    ctx = model._context(ids, layout)
    x = _rand(_gen(), 1, L, config.d_model, dtype=torch.float32)
    params = list(block.parameters())

    def forward():
        with _autocast():
            return block(x, ctx)

    flops = costs.matmul_flops(L, params)
    if kind == "T":
        pairs = visible_pairs(layout.cu_seqlens, layout.doc_ids)
        attn = costs.attention_flops(pairs, config.head_dim, config.n_head)
    else:
        m = config.mamba
        attn = costs.ssd_flops(L, config.mamba_heads, m.headdim, m.d_state, m.chunk_size)
    flops = (flops[0] + attn[0], flops[1] + attn[1])
    return Setup(forward, [x, *params, layout.cu_seqlens, layout.doc_ids], flops)


def train_step_setup(L: int) -> Setup:
    """One AdamW train step of the tiny HybridLM on a packed row with documents (loss on shared text)."""
    from bench.train_setup import build_train_step

    step = build_train_step("T,M,T,M", L, torch.device("cpu"), smoke=True, config=tiny_config(),
                            layout=LAYOUT)
    params = [p for p in step.model.parameters()]
    p_bytes = costs.io_bytes(params)
    # forward reads the weights, backward reads them and writes grads, AdamW reads param, grad and
    # two moments and writes param and moments: 10 passes over the parameters, plus the row.
    min_bytes = 10 * p_bytes + costs.io_bytes(step.input_ids, step.targets)

    def run():
        step.run(phase=lambda name: _autocast() if name == "forward" else contextlib.nullcontext())

    flops = float(step.flops())
    return Setup(run, [step.input_ids, step.targets, *params], (flops / 3, 2 * flops / 3), step=True,
                 min_bytes=min_bytes)


# --------------------------------------------------------------------------------- registry
def _reference(name: str):
    from refrag_kernels import reference

    return getattr(reference, name)


def _op(name: str, variant: str, build: Callable[[int], Setup], lengths: Sequence[int] = LENGTHS,
        modes: Tuple[str, ...] = ("fwd", "fwd_bwd")) -> List[Case]:
    return [Case(name, variant, L, build, modes) for L in lengths]


MODEL_SSD = "D,z,dt_bias,softplus,varlen,doc_mode"
CASES: List[Case] = [
    *_op("ssd_scan", MODEL_SSD, lambda L: ssd_setup(L, doc_mode=True)),
    # issue 16's baseline: fp16, 4 heads, P = N = 64, chunk 64, 3 equal sequences, no documents
    *_op("ssd_scan", "D,z,dt_bias,softplus,3 seqs", lambda L: ssd_setup(L, doc_mode=False, num_seqs=3), (1024,),
         ("fwd_bwd",)),
    *_op("doc_attention", "causal,docs,GQA 2:1,d64", attention_setup),
    *_op("causal_conv1d", "silu,varlen,docs,w4", conv_setup),
    *_op("selective_scan", "D,z,delta_bias,softplus,varlen", selective_scan_setup, SCAN_LENGTHS),
    *_op("fused_linear_cross_entropy", "10% targets", lambda L: cross_entropy_setup(L, 0.1)),
    *_op("fused_linear_cross_entropy", "100% targets", lambda L: cross_entropy_setup(L, 1.0)),
    *_op("gated_rms_norm", "z gate,1 group", gated_rms_norm_setup),
    *_op("ssd_state_update", f"{DECODE_ROWS} rows,D,z,dt_bias,softplus", ssd_update_setup, (1,), ("fwd",)),
    *_op("causal_conv1d_update", f"{DECODE_ROWS} rows,silu", conv_update_setup, (1,), ("fwd",)),
    *_op("AttentionBlock", "tiny,fp16 autocast", lambda L: block_setup(L, "T"), (MODEL_L,)),
    *_op("MambaBlock", "tiny,fp16 autocast", lambda L: block_setup(L, "M"), (MODEL_L,)),
    *_op("train_step", "tiny T,M,T,M,AdamW,fp16 autocast", train_step_setup, (MODEL_L,), ("step",)),
    # baselines in the same run: the PyTorch references (unfused torch ops)
    *_op("reference.ssd_scan", MODEL_SSD,
         lambda L: ssd_setup(L, doc_mode=True, impl=_reference("ssd_scan")), LENGTHS[1:]),
    *_op("reference.doc_attention", "causal,docs,GQA 2:1,d64",
         lambda L: attention_setup(L, impl=_reference("doc_attention")), LENGTHS[1:]),
    *_op("reference.fused_linear_cross_entropy", "100% targets",
         lambda L: cross_entropy_setup(L, 1.0, impl=_reference("fused_linear_cross_entropy")), LENGTHS[1:]),
    # plain torch in the meter's dtype (logits GEMM in fp16, loss in fp32): what the fused op replaces
    *_op("torch.linear_cross_entropy", "10% targets",
         lambda L: cross_entropy_setup(L, 0.1, impl=torch_linear_cross_entropy), LENGTHS[1:]),
    *_op("torch.linear_cross_entropy", "100% targets",
         lambda L: cross_entropy_setup(L, 1.0, impl=torch_linear_cross_entropy), LENGTHS[1:]),
]

# Third-party baselines that run under the interpreter, when installed.
OPTIONAL = {
    "fla.chunk_simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "liger.fused_linear_cross_entropy": ("liger_kernel.ops.fused_linear_cross_entropy",
                                         "LigerFusedLinearCrossEntropyFunction"),
}
if optional_import(*OPTIONAL["fla.chunk_simple_gla"]) is not None:
    CASES += _op("fla.chunk_simple_gla", "varlen", fla_simple_gla_setup, LENGTHS[1:])
if optional_import(*OPTIONAL["liger.fused_linear_cross_entropy"]) is not None:
    CASES += _op("liger.fused_linear_cross_entropy", "100% targets", lambda L: liger_setup(L, 1.0), LENGTHS[1:])
