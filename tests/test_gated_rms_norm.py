"""Triton gated RMSNorm (refrag_kernels.gated_rms_norm) against refrag_kernels.reference.gated_rms_norm:
forward and every gradient, groups, no gate, strided (projection-slice) inputs, every
autotune config, and input validation.

Tolerance rule: the kernel's error against the fp64 reference is at most twice the error
of the same reference code run in the kernel's dtype, plus a small dtype-tied atol.
"""
import pytest
import torch

from refrag_kernels import gated_rms_norm
from refrag_kernels import reference as R
from refrag_kernels.gated_rms_norm import GATED_RMS_NORM_CONFIGS, ROWS_PER_PROGRAM

F64 = torch.float64
ATOL = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_case(shape, gate=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, generator=gen, dtype=F64) * 2
    z = torch.randn(*shape, generator=gen, dtype=F64) * 2 if gate else None
    w = torch.rand(shape[-1], generator=gen, dtype=F64) + 0.5
    dout = torch.randn(*shape, generator=gen, dtype=F64)
    return y, z, w, dout


def run(fn, y, z, w, dout, dtype, device, **kwargs):
    leaves = [None if t is None else t.to(device, dtype).clone().requires_grad_() for t in (y, z, w)]
    out = fn(*leaves, **kwargs)
    out.backward(dout.to(device, out.dtype))
    return {"out": out, "dy": leaves[0].grad, "dz": None if z is None else leaves[1].grad, "dw": leaves[2].grad}


def check(y, z, w, dout, dtype, device, **kwargs):
    got = run(gated_rms_norm, y, z, w, dout, dtype, device, **kwargs)
    kwargs.pop("config", None)
    exact = run(R.gated_rms_norm, y, z, w, dout, F64, "cpu", **kwargs)
    low = run(R.gated_rms_norm, y, z, w, dout, dtype, "cpu", **kwargs)
    for name, ref in exact.items():
        if ref is None:
            assert got[name] is None
            continue
        assert got[name].dtype == dtype, name
        err, ref_err = rel_err(got[name].cpu(), ref), rel_err(low[name], ref)
        assert err <= 2 * ref_err + ATOL[dtype], f"{name}: error {err:.3e} vs reference-in-{dtype} {ref_err:.3e}"
    return got


CASES = [
    pytest.param(dict(shape=(2, 7, 48)), dict(), id="one-group-48"),
    pytest.param(dict(shape=(37, 96)), dict(group_size=32), id="3-groups"),
    pytest.param(dict(shape=(5, 100), gate=False), dict(), id="no-gate-non-pow2"),
    pytest.param(dict(shape=(1, 3, 1)), dict(eps=1e-3), id="width-1"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case, kwargs", CASES)
def test_forward_and_gradients(case, kwargs, dtype, device):
    check(*make_case(**case), dtype, device, **kwargs)


def test_output_dtype_follows_y(device):
    y, z, w, _ = make_case((3, 16))
    out = gated_rms_norm(y.to(device, torch.float16), z.to(device, torch.float16), w.to(device, torch.float32))
    assert out.dtype == torch.float16 and out.shape == (3, 16)


def test_strided_projection_slices(device):
    """y and z as slices of one wider tensor: read in place, same result as contiguous copies."""
    gen = torch.Generator().manual_seed(1)
    proj = torch.randn(2, 9, 3 * 32, generator=gen).to(device).requires_grad_()
    w = (torch.rand(32, generator=gen) + 0.5).to(device)
    z, y = proj[..., :32], proj[..., 64:]
    out = gated_rms_norm(y, z, w, group_size=16)
    ref = R.gated_rms_norm(y.detach().double(), z.detach().double(), w.double(), group_size=16)
    assert rel_err(out.detach().cpu(), ref.cpu()) < 1e-6
    out.backward(torch.ones_like(out))
    assert proj.grad[..., 32:64].abs().max() == 0  # untouched middle slice gets no gradient
    assert proj.grad[..., :32].abs().max() > 0 and proj.grad[..., 64:].abs().max() > 0


@pytest.mark.parametrize("config", [pytest.param(c, id=f"BM{c.kwargs['BM']}-w{c.num_warps}")
                                    for c in GATED_RMS_NORM_CONFIGS])
def test_every_config_is_correct(config, device):
    check(*make_case((19, 64)), torch.float32, device, group_size=32, config=config)


def test_rows_past_one_backward_program(device):
    """More rows than one backward program owns: dweight sums the programs' partials."""
    rows = ROWS_PER_PROGRAM + 5
    widest = max(GATED_RMS_NORM_CONFIGS, key=lambda c: c.kwargs["BM"])
    check(*make_case((rows, 8)), torch.float32, device, group_size=4, config=widest)


def test_deterministic(device):
    y, z, w, dout = make_case((33, 64))
    first = run(gated_rms_norm, y, z, w, dout, torch.float32, device)
    second = run(gated_rms_norm, y, z, w, dout, torch.float32, device)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _bad(**changes):
    y, z, w, _ = make_case((4, 16))
    kwargs = dict(y=y.float(), z=z.float(), weight=w.float())
    kwargs.update(changes)
    return kwargs


BAD_INPUTS = [
    pytest.param(_bad(z=torch.randn(4, 15)), "z must have shape", id="z-shape"),
    pytest.param(_bad(weight=torch.randn(15)), "weight must have shape", id="weight-shape"),
    pytest.param(_bad(group_size=5), "positive divisor", id="group-not-dividing"),
    pytest.param(_bad(group_size=0), "positive divisor", id="group-zero"),
    pytest.param(_bad(eps=0.0), "eps must be positive", id="eps-zero"),
    pytest.param(_bad(y=torch.zeros(4, 16, dtype=torch.int32)), "y must be fp16", id="y-int"),
]


@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_bad_inputs_raise(kwargs, match, device):
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        gated_rms_norm(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("case, kwargs", CASES)
def test_forward_and_gradients_bf16(case, kwargs, device):
    check(*make_case(**case), torch.bfloat16, device, **kwargs)
