"""The performance meter's counters: what a callable costs a GPU, counted exactly on any machine.

    from bench.meter import measure
    m = measure(lambda: ssd_scan(x, dt, A, B, C, chunk_size=64))
    m.launches, m.logical_bytes, m.unique_bytes, m.dot_flops, m.aten_ops, m.host_syncs

Two counters run together while the callable runs:

* Triton kernels (needs ``TRITON_INTERPRET=1`` before ``kernels`` is imported): the interpreter's
  builder is hooked so that every launch records its logical global bytes (every unmasked element
  of every load and store, atomics counted as a load and a store), its unique bytes (distinct byte
  addresses read plus distinct byte addresses written in that launch: a perfect cache within one
  kernel, nothing cached between kernels), and its ``tl.dot`` FLOPs (2 M N K per dot) keyed by
  operand dtype (fp32 operands also name their input precision, e.g. ``fp32/tf32``).
* Torch: a ``TorchDispatchMode`` records every non-view aten op with the bytes of its tensor
  inputs and outputs (the traffic of an unfused op); allocations (``empty*``) are counted apart
  and move no bytes. Ops that make the host wait for the device (``_local_scalar_dense``,
  ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without output size,
  device-to-host copies) are sync ops; Python-level reads (``item``, ``tolist``, ``__bool__``,
  ``__int__``, ``__index__``, ``__float__``, ``numpy``) are host reads. A sync op issued inside a
  host read (``item`` -> ``_local_scalar_dense``) is that read's, not a second sync. What the
  interpreter does to run a kernel (host copies of its arguments) is not a torch op.

Every hook is installed on entry and restored on exit, also when the callable raises.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["KernelStats", "Measurement", "measure", "metering", "interpreting"]

# ---------------------------------------------------------------------------------------------
# Result objects


@dataclass
class KernelStats:
    """Counts of one Triton kernel (by name), summed over its launches."""

    name: str
    launches: int = 0
    programs: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    unique_read_bytes: int = 0
    unique_write_bytes: int = 0
    dot_flops: Counter = field(default_factory=Counter)

    @property
    def logical_bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def unique_bytes(self) -> int:
        return self.unique_read_bytes + self.unique_write_bytes

    def add(self, other: "KernelStats") -> None:
        for name in ("launches", "programs", "read_bytes", "write_bytes", "unique_read_bytes", "unique_write_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dot_flops.update(other.dot_flops)

    def as_dict(self) -> Dict[str, object]:
        return {"launches": self.launches, "programs": self.programs, "read_bytes": self.read_bytes,
                "write_bytes": self.write_bytes, "unique_read_bytes": self.unique_read_bytes,
                "unique_write_bytes": self.unique_write_bytes, "dot_flops": dict(self.dot_flops)}


@dataclass
class Measurement:
    """Everything one metered run counted. Byte counts are in bytes, FLOPs are 2 M N K per dot."""

    kernels: Dict[str, KernelStats] = field(default_factory=dict)
    aten_ops: Counter = field(default_factory=Counter)  # op name -> calls (non-view, non-allocation)
    aten_op_bytes: Counter = field(default_factory=Counter)  # op name -> input + output tensor bytes
    # op name -> {operand dtype key: FLOPs} for the ops torch's FLOP counter knows (mm, addmm,
    # bmm, convolution, SDPA ...): torch GEMMs, which the roofline charges at the tensor-core rate
    aten_op_flops: Dict[str, Counter] = field(default_factory=dict)
    allocations: int = 0  # empty / empty_strided / empty_like: no traffic
    sync_ops: Counter = field(default_factory=Counter)  # aten ops that wait for the device (outside host reads)
    host_reads: Counter = field(default_factory=Counter)  # Python-level reads by kind (item, tolist, ...)
    interpreted: bool = True  # False: Triton launches were not counted (no interpreter)

    # Triton side
    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())

    @property
    def read_bytes(self) -> int:
        return sum(k.read_bytes for k in self.kernels.values())

    @property
    def write_bytes(self) -> int:
        return sum(k.write_bytes for k in self.kernels.values())

    @property
    def logical_bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def unique_bytes(self) -> int:
        return sum(k.unique_bytes for k in self.kernels.values())

    @property
    def dot_flops(self) -> Counter:
        total = Counter()
        for k in self.kernels.values():
            total.update(k.dot_flops)
        return total

    # Torch side
    @property
    def num_aten_ops(self) -> int:
        return sum(self.aten_ops.values())

    @property
    def aten_bytes(self) -> int:
        return sum(self.aten_op_bytes.values())

    @property
    def aten_flops(self) -> Counter:
        """FLOPs of torch GEMM-like ops by operand dtype key (same keys as dot_flops)."""
        total = Counter()
        for flops in self.aten_op_flops.values():
            total.update(flops)
        return total

    @property
    def num_host_reads(self) -> int:
        return sum(self.host_reads.values())

    @property
    def num_sync_ops(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def host_syncs(self) -> int:
        """Times the host waits for the device: Python-level reads plus sync ops outside them."""
        return self.num_host_reads + self.num_sync_ops

    def __add__(self, other: "Measurement") -> "Measurement":
        """Counts of two regions run one after the other (e.g. forward, then backward)."""
        total = Measurement(interpreted=self.interpreted and other.interpreted)
        for part in (self, other):
            for name, stats in part.kernels.items():
                total.kernels.setdefault(name, KernelStats(name)).add(stats)
            total.aten_ops.update(part.aten_ops)
            total.aten_op_bytes.update(part.aten_op_bytes)
            for name, flops in part.aten_op_flops.items():
                total.aten_op_flops.setdefault(name, Counter()).update(flops)
            total.sync_ops.update(part.sync_ops)
            total.host_reads.update(part.host_reads)
            total.allocations += part.allocations
        return total

    def summary(self) -> Dict[str, object]:
        """Flat totals (what the meter's table shows)."""
        return {"launches": self.launches, "logical_bytes": self.logical_bytes, "unique_bytes": self.unique_bytes,
                "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "dot_flops": dict(self.dot_flops), "aten_ops": self.num_aten_ops, "aten_bytes": self.aten_bytes,
                "aten_flops": dict(self.aten_flops),
                "host_reads": self.num_host_reads, "sync_ops": self.num_sync_ops, "host_syncs": self.host_syncs}

    def as_dict(self) -> Dict[str, object]:
        """Totals plus the per-kernel and per-op breakdown (the meter's JSON)."""
        return {**self.summary(), "kernels": {n: k.as_dict() for n, k in sorted(self.kernels.items())},
                "aten_op_counts": dict(self.aten_ops.most_common()),
                "aten_op_bytes": dict(self.aten_op_bytes.most_common()),
                "aten_op_flops": {n: dict(f) for n, f in sorted(self.aten_op_flops.items())},
                "sync_op_counts": dict(self.sync_ops), "host_read_counts": dict(self.host_reads),
                "allocations": self.allocations}


# ---------------------------------------------------------------------------------------------
# Triton interpreter hooks


def interpreting() -> bool:
    """True when Triton kernels run (and can be counted) in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _element_bytes(handle) -> int:
    """Bytes per element behind a pointer handle (int1 is stored as one byte)."""
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


def _merged_length(starts: np.ndarray, width: np.ndarray) -> int:
    """Total length of the union of byte intervals [start, start + width)."""
    if starts.size == 0:
        return 0
    order = np.argsort(starts, kind="stable")
    s = starts[order].astype(np.int64)
    e = s + width[order].astype(np.int64)
    prev_end = np.maximum.accumulate(e)
    prev_end = np.concatenate(([s[0]], prev_end[:-1]))
    return int(np.maximum(0, e - np.maximum(s, prev_end)).sum())


class _Launch:
    """Addresses and counts gathered during one kernel launch."""

    def __init__(self, name: str):
        self.stats = KernelStats(name, launches=1)
        self.reads: Dict[int, List[np.ndarray]] = {}  # element width -> address arrays
        self.writes: Dict[int, List[np.ndarray]] = {}

    def access(self, ptrs, mask, write: bool) -> None:
        width = _element_bytes(ptrs)
        addrs = np.asarray(ptrs.data)
        if mask is not None:
            addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
        addrs = addrs.reshape(-1)
        nbytes = int(addrs.size) * width
        if write:
            self.stats.write_bytes += nbytes
        else:
            self.stats.read_bytes += nbytes
        if addrs.size:
            (self.writes if write else self.reads).setdefault(width, []).append(np.unique(addrs))

    @staticmethod
    def _unique(groups: Dict[int, List[np.ndarray]]) -> int:
        starts, widths = [], []
        for width, arrays in groups.items():
            addrs = np.unique(np.concatenate(arrays))
            starts.append(addrs)
            widths.append(np.full(addrs.shape, width, dtype=np.int64))
        if not starts:
            return 0
        return _merged_length(np.concatenate(starts), np.concatenate(widths))

    def finish(self) -> KernelStats:
        self.stats.unique_read_bytes = self._unique(self.reads)
        self.stats.unique_write_bytes = self._unique(self.writes)
        return self.stats


def _dot_key(a, b, input_precision) -> str:
    names = [h.dtype.scalar.name for h in (a, b)]
    key = names[0] if names[0] == names[1] else "*".join(names)
    if "fp32" in names and input_precision is not None:
        key += "/" + getattr(input_precision, "name", str(input_precision)).lower()
    return key


def _dot_flops(a, b) -> int:
    """2 M N K (times the batch of a 3-D dot)."""
    a_shape, b_shape = np.shape(a.data), np.shape(b.data)
    out = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
    return 2 * int(np.prod(out)) * int(a_shape[-1])


class _Recorder:
    """The active measurement, shared by the hooks (one metered region at a time)."""

    def __init__(self, result: Measurement):
        self.result = result
        self.launch: Optional[_Launch] = None
        self.quiet = 0  # >0 while the interpreter runs a kernel or a host read is in progress

    def end_launch(self) -> None:
        stats = self.launch.finish()
        self.launch = None
        known = self.result.kernels.setdefault(stats.name, KernelStats(stats.name))
        known.add(stats)


_ACTIVE: Optional[_Recorder] = None
_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _triton_hooks(rec: _Recorder) -> Iterator[None]:
    from triton.runtime import interpreter as interp

    Builder, Executor = interp.InterpreterBuilder, interp.GridExecutor
    masked_load, masked_store = Builder.create_masked_load, Builder.create_masked_store
    atomic_rmw, atomic_cas = Builder.create_atomic_rmw, Builder.create_atomic_cas
    create_dot, dot_scaled, set_grid_dim = Builder.create_dot, Builder.create_dot_scaled, Builder.set_grid_dim
    execute = Executor.__call__

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if rec.launch is not None:
            rec.launch.access(ptrs, mask, write=False)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        if rec.launch is not None:
            rec.launch.access(ptrs, mask, write=True)
        return masked_store(self, ptrs, value, mask, cache_policy)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if rec.launch is not None:
            rec.launch.access(ptr, mask, write=False)
            rec.launch.access(ptr, mask, write=True)
        return atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        if rec.launch is not None:
            rec.launch.access(ptr, None, write=False)
            rec.launch.access(ptr, None, write=True)
        return atomic_cas(self, ptr, cmp, val, sem, scope)

    def create_dot_(self, a, b, d, input_precision, max_num_imprecise_acc):
        if rec.launch is not None:
            rec.launch.stats.dot_flops[_dot_key(a, b, input_precision)] += _dot_flops(a, b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, *args, **kwargs):
        if rec.launch is not None:
            rec.launch.stats.dot_flops[f"scaled/{lhs_format.name}*{rhs_format.name}".lower()] += _dot_flops(lhs, rhs)
        return dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, *args, **kwargs)

    def set_grid_dim_(self, nx, ny, nz):
        if rec.launch is not None:
            rec.launch.stats.programs += nx * ny * nz
        return set_grid_dim(self, nx, ny, nz)

    def call(self, *args, **kwargs):
        if rec.launch is not None:  # a launch inside a launch cannot happen; never lose the outer one
            return execute(self, *args, **kwargs)
        rec.launch = _Launch(self.fn.__name__)
        rec.quiet += 1
        try:
            return execute(self, *args, **kwargs)
        finally:
            rec.quiet -= 1
            rec.end_launch()

    with contextlib.ExitStack() as stack:
        for obj, name, value in [(Builder, "create_masked_load", create_masked_load),
                                 (Builder, "create_masked_store", create_masked_store),
                                 (Builder, "create_atomic_rmw", create_atomic_rmw),
                                 (Builder, "create_atomic_cas", create_atomic_cas),
                                 (Builder, "create_dot", create_dot_),
                                 (Builder, "create_dot_scaled", create_dot_scaled),
                                 (Builder, "set_grid_dim", set_grid_dim_),
                                 (Executor, "__call__", call)]:
            stack.enter_context(_patched(obj, name, value))
        yield


# ---------------------------------------------------------------------------------------------
# Torch counters

_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "unique_dim_consecutive", "is_nonzero", "equal", "allclose"}
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "numpy")


def _is_view(func) -> bool:
    """Ops whose outputs alias an input without writing it (view, reshape-as-view, detach, ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _tensor_bytes(tree) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _devices(tree) -> set:
    leaves, _ = tree_flatten(tree)
    return {t.device.type for t in leaves if isinstance(t, torch.Tensor)}


def _is_sync(func, args, kwargs, out) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_", "to"):  # device -> host
        return "cuda" in _devices((args, kwargs)) and "cpu" in _devices(out)
    return False


def _aten_flops(func, args, kwargs, out) -> int:
    """FLOPs of an aten op by torch's own FLOP formulas (2 M N K for mm/addmm/bmm); 0 for ops
    it has none for."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func.overloadpacket)
    if formula is None:
        return 0
    return int(formula(*args, **kwargs, out_val=out))  # the registry's wrapper takes the shapes


def _aten_dot_key(args) -> str:
    """dtype key of a torch GEMM's operands, as for tl.dot: fp16, bf16, or fp32/ieee (fp32 GEMMs
    run without TF32 unless a trainer enables it)."""
    dtype = next((t.dtype for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor) and t.dim() >= 2),
                 torch.float32)
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32/ieee")


class _AtenCounter(TorchDispatchMode):
    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.rec
        if rec.quiet and rec.launch is not None:  # the interpreter moving a kernel's arguments
            return out
        name = func._schema.name.split("::")[-1]
        overload = func._overloadname
        full = name if overload in ("default", "") else f"{name}.{overload}"
        if _is_sync(func, args, kwargs, out):
            if not rec.quiet:
                rec.result.sync_ops[full] += 1
        if name in _ALLOCATIONS:
            rec.result.allocations += 1
        elif not _is_view(func):
            rec.result.aten_ops[full] += 1
            rec.result.aten_op_bytes[full] += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
            flops = _aten_flops(func, args, kwargs, out)
            if flops:
                rec.result.aten_op_flops.setdefault(full, Counter())[_aten_dot_key(args)] += flops
        return out


@contextlib.contextmanager
def _host_read_hooks(rec: _Recorder) -> Iterator[None]:
    def wrap(kind, method):
        def read(self, *args, **kwargs):
            if rec.quiet:
                return method(self, *args, **kwargs)
            rec.result.host_reads[kind] += 1
            rec.quiet += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                rec.quiet -= 1
        read.__name__ = getattr(method, "__name__", kind)
        return read

    with contextlib.ExitStack() as stack:
        for kind in _HOST_READS:
            stack.enter_context(_patched(torch.Tensor, kind, wrap(kind.strip("_"), getattr(torch.Tensor, kind))))
        yield


# ---------------------------------------------------------------------------------------------
# Public entry points


@contextlib.contextmanager
def metering(kernels: bool = True, torch_ops: bool = True) -> Iterator[Measurement]:
    """Count everything run inside the block into the yielded `Measurement`.

    kernels: hook the Triton interpreter (raises if ``TRITON_INTERPRET=1`` is not set).
    torch_ops: count aten ops, sync ops and Python-level host reads.
    """
    global _ACTIVE
    if kernels and not interpreting():
        raise RuntimeError("Triton launches can only be metered under the interpreter: set TRITON_INTERPRET=1 "
                           "before importing kernels (python -m bench.meter does), or pass kernels=False")
    result = Measurement(interpreted=kernels)
    rec = _Recorder(result)
    with _LOCK:
        if _ACTIVE is not None:
            raise RuntimeError("metering regions cannot nest")
        _ACTIVE = rec
    try:
        with contextlib.ExitStack() as stack:
            if kernels:
                stack.enter_context(_triton_hooks(rec))
            if torch_ops:
                stack.enter_context(_host_read_hooks(rec))
                stack.enter_context(_AtenCounter(rec))
            yield result
    finally:
        _ACTIVE = None


def measure(fn: Callable[[], object], kernels: bool = True, torch_ops: bool = True) -> Measurement:
    """Run `fn()` once under `metering` and return what it counted."""
    with metering(kernels=kernels, torch_ops=torch_ops) as result:
        fn()
    return result
