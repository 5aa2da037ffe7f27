"""REFRAG training: multi-hop SFT on gold-chain traces, then GRPO policy gradient through the loop.

``python -m refrag.train refrag --config FILE.json [--key value ...]`` (`main_refrag`) runs

1. **Multi-hop SFT** (``sft_steps`` > 0): every question of the train split becomes a
   conversation in the multi-hop format of `refrag.infer.multihop` with teacher queries from
   the gold chain. A two-hop question: hop 1 retrieves with the question (gold document 1
   ensured), the assistant emits the hop-2 query of the record, hop 2 retrieves with it (gold
   document 2 ensured), the assistant answers. Other questions are one hop then the answer
   (unanswerable ones "I don't know"), so the model also learns when to stop asking. Packed
   and trained with the SFT loop of `refrag.train.sft` (checkpoints and resume under
   ``<out_dir>/sft``).
2. **Policy gradient** (``rl_steps`` > 0): per step ``questions_per_step`` questions, each
   run ``group_size`` times through the multi-hop loop with top-p sampling. Reward
   (`refrag_reward`) = 0.6 answer + 0.3 relevance + 0.1 efficiency:

   - answer: token F1 of the final answer against the gold answer; for an unanswerable
     question 1 iff the model abstains ("I don't know"); 0 without a final answer;
   - relevance: fraction of the question's gold document ids among all retrieved documents
     (1 when the question has no gold documents: nothing to find);
   - efficiency: ``1 - (hops - 1) / max_hops`` for a trajectory that ends with an answer or an
     abstention, 0 otherwise (truncated, empty, out of hops).

   Advantages are group-normalized, ``(r - mean_group) / (std_group + 1e-6)`` (population
   std). Loss per step, over the N = questions x group trajectories::

       L = -(1/N) sum_i A_i sum_{t in gen_i} log p(y_t)  +  beta (1/N) sum_i sum_{t in gen_i} k3_t
       k3_t = exp(l_ref - l) - (l_ref - l) - 1      (per-token KL estimate to the frozen SFT model)

   where gen_i are the tokens the model generated (queries and answer; prompts and retrieved
   documents are masked). One JSON line per step goes to ``<out_dir>/rl/metrics.jsonl``:
   loss, mean reward and its three components, mean hops, answer F1, EM, abstention rate,
   answered / truncated rates, KL, grad norm. The final policy is saved to
   ``<out_dir>/rl/checkpoints`` (readable by `refrag.eval.evaluate.load_trained_model`). The RL
   phase runs in one process and restarts from its initial model when re-run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from kernels import DocLayout
from refrag.data import RagTokenizer, load_queries, pack_examples, refrag_conversation, render_conversations
from refrag.data.conversations import gold_documents, with_gold
from refrag.data.loader import PackedLoader
from refrag.data.answers import QUESTION_TYPES, exact_match, token_f1
from refrag.fileio import dumps_line, file_lock
from refrag.infer import Engine
from refrag.infer.multihop import ABSTAINED, ANSWERED, TRUNCATED, MultiHopTrace, run_multihop
from refrag.model import HybridLM, ModelConfig, preset
from refrag.train import checkpoint as ckpt
from refrag.train.config import TrainConfig, apply_overrides, parse_value, read_config_file, require
from refrag.train.data import kb_source, prepare_tokenizer, retrieval_manager
from refrag.train.optim import parameter_groups
from refrag.train.sft import checkpoint_assets, train_sft
from refrag.train.shims import DistEnv, autocast, init_distributed, nvtx_range, seed_everything

REWARD_WEIGHTS = {"answer": 0.6, "relevance": 0.3, "efficiency": 0.1}
ADVANTAGE_EPS = 1e-6

REFRAG_HELP = {
    "sft_steps": "multi-hop SFT optimizer steps (0 skips the phase)",
    "init_checkpoint": "checkpoint to start from (e.g. an SFT-RAG run); empty: a fresh model from the preset",
    "rl_steps": "policy-gradient steps (0 skips the phase)",
    "questions_per_step": "questions per policy-gradient step",
    "group_size": "sampled trajectories per question (GRPO group)",
    "max_hops": "retrievals per question at most (>= 1)",
    "max_new_tokens": "tokens per model turn at most",
    "temperature": "sampling temperature of RL trajectories",
    "top_p": "nucleus sampling mass of RL trajectories",
    "kl_beta": "weight of the per-token k3 KL penalty to the frozen SFT model (0 disables it)",
    "rl_lr": "AdamW learning rate of the policy-gradient phase (constant)",
    "question_types": "comma-separated question types used by both phases",
}


@dataclass
class RefragConfig:
    """REFRAG-specific settings (see REFRAG_HELP); the rest of a run's settings is a TrainConfig."""

    sft_steps: int = 200
    init_checkpoint: str = ""
    rl_steps: int = 50
    questions_per_step: int = 4
    group_size: int = 4
    max_hops: int = 3
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.95
    kl_beta: float = 0.02
    rl_lr: float = 1e-4
    question_types: str = "single_hop,two_hop,unanswerable"

    def __post_init__(self):
        for name in ("sft_steps", "rl_steps"):
            require(name, getattr(self, name), int, minimum=0)
        for name in ("questions_per_step", "max_hops", "max_new_tokens"):
            require(name, getattr(self, name), int, minimum=1)
        require("group_size", self.group_size, int, minimum=2)  # GRPO advantages of a group of 1 are all 0
        for name in ("temperature", "kl_beta", "rl_lr"):
            require(name, getattr(self, name), float, minimum=0)
        require("top_p", self.top_p, float, above=0, maximum=1)
        unknown = [t for t in self.types if t not in QUESTION_TYPES]
        if unknown or not self.types:
            raise ValueError(f"config key question_types: unknown type(s) {unknown}; choose from {QUESTION_TYPES}")

    @property
    def types(self) -> list[str]:
        return [t.strip() for t in self.question_types.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_refrag_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> tuple[TrainConfig, RefragConfig]:
    """(TrainConfig, RefragConfig) from one flat JSON object plus ``--key value`` string overrides.

    REFRAG keys (REFRAG_HELP) go to RefragConfig, every other key to TrainConfig; an unknown
    key raises ValueError naming it. ``max_steps`` is refused: use sft_steps and rl_steps.
    """
    values = read_config_file(path)
    refrag_values = {k: values.pop(k) for k in list(values) if k in REFRAG_HELP}
    train_overrides = {}
    for key, raw in (overrides or {}).items():
        if key in REFRAG_HELP:
            refrag_values[key] = raw if key in ("init_checkpoint", "question_types") else parse_value(raw, key)
        else:
            train_overrides[key] = raw
    train_values = apply_overrides(values, train_overrides)
    if "max_steps" in train_values:
        raise ValueError("config key max_steps is not used by refrag; set sft_steps and rl_steps")
    valid = sorted({f.name for f in dataclasses.fields(TrainConfig)} - {"max_steps"} | set(REFRAG_HELP))
    unknown = sorted(set(train_values) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    return TrainConfig.from_dict(train_values), RefragConfig(**refrag_values)


# ---------------------------------------------------------------------- multi-hop SFT data


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


def prompt_format(cfg: TrainConfig, rcfg: RefragConfig) -> dict:
    """How a REFRAG model's prompts were rendered (stored in its checkpoint; evaluation reuses it)."""
    return {"multihop": True, "question_first": cfg.question_first, "max_doc_tokens": cfg.max_doc_tokens}


def initial_model(cfg: TrainConfig, rcfg: RefragConfig, tokenizer: RagTokenizer) -> HybridLM:
    """Model from rcfg.init_checkpoint when set, else a fresh preset model."""
    if not rcfg.init_checkpoint:
        return HybridLM(preset(cfg.preset, vocab_size=tokenizer.vocab_size, **cfg.model))
    path = ckpt.latest_checkpoint(rcfg.init_checkpoint) or rcfg.init_checkpoint
    state = ckpt.load_checkpoint(path)
    config = ModelConfig.from_dict(state["config"]["model"])
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"init_checkpoint {path} has vocab_size {config.vocab_size} but the tokenizer "
                         f"{cfg.tokenizer} has {tokenizer.vocab_size}")
    model = HybridLM(config)
    model.load_state_dict(state["model"])
    return model


def run_refrag(cfg: TrainConfig, rcfg: RefragConfig, resume: bool = True) -> dict:
    """Both phases from configs; returns {"sft": records, "rl": records, "checkpoint": path or None}.
    Holds ``<out_dir>/.run.lock``: a second run with the same out_dir fails at once."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / ".run.lock", blocking=False, what=f"refrag out_dir {out_dir}"):
        return _run_refrag(cfg, rcfg, resume)


def _run_refrag(cfg: TrainConfig, rcfg: RefragConfig, resume: bool) -> dict:
    env = init_distributed(cfg.device)
    if env.world_size > 1:
        raise ValueError("refrag training runs in one process (launch without torchrun)")
    seed_everything(cfg.seed)
    tokenizer = prepare_tokenizer(cfg, env)
    manager = retrieval_manager(cfg)
    records = [r for r in load_queries("train", kb_source(cfg)) if r["type"] in rcfg.types]
    model = initial_model(cfg, rcfg, tokenizer)
    out_dir = Path(cfg.out_dir)
    result = {"sft": [], "rl": [], "checkpoint": None}
    if rcfg.sft_steps:
        sft_cfg = dataclasses.replace(cfg, max_steps=rcfg.sft_steps, out_dir=str(out_dir / "sft"))
        loader = multihop_loader(records, sft_cfg, rcfg, tokenizer, manager, env)
        result["sft"] = train_sft(sft_cfg, model, loader, None, env=env, model_config=model.config.to_dict(),
                                  resume=resume)
    if rcfg.rl_steps:
        result["rl"] = train_rl(model, tokenizer, manager, records, cfg, rcfg, device=env.device,
                                out_dir=out_dir / "rl")
        result["checkpoint"] = ckpt.save_checkpoint(
            out_dir / "rl" / "checkpoints", rcfg.rl_steps, model_state=model.state_dict(), optimizer_state={},
            trainer_state={"step": rcfg.rl_steps},
            config={"train": cfg.to_dict(), "model": model.config.to_dict(), "refrag": rcfg.to_dict(),
                    "prompt": prompt_format(cfg, rcfg)}, files=checkpoint_assets(cfg))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m refrag.train refrag",
        description="REFRAG: multi-hop SFT on gold-chain traces, then GRPO through the multi-hop loop. "
                    "Besides the flags below every TrainConfig key is a flag (--top_k 5, --model.block_pattern "
                    "T,M), except max_steps.")
    parser.add_argument("--config", help="flat JSON config (TrainConfig and REFRAG keys); flags override it")
    parser.add_argument("--no-resume", action="store_true", help="start the SFT phase fresh")
    group = parser.add_argument_group("refrag")
    defaults = RefragConfig().to_dict()
    for key, text in REFRAG_HELP.items():
        group.add_argument(f"--{key}", default=None, metavar="VALUE", help=f"{text} (default {defaults[key]!r})")
    return parser


def main_refrag(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m refrag.train refrag``; argv without the subcommand name."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = {k: v for k, v in vars(args).items() if k in REFRAG_HELP and v is not None}
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or not rest:
            parser.error(f"expected --key VALUE pairs, got {flag!r}")
        overrides[flag[2:]] = rest.pop(0)
    try:
        cfg, rcfg = load_refrag_config(args.config, overrides)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    return run_refrag(cfg, rcfg, resume=not args.no_resume)
