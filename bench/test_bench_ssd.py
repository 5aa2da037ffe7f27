"""SSD (Mamba-2) forward / forward+backward vs the torch reference, fla chunk_simple_gla and
mamba-ssm mamba_chunk_scan_combined, at packed lengths 2K-32K (smoke: 64 tokens).

FLOP model per token and head (chunk Q, headdim P, state N): intra-chunk C·B^T and the
masked product with x cost 2QN + 2QP; state build and read cost 2PN each -> 2(QN + QP + 2PN);
backward ~2.5x forward. Bytes: read x, dt, B, C, write y once (ideal, fp16/bf16)."""
import pytest
import torch

from bench import costs
from bench.common import DEVICE, SMOKE, Case, bench_lengths, fwd_bwd, optional_import, run_case
from refrag_kernels import DocLayout, reference, ssd_scan

LENGTHS = bench_lengths()
HEADS, P, N, G = (2, 8, 8, 1) if SMOKE else (32, 64, 128, 1)
CHUNK = 16 if SMOKE else 64
DTYPE = torch.float32 if SMOKE else torch.bfloat16
REFERENCE_MAX_L = 8192

chunk_simple_gla = optional_import("fla.ops.simple_gla", "chunk_simple_gla")
mamba_chunk_scan_combined = optional_import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def make_inputs(L, num_seqs):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, DTYPE).requires_grad_()  # noqa: E731
    x, B, C = mk(1, L, HEADS, P), mk(1, L, G, N, scale=0.3), mk(1, L, G, N, scale=0.3)
    dt = (torch.rand(1, L, HEADS, generator=g) * 0.1).to(DEVICE).requires_grad_()
    A = (-torch.rand(HEADS, generator=g) - 0.5).to(DEVICE).requires_grad_()
    cuts = torch.linspace(0, L, num_seqs + 1).round().to(torch.int32).to(DEVICE)
    return (x, dt, A, B, C), (cuts if num_seqs > 1 else None)


def cost(L, mode):
    fwd, bwd = costs.ssd_flops(L, HEADS, P, N, CHUNK)
    elem = torch.finfo(DTYPE).bits // 8
    nbytes = elem * L * (2 * HEADS * P + 2 * G * N) + 4 * L * HEADS
    return fwd + (bwd if mode == "fwd_bwd" else 0.0), nbytes * (3 if mode == "fwd_bwd" else 1)


def runner(forward, inputs, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    return fwd_bwd(forward, inputs)


def baselines(inputs, cu, mode, L):
    x, dt, A, B, C = inputs
    out = {}
    ref = lambda: reference.ssd_scan(x, dt, A, B, C, chunk_size=CHUNK, cu_seqlens=cu)  # noqa: E731
    out["reference"] = Case(runner(ref, inputs, mode)) if L <= REFERENCE_MAX_L else None
    if chunk_simple_gla is not None and not SMOKE:
        def fla():
            q = C.expand(-1, -1, HEADS, -1)
            k = B.expand(-1, -1, HEADS, -1)
            v = x * dt.unsqueeze(-1).to(x.dtype)
            o, _ = chunk_simple_gla(q, k, v, g=(dt * A), scale=1.0, cu_seqlens=cu)
            return o
        out["fla_chunk_simple_gla"] = Case(runner(fla, inputs, mode))
    else:
        out["fla_chunk_simple_gla"] = None
    if mamba_chunk_scan_combined is not None and not SMOKE:
        seq_idx = None
        if cu is not None:
            seq_idx = torch.searchsorted(cu[1:], torch.arange(L, device=DEVICE), right=True).to(torch.int32)[None]
        mamba = lambda: mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, seq_idx=seq_idx, cu_seqlens=cu)  # noqa: E731
        out["mamba_ssm"] = Case(runner(mamba, inputs, mode))
    else:
        out["mamba_ssm"] = None
    return out


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("num_seqs", [1, 64], ids=["one-seq", "64-seqs"])
@pytest.mark.parametrize("L", LENGTHS, ids=[f"L{n}" for n in LENGTHS])
def test_ssd(benchmark, L, num_seqs, mode):
    if num_seqs > L // 2:
        pytest.skip("more sequences than tokens allow")
    inputs, cu = make_inputs(L, num_seqs)
    x, dt, A, B, C = inputs
    layout = DocLayout.from_batch(1, L, cu, device=x.device)  # once per batch, as in training
    ours = lambda: ssd_scan(x, dt, A, B, C, chunk_size=CHUNK, layout=layout)  # noqa: E731
    flops, nbytes = cost(L, mode)
    benchmark.group = f"ssd-{mode}-{num_seqs}seq"
    run_case(benchmark, Case(runner(ours, inputs, mode), flops, nbytes), baselines(inputs, cu, mode, L),
             tokens=L, op="ssd_scan", L=L, num_seqs=num_seqs, mode=mode, heads=HEADS, headdim=P, d_state=N,
             chunk=CHUNK, dtype=str(DTYPE))
