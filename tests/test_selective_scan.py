"""Triton Mamba-1 selective scan vs the sequential reference: forward, every gradient, varlen.

Tolerance rule: the kernel's error against the fp64 reference is at most 2x the error of the
same reference run in the kernel's dtype, plus a small atol relative to the tensor's scale.
"""
from functools import partial

import pytest
import torch

from refrag_kernels import reference
from refrag_kernels.layout import DocLayout
from refrag_kernels.selective_scan import (
    BWD_CONFIGS,
    DETERMINISTIC_BWD_CONFIG,
    FWD_CONFIGS,
    selective_scan,
    selective_scan_bwd,
    selective_scan_fwd,
)

F64 = torch.float64
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def tiny_cu_seqlens(num: int, max_len: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_len + 1, (num,), generator=gen)
    return [0] + torch.cumsum(lens, 0).tolist()


TINY_CU = tiny_cu_seqlens(40, 3, seed=1)  # 40 sequences of 0..3 tokens

# (b, d, n, l, groups, cu_seqlens, options); options enable D, z, delta_bias, softplus, h0, dlast
ALL = dict(D=True, z=True, bias=True, softplus=True, h0=True, dlast=True)
NONE = dict(D=False, z=False, bias=False, softplus=False, h0=False, dlast=False)
CASES = [
    pytest.param((2, 4, 3, 1, None, None, ALL), id="L1-b2"),
    pytest.param((1, 6, 4, 63, None, None, ALL), id="L63-all-options"),
    pytest.param((2, 5, 5, 40, None, None, NONE), id="L40-b2-plain"),
    pytest.param((1, 6, 4, 37, 2, None, dict(ALL, softplus=False, h0=False)), id="L37-g2-cpg3"),
    pytest.param((1, 8, 4, 45, 4, [0, 1, 1, 20, 37], ALL), id="varlen-len1-len0-pad8-g4"),
    pytest.param((1, 4, 2, 75, None, [0, 70], dict(NONE, D=True, dlast=True)), id="varlen-one-long-pad5"),
    pytest.param((1, 2, 4, TINY_CU[-1] + 3, None, TINY_CU, ALL), id="varlen-40-tiny"),
    pytest.param((1, 3, 16, 50, None, [0, 16, 32, 33, 50], dict(ALL, z=False)), id="varlen-chunk-multiples-n16"),
]


