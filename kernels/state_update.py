"""Single-token decode steps for generation: the SSD state update and the conv1d window update.

Both kernels update their state in place and return the token's output; decode needs no
backward. Semantics are those of ``refrag_kernels.reference.ssd_state_update`` and
``refrag_kernels.reference.causal_conv1d_update``: stepping token by token reproduces
``ssd_scan`` and ``causal_conv1d`` over the sequence.

Every program reads its whole state tile before a barrier and writes it after, so the
in-place update is safe whatever thread layout the compiler picks. Autotuning restores
the states after each benchmarked config (``restore_value``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels import reference
from refrag_kernels.common.autotune import launch
from refrag_kernels.common.checks import check_float, check_no_overlap, check_shape
from refrag_kernels.common.dispatch import use_torch_path, use_triton
from refrag_kernels.conv1d import ACTIVATIONS, MAX_WIDTH, MIN_WIDTH

# One program per (BP head dims, head, row) with the whole state dimension n in registers.
SSD_UPDATE_CONFIGS = [
    triton.Config({"BP": 16}, num_warps=4),
    triton.Config({"BP": 32}, num_warps=4),
    triton.Config({"BP": 64}, num_warps=8),
]
# One program per (BD channels, row); the width axis is padded to 4 taps.
CONV_UPDATE_CONFIGS = [
    triton.Config({"BD": 64}, num_warps=2),
    triton.Config({"BD": 128}, num_warps=4),
    triton.Config({"BD": 256}, num_warps=4),
]
_TAPS = MAX_WIDTH  # register width of the conv window (power of two >= every width)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) computed stably; x itself above 20, as torch.nn.functional.softplus."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.autotune(configs=SSD_UPDATE_CONFIGS, key=["P", "N"], restore_value=["state"])
@triton.jit
def ssd_state_update_kernel(
    state, x, dt, A, B, C, D, z, dt_bias, y,
    H, P, N, HEADS_PER_GROUP,
    stride_sb, stride_sh, stride_sp, stride_sn,
    HAS_D: tl.constexpr, D_PER_DIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
):
    i_p, i_h, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_g = i_h // HEADS_PER_GROUP
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_s = m_p[:, None] & m_n[None, :]

    b_dt = tl.load(dt + i_b * H + i_h).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias + i_h).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_decay = tl.exp(b_dt * tl.load(A + i_h).to(tl.float32))
    o_x = (i_b * H + i_h) * P + o_p
    b_x = tl.load(x + o_x, mask=m_p, other=0.0).to(tl.float32)
    b_B = tl.load(B + (i_b * (H // HEADS_PER_GROUP) + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C + (i_b * (H // HEADS_PER_GROUP) + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    p_s = state + i_b * stride_sb + i_h * stride_sh + o_p[:, None] * stride_sp + o_n[None, :] * stride_sn
    b_s = tl.load(p_s, mask=m_s, other=0.0).to(tl.float32)

    b_s = b_s * b_decay + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_s * b_C[None, :], axis=1)  # [BP, BN] @ [BN] -> [BP]
    if HAS_D:
        if D_PER_DIM:
            b_y += b_x * tl.load(D + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        else:
            b_y += b_x * tl.load(D + i_h).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_x, mask=m_p, other=0.0).to(tl.float32)
        b_y *= b_z * tl.sigmoid(b_z)
    tl.debug_barrier()
    tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_s)
    tl.store(y + o_x, b_y.to(y.dtype.element_ty), mask=m_p)


def ssd_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool,
                         config: Optional[triton.Config] = None) -> torch.Tensor:
    """Launch the SSD decode kernel (shapes validated by the public function); returns y (b,h,p)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    y = torch.empty_like(x)
    launch(
        ssd_state_update_kernel,
        lambda meta: (triton.cdiv(p, meta["BP"]), h, b),
        config,
        state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, y=y,
        H=h, P=p, N=n, HEADS_PER_GROUP=h // g,
        stride_sb=state.stride(0), stride_sh=state.stride(1), stride_sp=state.stride(2), stride_sn=state.stride(3),
        HAS_D=D is not None, D_PER_DIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, BN=triton.next_power_of_2(n),
    )
    return y


