"""Small layers shared by the blocks: gated RMSNorm, rotary embeddings, the MLP, weight init."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from refrag_kernels import gated_rms_norm


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: rmsnorm(y * silu(z)) * weight over the last dim (norm after gate),
    or over each slice of group_size channels of it (None: one group); computed in fp32 and
    returned in y's dtype (`refrag_kernels.gated_rms_norm`, fused fwd + bwd)."""

    def __init__(self, dim: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., dim) -> (..., dim)."""
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., head_dim // 2) fp32 for integer positions (...)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the first r = 2 * cos.shape[-1] channels of x (b, l, heads, d) by cos, sin
    (b|1, l, r/2), the other d - r channels unchanged (r == d: the whole head); computed in fp32."""
    r = 2 * cos.shape[-1]
    x1, x2 = x[..., :r].float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)


class MLP(nn.Module):
    """Position-wise MLP: "relu2" (down(relu(up x)^2)) or "swiglu" (down(silu(gate x) * up x))."""

    def __init__(self, d_model: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, hidden * (2 if kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        if self.kind == "swiglu":
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.relu(self.up(x)).square())


def init_input_linear(linear: nn.Linear) -> None:
    """Uniform init with std 1/sqrt(fan_in) (nanochat), zero bias."""
    bound = math.sqrt(3.0 / linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_output_linear(linear: nn.Linear) -> None:
    """Residual-branch output projections start at zero, so every block starts as the identity."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