def make_inputs(b, d, n, l, groups, cu_seqlens, options, seed=0):
    """fp64 master inputs; the delta range makes decays between ~0.3 and 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    num_seqs = b if cu_seqlens is None else len(cu_seqlens) - 1
    inputs = dict(
        u=randn(b, d, l),
        delta=torch.rand(b, d, l, generator=gen, dtype=F64) - (0.5 if options["softplus"] else 0.0),
        A=-torch.rand(d, n, generator=gen, dtype=F64) - 0.1,
        B=randn(*bc_shape), C=randn(*bc_shape),
        D=randn(d) if options["D"] else None,
        z=randn(b, d, l) if options["z"] else None,
        delta_bias=randn(d, scale=0.2) if options["bias"] else None,
        initial_state=randn(num_seqs, d, n) if options["h0"] else None,
    )
    flags = dict(delta_softplus=options["softplus"],
                 cu_seqlens=None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32))
    return inputs, flags


def cast(inputs, dtype, device):
    """Leaf copies in `dtype` (A, D, delta_bias and the state stay fp32 as in Mamba-1) that require grad."""
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        keep_fp32 = name in ("A", "D", "delta_bias", "initial_state") and dtype != F64
        out[name] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype).requires_grad_(True)
    return out


def forward_and_grads(fn, inputs, flags, seeds_for, device):
    """y, last state and the gradients of <y, gy> + <last, glast> w.r.t. every present input."""
    cu = flags["cu_seqlens"]
    flags = dict(flags, cu_seqlens=None if cu is None else cu.to(device))
    y, last = fn(**inputs, **flags, return_last_state=True)
    gy, glast = seeds_for(y, last)
    loss = (y.double() * gy).sum() + (0 if glast is None else (last.double() * glast).sum())
    names = [k for k in GRAD_NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    return y, last, dict(zip(names, grads))


def make_seeds(options, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def seeds_for(y, last):
        gy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.device)
        glast = torch.randn(last.shape, generator=gen, dtype=F64).to(y.device) if options["dlast"] else None
        return gy, glast

    return seeds_for


def assert_close(name, kernel, low, exact, dtype):
    kernel, low, exact = (t.detach().cpu().double() for t in (kernel, low, exact))
    scale = exact.abs().max().item() if exact.numel() else 0.0
    err_kernel = (kernel - exact).abs().max().item() if exact.numel() else 0.0
    err_low = (low - exact).abs().max().item() if exact.numel() else 0.0
    bound = 2 * err_low + ATOL[dtype] * max(scale, 1.0)
    assert err_kernel <= bound, (
        f"{name}: kernel error {err_kernel:.3g} > {bound:.3g} (reference in {dtype}: {err_low:.3g})")


def compare_to_reference(case, dtype, device, seed=0, kernel=selective_scan):
    b, d, n, l, groups, cu, options = case
    inputs, flags = make_inputs(b, d, n, l, groups, cu, options, seed)
    runs = {}
    for label, fn, dt, dev in (("kernel", kernel, dtype, device),
                               ("low", reference.selective_scan, dtype, torch.device("cpu")),
                               ("exact", reference.selective_scan, F64, torch.device("cpu"))):
        runs[label] = forward_and_grads(fn, cast(inputs, dt, dev), flags, make_seeds(options), dev)
    (yk, lk, gk), (yl, ll, gl), (ye, le, ge) = runs["kernel"], runs["low"], runs["exact"]
    assert yk.dtype == dtype and lk.dtype == torch.float32
    assert_close("y", yk, yl, ye, dtype)
    assert_close("last_state", lk, ll, le, dtype)
    assert set(gk) == set(ge)
    for name in ge:
        assert_close("d" + name, gk[name], gl[name], ge[name], dtype)


FP16_CASES = [p for p in CASES if p.id in ("L1-b2", "L63-all-options", "varlen-len1-len0-pad8-g4")]


@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(case, device):
    compare_to_reference(case, torch.float32, device)


@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_matches_reference(case, device):
    compare_to_reference(case, torch.float16, device)


def test_fp64_matches_reference_to_roundoff(device):
    inputs, flags = make_inputs(1, 8, 4, 45, 4, [0, 1, 1, 20, 37], ALL)
    seeds = make_seeds(ALL)
    yk, lk, gk = forward_and_grads(selective_scan, cast(inputs, F64, device), flags, seeds, device)
    ye, le, ge = forward_and_grads(reference.selective_scan, cast(inputs, F64, torch.device("cpu")), flags,
                                   make_seeds(ALL), torch.device("cpu"))
    for name, k, e in [("y", yk, ye), ("last", lk, le)] + [("d" + n, gk[n], ge[n]) for n in ge]:
        assert torch.allclose(k.cpu(), e, rtol=1e-10, atol=1e-12), name


def test_padding_is_zero_and_finite_with_garbage_inputs(device):
    """Tokens past cu_seqlens[-1] hold NaN: outputs and gradients there are 0, elsewhere finite."""
    inputs, flags = make_inputs(1, 4, 4, 30, 2, [0, 3, 3, 21], ALL)
    for name in ("u", "delta", "z", "B", "C"):
        inputs[name][..., 21:] = float("nan")
    leaves = cast(inputs, torch.float32, device)
    y, last, grads = forward_and_grads(selective_scan, leaves, flags, make_seeds(ALL), device)
    assert torch.isfinite(last).all()
    assert (y[..., 21:] == 0).all() and torch.isfinite(y).all()
    for name in ("u", "delta", "z", "B", "C"):
        assert (grads[name][..., 21:] == 0).all(), name
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


def test_grouped_bc_equals_expanded_bc(device):
    """Groups read B/C in place: same result as handing every channel its group's copy."""
    inputs, flags = make_inputs(1, 6, 4, 33, 3, None, NONE)
    leaves = cast(inputs, torch.float32, device)
    y_grouped = selective_scan(**leaves, **flags)
    expanded = dict(leaves, B=leaves["B"].repeat_interleave(2, 1), C=leaves["C"].repeat_interleave(2, 1))
    y_expanded = selective_scan(**expanded, **flags)
    assert torch.allclose(y_grouped, y_expanded, rtol=0, atol=0)


def launcher_inputs(device, dtype=torch.float32):
    inputs, flags = make_inputs(1, 6, 4, 41, 2, [0, 1, 17, 17, 41], ALL)
    t = {k: v.to(device=device, dtype=dtype if k not in ("A", "D", "delta_bias", "initial_state") else torch.float32)
         for k, v in inputs.items()}
    return t, flags["cu_seqlens"].to(device)


