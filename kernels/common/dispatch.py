"""Dispatch rule shared by every op (see DESIGN.md).

CUDA tensors run the Triton kernel. CPU tensors run the Triton kernel when the
interpreter is on (``TRITON_INTERPRET=1`` set before ``kernels`` is imported),
otherwise the pure-PyTorch reference. The reference is never a silent fallback
on CUDA.
"""
from __future__ import annotations

import os
import warnings

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BUILT_INTERPRETED = INTERPRET  # what the kernels were built as (tests may switch INTERPRET off)
_warned_late_interpret = False


def _warn_late_interpret() -> None:
    """Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when ``kernels`` is imported:
    setting it later cannot switch the kernels to the interpreter. Say so, once."""
    global _warned_late_interpret
    if not _warned_late_interpret and not _BUILT_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1":
        _warned_late_interpret = True
        warnings.warn("TRITON_INTERPRET=1 was set after `import kernels`: the Triton kernels were built for the "
                      "GPU, so CPU tensors run the PyTorch reference (kernels.reference), not the interpreted "
                      "kernels. Set TRITON_INTERPRET=1 before the first import of kernels.", RuntimeWarning,
                      stacklevel=3)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for these tensors."""
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRET:
        _warn_late_interpret()
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)
