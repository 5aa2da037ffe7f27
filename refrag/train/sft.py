"""The SFT step loop: packed batches, grad accumulation, AdamW, NaN guard, exact resume.

`train_sft(cfg, model, train_loader, val_loader, env)` runs ``cfg.max_steps`` optimizer
steps. A loader (`refrag.data.PackedLoader`) yields batches with ``input_ids`` and ``targets``
(B, L) int64 (-100 = no loss) and ``layout(device)``, the `refrag_kernels.DocLayout` of the batch
flattened to one (1, B*L) row; each ``iter()`` is one epoch, and ``state_dict()`` /
``load_state_dict()`` give its position. Under DDP each rank's loader yields its own shard.
Each optimizer step consumes ``cfg.grad_accum`` batches per rank; the logged loss is the mean
over micro-steps and ranks. The validation loss is over the first ``cfg.val_rows`` batches of
each rank's validation loader, fixed once at the start.

Per step, rank 0 appends one JSON line to ``<out_dir>/metrics.jsonl``: step, loss, lr,
grad_norm, tokens (all ranks), tokens_per_s, peak_mem_mib, skipped (NaN/inf guard),
skipped_steps (running count) and, when evaluated, val_loss. A non-finite loss or grad norm
skips the optimizer update (grads are zeroed, the schedule still advances);
``MAX_CONSECUTIVE_SKIPS`` skipped steps in a row stop the run with an error (it diverged), and
weights that are not finite are never saved. Checkpoints go to ``<out_dir>/checkpoints/``
(see `refrag.train.checkpoint`) with the run's tokenizer and prompt-format record inside
(`checkpoint_assets`), so evaluation needs nothing else; a run started with the same out_dir resumes from the newest
intact one (a corrupt newer one is skipped with a warning) and reproduces the uninterrupted
loss curve exactly (bit for bit with ``cfg.deterministic``). Resuming applies the *current*
config's optimization settings: the learning-rate schedule (lr, warmup_steps, max_steps,
min_lr_ratio) is recomputed at the checkpoint's step and weight_decay / betas replace the saved
ones, so ``--max_steps 200`` extends a 100-step run with the new cosine; a checkpoint past
``max_steps`` is refused. Rank 0 holds the lock ``<out_dir>/.run.lock`` for the whole run: a
second run with the same out_dir fails at once with a clear error instead of interleaving.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from refrag.data.prompt import FILE_NAME as PROMPT_FORMAT_FILE
from refrag.fileio import file_lock, read_jsonl, write_jsonl
from refrag.train import checkpoint as ckpt
from refrag.train.config import TrainConfig
from refrag.train.optim import build_optimizer, build_scheduler
from refrag.train.shims import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    autocast,
    barrier,
    gather_objects,
    nvtx_range,
    peak_memory_mib,
    reset_peak_memory,
    synchronize,
)

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
MAX_CONSECUTIVE_SKIPS = 20


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """FSDP2 (`fully_shard` per block, then the root), DDP when world_size > 1, else the model."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        if env.world_size == 1:
            raise ValueError("fsdp needs more than one process (torchrun; CUDA with NCCL or CPU with gloo)")
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    if env.world_size > 1:
        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return model


def grad_sync(wrapped: nn.Module, enabled: bool):
    """Context that skips the DDP/FSDP gradient all-reduce on non-final micro-steps."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(wrapped, DistributedDataParallel):
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        return _restore_gradient_sync(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_gradient_sync(wrapped: nn.Module):
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def to_device(batch, device: torch.device):
    """(input_ids (1, B*L), targets (1, B*L), layout) of a loader batch, on `device`.

    The layout is built and validated on the CPU; every tensor goes to a GPU through pinned
    memory with non-blocking copies, so the step that follows never waits on the host.
    """
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(1, -1)
        if torch.device(device).type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return move(batch.input_ids), move(batch.targets), batch.layout(device)


def endless(loader):
    """The loader's batches epoch after epoch (each ``iter(loader)`` is one epoch)."""
    while True:
        yield from loader


