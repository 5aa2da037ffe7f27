"""Batch generation with a HybridLM: packed prefill, batched decode, greedy and top-p sampling."""
from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch

from refrag_kernels import DocLayout
from refrag.model import HybridLM


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (b, vocab) -> (b,) int64.

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature) restricted to
    the smallest set of most likely tokens whose probability reaches top_p (nucleus), then
    sampled with `generator` (seeded generator, reproducible draws).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # multinomial renormalizes
    return order.gather(-1, choice).squeeze(-1)


class Engine:
    """Generation front end of a HybridLM (optionally with a tokenizer exposing encode / decode)."""

    def __init__(self, model: HybridLM, tokenizer=None):
        if not isinstance(model, HybridLM):
            raise ValueError(f"model must be a HybridLM, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @torch.inference_mode()  # generation only reads weights: no autograd bookkeeping (~15% per CPU decode step)
    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 doc_ids: Sequence[Sequence[int]] | None = None, timings: dict | None = None) -> list[list[int]]:
        """Generate up to max_new_tokens after each prompt; returns the new ids per prompt.

        prompt_ids: list of non-empty token lists (any lengths). doc_ids: optional per-token
        document ids of each prompt (0 shared, k >= 1 document k; doc_mode as in training).
        A prompt stops after emitting a token of stop_token_ids (kept in its output).
        All prompts are prefilled in one packed row and decoded together, each row with its
        own cache length, so a prompt's greedy output does not depend on its batch.
        timings: a dict to which the call adds its wall seconds under "prefill_seconds" (up to
        the first tokens' logits: the time to first token) and "decode_seconds" (the rest).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        input_ids, layout = self._pack(prompt_ids, doc_ids)
        outputs = [[] for _ in prompt_ids]
        if max_new_tokens == 0:
            return outputs
        with timed(timings, "prefill_seconds"):
            logits, cache = self.model.prefill_packed(input_ids, layout, capacity=layout.max_seqlen + max_new_tokens)
        with timed(timings, "decode_seconds"):
            return decode_loop(self.model, logits, cache, max_new_tokens, temperature, top_p, seed, stop_token_ids)

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
        """Text in, text out: `generate` on tokenizer.encode(prompt), decoded with tokenizer.decode."""
        if self.tokenizer is None:
            raise ValueError("generate_text needs an Engine built with a tokenizer")
        prompt_ids = [self.tokenizer.encode(p) for p in prompts]
        outputs = self.generate(prompt_ids, max_new_tokens, **kwargs)
        return [self.tokenizer.decode(ids) for ids in outputs]

    def _pack(self, prompt_ids, doc_ids) -> tuple[torch.Tensor, DocLayout]:
        """Concatenate prompts into one row (1, L) and its layout (one example per prompt)."""
        prompts = [list(p) for p in prompt_ids]
        if not prompts:
            raise ValueError("prompt_ids is empty; pass at least one prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=self.device)
        docs = None
        if doc_ids is not None:
            docs_per_prompt = [list(d) for d in doc_ids]
            if [len(d) for d in docs_per_prompt] != [len(p) for p in prompts]:
                raise ValueError("doc_ids must give one id per prompt token, for every prompt")
            docs = torch.tensor([d for row in docs_per_prompt for d in row], dtype=torch.int32, device=self.device)
        return flat[None], DocLayout.from_cu_seqlens(cu_seqlens, docs)


@contextlib.contextmanager
def timed(timings: dict | None, key: str):
    """Add the block's wall seconds to timings[key] (nothing when timings is None)."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def decode_loop(model, logits: torch.Tensor, cache, max_new_tokens: int, temperature: float, top_p: float,
                seed, stop_token_ids, on_finish=None) -> list[list[int]]:
    """Sample from prefill `logits` (b, V), then step `model` on `cache` until every row hit a stop
    token or `max_new_tokens` were generated; returns the generated ids per row (stop token included).

    on_finish(row, output, cache): called once per row when it is done (stop token or last
    step), before any further step: the cache's row `row` then holds exactly the prompt and
    output[:-1] (the last sampled token is never fed), e.g. to keep that state for the next turn.
    """
    generator = None if seed is None else torch.Generator(device=logits.device).manual_seed(seed)
    stops = {int(t) for t in stop_token_ids}
    outputs: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = [False] * len(outputs)
    for step in range(max_new_tokens):
        tokens = sample_next_token(logits, temperature, top_p, generator)
        last = step == max_new_tokens - 1
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token in stops
                if on_finish is not None and (done[row] or last):
                    on_finish(row, outputs[row], cache)
        if all(done) or last:
            break
        logits = model.step(tokens, cache)
    return outputs