@triton.autotune(configs=CONV_UPDATE_CONFIGS, key=["D", "W"], restore_value=["conv_state"])
@triton.jit
def causal_conv1d_update_kernel(
    conv_state, x, weight, bias, y,
    D,
    stride_sb, stride_sd, stride_sw,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, TAPS: tl.constexpr, BD: tl.constexpr,
):
    i_d, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_k = tl.arange(0, TAPS)
    m_d = o_d < D
    b_x = tl.load(x + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_s = conv_state + i_b * stride_sb + o_d[:, None] * stride_sd
    # window[:, k] = input k of the last W (oldest first): state columns 0..W-2, then x.
    m_old = m_d[:, None] & (o_k[None, :] < W - 1)
    b_window = tl.load(p_s + o_k[None, :] * stride_sw, mask=m_old, other=0.0).to(tl.float32)
    b_window += tl.where(o_k[None, :] == W - 1, b_x[:, None], 0.0)
    # shifted[:, k] = window[:, k + 1]: the new state, read before anything is written.
    m_keep = m_d[:, None] & (o_k[None, :] < W - 2)
    b_shifted = tl.load(p_s + (o_k[None, :] + 1) * stride_sw, mask=m_keep, other=0.0).to(tl.float32)
    b_shifted += tl.where(o_k[None, :] == W - 2, b_x[:, None], 0.0)

    m_w = m_d[:, None] & (o_k[None, :] < W)
    b_w = tl.load(weight + o_d[:, None] * W + o_k[None, :], mask=m_w, other=0.0).to(tl.float32)
    b_y = tl.sum(b_window * b_w, axis=1)  # [BD, TAPS] * [BD, TAPS] -> [BD]
    if HAS_BIAS:
        b_y += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.debug_barrier()
    tl.store(p_s + o_k[None, :] * stride_sw, b_shifted.to(p_s.dtype.element_ty), mask=m_old)
    tl.store(y + i_b * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


def causal_conv1d_update_fwd(conv_state, x, weight, bias, silu: bool,
                             config: Optional[triton.Config] = None) -> torch.Tensor:
    """Launch the conv decode kernel (shapes validated by the public function); returns y (b,d)."""
    b, d = x.shape
    y = torch.empty_like(x)
    launch(
        causal_conv1d_update_kernel,
        lambda meta: (triton.cdiv(d, meta["BD"]), b),
        config,
        conv_state=conv_state, x=x, weight=weight, bias=bias, y=y, D=d,
        stride_sb=conv_state.stride(0), stride_sd=conv_state.stride(1), stride_sw=conv_state.stride(2),
        W=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, TAPS=_TAPS,
    )
    return y


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def ssd_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The "torch" path of `ssd_state_update` (CPU decode without the interpreter): the oracle's
    update with the heads split by group (``unflatten``, a view even of a strided state), so
    each group's B and C broadcast over its heads instead of being repeated per head, and the
    readout a batched matmul: about half the oracle's ops, which is what a one-token step
    costs on a CPU. The state update is the oracle's, operation for operation."""
    b, h, p, n = state.shape
    g = B.shape[1]
    cdt = state.dtype
    dt = reference._prepare_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus)
    grouped = state.unflatten(1, (g, h // g))  # (b, g, h/g, p, n), a view: updated in place
    decay = torch.exp(dt * A.to(cdt)).view(b, g, h // g, 1, 1)
    xf = x.to(cdt)
    dtx = (dt[:, :, None] * xf).view(b, g, h // g, p, 1)
    grouped.mul_(decay).add_(dtx * B.to(cdt)[:, :, None, None, :])
    y = (grouped @ C.to(cdt)[:, :, None, :, None]).view(b, h, p)
    if D is not None:
        y = y + xf * (D[:, None] if D.dim() == 1 else D).to(cdt)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cdt))
    return y.to(x.dtype)


def _check_ssd_update_inputs(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C),
                    ("D", D), ("z", z), ("dt_bias", dt_bias)):
        if t is not None:
            check_float(name, t)
    if state.dim() != 4:
        raise ValueError(f"state must be (b, h, p, n), got shape {tuple(state.shape)}")
    b, h, p, n = state.shape
    check_shape("x", x, (b, h, p))
    check_shape("dt", dt, (b, h))
    check_shape("A", A, (h,))
    if B.dim() != 3 or B.shape[0] != b or B.shape[2] != n:
        raise ValueError(f"B must be (b, g, n) = ({b}, g, {n}), got shape {tuple(B.shape)}")
    if h % B.shape[1]:
        raise ValueError(f"number of heads {h} must be a multiple of the number of groups {B.shape[1]}")
    check_shape("C", C, tuple(B.shape))
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if z is not None:
        check_shape("z", z, (b, h, p))
    if dt_bias is not None:
        check_shape("dt_bias", dt_bias, (h,))
    check_no_overlap("state", state)


def ssd_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor] = None,
                     z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                     dt_softplus: bool = False, *, config: Optional[triton.Config] = None) -> torch.Tensor:
    """One SSD decode step; `state` (b,h,p,n) (fp32) is updated in place. Returns y (b,h,p).

    x (b,h,p) dt (b,h) A (h,) B,C (b,g,n) with h % g == 0; D (h,)|(h,p); z (b,h,p);
    dt_bias (h,). With dt after bias and optional softplus:
    state = exp(dt*A) * state + dt * x B^T;  y = (state C + D x) * silu(z).
    Computes in fp32; y has x's dtype. `config` forces one of SSD_UPDATE_CONFIGS (tests).
    """
    _check_ssd_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    if not use_triton(state, x, dt, A, B, C, D, z, dt_bias, op="ssd_state_update"):
        if use_torch_path(state, op="ssd_state_update"):
            return ssd_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        return reference.ssd_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    x, dt, A, B, C, D, z, dt_bias = _contiguous(x, dt, A, B, C, D, z, dt_bias)
    return ssd_state_update_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, config)