@pytest.mark.parametrize("config", FWD_CONFIGS, ids=lambda c: f"BD{c.kwargs['BD']}-w{c.num_warps}")
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_each_forward_config(config, chunk_size, device):
    t, cu = launcher_inputs(device)
    y, last, _, _, _ = selective_scan_fwd(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True,
        DocLayout.from_batch(1, t["u"].shape[2], cu), t["initial_state"], save_states=False, chunk_size=chunk_size, config=config)
    y_ref, last_ref = reference.selective_scan(**{k: v.double() for k, v in t.items()}, delta_softplus=True,
                                               cu_seqlens=cu, return_last_state=True)
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(last.double(), last_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", BWD_CONFIGS, ids=lambda c: f"BD{c.kwargs['BD']}-w{c.num_warps}")
def test_each_backward_config(config, device):
    t, cu = launcher_inputs(device)
    y, _, states, chunk_offsets, chunk_size = selective_scan_fwd(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True,
        DocLayout.from_batch(1, t["u"].shape[2], cu), t["initial_state"], save_states=True)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=gen).to(device)
    dlast = torch.randn(t["initial_state"].shape, generator=gen).to(device)
    grads = selective_scan_bwd(dy, dlast, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                               t["delta_bias"], True, cu, states, chunk_offsets, chunk_size, config=config)
    exact = {k: v.detach().cpu().double().requires_grad_(True) for k, v in t.items()}
    y_ref, last_ref = reference.selective_scan(**exact, delta_softplus=True, cu_seqlens=cu.cpu(),
                                               return_last_state=True)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    ref_grads = torch.autograd.grad((y_ref * dy.cpu().double()).sum() + (last_ref * dlast.cpu().double()).sum(),
                                    [exact[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.allclose(got.cpu().double(), want, rtol=1e-4, atol=1e-4), name


def test_gradient_through_last_state_only(device):
    """y unused: the backward runs with dy = 0 and only the last-state gradient."""
    inputs, flags = make_inputs(1, 4, 4, 40, 2, [0, 25, 25, 38], dict(ALL, softplus=False))
    grads = []
    for fn, dt, dev in ((selective_scan, torch.float32, device), (reference.selective_scan, F64, torch.device("cpu"))):
        leaves = cast(inputs, dt, dev)
        cu = flags["cu_seqlens"].to(dev)
        _, last = fn(**leaves, delta_softplus=False, cu_seqlens=cu, return_last_state=True)
        names = ("u", "delta", "A", "B", "delta_bias", "initial_state")  # what the last state depends on
        grads.append(torch.autograd.grad(last.double().square().sum(), [leaves[k] for k in names]))
    for name, got, want in zip(names, *grads):
        assert torch.allclose(got.cpu().double(), want, rtol=1e-4, atol=1e-5), name


def test_no_grad_forward_returns_y_only(device):
    inputs, flags = make_inputs(1, 4, 4, 20, None, None, NONE)
    t = {k: (None if v is None else v.float().to(device)) for k, v in inputs.items()}
    with torch.no_grad():
        y = selective_scan(**t, **flags)
    y_ref = reference.selective_scan(**{k: (None if v is None else v.cpu()) for k, v in t.items()}, **flags)
    assert isinstance(y, torch.Tensor) and torch.allclose(y.cpu(), y_ref, rtol=1e-4, atol=1e-5)


# Several deterministic channel blocks per B/C group, the last one partial (d/g not a multiple of BD).
DET_BD = DETERMINISTIC_BWD_CONFIG.kwargs["BD"]
DET_CASES = [
    pytest.param((1, DET_BD + 1, 3, 19, None, None, ALL), id="L19-2blocks"),
    pytest.param((1, 2 * DET_BD + 2, 4, 20, 2, [0, 1, 1, 17], ALL), id="varlen-g2-2blocks-pad3"),
]


@pytest.mark.parametrize("case", DET_CASES)
def test_deterministic_matches_reference(case, device):
    compare_to_reference(case, torch.float32, device, kernel=partial(selective_scan, deterministic=True))


def test_deterministic_matches_atomic(device):
    """Only the dB/dC summation differs: same forward bits, gradients equal up to fp32 rounding."""
    case = DET_CASES[0].values[0]
    inputs, flags = make_inputs(*case)
    runs = [forward_and_grads(partial(selective_scan, deterministic=det), cast(inputs, torch.float32, device),
                              flags, make_seeds(case[-1]), device) for det in (True, False)]
    (y_det, last_det, g_det), (y_atomic, last_atomic, g_atomic) = runs
    assert torch.equal(y_det, y_atomic) and torch.equal(last_det, last_atomic)
    assert set(g_det) == set(g_atomic)
    for name in g_det:
        scale = max(g_atomic[name].abs().max().item(), 1.0)
        assert torch.allclose(g_det[name], g_atomic[name], rtol=1e-5, atol=1e-6 * scale), name


def backward_runs(case, device, runs: int, deterministic: bool, dtype=torch.float32):
    """Gradients of `runs` backward passes through one forward graph, one dict per pass."""
    inputs, flags = make_inputs(*case)
    leaves = cast(inputs, dtype, device)
    cu = flags["cu_seqlens"]
    y, last = selective_scan(**leaves, **dict(flags, cu_seqlens=None if cu is None else cu.to(device)),
                             return_last_state=True, deterministic=deterministic)
    gy, glast = make_seeds(case[-1])(y, last)
    loss = (y.double() * gy).sum() + (0 if glast is None else (last.double() * glast).sum())
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    return [dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names], retain_graph=True)))
            for _ in range(runs)]


