"""Resumable, DDP-sharded, deterministic loader over packed rows.

Epoch e visits the rows in the order `np.random.default_rng([seed, e]).permutation`
(or in order with shuffle=False), truncated to a multiple of world_size * batch_size so
every rank takes the same number of steps; rank r takes every world_size-th row of that
order. `state_dict()` records (epoch, position); `load_state_dict` resumes exactly there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from refrag.data.packing import IGNORE_INDEX, PackedRow


@dataclass
class PackedBatch:
    """input_ids, targets int64 (B, L); doc_ids int32 (B, L); examples: the rows' DocLayout
    examples concatenated, i.e. the layout of the batch flattened row-major to (1, B*L)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    examples: list[tuple[int, list[tuple[int, int]]]]
    num_tokens: int

    @property
    def loss_mask(self) -> torch.Tensor:
        """bool (B, L): positions whose target is learned (targets != -100)."""
        return self.targets != IGNORE_INDEX

    @property
    def num_loss_tokens(self) -> int:
        """Number of learned positions, counted on the CPU (the model's loss takes it to skip a host sync)."""
        return int(self.loss_mask.sum())

    def layout(self, device=None):
        """DocLayout of the flattened (1, B*L) batch (the varlen convention of the kernels):
        built and validated on the CPU, then copied to `device` without blocking."""
        from refrag_kernels.layout import DocLayout

        return DocLayout.from_examples(self.examples, device=device)


def collate(rows: Sequence[PackedRow]) -> PackedBatch:
    return PackedBatch(input_ids=torch.from_numpy(np.stack([r.input_ids for r in rows])),
                       targets=torch.from_numpy(np.stack([r.targets for r in rows])),
                       doc_ids=torch.from_numpy(np.stack([r.doc_ids for r in rows])),
                       examples=[e for r in rows for e in r.examples],
                       num_tokens=sum(r.num_tokens for r in rows))


class PackedLoader:
    """Iterates one epoch per `iter()` from the saved position; the next `iter()` starts the next epoch."""

    def __init__(self, rows: Sequence[PackedRow], batch_size: int = 1, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(rows) < batch_size * world_size:
            raise ValueError(f"{len(rows)} rows cannot fill one step of {world_size} rank(s) x batch {batch_size}")
        self.rows, self.batch_size, self.rank, self.world_size = list(rows), batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's row indices for `epoch`, (steps_per_epoch * batch_size,)."""
        n = len(self.rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[:self.steps_per_epoch * self.batch_size * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[PackedBatch]:
        order = self.epoch_order(self.epoch)
        while self.position < self.steps_per_epoch:
            idx = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            self.position += 1
            yield collate([self.rows[i] for i in idx])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        """Checkpointable position: the next batch is `position` of epoch `epoch`."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """Resume; the data (num_rows), seed, shuffle, batch size and world size must match."""
        for key in ("seed", "shuffle", "batch_size", "world_size", "num_rows"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state mismatch: {key} is {state.get(key)!r} in the checkpoint, {mine!r} here")
        if not 0 <= state["position"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state out of range: epoch {state['epoch']}, position {state['position']}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
