"""Profiling drivers and summaries: Nsight Systems / Nsight Compute scripts and a torch.profiler
fallback around HybridLM train steps (see profiles/README.md).

Without CUDA the drivers run the Triton kernels under the interpreter, so TRITON_INTERPRET is
set here, before any submodule imports `kernels` (otherwise CPU tensors take the reference ops).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
