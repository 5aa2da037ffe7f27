"""CLI: python -m refrag.train sft --config FILE.json [--key value ...]
     python -m refrag.train sft --init-from HF_DIR [--key value ...]      (fine-tune a transformers Mamba2 or Bamba)
     python -m refrag.train refrag --config FILE.json [--key value ...]   (multi-hop SFT + RL, refrag.train.refrag)

Every config key (refrag.train.config.TrainConfig) is a flag, grouped below; flags override
the file. Model fields override the preset with ``--model.<field> value`` (e.g.
``--model.block_pattern T,M,M,M``). Multi-GPU / multi-node: launch with torchrun, e.g.
``torchrun --standalone --nproc_per_node=8 -m refrag.train sft --config refrag/train/configs/d20.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from refrag.model import HybridLM, preset
from refrag.model.hf_import import import_transformers, transformers_config
from refrag.train.config import GROUPS, HELP, TrainConfig, load_config
from refrag.train.data import build_loaders, init_tokenizer, prepare_tokenizer, retrieval_manager
from refrag.train.sft import train_sft
from refrag.train.shims import init_distributed, seed_everything


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refrag.train", description="Thin RAG fine-tuning loop.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("refrag", help="multi-hop SFT then GRPO policy-gradient RL (flags: python -m refrag.train refrag -h)")
    sft = sub.add_parser("sft", help="supervised RAG fine-tuning on packed conversations",
                         description="Supervised RAG fine-tuning. Unknown flags are config errors.")
    sft.add_argument("--config", help="JSON config file (keys of TrainConfig); flags override it")
    sft.add_argument("--no-resume", action="store_true", help="start fresh even if out_dir has checkpoints")
    defaults = TrainConfig().to_dict()
    for group, keys in GROUPS.items():
        flags = sft.add_argument_group(group)
        for key in keys:
            names = [f"--{key}"] + (["--init-from"] if key == "init_from" else [])  # the documented spelling
            flags.add_argument(*names, dest=key, default=None, metavar="VALUE",
                               help=f"{HELP[key]} (default {defaults[key]!r})")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parsed arguments and the config overrides, including ``--model.<field> value`` pairs."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("command", "config", "no_resume") and value is not None}
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--model.") or not rest:
            parser.error(f"unknown config key or flag {flag!r} (model fields: --model.<field> VALUE)")
        overrides[flag[2:]] = rest.pop(0)
    return args, overrides


def run_sft(cfg: TrainConfig, resume: bool = True) -> list[dict]:
    """Build tokenizer, data and model from `cfg` and train; returns this process's step records."""
    try:  # before the tokenizer and data: an unusable out_dir must not cost a tokenizer training
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"config key out_dir: cannot create {cfg.out_dir} ({err.strerror})") from None
    env = init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        if cfg.init_from:  # a transformers checkpoint: its config and weights, its tokenizer when it has one
            hf_config = transformers_config(cfg.init_from, cfg.model)
            tokenizer, cfg = init_tokenizer(cfg, env, hf_config.vocab_size)
            model = import_transformers(cfg.init_from, cfg.model,
                                        vocab_size=max(tokenizer.vocab_size, hf_config.vocab_size))
        else:
            tokenizer = prepare_tokenizer(cfg, env)
            model = HybridLM(preset(cfg.preset, vocab_size=tokenizer.vocab_size, **cfg.model))
        train_loader, val_loader = build_loaders(cfg, tokenizer, retrieval_manager(cfg), env)
        return train_sft(cfg, model, train_loader, val_loader, env=env, model_config=model.config.to_dict(),
                         resume=resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["refrag"]:
        from refrag.train.refrag import main_refrag

        main_refrag(argv[1:])
        return
    args, overrides = parse_args(argv)
    try:
        run_sft(load_config(args.config, overrides), resume=not args.no_resume)
    except ValueError as err:  # bad config, model pattern, KB or checkpoint: the message names it
        build_parser().exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
