"""The SFT loop (refrag.train): learning, checkpoints, exact resume, crash safety, NaN guard, DDP.

These tests exercise the loop, not the kernels (tested against kernels/reference.py elsewhere),
so the tiny HybridLM runs its ops on the PyTorch reference path (`reference_ops` fixture).
"""
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

import refrag_kernels
from refrag_kernels import DocLayout
from refrag.model import HybridLM, MambaConfig, preset
from refrag.train import checkpoint as ckpt
from refrag.train.config import GROUPS, TrainConfig, load_config
from refrag.train.optim import lr_multiplier, parameter_groups
from refrag.train.sft import train_sft
from refrag.train.shims import init_distributed

VOCAB = 48
SEQ_LEN = 40


@dataclass
class Row:
    """A packed row in the loader's batch format (B = 1)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    examples: list

    def layout(self, device=None) -> DocLayout:
        return DocLayout.from_examples(self.examples, device=device)

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != -100).sum())


def make_row(gen: torch.Generator) -> Row:
    """Two examples: a retrieval block of two documents, a 1-token document, then a copy task."""
    first, second = 23, SEQ_LEN - 23
    examples = [(first, [(1, 6), (6, 7)]), (second, [])]
    half = second // 2
    prefix = torch.randint(3, VOCAB, (first,), generator=gen)
    pattern = torch.randint(3, 12, (half,), generator=gen)
    ids = torch.cat([prefix, pattern, pattern, torch.tensor([1] * (second - 2 * half))])
    targets = torch.full((SEQ_LEN,), -100)
    targets[:-1] = ids[1:]
    targets[: first + half] = -100  # loss on the repeated half only
    targets[first - 4: first - 1] = ids[first - 3: first]
    return Row(ids.view(1, -1), targets.view(1, -1), examples)


class SyntheticRows:
    """Deterministic packed rows, endlessly cycled; rank r gets rows r, r + world, ...; resumable."""

    def __init__(self, n_rows: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = [make_row(gen) for _ in range(n_rows)][rank::world_size]
        self.position = 0

    def __iter__(self):
        while True:
            row = self.rows[self.position % len(self.rows)]
            self.position += 1
            yield row

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class KilledAfter:
    """Loader wrapper that raises after `batches` batches, like a process killed mid-run."""

    def __init__(self, loader, batches: int):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        for served, row in enumerate(self.loader):
            if served == self.batches:
                raise KeyboardInterrupt("killed")
            yield row

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


class PoisonedAt(torch.nn.Module):
    """Model wrapper whose loss is NaN on the given (1-based) forward calls."""

    def __init__(self, model: HybridLM, calls: set):
        super().__init__()
        self.inner, self.calls, self.count = model, calls, 0
        self.blocks = model.blocks

    def forward(self, input_ids, layout=None, targets=None, num_loss_tokens=None):
        self.count += 1
        loss = self.inner(input_ids, layout=layout, targets=targets)
        return loss * float("nan") if self.count in self.calls else loss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes on a shared CPU: extra intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=VOCAB, d_model=64, n_head=2, block_pattern="T,M",
                    mamba=MambaConfig(d_state=16, headdim=16, chunk_size=16))
    return HybridLM(config)


def run(tmp_path, name: str, loader=None, model=None, **overrides) -> list[dict]:
    values = dict(max_steps=6, lr=3e-3, warmup_steps=2, out_dir=str(tmp_path / name), deterministic=True,
                  seed=0, val_rows=2)
    cfg = TrainConfig(**{**values, **overrides})
    model = model or tiny_model()
    config = (model.inner if isinstance(model, PoisonedAt) else model).config.to_dict()
    return train_sft(cfg, model, loader or SyntheticRows(), SyntheticRows(n_rows=2, seed=99),
                     env=init_distributed("cpu"), model_config=config)


def read_metrics(tmp_path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_metrics_logged(tmp_path, reference_ops):
    history = run(tmp_path, "learn", max_steps=12, grad_accum=2, eval_every=6, lr=1e-2)
    losses = [r["loss"] for r in history]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert [r["step"] for r in read_metrics(tmp_path, "learn")] == list(range(1, 13))
    assert {"lr", "grad_norm", "tokens_per_s", "peak_mem_mib", "skipped_steps"} <= set(history[0])
    assert history[0]["tokens"] == 2 * SEQ_LEN
    assert [r["step"] for r in history if "val_loss" in r] == [6, 12]
    assert history[-1]["val_loss"] < 0.9 * math.log(VOCAB)  # untrained: about log(VOCAB)
    assert ckpt.latest_checkpoint(tmp_path / "learn" / "checkpoints").name == "step_000012"


def test_checkpoint_round_trip(tmp_path, reference_ops):
    run(tmp_path, "rt", max_steps=3)
    path = ckpt.latest_checkpoint(tmp_path / "rt" / "checkpoints")
    model = tiny_model(seed=1)
    state = ckpt.load_checkpoint(path, model_config=model.config.to_dict())
    model.load_state_dict(state["model"])
    trained = dict(tiny_model().named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters())  # it trained
    assert state["trainer"]["step"] == 3 and state["trainer"]["ranks"][0]["loader"] == {"position": 3}
    assert state["config"]["train"]["max_steps"] == 3
    assert set(state["optimizer"]["state"]) == set(state["model"])


def test_checkpoint_is_self_contained(tmp_path, monkeypatch, reference_ops):
    """A checkpoint carries its tokenizer and prompt-format record: evaluation loads them from
    another folder, with the training config's relative tokenizer path meaningless there."""
    from refrag.data.prompt import PromptFormat
    from refrag.data import load_tokenizer
    from refrag.data.tokenizer import DEFAULT_TOKENIZER_PATH
    from refrag.eval.evaluate import load_trained_model

    run_dir = tmp_path / "train_here"
    (run_dir / "out").mkdir(parents=True)
    (run_dir / "out" / "tok.json").write_text(DEFAULT_TOKENIZER_PATH.read_text())
    monkeypatch.chdir(run_dir)
    run(run_dir, "sc", max_steps=1, tokenizer="out/tok.json", question_first=True, max_doc_tokens=48,
        retrieval=True)
    path = ckpt.latest_checkpoint(run_dir / "sc" / "checkpoints")
    assert {"prompt_format.json", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert set(json.loads((path / "manifest.json").read_text())["files"]) >= {"prompt_format.json", "tokenizer.json"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    trained = load_trained_model(run_dir / "sc")  # the run's out_dir: newest step
    assert trained.path == path
    assert trained.prompt == PromptFormat(retrieval=True, question_first=True, max_doc_tokens=48)
    assert trained.tokenizer.encode("Nindzer is an economist.") == load_tokenizer().encode("Nindzer is an economist.")
    (path / "prompt_format.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="prompt_format.json is corrupt"):
        load_trained_model(path)


def test_prompt_format_record_round_trip_and_errors(tmp_path):
    from refrag.data.prompt import PromptFormat

    record = TrainConfig(retrieval=False, question_first=True, max_doc_tokens=40).prompt_format()
    record.save(tmp_path / "p.json")
    assert PromptFormat.load(tmp_path / "p.json") == record and not record.retrieval
    with pytest.raises(ValueError, match="unknown prompt format key"):
        PromptFormat.from_dict({"retrieval": True, "docs_first": True})
    with pytest.raises(ValueError, match="version 9"):
        PromptFormat.from_dict({"format_version": 9})
    with pytest.raises(ValueError, match="max_doc_tokens must be an int >= 1"):
        PromptFormat(max_doc_tokens=0)
    with pytest.raises(ValueError, match="not found"):
        PromptFormat.load(tmp_path / "missing.json")


def test_resume_is_bit_identical(tmp_path, reference_ops):
    full = [r["loss"] for r in run(tmp_path, "full", max_steps=6, grad_accum=2, ckpt_every=3)]
    with pytest.raises(KeyboardInterrupt):  # killed during step 5, after the step-3 checkpoint
        run(tmp_path, "resumed", loader=KilledAfter(SyntheticRows(), 9), max_steps=6, grad_accum=2, ckpt_every=3)
    assert [r["step"] for r in read_metrics(tmp_path, "resumed")] == [1, 2, 3, 4]
    resumed = run(tmp_path, "resumed", max_steps=6, grad_accum=2, ckpt_every=3)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in read_metrics(tmp_path, "resumed")] == full


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpts"
    config = {"train": {"lr": 1.0}, "model": {"d_model": 8}}
    weights = {"w": torch.arange(4.0)}
    trainer = {"step": 1, "ranks": [{"rng": ckpt.capture_rng_state()}]}
    ckpt.save_checkpoint(root, 1, model_state=weights, optimizer_state={}, trainer_state=trainer, config=config)
    with pytest.raises(ckpt.SimulatedCrash):
        ckpt.save_checkpoint(root, 2, model_state={"w": torch.ones(4)}, optimizer_state={},
                             trainer_state=trainer, config=config, crash_after_files=2)
    assert ckpt.latest_checkpoint(root).name == "step_000001"
    assert torch.equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(root))["model"]["w"], weights["w"])
    assert not list(root.glob(".step_000002.*-*")), "the aborted save left its temp directory"
    partial = root / "step_000002"
    shutil.copytree(root / "step_000001", partial)
    (partial / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json: it is partial"):
        ckpt.load_checkpoint(partial)


def test_corrupt_and_mismatched_checkpoints_refused(tmp_path):
    root = tmp_path / "ckpts"
    config = {"train": {}, "model": {"d_model": 8, "mamba": {"d_state": 16}}}
    path = ckpt.save_checkpoint(root, 1, model_state={"w": torch.zeros(64)}, optimizer_state={},
                                trainer_state={}, config=config)
    with pytest.raises(ckpt.CheckpointError, match=r"mamba\.d_state: checkpoint 16 vs current 32"):
        ckpt.load_checkpoint(path, model_config={"d_model": 8, "mamba": {"d_state": 32}})
    blob = bytearray((path / "model.pt").read_bytes())
    blob[-20] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match="model.pt is corrupt"):
        ckpt.load_checkpoint(path)