@torch.no_grad()
def validation_loss(wrapped: nn.Module, val_batches: list, cfg: TrainConfig, env: DistEnv) -> float:
    """Mean loss over the rank's fixed validation batches, averaged over ranks."""
    wrapped.eval()
    total = torch.zeros(2, device=env.device)
    for batch in val_batches:
        input_ids, targets, layout = to_device(batch, env.device)
        with autocast(env.device, cfg.bf16):
            loss = wrapped(input_ids, layout=layout, targets=targets, num_loss_tokens=batch.num_loss_tokens)
        total += torch.stack([loss.detach().float(), torch.ones((), device=env.device)])
    wrapped.train()
    total = all_reduce_sum(total, env)
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


def save_training_state(root: Path, step: int, skipped: int, wrapped: nn.Module, optimizer, scheduler,
                        train_loader, cfg: TrainConfig, model_config: dict, env: DistEnv) -> None:
    """Collective: every rank contributes its loader position and RNG; rank 0 writes. Weights that
    are not finite are refused (ValueError) rather than saved over the last good checkpoint."""
    model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=FULL_STATE)
    per_rank = gather_objects({"loader": train_loader.state_dict(), "rng": ckpt.capture_rng_state()}, env)
    if env.is_main:
        bad = [name for name, t in model_state.items() if torch.is_tensor(t) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"step {step}: weights {', '.join(bad[:5])} are not finite; refusing to save them "
                             "(the run diverged: lower lr or check the data)")
        trainer_state = {"step": step, "skipped_steps": skipped, "world_size": env.world_size,
                         "scheduler": scheduler.state_dict(), "ranks": per_rank}
        ckpt.save_checkpoint(root, step, model_state=model_state, optimizer_state=optimizer_state,
                             trainer_state=trainer_state,
                             config={"train": cfg.to_dict(), "model": model_config}, files=checkpoint_assets(cfg))
        ckpt.prune_checkpoints(root, cfg.keep_checkpoints)
    barrier(env)


def checkpoint_assets(cfg: TrainConfig) -> dict:
    """Files that make a checkpoint self-contained: ``prompt_format.json`` (the run's
    `PromptFormat` record) and a copy of the tokenizer as ``tokenizer.json`` when cfg.tokenizer
    exists (synthetic-data runs without one store only the record)."""
    files = {PROMPT_FORMAT_FILE: cfg.prompt_format().to_dict()}
    if Path(cfg.tokenizer).is_file():
        files[ckpt.TOKENIZER_FILE] = Path(cfg.tokenizer).read_text(encoding="utf-8")
    return files


