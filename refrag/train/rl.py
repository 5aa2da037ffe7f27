"""REFRAG's training loop and data: multi-hop SFT conversations from gold chains, the reward, group
advantages and the GRPO policy loss through `refrag.infer.multihop` (``train_rl``).

Configuration, the two-phase driver and the CLI are in `refrag.train.refrag` (its docstring
describes the method: data, reward, advantages, loss, metrics).
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from tqdm import tqdm

from refrag_kernels import DocLayout
from refrag.data import RagTokenizer, pack_examples, refrag_conversation, render_conversations
from refrag.data.answers import exact_match, token_f1
from refrag.data.conversations import gold_documents, with_gold
from refrag.data.loader import PackedLoader
from refrag.fileio import dumps_line
from refrag.infer import Engine
from refrag.infer.multihop import ABSTAINED, ANSWERED, TRUNCATED, MultiHopTrace, run_multihop
from refrag.model import HybridLM
from refrag.train.config import TrainConfig
from refrag.train.optim import parameter_groups
from refrag.train.shims import DistEnv, autocast, nvtx_range

if TYPE_CHECKING:
    from refrag.train.refrag import RefragConfig

REWARD_WEIGHTS = {"answer": 0.6, "relevance": 0.3, "efficiency": 0.1}
ADVANTAGE_EPS = 1e-6

def multihop_conversations(records: Sequence[dict], manager, top_k: int, seed: int,
                           question_first: bool = True) -> list[dict]:
    """Teacher-forced multi-hop conversations (gold documents ensured in every hop's list).

    Two-hop records: hop 1 queries the question, hop 2 the record's second hop query.
    Other records: one hop with the question, then the answer. question_first: the layout
    (`refrag.data.refrag_conversation`; False puts hop 1's documents before the question).
    """
    conversations = []
    for rec in records:
        rng = random.Random(f"{seed}:{rec['id']}")
        if rec["type"] == "two_hop":
            queries = [rec["question"]] + [h["query"] for h in rec["hops"][1:]]
            golds = [[h["doc_id"]] for h in rec["hops"]]
        else:
            queries, golds = [rec["question"]], [rec["gold_doc_ids"]]
        found = manager.retrieve_many(queries, top_k)
        hops = [(q, with_gold(docs, gold_documents(manager, g), rng)) for q, docs, g in zip(queries, found, golds)]
        conv = refrag_conversation(rec["question"], rec["answer"], hops, question_first=question_first)
        conv["metadata"] = {"id": rec["id"], "type": rec["type"], "gold_doc_ids": rec["gold_doc_ids"]}
        conversations.append(conv)
    return conversations


def multihop_loader(records: Sequence[dict], cfg: TrainConfig, rcfg: RefragConfig, tokenizer: RagTokenizer,
                    manager, env: DistEnv) -> PackedLoader:
    """PackedLoader over the records' multi-hop conversations packed into cfg.seq_len rows."""
    conversations = multihop_conversations(records, manager, cfg.top_k, cfg.seed, cfg.question_first)
    examples, _ = render_conversations(conversations, tokenizer, max_len=cfg.seq_len,
                                       max_doc_tokens=cfg.max_doc_tokens)
    if not examples:
        raise ValueError(f"no multi-hop example fits seq_len={cfg.seq_len}")
    rows = pack_examples(examples, cfg.seq_len, tokenizer.pad_id)
    return PackedLoader(rows, cfg.batch_size, rank=env.rank, world_size=env.world_size, seed=cfg.seed)


# ---------------------------------------------------------------------- reward and advantages


@dataclass
class Reward:
    """Total reward and its components, each in [0, 1]."""

    total: float
    answer: float
    relevance: float
    efficiency: float


def refrag_reward(trace: MultiHopTrace, record: dict, max_hops: int) -> Reward:
    """Reward of one trajectory for a query record {answer, gold_doc_ids} (definitions in the module doc)."""
    finished = trace.status in (ANSWERED, ABSTAINED)
    answer = token_f1(trace.answer, record["answer"]) if finished else 0.0
    gold = set(record["gold_doc_ids"])
    relevance = len(gold & set(trace.retrieved_doc_ids)) / len(gold) if gold else 1.0
    efficiency = 1.0 - (trace.num_hops - 1) / max_hops if finished else 0.0
    w = REWARD_WEIGHTS
    total = w["answer"] * answer + w["relevance"] * relevance + w["efficiency"] * efficiency
    return Reward(total, answer, relevance, efficiency)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO advantages: rewards (G * k,) in consecutive groups of group_size -> (r - mean) / (std + eps)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, correction=0, keepdim=True)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).view(-1)


# ---------------------------------------------------------------------- policy loss


