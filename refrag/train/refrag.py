"""REFRAG training: multi-hop SFT on gold-chain traces, then GRPO policy gradient through the loop.

This module holds the configuration, the two-phase driver and the CLI; the loop, the reward and
the data are in `refrag.train.rl`.

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
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from refrag.data import RagTokenizer, load_queries
from refrag.data.answers import QUESTION_TYPES
from refrag.fileio import file_lock
from refrag.model import HybridLM, ModelConfig, preset
from refrag.train import checkpoint as ckpt
from refrag.train.config import TrainConfig, apply_overrides, parse_value, read_config_file, require
from refrag.train.data import kb_source, prepare_tokenizer, retrieval_manager
from refrag.train.rl import multihop_loader, train_rl
from refrag.train.sft import checkpoint_assets, train_sft
from refrag.train.shims import init_distributed, seed_everything


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
    if train_values.get("init_from"):
        raise ValueError("config key init_from is an sft key; fine-tune the transformers checkpoint with "
                         "python -m refrag.train sft --init-from DIR, then start refrag from that run "
                         "(init_checkpoint)")
    valid = sorted({f.name for f in dataclasses.fields(TrainConfig)} - {"max_steps", "init_from"} | set(REFRAG_HELP))
    unknown = sorted(set(train_values) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    return TrainConfig.from_dict(train_values), RefragConfig(**refrag_values)


# ---------------------------------------------------------------------- multi-hop SFT data


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
