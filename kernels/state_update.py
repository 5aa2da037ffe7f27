"""Decode steps: interim module that calls the reference until its Triton kernel lands."""
from kernels.reference import causal_conv1d_update, ssd_state_update

__all__ = ["ssd_state_update", "causal_conv1d_update"]