def restore_training_state(path: Path, wrapped: nn.Module, optimizer, train_loader,
                           model_config: dict, env: DistEnv) -> tuple[int, int]:
    """Load a checkpoint into model, optimizer, loader and RNG; returns (step, skipped). The
    optimizer keeps the hyperparameters it was built with (the current config's), only its
    moments come from the checkpoint; the caller rebuilds the schedule at the returned step."""
    state = ckpt.load_checkpoint(path, model_config=model_config)
    trainer = state["trainer"]
    if trainer["world_size"] != env.world_size:
        raise ckpt.CheckpointError(f"checkpoint {path} was written by {trainer['world_size']} ranks, "
                                   f"this run has {env.world_size}; data positions cannot be mapped")
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    for group, hyper in zip(optimizer.param_groups, current):
        group.update(hyper)
    own = trainer["ranks"][env.rank]
    train_loader.load_state_dict(own["loader"])
    ckpt.restore_rng_state(own["rng"])
    return trainer["step"], trainer["skipped_steps"]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past `last_step` (written by a run that died after its checkpoint) and a
    torn last line (a crash during the append); a malformed line elsewhere is an error naming it."""
    if not path.exists():
        return
    kept = []
    for lineno, record in read_jsonl(path, allow_nan=True, torn_tail=True):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{lineno}: not a metrics record (no integer 'step')")
        if record["step"] <= last_step:
            kept.append(record)
    write_jsonl(path, kept, allow_nan=True)


def _due(step: int, every: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)


def train_sft(cfg: TrainConfig, model: nn.Module, train_loader, val_loader=None, *,
              env: DistEnv, model_config: dict, resume: bool = True) -> list[dict]:
    """Run SFT to `cfg.max_steps`, resuming from `<out_dir>/checkpoints` when one exists
    (``resume=False`` deletes that directory and starts from step 0).

    model: an nn.Module called as ``model(input_ids, layout=layout, targets=targets,
    num_loss_tokens=n) -> loss`` (n: targets != -100, counted on the CPU; built identically on
    every rank). model_config: its plain-dict config, stored in and
    checked against checkpoints. Returns the metric records of the steps this call ran.
    """
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_lock = file_lock(out_dir / ".run.lock", blocking=False, what=f"training out_dir {out_dir}") \
        if env.is_main else contextlib.nullcontext()
    with run_lock:
        return _train_sft(cfg, model, train_loader, val_loader, env, model_config, resume)


def _train_sft(cfg: TrainConfig, model: nn.Module, train_loader, val_loader, env: DistEnv, model_config: dict,
               resume: bool) -> list[dict]:
    out_dir = Path(cfg.out_dir)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    model.to(env.device)
    wrapped = wrap_model(model, env, cfg.fsdp)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    start, skipped = 0, 0
    if not resume and env.is_main:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    barrier(env)
    latest = ckpt.latest_valid_checkpoint(ckpt_root, warn=lambda line: print(line, file=sys.stderr)) \
        if resume else None
    if latest is not None:
        start, skipped = restore_training_state(latest, wrapped, optimizer, train_loader, model_config, env)
        if start > cfg.max_steps:
            raise ckpt.CheckpointError(f"checkpoint {latest} is at step {start}, past max_steps {cfg.max_steps}; "
                                       "raise max_steps, or start fresh (--no-resume or another out_dir)")
        scheduler = build_scheduler(optimizer, cfg, start_step=start)
    if env.is_main:
        _truncate_metrics(metrics_path, start)
    barrier(env)

    history = []
    consecutive_skips = 0
    val_batches = list(itertools.islice(endless(val_loader), cfg.val_rows)) if val_loader is not None else []
    train_iter = endless(train_loader)
    tty = sys.stderr.isatty()  # redirected to a log: a bar line a minute, not one per step
    progress = tqdm(total=cfg.max_steps, initial=start, desc="sft", disable=not env.is_main, dynamic_ncols=True,
                    mininterval=0.1 if tty else 60, maxinterval=10 if tty else 600)
    for step in range(start + 1, cfg.max_steps + 1):
        synchronize(env.device)
        reset_peak_memory(env.device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=env.device)
        tokens = torch.zeros((), device=env.device)
        for micro in range(cfg.grad_accum):
            with nvtx_range("data", env.device):
                batch = next(train_iter)
                input_ids, targets, layout = to_device(batch, env.device)
            with grad_sync(wrapped, enabled=micro == cfg.grad_accum - 1):
                with nvtx_range("forward", env.device), autocast(env.device, cfg.bf16):
                    loss = wrapped(input_ids, layout=layout, targets=targets,
                                   num_loss_tokens=batch.num_loss_tokens)
                with nvtx_range("backward", env.device):
                    (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
            tokens += input_ids.numel()

        with nvtx_range("optimizer", env.device):
            step_loss = all_reduce_mean(loss_sum / cfg.grad_accum, env)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            finite = bool(torch.isfinite(step_loss)) and bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
                consecutive_skips = 0
            else:
                skipped += 1
                consecutive_skips += 1
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
        synchronize(env.device)
        elapsed = time.perf_counter() - t0

        total_tokens = all_reduce_sum(tokens, env).item()
        record = {"step": step, "loss": step_loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": int(total_tokens), "tokens_per_s": total_tokens / elapsed,
                  "peak_mem_mib": peak_memory_mib(env.device), "skipped": not finite, "skipped_steps": skipped}
        if val_batches and _due(step, cfg.eval_every, cfg.max_steps):
            record["val_loss"] = validation_loss(wrapped, val_batches, cfg, env)
        history.append(record)
        if env.is_main:
            write_jsonl(metrics_path, [record], append=True, allow_nan=True)
            if not finite:
                progress.write(f"step {step}: non-finite loss or grad norm, update skipped ({skipped} so far)")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}")
        progress.update(1)
        if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise ValueError(f"{consecutive_skips} steps in a row had a non-finite loss or grad norm (step {step}): "
                             "the run diverged; lower lr or check the model config and data")
        if _due(step, cfg.ckpt_every, cfg.max_steps):
            save_training_state(ckpt_root, step, skipped, wrapped, optimizer, scheduler, train_loader,
                                cfg, model_config, env)
    progress.close()
    return history
