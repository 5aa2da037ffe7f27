"""causal_conv1d: interim module that calls the reference until its Triton kernel lands."""
from kernels.reference import causal_conv1d

__all__ = ["causal_conv1d"]
