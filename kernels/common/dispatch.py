"""Dispatch rule shared by every op (see docs/architecture.md), and the backend switch.

Default ("auto"): CUDA tensors run the Triton kernel. CPU tensors run the Triton kernel when
the interpreter is on (``TRITON_INTERPRET=1`` set before ``kernels`` is imported), otherwise the
"torch" path: an op's fast PyTorch implementation where it has one (``doc_attention``: torch's
``scaled_dot_product_attention`` under the dense mask; ``ssd_scan``: every chunk of every run in
one batch, ``kernels/ssd/torch_path.py``; ``causal_conv1d`` on rows without a layout: each
window a strided view; ``ssd_state_update``: B and C broadcast per group), else the
pure-PyTorch reference. The reference is never a silent fallback on CUDA.

``use_backend("reference")`` (all ops) or ``use_backend("reference", ops="doc_attention")``
(some ops) selects a path explicitly, for tests, benchmarks and debugging::

    with refrag_kernels.use_backend("reference"):
        loss = model(batch)          # every op runs its refrag_kernels.reference oracle

The choice is process-wide, not per thread: autograd runs backward (and the recompute of
checkpointed blocks) on its own threads, and they must see the same choice as the forward.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterable, Iterator, Optional, Union

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BUILT_INTERPRETED = INTERPRET  # what the kernels were built as (tests may switch INTERPRET off)
_warned_late_interpret = False


def _warn_late_interpret() -> None:
    """Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when ``refrag_kernels`` is imported:
    setting it later cannot switch the kernels to the interpreter. Say so, once."""
    global _warned_late_interpret
    if not _warned_late_interpret and not _BUILT_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") == "1":
        _warned_late_interpret = True
        warnings.warn("TRITON_INTERPRET=1 was set after `import refrag_kernels`: the Triton kernels were built for the "
                      "GPU, so CPU tensors run the PyTorch reference (refrag_kernels.reference), not the interpreted "
                      "kernels. Set TRITON_INTERPRET=1 before the first import of refrag_kernels.", RuntimeWarning,
                      stacklevel=3)

BACKENDS = ("auto", "triton", "torch", "reference")
# Every public op that dispatches; `use_backend(..., ops=...)` accepts only these names.
OPS = ("ssd_scan", "selective_scan", "causal_conv1d", "doc_attention", "ssd_state_update",
       "causal_conv1d_update", "fused_linear_cross_entropy", "gated_rms_norm")

_default = "auto"
_per_op: dict = {}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    return backend


def _op_names(ops: Union[str, Iterable[str], None]) -> Optional[tuple]:
    if ops is None:
        return None
    names = (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; the ops with a backend switch are {OPS}")
    return names


def current_backend(op: Optional[str] = None) -> str:
    """The backend selected for ``op`` (or the default for all ops): "auto", "triton" or "reference"."""
    return _per_op.get(op, _default)


def set_backend(backend: str, ops: Union[str, Iterable[str], None] = None) -> None:
    """Select a backend until changed (prefer the ``use_backend`` context manager)."""
    global _default
    _check_backend(backend)
    names = _op_names(ops)
    if names is None:
        _default = backend
        _per_op.clear()
    else:
        for name in names:
            _per_op[name] = backend


@contextlib.contextmanager
def use_backend(backend: str, ops: Union[str, Iterable[str], None] = None) -> Iterator[None]:
    """Run the ops (all, or those named in ``ops``) on ``backend`` inside the block, then restore.

    "reference": the pure-PyTorch oracle of ``refrag_kernels.reference`` on any device (autograd gives
    its gradients). "torch": the op's fast PyTorch path (``doc_attention``, ``ssd_scan``,
    ``causal_conv1d`` without a layout, ``ssd_state_update``; the reference for the other ops),
    what "auto" runs on CPU without the interpreter. "triton": the Triton kernel; on CPU tensors
    this needs ``TRITON_INTERPRET=1`` set before ``kernels`` was imported. "auto": the default
    dispatch rule.
    """
    global _default
    _check_backend(backend)
    names = _op_names(ops)
    saved = (_default, dict(_per_op))
    try:
        set_backend(backend, names)
        yield
    finally:
        _default = saved[0]
        _per_op.clear()
        _per_op.update(saved[1])


def use_triton(*tensors: Optional[torch.Tensor], op: Optional[str] = None) -> bool:
    """True when the op should launch its Triton kernel for these tensors."""
    device = tensors[0].device
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    backend = current_backend(op)
    if backend in ("reference", "torch"):
        return False
    if backend == "triton":
        if device.type == "cpu" and not INTERPRET:
            raise RuntimeError(f"backend 'triton' for {op or 'the ops'} on CPU tensors needs the Triton "
                               "interpreter: set TRITON_INTERPRET=1 before importing kernels")
        return True
    if device.type == "cpu" and not INTERPRET:
        _warn_late_interpret()
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def use_torch_path(*tensors: Optional[torch.Tensor], op: Optional[str] = None) -> bool:
    """True when the op should take its fast PyTorch path (where `use_triton` is False): backend
    "torch", or "auto" on CPU tensors without the interpreter."""
    backend = current_backend(op)
    return backend == "torch" or (backend == "auto" and tensors[0].device.type == "cpu" and not INTERPRET)
