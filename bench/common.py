"""Shared benchmark machinery: timing, peak memory, provenance stamps, baseline ratios.

Conventions (Liger / fla): CUDA-synchronized timing with triton's do_bench (warm-up
and autotune excluded: the first call happens before timing), median with 20/80
quantiles, peak memory per case, and every case measured against its baselines in
the same run so ratios are meaningful. On CPU (smoke mode) times are wall-clock
medians of tiny shapes under the Triton interpreter: they test the suite, not speed.
"""
from __future__ import annotations

import datetime as _dt
import functools
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

HAS_CUDA = torch.cuda.is_available()
SMOKE = not HAS_CUDA or os.environ.get("REFRAG_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
QUANTILES = (0.5, 0.2, 0.8)
CPU_REPS = 1  # interpreted kernels take seconds per call on CPU
SMOKE_LENGTH = 64
FULL_LENGTHS = (2048, 4096, 8192, 16384, 32768)


def bench_lengths() -> List[int]:
    """Packed lengths the length-swept suites run: REFRAG_BENCH_LENGTHS (comma-separated) when set
    (bench.gpu_check runs 8K and 16K only), else SMOKE_LENGTH in smoke mode, else FULL_LENGTHS."""
    chosen = os.environ.get("REFRAG_BENCH_LENGTHS", "").strip()
    if chosen:
        try:
            lengths = [int(n) for n in chosen.split(",")]
        except ValueError:
            raise ValueError(f"REFRAG_BENCH_LENGTHS must be comma-separated integers, got {chosen!r}") from None
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"REFRAG_BENCH_LENGTHS must hold positive lengths, got {chosen!r}")
        return lengths
    return [SMOKE_LENGTH] if SMOKE else list(FULL_LENGTHS)


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    """Name used to key result folders: the GPU name, or 'cpu-smoke'."""
    return torch.cuda.get_device_name(0) if HAS_CUDA else "cpu-smoke"


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The checkout's short commit; REFRAG_COMMIT when set (a copy of the tree without .git, as on a
    lent GPU machine, is told its commit that way)."""
    if os.environ.get("REFRAG_COMMIT"):
        return os.environ["REFRAG_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> Dict[str, str]:
    """Provenance recorded on every benchmark row."""
    return {"device": device_name(), "commit": git_commit(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "smoke": SMOKE}


@dataclass
class Timing:
    """Median and 20/80 quantiles in milliseconds."""
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(fn: Callable[[], object], rep: int = CPU_REPS) -> Timing:
    """Time `fn` after the caller has run it once (compilation and autotune excluded).

    CUDA: triton's do_bench (one more warm-up call, then its own warm-up and repetitions).
    CPU (smoke mode only): `rep` wall-clock calls; the numbers only show that the suite runs.
    """
    if HAS_CUDA:
        import triton.testing

        fn()
        torch.cuda.synchronize()
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
        return Timing(med, p20, p80)
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(float(med), float(p20), float(p80))


def peak_memory(fn: Callable[[], object]) -> Tuple[Optional[int], Optional[int]]:
    """Peak CUDA memory allocated while running `fn` once: (above what was live before, in all:
    parameters, optimizer state and inputs included). (None, None) on CPU."""
    if not HAS_CUDA:
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - base, peak


@dataclass
class Case:
    """One provider's runnable for a benchmark case plus its cost model."""
    fn: Callable[[], object]
    flops: float = 0.0
    bytes: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)


def run_case(benchmark, ours: Case, baselines: Dict[str, Optional[Case]], tokens: int, **info) -> None:
    """Time `ours` with pytest-benchmark, time every available baseline in the same run,
    and store throughput, TFLOP/s, GB/s, peak memory and ratios in extra_info."""
    # First call (pytest-benchmark's warm-up round on CUDA) compiles and autotunes before time_fn.
    benchmark.pedantic(ours.fn, rounds=1 if SMOKE else 10, iterations=1, warmup_rounds=0 if SMOKE else 1)
    timing = time_fn(ours.fn)
    seconds = timing.median_ms / 1e3
    extra = benchmark.extra_info
    extra.update(stamp())
    extra.update(info)
    extra.update({
        "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "tokens_per_s": tokens / seconds,
        "tflops": ours.flops / seconds / 1e12 if ours.flops else None,
        "gbps": ours.bytes / seconds / 1e9 if ours.bytes else None,
    })
    extra["peak_mem_bytes"], extra["peak_mem_total_bytes"] = peak_memory(ours.fn)
    extra.update(ours.extra)
    for name, case in baselines.items():
        if case is None:
            extra[f"{name}_median_ms"] = None
            continue
        try:
            base = time_fn(case.fn)
            extra[f"{name}_median_ms"] = base.median_ms
            extra[f"speedup_vs_{name}"] = base.median_ms / timing.median_ms
            extra[f"{name}_peak_mem_bytes"], extra[f"{name}_peak_mem_total_bytes"] = peak_memory(case.fn)
        except torch.cuda.OutOfMemoryError:
            extra[f"{name}_median_ms"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as error:  # noqa: BLE001 - a broken baseline must not lose our own numbers
            if SMOKE:
                raise  # CPU smoke runs are where a broken baseline call is caught
            extra[f"{name}_median_ms"] = f"error: {type(error).__name__}: {str(error)[:300]}"


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs) -> Callable[[], None]:
    """A callable running forward + backward with a fixed upstream gradient."""
    def step():
        for t in inputs:
            t.grad = None
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return step


def optional_import(module: str, attr: str):
    """Return module.attr if the (optional, GPU-only) baseline is installed and importable, else None."""
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except Exception:  # noqa: BLE001 - baselines fail to import in many ways (missing CUDA build)
        return None


def torch_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain-torch baseline of fused_linear_cross_entropy, what a trainer writes without a fused
    kernel: [T, V] logits in the input dtype, the loss in fp32 (benchmark and meter baseline)."""
    import torch.nn.functional as F

    return F.cross_entropy(F.linear(hidden, weight).float(), targets)
