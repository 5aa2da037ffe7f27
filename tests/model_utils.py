"""Tiny HybridLM factories shared by tests/test_model.py and tests/test_infer.py."""
from __future__ import annotations

import pytest
import torch

import kernels
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
    """On CPU, model tests run the kernels' reference path (interpreter off, DESIGN.md dispatch
    rule): the interpreter is too slow for whole models; kernels have their own tests. Tests that
    request `triton_ops` keep the interpreter as integration checks. CUDA always runs Triton."""
    if device.type == "cpu" and "triton_ops" not in request.fixturenames:
        with kernels.use_backend("reference"):
            yield
    else:
        yield
