"""A roofline MODEL of GPU time from the meter's counts: a prediction, never a measurement.

Per Triton kernel: max(unique bytes / bandwidth, sum over operand dtypes of dot FLOPs / peak).
Per torch op: its input + output bytes / bandwidth (an unfused op reads and writes its tensors),
or for a GEMM (torch's FLOP formulas: mm, addmm, bmm, ...) its FLOPs / the operand dtype's peak
when that is longer.
Plus a fixed cost per launch (Triton and torch ops alike) and per host sync.

Bandwidth and peaks are the vendors' published dense figures; the launch and sync costs are
assumptions of this model (typical host-side overheads), stated here and in the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from bench.meter import Measurement

LAUNCH_S = 4e-6  # assumed: host launch overhead of one kernel (CUDA launch latency, ~3-5 us)
SYNC_S = 10e-6  # assumed: one host wait for the device (round trip plus a drained launch queue)


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s, DRAM
    peaks: Dict[str, float]  # FLOP/s by tl.dot operand key (bench.meter's dot_flops keys)
    source: str

    def peak(self, key: str) -> float:
        """Peak for a dot key; unknown keys fall back to the fp32 (CUDA-core) rate."""
        return self.peaks.get(key, self.peaks["fp32/ieee"])


GPUS = {
    "H100": Gpu("H100 SXM5", 3.35e12,
                {"fp16": 989.4e12, "bf16": 989.4e12, "fp32/tf32": 494.7e12, "fp32/tf32x3": 494.7e12 / 3,
                 "fp32/ieee": 66.9e12},
                "NVIDIA H100 datasheet: HBM3 3.35 TB/s; dense FP16/BF16 tensor 989.4, TF32 494.7, FP32 66.9 TFLOP/s"),
    "RTX4070": Gpu("RTX 4070", 504.2e9,
                   {"fp16": 58.3e12, "bf16": 58.3e12, "fp32/tf32": 29.1e12, "fp32/tf32x3": 29.1e12 / 3,
                    "fp32/ieee": 29.1e12},
                   "NVIDIA Ada whitepaper: GDDR6X 504.2 GB/s; dense FP16/BF16 tensor with FP32 accumulate "
                   "58.3, TF32 29.1, FP32 29.1 TFLOP/s"),
}


def kernel_seconds(m: Measurement, gpu: Gpu) -> float:
    """Roofline time of the Triton kernels, each bound by its unique bytes or its dot FLOPs."""
    total = 0.0
    for k in m.kernels.values():
        compute = sum(flops / gpu.peak(key) for key, flops in k.dot_flops.items())
        total += max(k.unique_bytes / gpu.bandwidth, compute)
    return total


def aten_seconds(m: Measurement, gpu: Gpu) -> float:
    """Roofline time of the torch ops: each op name bound by its bytes or, for GEMMs (torch's
    FLOP formulas), its FLOPs at the peak of its operand dtype."""
    total = 0.0
    for name, nbytes in m.aten_op_bytes.items():
        compute = sum(flops / gpu.peak(key) for key, flops in m.aten_op_flops.get(name, {}).items())
        total += max(nbytes / gpu.bandwidth, compute)
    return total


def predicted_seconds(m: Measurement, gpu: Gpu) -> float:
    """Modelled GPU time of a metered run: kernels + unfused torch ops + launches + host syncs."""
    return (kernel_seconds(m, gpu) + aten_seconds(m, gpu) + (m.launches + m.num_aten_ops) * LAUNCH_S
            + m.host_syncs * SYNC_S)


def minimum_seconds(min_bytes: float, min_flops: float, gpu: Gpu, dot_key: str = "fp16") -> float:
    """The op's own bound: its minimum bytes or its minimum FLOPs at the tensor-core rate, one launch."""
    return max(min_bytes / gpu.bandwidth, min_flops / gpu.peak(dot_key)) + LAUNCH_S
