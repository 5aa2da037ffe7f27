"""Compile Triton kernels for a GPU target on a machine without that GPU, and read their resources.

Two phases, two processes (the interpreter flag is read when ``kernels`` is imported):

1. Capture, with ``TRITON_INTERPRET=1``: ``record_launches()`` records every kernel launch the
   ops make on CPU tensors: the kernel (module and name), each argument described by what a
   real launch specializes on (tensor dtype and 16-byte alignment, python scalars, constexpr
   values) and the launch options (``num_warps``, ``num_stages``). ``cuda_launchers()`` makes
   the launchers pick what they would pick on CUDA (they read a module-level ``INTERPRET``).
2. Compile, interpreter off: ``compile_launch`` rebuilds each launch with stand-in tensors,
   lets the real ``JITFunction``'s argument binder specialize it exactly as a CUDA launch
   would (dtype, alignment, ints equal to 1 or divisible by 16), compiles it for the target
   (default sm_90, H100) and reads registers, stack and local memory of the cubin with
   ``cuobjdump -res-usage``, spill bytes from ``ptxas -v`` rerun on the PTX with Triton's
   flags, and shared memory from the compiler's metadata.

Numbers are static, from the compiler: no GPU runs anything.

Command line (phase 2): ``python -m profiles.aot launches.json results.json [--jobs N]``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

SM90 = ("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelLaunch:
    """One recorded launch: `kernel` is "module:qualname" of the @triton.jit function, `args`
    maps parameter names to encoded values (see `encode_arg`), `options` holds num_warps etc.,
    `label` says which workload launched it (not part of the identity)."""

    kernel: str
    args: dict
    options: dict
    label: str = field(default="", compare=False)

    def key(self) -> str:
        """Identity of the compiled binary: kernel, specialized arguments and options."""
        return json.dumps([self.kernel, self.args, self.options], sort_keys=True)


@dataclass
class CompileResult:
    """Outcome of compiling one launch, or the error: per thread, registers, bytes of register
    spill stores and loads, stack frame and local memory; per block, shared memory; and the
    names of the kernel's constexpr parameters."""

    launch: KernelLaunch
    constexprs: list = field(default_factory=list)
    registers: Optional[int] = None
    spill_store_bytes: Optional[int] = None
    spill_load_bytes: Optional[int] = None
    stack_bytes: Optional[int] = None
    local_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None


# ----------------------------------------------------------------------------- argument encoding


def encode_arg(value) -> dict:
    """JSON description of a launch argument holding what a real launch specializes on."""
    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise ValueError(f"cannot record a kernel argument of type {type(value).__name__}: {value!r}")


class _StandInTensor:
    """What the argument binder reads from a tensor: its dtype and data pointer."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr


def decode_arg(desc: dict):
    """Launch argument for the binder from `encode_arg`'s description (tensors become stand-ins)."""
    if "tensor" in desc:
        return _StandInTensor(getattr(torch, desc["tensor"]), desc["aligned"])
    if "tl_dtype" in desc:
        return tl.dtype(desc["tl_dtype"])
    return desc["value"]


# ----------------------------------------------------------------------------- capture


