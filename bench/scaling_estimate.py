"""Model FLOPs of a train step by context length, and a simulated (not measured) data-parallel
scaling estimate for the d12 HybridLM. Every input of the estimate is a stated assumption.

    python -m bench.scaling_estimate [--mfu 0.4] [--peak-tflops 989] [--overlap 0.7]

FLOPs: `HybridLM.flops_per_token` at the effective context length (sum n_i^2 / L) of the
synthetic packed RAG rows of bench.layouts (examples of 5-15 documents of 200-800 tokens).

Data parallel (DDP; FSDP2 moves the same gradient bytes as reduce-scatter + all-gather): per
optimizer step each GPU sends and receives 2 (N-1)/N x the gradient payload (ring all-reduce),
payload = params x bytes per element. Step time on N GPUs = compute + max(0, comm - overlap x
backward), backward = 2/3 of compute (DDP overlaps bucketed all-reduce with backward).
Compute time = model FLOPs / (MFU x peak): an assumed utilization, not a measurement.
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import torch

from bench.layouts import rag_examples
from bench.train_setup import REAL_LAYOUT, block_patterns, effective_seq_len, model_config
from refrag_kernels import DocLayout
from refrag.model import HybridLM

LENGTHS = (2048, 4096, 8192, 16384, 32768)
# Effective all-reduce bus bandwidth per GPU, GB/s (assumed typical values, not measured here).
LINKS = {"NVLink 4 (H100 SXM)": 360.0, "PCIe 5 x16": 45.0, "PCIe 4 x16": 22.0, "400 Gb/s network": 45.0,
         "100 Gb/s network": 11.0}
GPU_COUNTS = (2, 4, 8)


def model_on_meta(pattern: str) -> HybridLM:
    """The d12 model with the given pattern, without allocating weights."""
    with torch.device("meta"):
        return HybridLM(model_config(pattern, smoke=False))


def flops_table(lengths=LENGTHS) -> List[Dict]:
    """Model FLOPs per token and per step for each pattern and packed length."""
    rows = []
    for name, pattern in block_patterns(smoke=False).items():
        model = model_on_meta(pattern)
        for L in lengths:
            layout = DocLayout.from_examples(rag_examples(L, **REAL_LAYOUT))
            per_token = model.flops_per_token(effective_seq_len(layout))
            rows.append({"pattern": name, "L": L, "params": model.num_params(), "flops_per_token": per_token,
                         "step_tflop": per_token * L / 1e12,
                         "attention_share": attention_flops(model, effective_seq_len(layout)) / per_token})
    return rows


def attention_flops(model: HybridLM, seq_len: int) -> int:
    """The attention term of `HybridLM.flops_per_token` (grows with the context length)."""
    c = model.config
    return 12 * c.layers.count("T") * c.n_head * c.head_dim * seq_len


def scaling_efficiency(compute_s: float, params: int, bytes_per_param: int, gpus: int, link_gbps: float,
                       overlap: float) -> float:
    """Throughput on `gpus` GPUs relative to `gpus` x one GPU, under the module's model."""
    comm_s = 2 * (gpus - 1) / gpus * params * bytes_per_param / (link_gbps * 1e9)
    exposed = max(0.0, comm_s - overlap * (2 / 3) * compute_s)
    return compute_s / (compute_s + exposed)


def markdown(rows: List[Dict], mfu: float, peak_tflops: float, overlap: float) -> str:
    lines = ["| pattern | L | params (M) | model GFLOP/token | step TFLOP | attention share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['L']} | {r['params'] / 1e6:.1f} | {r['flops_per_token'] / 1e9:.3f} | "
                     f"{r['step_tflop']:.2f} | {r['attention_share']:.1%} |")
    hybrid = [r for r in rows if r["pattern"] == "hybrid"]
    head = ["link", "grad bytes/param", "L"] + [f"{n} GPUs" for n in GPU_COUNTS]
    lines += ["", f"Simulated data-parallel scaling efficiency, hybrid d12 (MFU {mfu:.0%} of {peak_tflops:.0f} "
              f"TFLOP/s, overlap {overlap:.0%} of backward):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for link, gbps in LINKS.items():
        for nbytes in (2, 4):
            for r in (hybrid[0], hybrid[-1]):
                compute_s = r["step_tflop"] / (mfu * peak_tflops)
                cells = [f"{scaling_efficiency(compute_s, r['params'], nbytes, n, gbps, overlap):.0%}"
                         for n in GPU_COUNTS]
                lines.append(f"| {link} | {nbytes} | {r['L']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilization of one GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--overlap", type=float, default=0.7, help="share of backward that hides all-reduce")
    args = parser.parse_args(argv)
    print(markdown(flops_table(), args.mfu, args.peak_tflops, args.overlap))


if __name__ == "__main__":
    main()
