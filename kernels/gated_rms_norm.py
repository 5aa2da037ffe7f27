"""Gated RMSNorm (Mamba-2's output norm): out = rmsnorm(y * silu(z)) * weight, per group.

The last dimension (size d) is split into groups of `group_size` channels; each group of
each row is normalized by its own root mean square (mamba-ssm's RMSNormGated with
norm_before_gate=False). Computed in fp32, returned in y's dtype; z may be None (plain
RMSNorm). y and z are read through their row strides, so z can be a slice of a projection.

Forward: one program per (BM rows, group); saves only the per-(row, group) 1/rms (fp32).
Backward: the gated input is recomputed; each program owns ROWS_PER_PROGRAM rows and writes
its share of dweight, reduced with torch (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from refrag_kernels import reference
from refrag_kernels.common.autotune import launch
from refrag_kernels.common.checks import check_float, check_same_device, check_shape
from refrag_kernels.common.dispatch import use_triton

# Memory-bound op: rows per program against occupancy; every config passes the precision
# tests (tests/test_gated_rms_norm.py runs each one).
GATED_RMS_NORM_CONFIGS = [
    triton.Config({"BM": 1}, num_warps=8),
    triton.Config({"BM": 1}, num_warps=4),
    triton.Config({"BM": 2}, num_warps=8),
    triton.Config({"BM": 4}, num_warps=16),
]
# Backward programs each own this many rows (a multiple of every BM) and reduce their dweight
# share in registers: the partial-sum buffer has M / ROWS_PER_PROGRAM rows, not M.
ROWS_PER_PROGRAM = 256
MAX_GROUP_SIZE = 16384


@triton.jit
def _gated(y, s_y, z, s_z, o_m, o_n, m_mn, HAS_Z: tl.constexpr):
    """(y * silu(z)) fp32 [BM, BN], and z fp32 (or y when there is no gate)."""
    b_y = tl.load(y + o_m[:, None] * s_y + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_m[:, None] * s_z + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
        return b_y * b_z * tl.sigmoid(b_z), b_y, b_z
    return b_y, b_y, b_y


@triton.jit
def gated_rms_norm_fwd_kernel(y, s_y, z, s_z, weight, out, rstd, M, N, GS, NG, eps, BM: tl.constexpr,
                              BN: tl.constexpr, HAS_Z: tl.constexpr):
    i_m, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_c = tl.arange(0, BN)
    o_n = i_g * GS + o_c
    m_n = o_c < GS
    m_mn = (o_m < M)[:, None] & m_n[None, :]
    b_g, _, _ = _gated(y, s_y, z, s_z, o_m, o_n, m_mn, HAS_Z)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_g * b_g, axis=1) / GS + eps)
    b_w = tl.load(weight + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_out = b_g * b_rstd[:, None] * b_w[None, :]
    tl.store(out + o_m[:, None] * N + o_n[None, :], b_out.to(out.dtype.element_ty), mask=m_mn)
    tl.store(rstd + o_m * NG + i_g, b_rstd, mask=o_m < M)


def gated_rms_norm_fwd(y, z, weight, eps: float, group_size: int, config: Optional[triton.Config] = None):
    """y, z (M, N) with unit last stride (z or None), weight (N,) -> out (M, N) in y's dtype,
    rstd (M, N // group_size) fp32."""
    M, N = y.shape
    ng = N // group_size
    out = torch.empty(M, N, dtype=y.dtype, device=y.device)
    rstd = torch.empty(M, ng, dtype=torch.float32, device=y.device)
    zz = y if z is None else z
    launch(gated_rms_norm_fwd_tuned, lambda meta: (triton.cdiv(M, meta["BM"]), ng), config, y=y, s_y=y.stride(0),
           z=zz, s_z=zz.stride(0), weight=weight, out=out, rstd=rstd, M=M, N=N, GS=group_size, NG=ng, eps=eps,
           BN=triton.next_power_of_2(group_size), HAS_Z=z is not None)
    return out, rstd


@triton.jit
def gated_rms_norm_bwd_kernel(y, s_y, z, s_z, weight, rstd, dout, s_do, dy, dz, dw_part, M, N, GS, NG, ROWS,
                              BM: tl.constexpr, BN: tl.constexpr, HAS_Z: tl.constexpr):
    """With g = y * silu(z), xhat = g * rstd, gw = dout * weight:
    dg = rstd * (gw - xhat * mean(gw * xhat)); dy = dg * silu(z); dz = dg * y * silu'(z);
    this program's ROWS rows' share of dweight = sum(dout * xhat)."""
    i_p, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = tl.arange(0, BN)
    o_n = i_g * GS + o_c
    m_n = o_c < GS
    b_w = tl.load(weight + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BN], dtype=tl.float32)
    for i_r in range(0, tl.minimum(ROWS, M - i_p * ROWS), BM):
        o_m = i_p * ROWS + i_r + tl.arange(0, BM)
        m_mn = (o_m < M)[:, None] & m_n[None, :]
        b_g, b_y, b_z = _gated(y, s_y, z, s_z, o_m, o_n, m_mn, HAS_Z)
        b_rstd = tl.load(rstd + o_m * NG + i_g, mask=o_m < M, other=0.0)
        b_do = tl.load(dout + o_m[:, None] * s_do + o_n[None, :], mask=m_mn, other=0.0).to(tl.float32)
        b_xhat = b_g * b_rstd[:, None]
        b_gw = b_do * b_w[None, :]
        b_dg = b_rstd[:, None] * (b_gw - b_xhat * (tl.sum(b_gw * b_xhat, axis=1) / GS)[:, None])
        p_out = o_m[:, None] * N + o_n[None, :]
        if HAS_Z:
            b_sig = tl.sigmoid(b_z)
            tl.store(dy + p_out, (b_dg * b_z * b_sig).to(dy.dtype.element_ty), mask=m_mn)
            b_dz = b_dg * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(dz + p_out, b_dz.to(dz.dtype.element_ty), mask=m_mn)
        else:
            tl.store(dy + p_out, b_dg.to(dy.dtype.element_ty), mask=m_mn)
        b_dw += tl.sum(b_do * b_xhat, axis=0)
    tl.store(dw_part + i_p * N + o_n, b_dw, mask=m_n)


