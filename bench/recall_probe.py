"""Associative-recall probe (MQAR, Arora et al. 2023): how fast does a HybridLM learn to copy?

Each example is ``[BOS] k1 v1 ... kP vP [SEP] q(k_i) f... v_i ...``: P random key/value pairs
(split over documents of a packed DocLayout), then the keys again in random order, each
followed by `fill` filler tokens and then its value, which is the only supervised token.
``--remap`` asks with a different token than the key (q(k) = k + 2200: the model has to learn
the query/key map). The printed accuracy is the share of values predicted exactly.

This is the diagnostic behind the demo's `key_conv`: copying "the token after an earlier
match" is one attention layer's job when keys carry their predecessor, and a long plateau
otherwise. Example::

    python -m bench.recall_probe --key-conv 0 --steps 500     # tied embeddings, plain keys
    python -m bench.recall_probe --key-conv 2 --steps 500     # smeared keys
    python -m bench.recall_probe --key-conv 3 --remap --fill 2
"""
from __future__ import annotations

import argparse
import time

import torch

from refrag_kernels import DocLayout
import refrag_kernels
from refrag.model import HybridLM, preset

VOCAB, KEYS, VALUES, FILLERS = 4096, (100, 1100), (1100, 2100), 3


def example(pairs: int, docs: int, fill: int, remap: bool, gen: torch.Generator):
    """(ids, targets, document spans) of one probe example."""
    keys = torch.randperm(KEYS[1] - KEYS[0], generator=gen)[:pairs] + KEYS[0]
    values = torch.randint(*VALUES, (pairs,), generator=gen)
    order = torch.randperm(pairs, generator=gen)
    asked = keys[order] + (2200 if remap else 0)
    fillers = [torch.full((pairs,), FILLERS + j) for j in range(fill)]
    queries = torch.stack([asked, *fillers, values[order]], dim=-1).flatten()
    ids = torch.cat([torch.tensor([1]), torch.stack([keys, values], -1).flatten(), torch.tensor([2]), queries])
    targets = torch.full_like(ids, -100)
    start, stride = 2 + 2 * pairs, 2 + fill
    targets[start + fill:-1:stride] = ids[start + fill + 1::stride]
    per_doc = 2 * pairs // docs
    spans = [(1 + d * per_doc, 1 + (d + 1) * per_doc) for d in range(docs)] if docs else []
    return ids, targets, spans


def batch(rows: int, **kwargs):
    """One packed row of `rows` examples: ids, targets (1, L) and its DocLayout."""
    examples = [example(**kwargs) for _ in range(rows)]
    ids = torch.cat([e[0] for e in examples])[None]
    targets = torch.cat([e[1] for e in examples])[None]
    return ids, targets, DocLayout.from_examples([(len(e[0]), e[2]) for e in examples])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recall_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--pattern", default="T,M,T,M", help="block pattern of the tiny preset")
    parser.add_argument("--key-conv", type=int, default=2, help="ModelConfig.key_conv (0: off)")
    parser.add_argument("--untied", action="store_true", help="separate input embedding and LM head")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--docs", type=int, default=2, help="documents the pairs are split over (0: none)")
    parser.add_argument("--fill", type=int, default=0, help="filler tokens between a query and its value")
    parser.add_argument("--remap", action="store_true", help="ask with a token other than the key")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rows", type=int, default=8, help="examples per packed batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # CPU: the PyTorch reference ops (the interpreter is far too slow to train); GPU: Triton.
    with refrag_kernels.use_backend("reference" if device == "cpu" else "auto"):
        train_and_probe(args, device)


def train_and_probe(args, device: str) -> None:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = HybridLM(preset("tiny", VOCAB, block_pattern=args.pattern, key_conv=args.key_conv,
                            tie_embeddings=not args.untied)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    shape = dict(pairs=args.pairs, docs=args.docs, fill=args.fill, remap=args.remap, gen=gen)
    started = time.perf_counter()
    for step in range(args.steps + 1):
        ids, targets, layout = batch(args.rows, **shape)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        loss = model(ids.to(device), layout=layout.to(device), targets=targets.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            ids, targets, layout = batch(args.rows, **shape)
            with torch.no_grad():
                predicted = model(ids.to(device), layout=layout.to(device)).argmax(-1).cpu()
            learned = targets != -100
            accuracy = (predicted[learned] == targets[learned]).float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.3f}  recall accuracy {accuracy:.3f}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