def assert_bitwise_repeatable(grad_runs):
    first = grad_runs[0]
    for run in grad_runs[1:]:
        for name, grad in first.items():
            assert torch.equal(run[name], grad), f"d{name} changed between backward runs"


def test_deterministic_backward_is_bitwise_repeatable(device):
    case = (1, DET_BD + 1, 4, 16, None, [0, 13], ALL)  # two blocks; 3 padding tokens
    assert_bitwise_repeatable(backward_runs(case, device, runs=5, deterministic=True))


def base_inputs():
    return dict(u=torch.randn(1, 4, 10), delta=torch.rand(1, 4, 10), A=-torch.rand(4, 3),
                B=torch.randn(1, 3, 10), C=torch.randn(1, 3, 10))


@pytest.mark.parametrize("change, match", [
    pytest.param(dict(u=torch.randn(4, 10)), "u must be", id="u-2d"),
    pytest.param(dict(u=torch.randint(0, 3, (1, 4, 10))), "u must be fp16", id="u-int"),
    pytest.param(dict(delta=torch.rand(1, 4, 9)), "delta must have shape", id="delta-shape"),
    pytest.param(dict(A=-torch.rand(5, 3)), "A must be", id="A-channels"),
    pytest.param(dict(B=torch.randn(1, 4, 10)), "B must be", id="B-state-size"),
    pytest.param(dict(B=torch.randn(1, 3, 3, 10), C=torch.randn(1, 3, 3, 10)), "multiple of the number of B/C groups",
                 id="groups-not-dividing"),
    pytest.param(dict(C=torch.randn(1, 2, 3, 10)), "C must have shape", id="C-differs-from-B"),
    pytest.param(dict(D=torch.randn(5)), "D must have shape", id="D-shape"),
    pytest.param(dict(z=torch.randn(1, 4, 11)), "z must have shape", id="z-shape"),
    pytest.param(dict(delta_bias=torch.randn(4, 1)), "delta_bias must have shape", id="bias-shape"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32)), "non-decreasing", id="cu-decreasing"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 11], dtype=torch.int32)), "only 10 tokens", id="cu-too-long"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 4.0])), "int32 or int64", id="cu-float"),
    pytest.param(dict(initial_state=torch.randn(2, 4, 3)), "initial_state must have shape", id="h0-count"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), initial_state=torch.randn(1, 4, 3)),
                 "initial_state must have shape", id="h0-count-varlen"),
])
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**dict(base_inputs(), **change))


def test_varlen_requires_batch_one():
    inputs = {k: torch.cat([v, v]) if k != "A" else v for k, v in base_inputs().items()}
    with pytest.raises(ValueError, match="batch size 1"):
        selective_scan(**inputs, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_bf16_matches_reference(case):
    compare_to_reference(case, torch.bfloat16, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_shape_matches_reference(dtype):
    case = (1, 256, 16, 3000, 4, [0, 1000, 1001, 2999], ALL)
    compare_to_reference(case, dtype, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_backward_is_bitwise_repeatable_on_gpu(dtype):
    """128 channel blocks per group add into the same dB/dC rows: atomics would reorder them."""
    case = (1, 2048, 16, 3000, 2, [0, 1000, 1001, 2999], ALL)
    assert_bitwise_repeatable(backward_runs(case, torch.device("cuda"), runs=5, deterministic=True, dtype=dtype))


@pytest.mark.gpu
def test_offsets_past_int32():
    """d * l > 2^31 elements: the last sequence of the row must match the reference run alone."""
    d, n, tail = 4096, 4, 64
    l = 2**31 // d + 2 * tail
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(1, d, l, device="cuda", dtype=torch.bfloat16, generator=gen)
    delta = torch.rand(1, d, l, device="cuda", dtype=torch.bfloat16, generator=gen)
    A = -torch.rand(d, n, device="cuda", generator=gen)
    B = torch.randn(1, n, l, device="cuda", dtype=torch.bfloat16, generator=gen)
    C = torch.randn(1, n, l, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, l - tail, l], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        y, last = selective_scan(u, delta, A, B, C, cu_seqlens=cu, return_last_state=True)
        part = [t[..., l - tail:].float() for t in (u, delta)]
        y_ref, last_ref = reference.selective_scan(part[0], part[1], A, B[..., l - tail:].float(),
                                                   C[..., l - tail:].float(), return_last_state=True)
    assert torch.allclose(y[..., l - tail:].float(), y_ref, rtol=2e-2, atol=2e-2)
    assert torch.allclose(last[1], last_ref[0], rtol=1e-3, atol=1e-3)
