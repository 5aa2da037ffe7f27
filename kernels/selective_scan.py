"""selective_scan: interim module that calls the reference until its Triton kernel lands."""
from kernels.reference import selective_scan

__all__ = ["selective_scan"]
