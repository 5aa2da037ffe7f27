"""Tiny HybridLM factories shared by tests/test_model.py and tests/test_infer.py."""
from __future__ import annotations

import pytest
import torch

import refrag_kernels
from refrag.model import HybridLM, MambaConfig, ModelConfig, parse_block_pattern

VOCAB = 97


def tiny_config(pattern: str, **overrides) -> ModelConfig:
    """d_model 64, 2 query heads of 32 sharing 1 KV head; 4 Mamba heads of 32 with 16 states, chunk 16.

    Head dim 32 and state 16 are the smallest sizes the Triton kernels take (tl.dot needs 16).
    """
    values = dict(
        vocab_size=VOCAB, d_model=64, n_layer=len(parse_block_pattern(pattern)),
        block_pattern=pattern, n_head=2, n_kv_head=1,
        mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16),
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(pattern: str, device, seed: int = 0, **overrides) -> HybridLM:
    """A tiny model whose matrices are all random (the default init zeroes residual outputs,
    which would make every block the identity and every mixing test vacuous)."""
    torch.manual_seed(seed)
    model = HybridLM(tiny_config(pattern, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.to(device)


def tolerance(device) -> dict:
    """fp32 weights everywhere; CUDA kernels may use TF32 dots, hence the looser bound there."""
    if torch.device(device).type == "cuda":
        return dict(atol=5e-3, rtol=5e-3)
    return dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def triton_ops():
    """Request this fixture to run a test on the dispatched ops (the Triton interpreter on CPU)."""


@pytest.fixture(autouse=True)
def reference_ops_on_cpu(request, device):
    """On CPU, model tests run the kernels' reference path (interpreter off, the dispatch
    rule): the interpreter is too slow for whole models; kernels have their own tests. Tests that
    request `triton_ops` keep the interpreter as integration checks. CUDA always runs Triton."""
    if device.type == "cpu" and "triton_ops" not in request.fixturenames:
        with refrag_kernels.use_backend("reference"):
            yield
    else:
        yield


# The `tiny` preset's T,M,T,M model on one packed row of four examples and five documents.
STEP_EXAMPLES = [(40, [(3, 12), (12, 20)]), (30, [(2, 9)]), (26, [(1, 8), (8, 14)]), (32, [])]
STEP_VOCAB = 256


def tiny_train_step(device):
    """(model, input_ids (1, L), targets (1, L), layout, num_loss_tokens) for one training step
    of the tiny preset on a packed row with documents; the layout and the loss-token count are
    built on the CPU (as the loader does) before the step. Every matrix is random so every
    gradient is live. Run it as ``model(ids, layout=layout, targets=targets,
    num_loss_tokens=num_loss_tokens)``."""
    from refrag_kernels import DocLayout
    from refrag.model import preset

    torch.manual_seed(0)
    model = HybridLM(preset("tiny", vocab_size=STEP_VOCAB))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    layout = DocLayout.from_examples(STEP_EXAMPLES)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, STEP_VOCAB, (1, layout.total_tokens), generator=gen)
    targets = torch.randint(0, STEP_VOCAB, (1, layout.total_tokens), generator=gen)
    targets[0, layout.doc_ids != 0] = -100
    num_loss_tokens = int((targets != -100).sum())
    return model.to(device), ids.to(device), targets.to(device), layout.to(device), num_loss_tokens
