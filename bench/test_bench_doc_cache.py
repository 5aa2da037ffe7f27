"""Time to first token of a question over retrieved documents: per-document cache vs full prefill.

Three cases, each against `HybridLM.prefill` of the whole prompt in doc_mode (same logits):

- ``hit`` (documents first: shared prefix (system text), a retrieval block of DOCS documents
  of DOC_LEN tokens, then the question): every document is already cached (the steady state of
  a RAG server), so only the question's tokens run. Goal (issue 8): at least 10x faster than
  full prefill at 10 x 512 tokens.
- ``miss`` (documents first, cold cache): every document is encoded on the way and stored,
  what the first question over new documents pays; the cache's overhead over full prefill.
  The missing documents (equal lengths here) are encoded together, as rows of one forward.
- ``miss_serial``: the same with ``max_batch=1``, one forward per document (the cache's
  path before batching): what batching the misses saves.
- ``question_first`` (shared prefix, question, then the documents; cache warmed by another
  question over the same documents): the key of a document holds every token before its
  block, so a new question misses every document; this is why serving uses documents first.
"""
import pytest
import torch

from bench.common import DEVICE, SMOKE, Case, run_case
from refrag.infer.doc_cache import CachedEngine, DocumentCache
from refrag.model import HybridLM, MambaConfig, preset

DOCS, DOC_LEN = (3, 8) if SMOKE else (10, 512)
PREFIX_LEN, QUESTION_LEN = (5, 4) if SMOKE else (48, 24)
VOCAB = 97 if SMOKE else 4096
PATTERNS = {"hybrid": "T,M" if SMOKE else "T*4+[T,M]*2+M*4", "pure_mamba": "M" if SMOKE else "M*12"}


def build_model(pattern: str) -> HybridLM:
    torch.manual_seed(0)
    if SMOKE:
        config = preset("tiny", vocab_size=VOCAB, block_pattern=pattern, d_model=64, n_head=2,
                        mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16))
    else:
        config = preset("d12", vocab_size=VOCAB, block_pattern=pattern)
    return HybridLM(config).to(DEVICE).eval()


@pytest.mark.parametrize("case", ["hit", "miss", "miss_serial", "question_first"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_time_to_first_token(benchmark, name, case):
    model = build_model(PATTERNS[name])
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prefix, docs = tokens(PREFIX_LEN), [tokens(DOC_LEN) for _ in range(DOCS)]
    question, other_question = tokens(QUESTION_LEN), tokens(QUESTION_LEN)
    block = [k + 1 for k in range(DOCS) for _ in range(DOC_LEN)]
    if case == "question_first":
        segments, warm = [prefix + question, docs, [1]], [prefix + other_question, docs, [1]]
        ids = torch.tensor([prefix + question + sum(docs, []) + [1]], device=DEVICE)
        doc_ids = torch.tensor([[0] * (PREFIX_LEN + QUESTION_LEN) + block + [0]], device=DEVICE)
    else:
        segments = warm = [prefix, docs, question]
        ids = torch.tensor([prefix + sum(docs, []) + question], device=DEVICE)
        doc_ids = torch.tensor([[0] * PREFIX_LEN + block + [0] * QUESTION_LEN], device=DEVICE)
    engine = CachedEngine(model, DocumentCache(max_bytes=8 << 30), model_version="bench",
                          max_batch=1 if case == "miss_serial" else 64)
    engine.prefill(warm)  # encodes and caches every document (for "question_first": of another question)

    def cold():
        engine.cache.clear()
        return engine.prefill(segments)

    ours = {"hit": lambda: engine.prefill(segments), "miss": cold, "miss_serial": cold}.get(case)
    if case == "question_first":
        stats = engine.cache.stats
        misses = stats.misses
        engine.prefill(segments)
        assert stats.misses - misses == DOCS  # a new question before the documents misses all of them
        ours = cold  # = what every new question costs: each of its documents is encoded again
    full = Case(lambda: model.prefill(ids, doc_ids))
    benchmark.group = "doc-cache-ttft"
    run_case(benchmark, Case(ours), {"full_prefill": full}, tokens=ids.shape[1], op="doc_cache_ttft", model=name,
             case=case, block_pattern=PATTERNS[name], docs=DOCS, doc_len=DOC_LEN, prompt_tokens=ids.shape[1],
             cache_bytes=engine.cache.nbytes)
    torch.testing.assert_close(engine.prefill(segments)[0], model.prefill(ids, doc_ids)[0],
                               atol=5e-3 if DEVICE.type == "cuda" else 1e-4, rtol=5e-3)
