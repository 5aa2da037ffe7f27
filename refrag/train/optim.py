"""AdamW with a no-decay group, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from refrag.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; norms, biases (ndim < 2) and embeddings do not."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` with the config's lr, betas and weight decay."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay from 1 to `min_lr_ratio` at `max_steps`.

    `step` counts optimizer steps already taken (0 for the first step).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable lr lambda of `lr_multiplier` (LambdaLR saves it in its state dict)."""

    def __init__(self, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.warmup_steps, self.max_steps, self.min_lr_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping `lr_multiplier` once per optimizer step, positioned after `start_step`
    steps (resume: the schedule is a function of the step and the config, never of saved state;
    the optimizer's groups must then hold ``initial_lr``, set by a first build at step 0)."""
    schedule = WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=start_step - 1)
