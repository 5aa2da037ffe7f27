"""Benchmarks run on CUDA at real sizes; without CUDA they run a smoke mode (tiny shapes,
Triton interpreter) so that the suite itself stays tested in CI.

REFRAG_BENCH_DEADLINE (seconds since the epoch, set by bench.gpu_check): cases that would start
after it are skipped, so a run under a time budget ends cleanly and pytest-benchmark still
writes the cases that finished."""
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item):
    deadline = os.environ.get("REFRAG_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("time budget spent (REFRAG_BENCH_DEADLINE)")