def test_checkpoint_from_before_a_new_model_key_resumes(tmp_path):
    """A checkpoint whose model config predates keys added to ModelConfig since (their defaults
    keep the old behaviour) loads against the current config; a real difference is still refused."""
    current = tiny_model().config.to_dict()
    old = {k: v for k, v in current.items() if k not in ("rope_dim", "mlp_dim")}
    old["mamba"] = {k: v for k, v in current["mamba"].items() if k not in ("conv_bias", "norm_per_group", "mlp")}
    path = ckpt.save_checkpoint(tmp_path / "ckpts", 1, model_state={"w": torch.zeros(4)}, optimizer_state={},
                                trainer_state={}, config={"train": {}, "model": old})
    assert ckpt.load_checkpoint(path, model_config=current)["config"]["model"] == old
    with pytest.raises(ckpt.CheckpointError, match=r"mamba\.conv_bias: checkpoint True vs current False"):
        ckpt.load_checkpoint(path, model_config={**current, "mamba": {**current["mamba"], "conv_bias": False}})


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_nan_steps_skipped_and_counted(tmp_path, reference_ops):
    model = PoisonedAt(tiny_model(), calls={3, 4})  # both micro-steps of step 2
    history = run(tmp_path, "nan", model=model, max_steps=4, grad_accum=2)
    assert [r["skipped"] for r in history] == [False, True, False, False]
    assert history[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history[-1]["loss"] == history[-1]["loss"]  # finite again after the skipped step


def test_config_validation(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 1e-3, "max_step": 10}))
    with pytest.raises(ValueError, match="unknown config key.*'max_step'"):
        load_config(path)
    path.write_text(json.dumps({"lr": 1e-3}))
    cfg = load_config(path, {"max_steps": "7", "model.block_pattern": "T,M", "retrieval": "false"})
    assert (cfg.lr, cfg.max_steps, cfg.model, cfg.retrieval) == (1e-3, 7, {"block_pattern": "T,M"}, False)
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        load_config(None, {"grad_accum": "0"})
    with pytest.raises(ValueError, match="unknown config key 'optim.lr'"):
        load_config(None, {"optim.lr": "1"})
    with pytest.raises(ValueError, match="extra_questions must be >= 0"):
        load_config(None, {"extra_questions": "-1"})
    with pytest.raises(ValueError, match="counterfactual_copies must be int"):
        load_config(None, {"counterfactual_copies": "1.5"})
    with pytest.raises(ValueError, match="document_loss must be bool"):
        load_config(None, {"document_loss": "2"})
    grouped = [key for keys in GROUPS.values() for key in keys]
    assert sorted(grouped) == sorted(TrainConfig().to_dict())