def _kernel_name(fn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


@contextlib.contextmanager
def record_launches(label: str = "", execute: bool = True) -> Iterator[list]:
    """Record every Triton launch made inside the block into the yielded list of KernelLaunch.

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported. With ``execute=False``
    the kernels are recorded but not run (outputs stay uninitialized): enough when the host
    code between launches depends only on shapes.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 set before the kernels are imported")
    launches: list = []
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
        launches.append(KernelLaunch(_kernel_name(self.fn), {k: encode_arg(v) for k, v in named.items()},
                                     options, label))
        if execute:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original_run


@contextlib.contextmanager
def cuda_launchers() -> Iterator[None]:
    """Inside the block, the launchers of ``kernels`` see ``INTERPRET = False``, so they choose
    the block sizes, chunk sizes and dot dtypes of a CUDA run. The dispatcher keeps its flag:
    CPU tensors still go to the (interpreted) Triton kernels."""
    from refrag_kernels.common import dispatch

    patched = [module for name, module in list(sys.modules.items())
               if (name == "refrag_kernels" or name.startswith("refrag_kernels.")) and module is not dispatch
               and getattr(module, "INTERPRET", None) is True]
    for module in patched:
        module.INTERPRET = False
    try:
        yield
    finally:
        for module in patched:
            module.INTERPRET = True


def unique_launches(launches: list) -> list:
    """`launches` without repeats of the same compiled binary, first occurrence kept."""
    seen: dict = {}
    for launch in launches:
        seen.setdefault(launch.key(), launch)
    return list(seen.values())


def save_launches(launches: list, path: str) -> None:
    """Write launches as a JSON list."""
    with open(path, "w") as f:
        json.dump([asdict(x) for x in launches], f, indent=1)


def load_launches(path: str) -> list:
    """Read launches written by `save_launches`."""
    with open(path) as f:
        return [KernelLaunch(**x) for x in json.load(f)]


# ----------------------------------------------------------------------------- compile


def resolve_kernel(name: str):
    """The JITFunction behind "module:qualname", unwrapping autotune/heuristics decorators."""
    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, triton.runtime.JITFunction):
        if not hasattr(obj, "fn"):
            raise ValueError(f"{name} is not a Triton kernel (is TRITON_INTERPRET=1 still set?)")
        obj = obj.fn
    return obj


def specialize(launch: KernelLaunch, target):
    """(ASTSource, options dict) of `launch` as JITFunction.run would build them on `target`."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = resolve_kernel(launch.kernel)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {k: decode_arg(v) for k, v in launch.args.items()}
    kwargs.update(launch.options)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or False
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options.__dict__


def cubin_resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED (static) and LOCAL of the one kernel in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = _RES_USAGE.search(out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, match.groups())
    return dict(registers=reg, stack_bytes=stack, static_shared_bytes=shared, local_bytes=local)


def ptxas_spills(ptx: str, capability: int, fp_fusion: bool) -> tuple:
    """(spill store bytes, spill load bytes) per thread that ptxas reports for `ptx`, assembled
    with the flags Triton's NVIDIA backend uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        if not fp_fusion:
            cmd.insert(2, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    match = _SPILLS.search(log)
    if match is None:
        raise RuntimeError(f"no spill report in the ptxas log:\n{log}")
    return int(match.group(1)), int(match.group(2))


def compile_launch(launch: KernelLaunch, target=SM90) -> CompileResult:
    """Compile `launch` for `target` (backend, arch, warp size) and read its resources;
    a compiler error is returned in `error`, not raised."""
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    try:
        src, options = specialize(launch, GPUTarget(*target))
        compiled = triton.compile(src, target=GPUTarget(*target), options=options)
        usage = cubin_resource_usage(compiled.asm["cubin"])
        stores, loads = ptxas_spills(compiled.asm["ptx"], target[1], compiled.metadata.enable_fp_fusion)
    except Exception as e:  # every compiler failure is a result to report
        return CompileResult(launch, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    return CompileResult(launch, [p.name for p in src.fn.params if p.is_constexpr],
                         registers=usage["registers"], spill_store_bytes=stores, spill_load_bytes=loads,
                         stack_bytes=usage["stack_bytes"], local_bytes=usage["local_bytes"],
                         shared_bytes=compiled.metadata.shared + usage["static_shared_bytes"],
                         seconds=time.perf_counter() - start)


def compile_launches(launches: list, target=SM90, jobs: int = 1) -> list:
    """CompileResult of every launch, compiled in `jobs` worker processes."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling needs real JITFunctions: unset TRITON_INTERPRET before importing kernels")
    if jobs <= 1:
        return [compile_launch(x, target) for x in launches]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_launch, launches, [target] * len(launches)))


def tool_missing() -> Optional[str]:
    """Why kernels cannot be compiled for NVIDIA targets here, or None when they can."""
    if not os.access(CUOBJDUMP, os.X_OK):
        return f"cuobjdump not found at {CUOBJDUMP}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(SM90[1]).path
    except Exception as e:  # a triton without the NVIDIA backend or its bundled tools
        return f"no ptxas in the installed triton: {type(e).__name__}: {e}"
    if not os.access(ptxas, os.X_OK):
        return f"ptxas at {ptxas} is not executable"
    return None


# ----------------------------------------------------------------------------- occupancy


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a GPU: NVIDIA H100 (sm_90) by default."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    max_threads: int = 2048
    max_blocks: int = 32
    shared_bytes: int = 228 * 1024
    max_shared_per_block: int = 227 * 1024
    reserved_shared_per_block: int = 1024
    warp_size: int = 32


H100 = SMLimits()


def occupancy(registers: int, shared_bytes: int, num_warps: int, sm: SMLimits = H100) -> dict:
    """Resident blocks and warps per SM implied by per-thread registers and per-block shared
    memory, the limiting resource, and occupancy = resident warps / max warps."""
    max_warps = sm.max_threads // sm.warp_size
    if shared_bytes > sm.max_shared_per_block:
        return dict(blocks=0, warps=0, occupancy=0.0, limiter="shared (exceeds the per-block maximum)")
    regs_per_warp = -(-registers * sm.warp_size // sm.register_unit) * sm.register_unit
    limits = {
        "warps": max_warps // num_warps,
        "blocks": sm.max_blocks,
        "registers": (sm.registers // regs_per_warp) // num_warps if regs_per_warp else sm.max_blocks,
        "shared": sm.shared_bytes // (shared_bytes + sm.reserved_shared_per_block),
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return dict(blocks=blocks, warps=blocks * num_warps, occupancy=blocks * num_warps / max_warps, limiter=limiter)


# ----------------------------------------------------------------------------- command line


def main(argv: Optional[list] = None) -> None:
    """Compile the launches of a JSON file (from `save_launches`) and write the results as JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("launches", help="JSON file written by save_launches")
    parser.add_argument("results", help="JSON file to write, one entry per launch")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")  # once per worker otherwise
    launches = unique_launches(load_launches(args.launches))
    results = compile_launches(launches, ("cuda", args.arch, 32), args.jobs)
    with open(args.results, "w") as f:
        json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
