"""Run N HybridLM train steps with named ranges, for Nsight Systems / Nsight Compute.

    python -m profiles.train_step [--pattern hybrid|pure-M|pure-T|hybrid-d16] [--length 8192] [--steps 5]
                                  [--warmup 3] [--smoke]

Without CUDA (or with --smoke) it runs the smoke model of bench/ and, unless told otherwise, at
the smoke length (64 tokens) for one step and no warm-up: the Triton interpreter takes seconds
per step even there. Each step prints its time as it ends.

Ranges (NVTX on CUDA, and torch.profiler record_function everywhere): ``step`` around each
profiled step, inside it ``data`` (host layout build and copy of the packed row), ``forward``
with one ``forward/T`` or ``forward/M`` range per block, ``backward`` and ``optimizer``. The
profiled steps run inside a ``profile`` range, between cudaProfilerStart/Stop, after
``--warmup`` untimed steps that compile and autotune every kernel: run nsys with
``--capture-range=cudaProfilerApi`` and ncu with ``--nvtx --nvtx-include profile/``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Iterator

import torch

from bench.layouts import rag_examples
from bench.common import SMOKE_LENGTH
from bench.train_setup import MODEL_SIZES, REAL_LAYOUT, SMOKE_LAYOUT, TrainStep, block_patterns, build_train_step
from refrag_kernels import DocLayout


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named range: NVTX (Nsight) on CUDA plus a torch.profiler record_function."""
    nvtx = torch.cuda.nvtx.range(name) if torch.cuda.is_available() else contextlib.nullcontext()
    with nvtx, torch.profiler.record_function(name):
        yield


def annotate_blocks(model: torch.nn.Module) -> None:
    """Wrap every block's forward in a ``forward/<letter>`` range (T attention, M Mamba-2) with hooks."""
    for letter, block in zip(model.config.layers, model.blocks):
        stack = []

        def enter(module, args, name=f"forward/{letter}", stack=stack):
            ctx = phase(name)
            ctx.__enter__()
            stack.append(ctx)

        def leave(module, args, output, stack=stack):
            stack.pop().__exit__(None, None, None)

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)


def load_batch(step: TrainStep, examples, device: torch.device) -> None:
    """The data phase of a real loop: rebuild the packed row's layout and copy the row to the device."""
    step.layout = DocLayout.from_examples(examples, device=device)
    step.input_ids = step.input_ids.cpu().to(device, non_blocking=True)
    step.targets = step.targets.cpu().to(device, non_blocking=True)


def run_steps(step: TrainStep, examples, steps: int, device: torch.device, label: str = "") -> list[float]:
    """`steps` annotated train steps; returns each step's wall time in seconds (device-synchronized).
    With a `label`, prints each step's time as it ends."""
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with phase("step"):
            with phase("data"):
                load_batch(step, examples, device)
            step.run(phase)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if label:
            print(f"[profile] {label} step {i + 1}/{steps}: {times[-1]:.2f} s", flush=True)
    return times


@contextlib.contextmanager
def cuda_profiler_range(device: torch.device) -> Iterator[None]:
    """cudaProfilerStart/Stop around the profiled steps (nsys --capture-range=cudaProfilerApi)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def prepare(pattern: str, length: int, smoke: bool, device: torch.device):
    """The train step with annotated blocks and its packed-row examples (the same row every step)."""
    if pattern not in block_patterns(smoke):
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(block_patterns(smoke))}")
    print(f"[profile] building the {'smoke' if smoke else MODEL_SIZES.get(pattern, 'd12')} {pattern} model, "
          f"{length} tokens on {device.type}", flush=True)
    step = build_train_step(block_patterns(smoke)[pattern], length, device, smoke,
                            size=MODEL_SIZES.get(pattern, "d12"))
    examples = rag_examples(length, **(SMOKE_LAYOUT if smoke else REAL_LAYOUT))
    annotate_blocks(step.model)
    return step, examples


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="hybrid", help="model name: hybrid, pure-M, pure-T or hybrid-d16")
    parser.add_argument("--length", type=int, help="tokens per packed row (default 8192; smoke: 64)")
    parser.add_argument("--steps", type=int, help="profiled steps (default 5; smoke: 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps first: compile, autotune (default 3; smoke: 0)")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("REFRAG_BENCH_SMOKE") == "1",
                        help="tiny model (the CPU smoke configuration of bench/); implied without CUDA")
    args = parser.parse_args(argv)
    args.smoke = args.smoke or not torch.cuda.is_available()
    defaults = dict(length=SMOKE_LENGTH, steps=1, warmup=0) if args.smoke else dict(length=8192, steps=5, warmup=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, examples = prepare(args.pattern, args.length, args.smoke, device)
    run_steps(step, examples, args.warmup, device, label="warm-up")
    with cuda_profiler_range(device), phase("profile"):
        times = run_steps(step, examples, args.steps, device, label="profiled")
    median = sorted(times)[len(times) // 2]
    print(f"{args.pattern} L={args.length}: median step {median * 1e3:.1f} ms, "
          f"{step.tokens / median:.0f} tokens/s over {args.steps} steps")


if __name__ == "__main__":
    main()
