"""Dispatch rule shared by every op (see DESIGN.md).

CUDA tensors run the Triton kernel. CPU tensors run the Triton kernel when the
interpreter is on (``TRITON_INTERPRET=1`` set before ``kernels`` is imported),
otherwise the pure-PyTorch reference. The reference is never a silent fallback
on CUDA.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these tensors."""
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)
