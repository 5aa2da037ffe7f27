"""ssd_scan: interim module that calls the reference until its Triton kernel lands."""
from kernels.reference import ssd_scan

__all__ = ["ssd_scan"]
