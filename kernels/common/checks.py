"""Input validation shared by every op: each failure is a ValueError naming the problem."""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise unless `t` is a floating tensor of a supported dtype."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Raise unless `t.shape == shape`."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """Raise unless distinct elements of `t` occupy distinct memory: an in-place output (a decode
    state) that is a broadcast view (stride 0, e.g. `expand`) or otherwise self-overlapping would
    have its rows overwrite each other. Sorting the dims of size > 1 by stride, each stride must
    reach past the span of the smaller ones."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(f"{name} is updated in place but its memory overlaps itself (strides {t.stride()} "
                             f"for shape {tuple(t.shape)}, e.g. a broadcast/expanded view); pass a tensor that "
                             "owns one element per entry (.contiguous() or .clone())")
        span = stride * (size - 1) + span


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """Raise unless every non-None tensor lives on the same device."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> None:
    """Validate varlen offsets for a packed row of `length` tokens.

    cu_seqlens: (N+1,) integer, starts at 0, non-decreasing (zero-length sequences
    allowed), last entry <= length (tokens past it are padding). Requires batch == 1.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor (N+1,) of int32/int64 on the inputs' device, got "
                         f"{type(cu_seqlens).__name__} (build it with torch.tensor(..., dtype=torch.int32))")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (one packed row), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if cu[-1] > length:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but the row has only {length} tokens")


def check_doc_ids(doc_ids: torch.Tensor, batch: int, length: int) -> None:
    """Validate per-token document ids: integer (b, l) or (l,), non-negative."""
    if not isinstance(doc_ids, torch.Tensor):
        raise ValueError(f"doc_ids must be a torch.Tensor of ints on the inputs' device, got {type(doc_ids).__name__}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
        raise ValueError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    if tuple(doc_ids.shape) != (batch, length):
        raise ValueError(f"doc_ids must have shape {(batch, length)} or ({length},), got {tuple(doc_ids.shape)}")
    if doc_ids.numel() and int(doc_ids.min()) < 0:
        raise ValueError("doc_ids must be non-negative (0 = shared text, k >= 1 = k-th document)")


def assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the 0-d bool tensor ``ok`` holds True, without a host
    read: at once for a CPU tensor, as a device-side assert on CUDA (the stream then fails
    with ``message`` at its next sync). For checks of values inside a step that must not wait
    on the device."""
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok, message)
        except RuntimeError:
            raise ValueError(message) from None
    else:
        torch._assert_async(ok, message)


def check_decay_rates(A: torch.Tensor) -> None:
    """A (h,) of a Mamba scan must be <= 0: exp(dt * A) is a decay; a positive A grows the state
    without bound. Checked without a host read (see `assert_on_device`)."""
    assert_on_device((A <= 0).all(), "A must be <= 0 (exp(dt * A) is a decay; pass A = -exp(A_log)), "
                                     "got a positive or NaN entry")


def check_layout(layout, b: int, l: int, device: torch.device, name: str, *, given: bool = False) -> None:
    """A `layout=` argument: a DocLayout for one packed row of length >= its tokens, on `device`;
    `given` is True when cu_seqlens/doc_ids were passed too (an error: one or the other)."""
    from refrag_kernels.layout import DocLayout  # layout.py imports this module's siblings

    if not isinstance(layout, DocLayout):
        raise ValueError(f"layout must be a refrag_kernels.DocLayout, got {type(layout).__name__}")
    if given:
        raise ValueError("pass either layout or cu_seqlens/doc_ids, not both")
    if b != 1:
        raise ValueError(f"a layout describes one packed row: {name} must have batch 1, got {b}")
    if layout.total_tokens > l:
        raise ValueError(f"layout covers {layout.total_tokens} tokens but {name} has length {l}")
    if layout.device != device:
        raise ValueError(f"layout is on {layout.device} but {name} is on {device}")