def test_optimizer_groups_and_schedule():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert {id(model.embed.weight), id(model.norm.weight)} <= no_decay_ids
    assert id(model.lm_head.weight) in decay_ids and no_decay["weight_decay"] == 0.0
    assert len(decay_ids | no_decay_ids) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in decay["params"])
    assert lr_multiplier(0, 4, 20, 0.1) == 0.25 and lr_multiplier(3, 4, 20, 0.1) == 1.0
    assert lr_multiplier(4, 4, 20, 0.1) == 1.0 and lr_multiplier(20, 4, 20, 0.1) == pytest.approx(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, results, fsdp: bool = False) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    refrag_kernels.set_backend("reference")
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    model = tiny_model()
    cfg = TrainConfig(max_steps=3, lr=3e-3, warmup_steps=1, out_dir=out_dir, deterministic=True, val_rows=1,
                      fsdp=fsdp)
    history = train_sft(cfg, model, SyntheticRows(rank=rank, world_size=world_size),
                        SyntheticRows(n_rows=2, seed=99, rank=rank, world_size=world_size),
                        env=env, model_config=model.config.to_dict())
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}  # FSDP2 parameters are DTensor shards
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(out_dir, "checkpoints")))["model"]
    sharded = all(hasattr(p, "full_tensor") for p in model.parameters())
    results[rank] = ([r["loss"] for r in history], params, saved, sharded)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_doubled_batch(tmp_path, reference_ops):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), results), nprocs=2, join=True)
    (losses0, params0, _, _), (losses1, params1, _, _) = results[0], results[1]
    assert losses0 == losses1
    assert all(torch.equal(params0[n], params1[n]) for n in params0)
    single = run(tmp_path, "single", max_steps=3, grad_accum=2, warmup_steps=1, val_rows=1)
    assert [r["loss"] for r in single] == pytest.approx(losses0, rel=1e-5)


