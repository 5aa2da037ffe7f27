"""Mini-model convergence: 30 AdamW steps of a tiny HybridLM ("T,M") on the Triton kernels
(the interpreter on CPU) and on the refrag_kernels.reference ops, from the same seed and data.

The reference run selects every op's refrag_kernels.reference oracle with `refrag_kernels.use_backend("reference")`
(gated_rms_norm and selective_scan included). Per-step losses and
the final parameters must agree within fp32 tolerance: a kernel whose gradient is slightly wrong
passes a one-step check but drifts over 30 optimizer steps.
"""
import pytest
import torch

import refrag_kernels
from refrag_kernels import DocLayout
from refrag.model import HybridLM, MambaConfig, ModelConfig

VOCAB = 32
STEPS = 30
EXAMPLES = [(9, [(2, 6)]), (6, [])]
LENGTH = sum(n for n, _ in EXAMPLES)
# fp32 weights. On CPU the two runs differ by about 1e-6 (losses, relative) and 1e-6 (parameters)
# after 30 steps, while a 0.5% error in one kernel gradient (SSD dx) moves them by 3e-4 and 1.5e-4.
# CUDA kernels may use TF32 dots, hence the looser bound there.
TOLERANCE = {"cpu": dict(loss_rtol=2e-5, param_atol=2e-5), "cuda": dict(loss_rtol=5e-3, param_atol=5e-3)}


def tiny_model(device) -> HybridLM:
    """d_model 16; one attention block (2 query heads of 32 sharing one KV head), one Mamba-2 block
    (expand 1: one head of 16, 16 states): about the smallest sizes the Triton kernels take. Every
    matrix is random: the default init zeroes residual outputs, which would leave the mixers'
    gradients near zero for the first steps and hide a wrong kernel gradient."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=16, n_layer=2, block_pattern="T,M", n_head=2, n_kv_head=1,
                         head_dim=32, mamba=MambaConfig(d_state=16, headdim=16, expand=1, chunk_size=16))
    model = HybridLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.to(device)


def batches(device):
    """Two fixed packed rows (1, LENGTH) with their layout (one retrieval document in the first
    example); loss on the second half of each example."""
    gen = torch.Generator().manual_seed(1)
    layout = DocLayout.from_examples(EXAMPLES, device=device)
    rows = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (1, LENGTH), generator=gen)
        targets = torch.full((1, LENGTH), -100)
        start = 0
        for n, _ in EXAMPLES:
            half = start + n // 2
            targets[0, half:start + n - 1] = ids[0, half + 1:start + n]
            start += n
        rows.append((ids.to(device), targets.to(device)))
    return layout, rows


def train(device):
    """Per-step losses and final parameters of STEPS AdamW steps."""
    model = tiny_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    layout, rows = batches(device)
    losses = []
    for step in range(STEPS):
        ids, targets = rows[step % len(rows)]
        loss = model(ids, layout=layout, targets=targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_run(device):
    with refrag_kernels.use_backend("reference"):
        return train(device)


@pytest.mark.slow
def test_thirty_steps_on_triton_kernels_track_the_reference(device):
    ref_losses, ref_params = reference_run(device)
    losses, params = train(device)
    assert ref_losses[-1] < 0.8 * ref_losses[0], "the reference run did not learn: the comparison is vacuous"
    tol = TOLERANCE[device.type]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol["loss_rtol"], atol=0.0)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=0.0, atol=tol["param_atol"],
                                   msg=lambda m: f"{name}: {m}")
