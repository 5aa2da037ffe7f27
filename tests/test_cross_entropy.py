"""fused_linear_cross_entropy (chunked, Triton) against refrag_kernels.reference: loss and both gradients."""
import pytest
import torch
import torch.nn.functional as F

from refrag_kernels import fused_linear_cross_entropy, reference
from refrag_kernels.cross_entropy import CROSS_ENTROPY_CONFIGS, LOGITS_BUDGET, logits_chunk_size

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_within_rule(out, ref64, ref_lowp, atol, what):
    """Kernel error vs fp64 <= 2x the error of plain PyTorch in the kernel's dtype + atol (relative to
    the reference's magnitude)."""
    err = (out.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    assert err <= 2 * base + atol * scale, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol * scale:g}"


def plain_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", z_loss=0.0):
    """What plain PyTorch does in the input dtype: logits from a low-precision GEMM (an fp32 weight cast
    to the hidden dtype), the loss in fp32."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.to(hidden.dtype).t()).float()
    tgt = targets.reshape(-1)
    lse = torch.logsumexp(logits, dim=-1)
    valid = tgt != ignore_index
    per_token = F.cross_entropy(logits, tgt.long(), ignore_index=ignore_index, reduction="none")
    per_token = per_token + torch.where(valid, z_loss * lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return per_token.reshape(targets.shape)
    return per_token.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)


def make_inputs(device, lead_shape, H, V, dtype, ignore_frac=0.3, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, H, generator=gen).to(device, dtype)
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5 * 3).to(device, dtype)
    targets = torch.randint(0, V, lead_shape, generator=gen)
    targets[torch.rand(lead_shape, generator=gen) < ignore_frac] = ignore_index
    return hidden, weight, targets.to(device)


def loss_and_grads(fn, hidden, weight, targets, dtype=None, grad_out=None, **kwargs):
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype))
    return loss, h.grad, w.grad


def check_against_reference(hidden, weight, targets, grad_out=None, chunk_size=None, config=None, num_valid=None,
                            **kwargs):
    out = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, grad_out=grad_out,
                         chunk_size=chunk_size, config=config, num_valid=num_valid, **kwargs)
    ref64 = loss_and_grads(reference.fused_linear_cross_entropy, hidden, weight, targets,
                           dtype=torch.float64, grad_out=grad_out, **kwargs)
    plain = loss_and_grads(plain_linear_cross_entropy, hidden, weight, targets, grad_out=grad_out, **kwargs)
    for name, o, r64, rlp in zip(("loss", "grad_hidden", "grad_weight"), out, ref64, plain):
        assert o.shape == rlp.shape and o.dtype == rlp.dtype, name
        assert_within_rule(o, r64, rlp, ATOL[hidden.dtype], name)
    return out


CASES = [
    pytest.param((2, 33), 16, 257, "mean", 0.0, None, id="B2-L33-V257-mean"),
    pytest.param((63,), 32, 1000, "sum", 0.0, 7, id="T63-V1000-sum-chunk7"),
    pytest.param((2, 20), 16, 1000, "none", 0.0, 16, id="B2-L20-V1000-none-chunk16"),
    pytest.param((1, 45), 8, 257, "mean", 0.1, 8, id="L45-V257-zloss-chunk8"),
    pytest.param((1,), 8, 3, "mean", 0.0, None, id="T1-V3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead_shape, H, V, reduction, z_loss, chunk_size", CASES)
def test_matches_reference(device, lead_shape, H, V, reduction, z_loss, chunk_size, dtype):
    hidden, weight, targets = make_inputs(device, lead_shape, H, V, dtype)
    grad_out = None
    if reduction == "none":
        grad_out = torch.randn(lead_shape, generator=torch.Generator().manual_seed(3)).to(device)
    check_against_reference(hidden, weight, targets, grad_out=grad_out, chunk_size=chunk_size,
                            reduction=reduction, z_loss=z_loss)


@pytest.mark.parametrize("config", CROSS_ENTROPY_CONFIGS, ids=[str(c.kwargs) for c in CROSS_ENTROPY_CONFIGS])
def test_every_config(device, config):
    """V = 5000 spans several BV blocks for all but the largest config (online logsumexp)."""
    hidden, weight, targets = make_inputs(device, (9,), 8, 5000, torch.float32)
    check_against_reference(hidden, weight, targets, chunk_size=4, config=config, z_loss=0.01)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(device, reduction):
    hidden, weight, targets = make_inputs(device, (2, 5), 8, 257, torch.float32, ignore_frac=1.0)
    loss, grad_hidden, grad_weight = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets,
                                                    reduction=reduction)
    assert torch.count_nonzero(loss) == 0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


def test_custom_ignore_index(device):
    hidden, weight, targets = make_inputs(device, (30,), 8, 257, torch.float32, ignore_index=5)
    check_against_reference(hidden, weight, targets, ignore_index=5, chunk_size=8)


def test_ignored_tokens_have_zero_grad(device):
    hidden, weight, targets = make_inputs(device, (40,), 8, 257, torch.float32, ignore_frac=0.5)
    _, grad_hidden, _ = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    assert torch.count_nonzero(grad_hidden[ignored]) == 0
    assert torch.count_nonzero(grad_hidden[~ignored].abs().sum(-1)) == int((~ignored).sum())


def test_frozen_weight_and_int32_targets(device):
    hidden, weight, targets = make_inputs(device, (2, 9), 8, 257, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets.to(torch.int32), chunk_size=5)
    loss.backward()
    h_ref = hidden.double().requires_grad_()
    reference.fused_linear_cross_entropy(h_ref, weight.double(), targets).backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_only_without_grad(device, reduction):
    """Under no_grad (evaluation) only the loss is computed; it matches the reference."""
    hidden, weight, targets = make_inputs(device, (3, 7), 8, 257, torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets, reduction=reduction,
                                          z_loss=0.01, chunk_size=4)
    expected = reference.fused_linear_cross_entropy(hidden.double(), weight.double(), targets,
                                                    reduction=reduction, z_loss=0.01)
    assert loss.shape == expected.shape and not loss.requires_grad
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_autocast_keeps_input_dtype(device):
    """Callers choose the GEMM dtype by casting hidden and weight; autocast does not change it."""
    hidden, weight, targets = make_inputs(device, (2, 9), 8, 257, torch.float32)
    expected = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    for name, g, e in zip(("loss", "grad_hidden", "grad_weight"), got, expected):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_chunk_size_respects_budget():
    for vocab in (257, 32000, 50257, 128256):
        chunk = logits_chunk_size(10 ** 6, vocab)
        assert chunk * vocab <= LOGITS_BUDGET and 2 * chunk * vocab > LOGITS_BUDGET
    assert logits_chunk_size(3, 1000) == 3
    assert logits_chunk_size(100, 1000, chunk_size=7) == 7


def _bad_calls(device):
    h = torch.randn(4, 8, device=device)
    w = torch.randn(10, 8, device=device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    return [
        ((h, torch.randn(10, 7, device=device), t), {}, "disagree"),
        ((h, w.double(), t), {}, "share a dtype"),
        ((h.to(torch.int32), w, t), {}, "hidden must be fp16"),
        ((h, w, t.float()), {}, "integer tensor"),
        ((h, w, t[:3]), {}, "targets must have shape"),
        ((h, w, t), {"reduction": "avg"}, "reduction"),
        ((h, w, t), {"z_loss": -1.0}, "z_loss"),
        ((h, w, torch.tensor([0, 1, 10, 2], device=device)), {}, r"\[0, 10\)"),
        ((h, w, torch.tensor([0, -1, 3, 2], device=device)), {}, r"\[0, 10\)"),
        ((h, w.to("meta"), t), {}, "one device"),
        ((h, w.half(), t), {}, "share a dtype"),
        ((h, w, t), {"num_valid": 3}, "num_valid=3 differs"),
        ((h, w, t), {"num_valid": 5}, r"num_valid must lie in \[0, 4\]"),
        ((h, w, t), {"num_valid": -1}, r"num_valid must lie in \[0, 4\]"),
        ((h, w, t), {"num_valid": 4.0}, "num_valid must be a Python int"),
        ((h, w, t), {"num_valid": torch.tensor(4)}, "num_valid must be a Python int"),
    ]


def test_bad_inputs_raise(device):
    for args, kwargs, match in _bad_calls(device):
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.9], ids=["all-valid", "10pct-valid"])
def test_num_valid_from_caller(device, reduction, ignore_frac):
    """A caller-supplied count gives the same losses and gradients as the counted path, also with
    every token valid (no compaction) and with 90% ignored (most tokens compacted away)."""
    hidden, weight, targets = make_inputs(device, (2, 12), 16, 300, torch.float32, ignore_frac=ignore_frac)
    grad_out = torch.randn(2, 12, generator=torch.Generator().manual_seed(5)).to(device) \
        if reduction == "none" else None
    num_valid = int((targets != -100).sum())
    counted = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, grad_out=grad_out,
                             reduction=reduction, chunk_size=8)
    given = check_against_reference(hidden, weight, targets, grad_out=grad_out, chunk_size=8,
                                    reduction=reduction, num_valid=num_valid)
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), counted, given):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_no_loss_tokens(device):
    """num_valid = 0: no GEMM runs; loss 0 ("mean" divides by at least 1) and zero gradients."""
    hidden, weight, targets = make_inputs(device, (2, 5), 8, 257, torch.float32, ignore_frac=1.0)
    loss, grad_hidden, grad_weight = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets,
                                                    num_valid=0)
    assert loss.item() == 0.0 and grad_hidden.shape == hidden.shape
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gemms_see_only_loss_tokens(device, reduction):
    """Counted by the meter: forward + backward GEMM FLOPs are those of the n loss tokens alone,
    6 n H V (2 n H V more for "none", whose backward recomputes the logits), whatever the number of
    ignored tokens; with 10% of the targets valid that is <= 0.15x the all-valid count (issue 17)."""
    from bench.meter import measure

    T, H, V = 60, 16, 200
    flops = {}
    for ignore_frac in (0.0, 0.9):
        hidden, weight, targets = make_inputs(device, (T,), H, V, torch.float32, ignore_frac=ignore_frac)
        n = int((targets != -100).sum())
        m = measure(lambda: loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets,
                                           reduction=reduction, num_valid=n, chunk_size=16), kernels=False)
        flops[ignore_frac] = sum(m.aten_flops.values())
        assert flops[ignore_frac] == (8 if reduction == "none" else 6) * n * H * V, (ignore_frac, n, m.aten_op_flops)
    assert flops[0.9] <= 0.15 * flops[0.0]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu)])
def test_grad_weight_accumulates_in_fp32(device, dtype):
    """hidden in fp16/bf16 with the fp32 master weight (how the model calls it): the fp32 weight
    gradient's error (Frobenius, vs fp64) is at most that of torch's linear + cross-entropy in the
    low dtype, whose GEMM accumulates in fp32 but rounds dW once. Rounding each chunk's dW to the
    low dtype (10 chunks here) fails this. bf16 needs a GPU: the interpreter truncates fp32 -> bf16.
    """
    hidden, weight, targets = make_inputs(device, (160,), 64, 1000, torch.float32, ignore_frac=0.5)
    hidden, weight = hidden.to(dtype), weight.to(dtype).float()  # a master weight the low dtype represents
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, chunk_size=8)[2]
    ref64 = loss_and_grads(reference.fused_linear_cross_entropy, hidden, weight, targets, dtype=torch.float64)[2]
    plain = loss_and_grads(lambda h, w, t: plain_linear_cross_entropy(h, w.to(h.dtype), t), hidden, weight,
                           targets)[2]
    assert ours.dtype == torch.float32 and plain.dtype == torch.float32
    err, base = (ours.double() - ref64).norm().item(), (plain.double() - ref64).norm().item()
    assert err <= base, f"dW error {err:.4g} > torch's {base:.4g}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_weight_with_fp16_hidden(device, reduction):
    """Mixed operands: GEMMs in fp16, gradients in each input's dtype, within the 2x rule of torch
    casting the weight itself."""
    hidden, weight, targets = make_inputs(device, (2, 30), 16, 500, torch.float16)
    weight = weight.float()
    grad_out = torch.randn(2, 30, generator=torch.Generator().manual_seed(7)).to(device) \
        if reduction == "none" else None
    out = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, grad_out=grad_out,
                         reduction=reduction, chunk_size=8, z_loss=0.01)
    ref64 = loss_and_grads(reference.fused_linear_cross_entropy, hidden, weight, targets, dtype=torch.float64,
                           grad_out=grad_out, reduction=reduction, z_loss=0.01)
    plain = loss_and_grads(lambda h, w, t, **kw: plain_linear_cross_entropy(h, w.to(h.dtype), t, **kw),
                           hidden, weight, targets, grad_out=grad_out, reduction=reduction, z_loss=0.01)
    for name, o, r64, rlp in zip(("loss", "grad_hidden", "grad_weight"), out, ref64, plain):
        assert o.dtype == rlp.dtype, name
        assert_within_rule(o, r64, rlp, ATOL[torch.float16], name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_grad_output_scales_forward_gradients(device, reduction):
    """A non-unit upstream gradient (loss / grad_accum, loss weights) scales the gradients made in the
    forward: fp16 weight (scaled and cast in one pass) and fp32 weight (scaled in place)."""
    hidden, weight, targets = make_inputs(device, (2, 15), 16, 300, torch.float16)
    for w in (weight, weight.float()):
        check_against_reference(hidden, w, targets, grad_out=torch.tensor(1 / 3, device=device), chunk_size=8,
                                reduction=reduction)


def test_none_reduction_with_broadcast_grad(device):
    """loss.sum().backward() hands backward a stride-0 grad_output."""
    hidden, weight, targets = make_inputs(device, (40,), 8, 257, torch.float32)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, targets, reduction="none", chunk_size=8).sum().backward()
    h_ref = hidden.double().requires_grad_()
    reference.fused_linear_cross_entropy(h_ref, weight.double(), targets, reduction="sum").backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, atol=1e-5, rtol=1e-5)


def test_second_backward_raises(device):
    """Gradients are computed in the forward and consumed (scaled in place) by the first backward."""
    hidden, weight, targets = make_inputs(device, (12,), 8, 257, torch.float32)
    loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_num_valid_makes_no_host_read(device):
    """Counted by the meter: with num_valid, forward + backward read nothing back from the device;
    without it, the count is the one read."""
    from bench.meter import measure

    hidden, weight, targets = make_inputs(device, (2, 9), 8, 257, torch.float32, ignore_frac=0.6)
    num_valid = int((targets != -100).sum())
    for given, reads in ((num_valid, 0), (None, 1)):
        m = measure(lambda: loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, num_valid=given,
                                           chunk_size=4), kernels=False)
        assert m.host_syncs == reads, (given, m.host_reads, m.sync_ops)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_accumulates_grad_weight_inside_the_gemm(device, dtype):
    """On CUDA dW takes the addmm(out_dtype=float32) path, not the fp32-GEMM fallback."""
    from refrag_kernels.cross_entropy import _gemm_has_fp32_out

    assert _gemm_has_fp32_out(device.type, dtype)


@pytest.mark.gpu
def test_num_valid_makes_no_host_sync(device):
    hidden, weight, targets = make_inputs(device, (4, 256), 64, 1000, torch.bfloat16, ignore_frac=0.8)
    hidden.requires_grad_()
    num_valid = int((targets != -100).sum())
    fused_linear_cross_entropy(hidden, weight, targets, num_valid=num_valid).backward()  # warm-up, autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_linear_cross_entropy(hidden, weight, targets, num_valid=num_valid).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("lead_shape, H, V, reduction, z_loss, chunk_size", CASES)
def test_bf16_matches_reference(device, lead_shape, H, V, reduction, z_loss, chunk_size):
    hidden, weight, targets = make_inputs(device, lead_shape, H, V, torch.bfloat16)
    grad_out = torch.randn(lead_shape, device=device) if reduction == "none" else None
    check_against_reference(hidden, weight, targets, grad_out=grad_out, chunk_size=chunk_size,
                            reduction=reduction, z_loss=z_loss)


@pytest.mark.gpu
def test_large_vocab_bf16(device):
    """A realistic LM head: V = 128256, several chunks; the loss matches the reference."""
    hidden, weight, targets = make_inputs(device, (2, 600), 256, 128256, torch.bfloat16)
    check_against_reference(hidden, weight, targets, chunk_size=256)
