"""One HybridLM train step (forward + backward + AdamW) on a synthetic packed RAG row, shared by
the train-step benchmark (bench/test_bench_train_step.py) and the profiling driver
(profiles/train_step.py).

Real mode: the d12 preset (d_model 768, 12 layers, vocab 32768) with the named block pattern, and
the d16 hybrid ("hybrid-d16", d_model 1024, 16 layers) for its memory at long context; bf16
autocast on CUDA. Smoke mode: a 2-layer d_model-32 model on CPU (Triton interpreter), fp32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from bench.layouts import rag_examples
from refrag_kernels import DocLayout
from refrag.model.lm import IGNORE_INDEX
from refrag.model import HybridLM, MambaConfig, ModelConfig, preset
from refrag.train.config import TrainConfig
from refrag.train.optim import build_optimizer
from refrag.train.shims import autocast

SMOKE_VOCAB, REAL_VOCAB = 128, 32768
SMOKE_LAYOUT = dict(doc_len=(4, 10), shared=(3, 8))
REAL_LAYOUT = dict(doc_len=(200, 800), shared=(32, 96))

# Benchmarked models that are not d12, by name (the rest are d12 with their block pattern).
MODEL_SIZES = {"hybrid-d16": "d16"}


def block_patterns(smoke: bool) -> Dict[str, str]:
    """Named block patterns benchmarked: hybrid, pure Mamba-2 and pure attention at d12, and the
    d16 hybrid (smoke: hybrid only, which runs both block types; an interpreted train step takes
    seconds)."""
    if smoke:
        return {"hybrid": "T,M"}
    return {"hybrid": "T*4+[T,M]*2+M*4", "pure-M": "M*12", "pure-T": "T*12", "hybrid-d16": "T*6+[T,M]*2+M*6"}


def model_config(pattern: str, smoke: bool, size: str = "d12") -> ModelConfig:
    """The benchmarked model: the `size` preset with the given block pattern, or a tiny smoke model."""
    if smoke:
        return ModelConfig(vocab_size=SMOKE_VOCAB, d_model=32, n_layer=2, block_pattern=pattern, n_head=1,
                           mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16))
    return preset(size, vocab_size=REAL_VOCAB, block_pattern=pattern)


def effective_seq_len(layout: DocLayout) -> int:
    """Context length to feed `HybridLM.flops_per_token`: sum of squared example lengths / L.

    flops_per_token's attention term is linear in the context length of each token (causal
    mask not discounted), so summing it over examples of lengths n_i gives total attention
    FLOPs proportional to sum n_i^2; dividing by L gives the per-token length to use.
    """
    lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).double()
    return max(1, round(float((lengths ** 2).sum()) / layout.total_tokens))


@dataclass
class TrainStep:
    """A ready-to-run train step and what is needed to account for it.

    input_ids, targets: (1, L) int64 (targets -100 on document tokens: loss on shared text only).
    """

    model: HybridLM
    optimizer: torch.optim.Optimizer
    layout: DocLayout
    input_ids: torch.Tensor
    targets: torch.Tensor
    bf16: bool
    num_loss_tokens: Optional[int] = None  # targets != -100, counted on the host as the loader does

    @property
    def tokens(self) -> int:
        """Tokens per step (L)."""
        return self.layout.total_tokens

    def flops(self) -> float:
        """Model FLOPs of one step (forward + backward), `HybridLM.flops_per_token` convention."""
        return float(self.model.flops_per_token(effective_seq_len(self.layout))) * self.tokens

    def forward(self) -> torch.Tensor:
        """Loss of the packed row (under bf16 autocast on CUDA when enabled)."""
        with autocast(self.input_ids.device, self.bf16):
            return self.model(self.input_ids, layout=self.layout, targets=self.targets,
                              num_loss_tokens=self.num_loss_tokens)

    def run(self, phase: Optional[Callable[[str], contextlib.AbstractContextManager]] = None) -> None:
        """forward, backward, AdamW step, zero grads; `phase(name)` wraps each part (profiling ranges)."""
        phase = phase or (lambda name: contextlib.nullcontext())
        with phase("forward"):
            loss = self.forward()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def build_train_step(pattern: str, length: int, device: torch.device, smoke: bool, seed: int = 0,
                     size: str = "d12", config: Optional[ModelConfig] = None,
                     layout: Optional[dict] = None) -> TrainStep:
    """Model (`size` preset, `pattern` blocks), AdamW (the trainer's `build_optimizer`) and one
    synthetic packed RAG row of `length` tokens.

    config overrides the model (default `model_config(pattern, smoke, size)`); layout overrides
    the `rag_examples` keyword arguments of the row (default SMOKE_LAYOUT or REAL_LAYOUT).
    """
    torch.manual_seed(seed)
    config = config or model_config(pattern, smoke, size)
    model = HybridLM(config).to(device)
    optimizer = build_optimizer(model, TrainConfig())
    examples = rag_examples(length, seed=seed, **(layout or (SMOKE_LAYOUT if smoke else REAL_LAYOUT)))
    layout = DocLayout.from_examples(examples, device=device)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (1, length), generator=g).to(device)
    targets = torch.roll(input_ids, -1, dims=1)
    targets[0, layout.doc_ids.long() != 0] = IGNORE_INDEX
    num_loss_tokens = int((targets != IGNORE_INDEX).sum())
    return TrainStep(model, optimizer, layout, input_ids, targets, bf16=device.type == "cuda",
                     num_loss_tokens=num_loss_tokens)