@pytest.mark.slow
def test_fsdp2_two_processes_match_ddp(tmp_path, reference_ops):
    """fully_shard (per block, then the root) on 2 CPU processes over gloo: same losses as DDP
    on the same shards, same parameters after 3 AdamW steps, and a checkpoint holding the full
    (unsharded) weights."""
    runs = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        results = mp.Manager().dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / name), results, fsdp), nprocs=2, join=True)
        runs[name] = dict(results)
    (ddp_losses, ddp_params, _, _), (fsdp_losses, fsdp_params, saved, sharded) = runs["ddp"][0], runs["fsdp"][0]
    assert sharded and not runs["ddp"][0][3]  # every parameter is a DTensor shard under fully_shard
    assert runs["fsdp"][0][0] == runs["fsdp"][1][0]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    assert set(fsdp_params) == set(ddp_params)
    for n in ddp_params:
        torch.testing.assert_close(fsdp_params[n], ddp_params[n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(saved[n], ddp_params[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["demo", "demo_gpu", "d12", "d16", "d20"])
def test_shipped_configs_load(name):
    from pathlib import Path

    import refrag.train

    cfg = load_config(Path(refrag.train.__file__).parent / "configs" / f"{name}.json")
    assert preset(cfg.preset, vocab_size=cfg.vocab_size, **cfg.model).vocab_size == cfg.vocab_size


def test_cli_rejects_unknown_flags():
    from refrag.train.__main__ import parse_args

    _, overrides = parse_args(["sft", "--lr", "0.01", "--model.block_pattern", "M*2"])
    assert overrides == {"lr": "0.01", "model.block_pattern": "M*2"}
    with pytest.raises(SystemExit):
        parse_args(["sft", "--learning_rate", "0.01"])


def test_conversation_variants():
    from refrag.data import rag_conversation, render_conversation, load_tokenizer
    from refrag.data.prompt import PromptFormat

    docs = [{"id": "d1", "title": "T", "content": "Nindzer is an economist.", "score": 1.0, "source": "s"}]
    conv = rag_conversation("What is Nindzer?", "economist", docs)
    roles = lambda c: [m["role"] for m in c["messages"]]  # noqa: E731
    question_first = PromptFormat(question_first=True)
    assert roles(question_first.arrange(conv)) == ["system", "user", "retrieval", "assistant"]
    assert roles(PromptFormat().arrange(conv)) == roles(conv)
    assert roles(PromptFormat(retrieval=False, question_first=True).arrange(conv)) == ["system", "user", "assistant"]
    generation = question_first.conversation("What is Nindzer?", docs)
    assert roles(generation) == ["system", "user", "retrieval"] and generation["messages"][1]["content"] == "What is Nindzer?"
    assert roles(PromptFormat().conversation("q", docs)) == ["system", "retrieval", "user"]
    example = render_conversation(question_first.arrange(conv), load_tokenizer())
    tokenizer = load_tokenizer()
    text = tokenizer.decode(example.input_ids.tolist())
    assert text.index("[USER]") < text.index("[DOC_1]") < text.index("[ASST]") and "[QUERY]" not in text
