"""Fault tolerance of the training loop beyond tests/test_train.py (which covers bit-identical
resume, crash-safe save and NaN losses): an infinite gradient with a finite loss is skipped and
reported, and a DDP rank that dies makes torchrun fail fast instead of hanging the others.
"""
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest
import torch

from refrag_kernels import DocLayout
from refrag.model import HybridLM, MambaConfig, preset
from refrag.train.config import TrainConfig
from refrag.train.sft import train_sft
from refrag.train.shims import init_distributed

VOCAB = 32
LENGTH = 24
TORCHRUN_TIMEOUT_S = 120


@dataclass
class Row:
    """A packed row in the loader's batch format: one example with a retrieval document."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    def layout(self, device=None) -> DocLayout:
        return DocLayout.from_examples([(LENGTH, [(2, 9)])], device=device)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != -100).sum())


class Rows:
    """Endless fixed packed rows (1, LENGTH); resumable."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = [torch.randint(0, VOCAB, (1, LENGTH), generator=gen) for _ in range(2)]
        self.position = 0

    def __iter__(self):
        while True:
            ids = self.ids[self.position % len(self.ids)]
            self.position += 1
            yield Row(ids, torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1))

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class InfiniteGradient(torch.autograd.Function):
    """Identity on the loss whose backward returns +inf: a finite loss with an inf gradient."""

    @staticmethod
    def forward(ctx, loss):
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class InfGradAt(torch.nn.Module):
    """Model wrapper whose gradient is infinite on the given (1-based) forward calls."""

    def __init__(self, model: HybridLM, calls: set):
        super().__init__()
        self.inner, self.calls, self.count = model, calls, 0

    def forward(self, input_ids, layout=None, targets=None, num_loss_tokens=None):
        self.count += 1
        loss = self.inner(input_ids, layout=layout, targets=targets)
        return InfiniteGradient.apply(loss) if self.count in self.calls else loss


def tiny_model() -> HybridLM:
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=VOCAB, d_model=32, n_head=1, block_pattern="T,M",
                    mamba=MambaConfig(d_state=16, headdim=16, expand=1, chunk_size=16))
    return HybridLM(config)


def test_infinite_gradient_step_is_skipped_reported_and_training_continues(tmp_path, capsys, reference_ops):
    # the loop is under test, not the kernels
    model = InfGradAt(tiny_model(), calls={2})
    cfg = TrainConfig(max_steps=4, lr=3e-3, warmup_steps=1, out_dir=str(tmp_path / "inf"), deterministic=True,
                      seed=0, val_rows=0)
    snapshots = {}  # parameters entering forward call k (= after step k - 1)

    def snapshot(module, args):
        snapshots[module.count + 1] = {n: p.detach().clone() for n, p in module.inner.named_parameters()}

    model.register_forward_pre_hook(snapshot)
    history = train_sft(cfg, model, Rows(), env=init_distributed("cpu"), model_config=model.inner.config.to_dict())
    assert [r["skipped"] for r in history] == [False, True, False, False]
    assert math.isfinite(history[1]["loss"]) and not math.isfinite(history[1]["grad_norm"])
    assert history[-1]["skipped_steps"] == 1
    assert "step 2: non-finite loss or grad norm, update skipped" in capsys.readouterr().out
    assert all(torch.equal(p, snapshots[2][n]) for n, p in snapshots[3].items()), "the skipped step changed weights"
    assert any(not torch.equal(p, snapshots[3][n]) for n, p in snapshots[4].items()), "step 3 did not train"
    assert all(torch.isfinite(p).all() for p in model.parameters())


RANK_DIES = textwrap.dedent("""
    import torch
    from refrag.train.shims import all_reduce_mean, init_distributed

    env = init_distributed("cpu")
    if env.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    while True:  # rank 0 waits in collectives for a peer that is gone
        all_reduce_mean(torch.ones(()), env)
""")


@pytest.mark.slow
def test_dead_rank_makes_torchrun_fail_fast(tmp_path):
    script = tmp_path / "rank_dies.py"
    script.write_text(RANK_DIES)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max_restarts=0", str(script)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.monotonic() - start
    assert result.returncode != 0, "torchrun reported success although rank 1 died"
    assert "injected failure on rank 1" in result.stderr + result.stdout
    assert elapsed < TORCHRUN_TIMEOUT_S