def generated_logprobs(model: HybridLM, traces: Sequence[MultiHopTrace], device: torch.device,
                       bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every generated token of the traces, in one packed forward.

    Returns logp (M,) fp32 (with grad when enabled) and owner (M,) int64, the trace of each
    token. Only tokens with generated_mask 1 are scored; the LM head runs on their
    predecessors' hidden states only (no (L, vocab) logits).
    """
    lengths = [len(t.input_ids) for t in traces]
    if min(lengths) < 2:
        raise ValueError("every trace needs a prompt and at least one generated token")
    ids = torch.tensor([i for t in traces for i in t.input_ids], dtype=torch.int64, device=device)
    docs = torch.tensor([d for t in traces for d in t.doc_ids], dtype=torch.int32, device=device)
    mask = torch.tensor([g for t in traces for g in t.generated_mask], dtype=torch.bool, device=device)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    layout = DocLayout.from_cu_seqlens(cu_seqlens, docs)
    mask[cu_seqlens[:-1].long()] = False  # a row's first token has no predecessor
    positions = mask.nonzero().flatten()
    with autocast(device, bf16):
        hidden = model.hidden_states(ids[None], layout)[0]
        logits = model.lm_head(hidden[positions - 1]).float()  # (M, vocab)
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[positions, None])[:, 0]
    return logp, layout.seq_idx[positions].long()


def policy_loss(model: HybridLM, traces: Sequence[MultiHopTrace], advantages: torch.Tensor, *,
                ref_model: HybridLM | None = None, kl_beta: float = 0.0, bf16: bool = True) -> tuple[torch.Tensor, float]:
    """GRPO loss of the module doc; returns (loss, mean per-token KL estimate (0 without a ref model))."""
    device = model.embed.weight.device
    if advantages.shape != (len(traces),):
        raise ValueError(f"advantages must have one entry per trace ({len(traces)}), got {tuple(advantages.shape)}")
    logp, owner = generated_logprobs(model, traces, device, bf16)
    n = len(traces)
    loss = -(advantages.to(device)[owner] * logp).sum() / n
    kl = 0.0
    if ref_model is not None and kl_beta > 0:
        with torch.no_grad():
            ref_logp, _ = generated_logprobs(ref_model, traces, device, bf16)
        log_ratio = ref_logp - logp
        k3 = log_ratio.exp() - log_ratio - 1
        loss = loss + kl_beta * k3.sum() / n
        kl = k3.mean().item()
    return loss, kl


# ---------------------------------------------------------------------- RL loop


def step_metrics(traces: Sequence[MultiHopTrace], records: Sequence[dict], rewards: Sequence[Reward]) -> dict:
    """Means over a step's trajectories: reward and components, hops, answer quality, outcomes."""
    n = len(traces)
    answers = [t.answer or "" for t in traces]
    return {
        "reward": sum(r.total for r in rewards) / n,
        "reward_answer": sum(r.answer for r in rewards) / n,
        "reward_relevance": sum(r.relevance for r in rewards) / n,
        "reward_efficiency": sum(r.efficiency for r in rewards) / n,
        "hops": sum(t.num_hops for t in traces) / n,
        "answer_f1": sum(token_f1(a, r["answer"]) for a, r in zip(answers, records)) / n,
        "em": sum(exact_match(a, r["answer"]) for a, r in zip(answers, records)) / n,
        "abstention_rate": sum(t.status == ABSTAINED for t in traces) / n,
        "answered_rate": sum(t.status == ANSWERED for t in traces) / n,
        "truncated_rate": sum(t.status == TRUNCATED for t in traces) / n,
    }


def train_rl(model: HybridLM, tokenizer: RagTokenizer, retriever, records: Sequence[dict], cfg: TrainConfig,
             rcfg: RefragConfig, *, device: torch.device, out_dir: str | Path, generator=None) -> list[dict]:
    """Policy-gradient phase: ``rcfg.rl_steps`` GRPO steps; returns the per-step metric records.

    generator: the sampler of trajectories (default `Engine(model)`; tests pass scripted fakes).
    The KL reference is a frozen copy of `model` as it is on entry.
    """
    if not records:
        raise ValueError("train_rl needs at least one question record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if rcfg.kl_beta > 0 else None
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=rcfg.rl_lr,
                                  betas=(cfg.beta1, cfg.beta2))
    generator = generator or Engine(model, tokenizer)
    rng = random.Random(cfg.seed)
    history = []
    with open(out_dir / "metrics.jsonl", "a") as log:
        for step in tqdm(range(1, rcfg.rl_steps + 1), desc="refrag-rl", dynamic_ncols=True):
            t0 = time.perf_counter()
            batch = [rec for rec in rng.sample(list(records), min(rcfg.questions_per_step, len(records)))
                     for _ in range(rcfg.group_size)]
            model.eval()
            with nvtx_range("rollout", device):
                traces = run_multihop(generator, tokenizer, retriever, [r["question"] for r in batch],
                                      max_hops=rcfg.max_hops, top_k=cfg.top_k, max_new_tokens=rcfg.max_new_tokens,
                                      temperature=rcfg.temperature, top_p=rcfg.top_p, seed=cfg.seed + step,
                                      max_doc_tokens=cfg.max_doc_tokens, question_first=cfg.question_first)
            model.train()
            rewards = [refrag_reward(t, r, rcfg.max_hops) for t, r in zip(traces, batch)]
            advantages = group_advantages(torch.tensor([r.total for r in rewards]), rcfg.group_size)
            with nvtx_range("policy_gradient", device):
                loss, kl = policy_loss(model, traces, advantages, ref_model=ref_model, kl_beta=rcfg.kl_beta,
                                       bf16=cfg.bf16)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                if torch.isfinite(loss) and torch.isfinite(grad_norm):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            record = {"step": step, "loss": loss.item(), "kl": kl, "grad_norm": float(grad_norm),
                      **step_metrics(traces, batch, rewards), "seconds": time.perf_counter() - t0}
            history.append(record)
            log.write(dumps_line(record, allow_nan=True))
            log.flush()
    return history


# ---------------------------------------------------------------------- CLI