def _check_conv_update_inputs(conv_state, x, weight, bias, activation) -> None:
    for name, t in (("conv_state", conv_state), ("x", x), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be (b, d), got shape {tuple(x.shape)}")
    b, d = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight must be (d, w) = ({d}, w), got shape {tuple(weight.shape)}")
    w = weight.shape[1]
    if not MIN_WIDTH <= w <= MAX_WIDTH:
        raise ValueError(f"conv width must be in {MIN_WIDTH}..{MAX_WIDTH}, got {w}")
    check_shape("conv_state", conv_state, (b, d, w - 1))
    check_no_overlap("conv_state", conv_state)
    if bias is not None:
        check_shape("bias", bias, (d,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_update(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, activation: Optional[str] = "silu", *,
                         config: Optional[triton.Config] = None) -> torch.Tensor:
    """One causal_conv1d decode step: x (b,d) -> y (b,d); weight (d,w), w in 2..4, bias (d,).

    conv_state (b,d,w-1) holds the previous w-1 inputs, oldest first, and is shifted in
    place to end with x. A new sequence (or document) starts from a zero conv_state.
    `config` forces one of CONV_UPDATE_CONFIGS (tests).
    """
    _check_conv_update_inputs(conv_state, x, weight, bias, activation)
    if not use_triton(conv_state, x, weight, bias, op="causal_conv1d_update"):
        return reference.causal_conv1d_update(conv_state, x, weight, bias, activation)
    x, weight, bias = _contiguous(x, weight, bias)
    return causal_conv1d_update_fwd(conv_state, x, weight, bias, activation is not None, config)
