"""refrag.infer: generation with a hybrid cache (KV for attention blocks, conv + SSM state for Mamba).

Public API::

    from refrag.infer import Engine, HybridCache, sample_next_token

    engine = Engine(model, tokenizer=None)
    outputs = engine.generate(
        prompt_ids,                 # list[list[int]], prompts may differ in length
        max_new_tokens=64,
        temperature=0.0,            # 0 = greedy; > 0 samples
        top_p=1.0,                  # nucleus sampling when temperature > 0
        seed=None,                  # seeds a torch.Generator: same seed, same samples
        stop_token_ids=(),          # generation of a prompt ends after it emits one of these
        doc_ids=None,               # optional list[list[int]] per-token doc ids of each prompt
    )                               # -> list[list[int]] generated ids per prompt (stop token included)
    texts = engine.generate_text(["prompt"], max_new_tokens=64)  # needs tokenizer.encode/.decode

Prompts are prefilled together as one packed row (doc_mode semantics as in training) and
decoded in a batch with per-row cache lengths, so results do not depend on the batch.
"""
from refrag.infer.engine import Engine, sample_next_token
from refrag.model.cache import HybridCache

__all__ = ["Engine", "HybridCache", "sample_next_token"]