def gated_rms_norm_bwd(y, z, weight, rstd, dout, group_size: int, config: Optional[triton.Config] = None):
    """Gradients dy, dz (M, N) in y's / z's dtype (dz None without z) and dweight (N,) in weight's dtype."""
    M, N = y.shape
    ng = N // group_size
    dy = torch.empty(M, N, dtype=y.dtype, device=y.device)
    dz = None if z is None else torch.empty(M, N, dtype=z.dtype, device=z.device)
    num_programs = triton.cdiv(M, ROWS_PER_PROGRAM)
    dw_part = torch.empty(num_programs, N, dtype=torch.float32, device=y.device)
    zz = y if z is None else z
    launch(gated_rms_norm_bwd_tuned, (num_programs, ng), config, y=y, s_y=y.stride(0), z=zz, s_z=zz.stride(0),
           weight=weight, rstd=rstd, dout=dout, s_do=dout.stride(0), dy=dy, dz=dy if dz is None else dz,
           dw_part=dw_part, M=M, N=N, GS=group_size, NG=ng, ROWS=ROWS_PER_PROGRAM,
           BN=triton.next_power_of_2(group_size), HAS_Z=z is not None)
    return dy, dz, dw_part.sum(0).to(weight.dtype)


gated_rms_norm_fwd_tuned = triton.autotune(configs=GATED_RMS_NORM_CONFIGS, key=["N", "GS"])(gated_rms_norm_fwd_kernel)
gated_rms_norm_bwd_tuned = triton.autotune(configs=GATED_RMS_NORM_CONFIGS, key=["N", "GS"])(gated_rms_norm_bwd_kernel)


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, config):
        out, rstd = gated_rms_norm_fwd(y, z, weight, eps, group_size, config)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group_size, ctx.config = group_size, config
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, weight, rstd = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dy, dz, dweight = gated_rms_norm_bwd(y, z, weight, rstd, dout, ctx.group_size, ctx.config)
        return dy, dz, dweight, None, None, None


def _rows2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) -> (M, n) with unit last stride, a view whenever the strides allow."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(y, z, weight, eps, group_size) -> int:
    check_float("y", y)
    check_float("weight", weight)
    if z is not None:
        check_float("z", z)
        check_shape("z", z, y.shape)
    check_same_device(y=y, z=z, weight=weight)
    if y.dim() < 1:
        raise ValueError("y must have at least one dimension")
    n = y.shape[-1]
    check_shape("weight", weight, (n,))
    group_size = n if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive divisor of the last dimension {n}, got {group_size!r}")
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be at most {MAX_GROUP_SIZE}, got {group_size}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return group_size


def gated_rms_norm(y: torch.Tensor, z: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
                   group_size: Optional[int] = None, *, config: Optional[triton.Config] = None) -> torch.Tensor:
    """rmsnorm(y * silu(z)) * weight over groups of `group_size` channels of the last dim.

    y, z (..., d) (z None: plain RMSNorm of y); weight (d,); group_size divides d (None: d).
    Computes in fp32, returns y's dtype; `config` forces one of GATED_RMS_NORM_CONFIGS (tests).

    Example (Mamba-2 output norm over d_inner, one group)::

        out = gated_rms_norm(y, z, weight, eps=1e-5)   # y, z (b, l, d_inner)
    """
    group_size = _check_inputs(y, z, weight, eps, group_size)
    if not use_triton(y, z, weight, op="gated_rms_norm"):
        return reference.gated_rms_norm(y, z, weight, eps, group_size)
    if y.dtype == torch.float64:
        raise ValueError("the Triton gated_rms_norm computes in fp32: pass fp16, bf16 or fp32 inputs (fp64 runs "
                         "only through refrag_kernels.reference.gated_rms_norm)")
    n = y.shape[-1]
    out = GatedRMSNormFunction.apply(_rows2d(y, n), None if z is None else _rows2d(z, n), weight.contiguous(),
                                     float(eps), group_size, config)
    return out.view(y.shape)
