"""Decode steps (Triton): stepping token by token reproduces the full-sequence ops."""
import pytest
import torch

import refrag_kernels
from refrag_kernels import causal_conv1d_update, reference, ssd_state_update
from refrag_kernels.state_update import CONV_UPDATE_CONFIGS, SSD_UPDATE_CONFIGS

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_within_rule(out, ref64, ref_lowp, atol, what):
    """Kernel error vs fp64 <= 2x the error of the reference run in the kernel's dtype + atol."""
    err = (out.double() - ref64.double()).abs().max().item()
    base = (ref_lowp.double() - ref64.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol:g}"


def ssd_inputs(device, b, l, h, p, g, n, dtype, options, seed=0):
    """Sequence inputs x (b,l,h,p) dt (b,l,h) A (h,) B,C (b,l,g,n) plus the optional extras."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    inputs = dict(
        x=rand(b, l, h, p).to(dtype),
        dt=(torch.rand(b, l, h, generator=gen) * 0.5 + 0.05).to(device, dtype),
        A=-(torch.rand(h, generator=gen) + 0.5).to(device),
        B=rand(b, l, g, n, scale=n ** -0.5).to(dtype),
        C=rand(b, l, g, n, scale=n ** -0.5).to(dtype),
    )
    if "D" in options:
        inputs["D"] = rand(h)
    if "Dp" in options:
        inputs["D"] = rand(h, p)
    if "z" in options:
        inputs["z"] = rand(b, l, h, p).to(dtype)
    if "dt_bias" in options:
        inputs["dt_bias"] = rand(h, scale=0.5)
    return inputs


def step_through(update, inputs, state, dt_softplus):
    """Run `update` token by token from `state` (in place); returns y (b,l,h,p)."""
    ys = []
    for t in range(inputs["x"].shape[1]):
        token = {k: (v[:, t] if v.dim() >= 3 else v) for k, v in inputs.items()}
        ys.append(update(state, **token, dt_softplus=dt_softplus))
    return torch.stack(ys, dim=1)


SSD_CASES = [
    pytest.param(1, 1, 2, 4, 1, 8, (), False, id="L1-plain"),
    pytest.param(2, 19, 4, 5, 2, 12, ("D", "z"), False, id="B2-L19-g2-D-z"),
    pytest.param(1, 23, 4, 20, 1, 16, ("Dp", "dt_bias"), True, id="L23-Dp-bias-softplus"),
    pytest.param(2, 9, 4, 3, 4, 5, ("D", "z", "dt_bias"), True, id="g4-n5-all"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, l, h, p, g, n, options, softplus", SSD_CASES)
def test_ssd_steps_equal_scan(device, b, l, h, p, g, n, options, softplus, dtype):
    inputs = ssd_inputs(device, b, l, h, p, g, n, dtype, options)
    inputs64 = {k: v.double() for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(b, h, p, n, generator=gen).to(device)

    state = h0.clone()
    y = step_through(ssd_state_update, inputs, state, softplus)
    y64, final64 = reference.ssd_scan(**inputs64, chunk_size=8, dt_softplus=softplus,
                                      initial_states=h0.double(), return_final_states=True)
    state_lowp = h0.clone()
    y_lowp = step_through(reference.ssd_state_update, inputs, state_lowp, softplus)

    assert y.dtype == dtype and y.shape == (b, l, h, p)
    assert_within_rule(y, y64, y_lowp, ATOL[dtype], "y")
    assert_within_rule(state, final64, state_lowp, ATOL[torch.float32], "state")


@pytest.mark.parametrize("config", SSD_UPDATE_CONFIGS, ids=[str(c.kwargs) for c in SSD_UPDATE_CONFIGS])
def test_ssd_every_config(device, config):
    inputs = ssd_inputs(device, 2, 1, 4, 37, 2, 24, torch.float32, ("D", "z", "dt_bias"))
    token = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    state = torch.randn(2, 4, 37, 24, device=device)
    state_ref = state.double()
    y = ssd_state_update(state, **token, dt_softplus=True, config=config)
    y_ref = reference.ssd_state_update(state_ref, **{k: v.double() for k, v in token.items()}, dt_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-5, rtol=1e-5)


def test_ssd_updates_a_strided_state_in_place(device):
    """The state may be a view into a larger cache (here every other head of it)."""
    inputs = ssd_inputs(device, 1, 1, 2, 4, 1, 8, torch.float32, ())
    token = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    cache = torch.randn(1, 4, 4, 8, device=device)
    untouched = cache[:, 1::2].clone()
    state = cache[:, ::2]
    expected_state = state.clone()
    expected_y = reference.ssd_state_update(expected_state, **token)
    y = ssd_state_update(state, **token)
    torch.testing.assert_close(y, expected_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache[:, ::2], expected_state, atol=1e-6, rtol=1e-6)
    assert torch.equal(cache[:, 1::2], untouched)


@pytest.mark.skipif(refrag_kernels.ssd_scan is reference.ssd_scan, reason="refrag_kernels.ssd_scan is not the Triton kernel yet")
def test_ssd_steps_equal_triton_scan(device):
    inputs = ssd_inputs(device, 1, 21, 4, 8, 2, 16, torch.float32, ("D", "z", "dt_bias"))
    state = torch.zeros(1, 4, 8, 16, device=device)
    y_steps = step_through(ssd_state_update, inputs, state, True)
    y_scan, final = refrag_kernels.ssd_scan(**inputs, chunk_size=16, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(y_steps, y_scan, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, final, atol=1e-4, rtol=1e-4)


def conv_steps(x, weight, bias, activation, config=None, update=causal_conv1d_update):
    """Step `update` through x (b,l,d) from a zero conv state; returns y (b,l,d) and the state."""
    b, l, d = x.shape
    state = torch.zeros(b, d, weight.shape[1] - 1, device=x.device, dtype=torch.float32)
    kwargs = {} if config is None else {"config": config}
    ys = [update(state, x[:, t], weight, bias, activation, **kwargs) for t in range(l)]
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("w, d, with_bias, activation", [
    pytest.param(2, 7, True, "silu", id="w2-d7"),
    pytest.param(3, 33, False, "silu", id="w3-d33-no-bias"),
    pytest.param(4, 70, True, None, id="w4-d70-no-act"),
])
def test_conv_steps_equal_causal_conv1d(device, w, d, with_bias, activation, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, d, generator=gen).to(device, dtype)
    weight = torch.randn(d, w, generator=gen).to(device)
    bias = torch.randn(d, generator=gen).to(device) if with_bias else None
    y, state = conv_steps(x, weight, bias, activation)
    bias64 = None if bias is None else bias.double()
    y64 = reference.causal_conv1d(x.double(), weight.double(), bias64, activation=activation)
    y_lowp, _ = conv_steps(x, weight, bias, activation, update=reference.causal_conv1d_update)
    assert y.dtype == dtype
    assert_within_rule(y, y64, y_lowp, ATOL[dtype], "y")
    torch.testing.assert_close(state, x[:, -(w - 1):].float().transpose(1, 2), atol=0, rtol=0)


@pytest.mark.parametrize("config", CONV_UPDATE_CONFIGS, ids=[str(c.kwargs) for c in CONV_UPDATE_CONFIGS])
def test_conv_every_config(device, config):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 300, generator=gen).to(device)
    weight = torch.randn(300, 4, generator=gen).to(device)
    bias = torch.randn(300, generator=gen).to(device)
    y, _ = conv_steps(x, weight, bias, "silu", config=config)
    torch.testing.assert_close(y, reference.causal_conv1d(x, weight, bias), atol=1e-5, rtol=1e-5)


def _bad_ssd_calls(device):
    b, h, p, g, n = 2, 4, 3, 2, 5

    def args(**overrides):
        base = dict(state=torch.zeros(b, h, p, n, device=device), x=torch.zeros(b, h, p, device=device),
                    dt=torch.zeros(b, h, device=device), A=torch.zeros(h, device=device),
                    B=torch.zeros(b, g, n, device=device), C=torch.zeros(b, g, n, device=device))
        base.update(overrides)
        return base

    return [
        (args(state=torch.zeros(b, h, p, device=device)), "state must be"),
        (args(x=torch.zeros(b, h, p + 1, device=device)), "x must have shape"),
        (args(dt=torch.zeros(b, device=device)), "dt must have shape"),
        (args(A=torch.zeros(h, 1, device=device)), "A must have shape"),
        (args(B=torch.zeros(b, 3, n, device=device), C=torch.zeros(b, 3, n, device=device)), "multiple of"),
        (args(B=torch.zeros(b, g, n + 1, device=device)), "B must be"),
        (args(C=torch.zeros(b, 1, n, device=device)), "C must have shape"),
        (args(D=torch.zeros(p, device=device)), "D must have shape"),
        (args(z=torch.zeros(b, h, device=device)), "z must have shape"),
        (args(dt_bias=torch.zeros(h + 1, device=device)), "dt_bias must have shape"),
        (args(x=torch.zeros(b, h, p, device=device, dtype=torch.int32)), "x must be fp16"),
        (args(A=torch.zeros(h, device="meta")), "one device"),
    ]


def _bad_conv_calls(device):
    b, d, w = 2, 6, 4

    def args(**overrides):
        base = dict(conv_state=torch.zeros(b, d, w - 1, device=device), x=torch.zeros(b, d, device=device),
                    weight=torch.zeros(d, w, device=device))
        base.update(overrides)
        return base

    return [
        (args(x=torch.zeros(b, 1, d, device=device)), "x must be"),
        (args(weight=torch.zeros(d + 1, w, device=device)), "weight must be"),
        (args(weight=torch.zeros(d, 5, device=device), conv_state=torch.zeros(b, d, 4, device=device)), "width"),
        (args(conv_state=torch.zeros(b, d, w, device=device)), "conv_state must have shape"),
        (args(bias=torch.zeros(d - 1, device=device)), "bias must have shape"),
        (args(activation="gelu"), "activation"),
        (args(conv_state=torch.zeros(b, d, w - 1, device=device, dtype=torch.int64)), "conv_state must be fp16"),
        (args(weight=torch.zeros(d, w, device="meta")), "one device"),
    ]


def test_bad_inputs_raise(device):
    for kwargs, match in _bad_ssd_calls(device):
        with pytest.raises(ValueError, match=match):
            ssd_state_update(**kwargs)
    for kwargs, match in _bad_conv_calls(device):
        with pytest.raises(ValueError, match=match):
            causal_conv1d_update(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("b, l, h, p, g, n, options, softplus", SSD_CASES)
def test_ssd_steps_bf16(device, b, l, h, p, g, n, options, softplus):
    inputs = ssd_inputs(device, b, l, h, p, g, n, torch.bfloat16, options)
    h0 = torch.randn(b, h, p, n, device=device)
    state, state_lowp = h0.clone(), h0.clone()
    y = step_through(ssd_state_update, inputs, state, softplus)
    y_lowp = step_through(reference.ssd_state_update, inputs, state_lowp, softplus)
    y64 = reference.ssd_scan(**{k: v.double() for k, v in inputs.items()}, dt_softplus=softplus,
                             initial_states=h0.double())
    assert_within_rule(y, y64, y_lowp, ATOL[torch.bfloat16], "y")


# ---------------------------------------------------------------- the "torch" path (CPU decode without the interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, l, h, p, g, n, options, softplus", SSD_CASES)
def test_ssd_torch_path_steps_equal_scan(b, l, h, p, g, n, options, softplus, dtype):
    """ssd_state_update_torch stepped token by token: y and the final state within 2x the
    oracle's own error (same dtype) against the fp64 chunked scan."""
    from refrag_kernels.state_update import ssd_state_update_torch

    inputs = ssd_inputs("cpu", b, l, h, p, g, n, dtype, options)
    h0 = torch.randn(b, h, p, n, generator=torch.Generator().manual_seed(1))
    state = h0.clone()
    y = step_through(ssd_state_update_torch, inputs, state, softplus)
    y64, final64 = reference.ssd_scan(**{k: v.double() for k, v in inputs.items()}, chunk_size=8,
                                      dt_softplus=softplus, initial_states=h0.double(), return_final_states=True)
    state_lowp = h0.clone()
    y_lowp = step_through(reference.ssd_state_update, inputs, state_lowp, softplus)
    assert y.dtype == dtype and y.shape == (b, l, h, p)
    assert_within_rule(y, y64, y_lowp, ATOL[dtype], "y")
    assert_within_rule(state, final64, state_lowp, ATOL[torch.float32], "state")


def test_ssd_torch_path_updates_a_strided_state_in_place_and_is_what_auto_runs():
    from unittest import mock

    from refrag_kernels import state_update

    inputs = ssd_inputs("cpu", 1, 1, 4, 4, 2, 8, torch.float32, ("D", "z", "dt_bias"))
    token = {k: (v[:, 0] if v.dim() >= 3 else v) for k, v in inputs.items()}
    cache = torch.randn(1, 8, 4, 8)
    untouched = cache[:, 1::2].clone()
    expected_state = cache[:, ::2].clone()
    expected_y = reference.ssd_state_update(expected_state, **token, dt_softplus=True)
    with refrag_kernels.use_backend("torch", ops="ssd_state_update"), mock.patch.object(
            state_update, "ssd_state_update_torch", wraps=state_update.ssd_state_update_torch) as torch_path:
        y = ssd_state_update(cache[:, ::2], **token, dt_softplus=True)
    assert torch_path.call_count == 1
    torch.testing.assert_close(y, expected_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache[:, ::2], expected_state, atol=1e-6, rtol=1e-6)
    assert torch.equal(cache[:, 1::2], untouched)
