"""Benchmarks run on CUDA at real sizes; without CUDA they run a smoke mode (tiny shapes,
Triton interpreter) so that the suite itself stays tested in CI."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
