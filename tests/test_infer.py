"""Generation: token-by-token decoding equals the full forward; batching, sampling, stop tokens."""
import pytest
import torch

from refrag_kernels import DocLayout
from model_utils import VOCAB, reference_ops_on_cpu, tiny_model, tolerance, triton_ops  # noqa: F401
from refrag.infer import Engine, sample_next_token

PATTERNS = [
    pytest.param("T,T", id="attention"),
    pytest.param("M,M", id="mamba"),
    pytest.param("T,M,T", id="hybrid"),
]
VARIANTS = [
    pytest.param("T,T", {}, id="attention-gqa"),
    pytest.param("M,M", {}, id="mamba"),
    pytest.param("T,M,T", {}, id="hybrid-gqa"),
    pytest.param("M,T", dict(n_kv_head=2, mlp="swiglu", tie_embeddings=True, qk_norm=False), id="hybrid-mha-swiglu"),
    pytest.param("T,M,T", dict(key_conv=2), id="hybrid-key-conv2"),
    pytest.param("T,T", dict(key_conv=4, n_kv_head=2), id="attention-key-conv4"),
]


def _decode_logits(model, prompt, doc_ids, new_tokens, capacity=None):
    """Logits predicting each of new_tokens (and one more), from prefill + steps: (n + 1, V)."""
    device = model.embed.weight.device
    ids = torch.tensor([prompt], device=device)
    docs = None if doc_ids is None else torch.tensor([doc_ids], device=device)
    logits, cache = model.prefill(ids, docs, capacity=capacity)
    steps = [logits]
    for token in new_tokens:
        steps.append(model.step(torch.tensor([token], device=device), cache))
    return torch.cat(steps)


def _forward_logits(model, prompt, doc_ids, new_tokens):
    """Full-sequence logits at the positions that predict the new tokens (and one more)."""
    device = model.embed.weight.device
    ids = torch.tensor([prompt + new_tokens], device=device)
    docs = torch.tensor((doc_ids or [0] * len(prompt)) + [0] * len(new_tokens), device=device)
    layout = DocLayout.from_cu_seqlens(torch.tensor([0, ids.shape[1]], device=device), docs)
    with torch.no_grad():
        logits = model(ids, layout=layout)
    return logits[0, len(prompt) - 1:]


CASES = [
    pytest.param([5, 6, 7, 8, 9, 10, 11], None, id="T7-shared"),
    pytest.param([3], None, id="T1-shorter-than-conv"),
    pytest.param(list(range(1, 14)), [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 0, 0, 0], id="T13-three-docs"),
    pytest.param([4, 9, 2, 7], [0, 1, 1, 2], id="T4-ends-in-doc"),
]


DOC_POSITIONS = [pytest.param("block", id="block-pos"), pytest.param("sequential", id="seq-pos")]


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
@pytest.mark.parametrize("pattern, overrides", VARIANTS)
@pytest.mark.parametrize("prompt, doc_ids", CASES)
def test_decoding_reproduces_full_forward(pattern, overrides, prompt, doc_ids, doc_positions, device):
    model = tiny_model(pattern, device, doc_positions=doc_positions, **overrides)
    generated = Engine(model).generate([prompt], max_new_tokens=9, doc_ids=None if doc_ids is None else [doc_ids])[0]
    assert len(generated) == 9
    decoded = _decode_logits(model, prompt, doc_ids, generated[:-1])  # default capacity: the cache grows
    expected = _forward_logits(model, prompt, doc_ids, generated[:-1])
    torch.testing.assert_close(decoded, expected, **tolerance(device))
    assert decoded.argmax(-1).tolist() == generated


def test_decoding_on_triton_ops_reproduces_full_forward(device, triton_ops):
    """Integration check on the dispatched kernels (interpreter on CPU), hybrid with documents."""
    model = tiny_model("T,M", device)
    prompt, doc_ids, new_tokens = [1, 2, 3, 4, 5, 6], [0, 1, 1, 2, 2, 0], [7, 8, 9]
    decoded = _decode_logits(model, prompt, doc_ids, new_tokens)
    torch.testing.assert_close(decoded, _forward_logits(model, prompt, doc_ids, new_tokens), **tolerance(device))


@pytest.mark.parametrize("doc_positions", DOC_POSITIONS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_batched_prefill_matches_single_prompts(pattern, doc_positions, device):
    model = tiny_model(pattern, device, doc_positions=doc_positions)
    ids = torch.randint(0, VOCAB, (3, 6), device=device)
    docs = torch.tensor([[0, 1, 1, 2, 0, 0], [0] * 6, [1, 1, 2, 2, 2, 2]], device=device)
    logits, cache = model.prefill(ids, docs)
    step = model.step(ids[:, 0], cache)
    for row in range(3):
        single_logits, single_cache = model.prefill(ids[row:row + 1], docs[row:row + 1])
        torch.testing.assert_close(logits[row:row + 1], single_logits, **tolerance(device))
        torch.testing.assert_close(step[row:row + 1], model.step(ids[row:row + 1, 0], single_cache),
                                   **tolerance(device))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_batch_generation_with_different_lengths_equals_per_prompt(pattern, device):
    engine = Engine(tiny_model(pattern, device))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]
    doc_ids = [[0, 1, 1, 1, 2, 2, 0, 0, 0], [0], [0, 0, 1, 1]]
    batched = engine.generate(prompts, max_new_tokens=7, doc_ids=doc_ids)
    single = [engine.generate([p], max_new_tokens=7, doc_ids=[d])[0] for p, d in zip(prompts, doc_ids)]
    assert batched == single


def test_top_p_sampling_is_reproducible_with_a_seed(device):
    engine = Engine(tiny_model("T,M", device))
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.9)
    first = engine.generate(prompts, seed=123, **kwargs)
    assert engine.generate(prompts, seed=123, **kwargs) == first
    assert engine.generate(prompts, seed=124, **kwargs) != first


def test_tiny_top_p_is_greedy(device):
    engine = Engine(tiny_model("T,M", device))
    prompts = [[1, 2, 3], [4, 5]]
    greedy = engine.generate(prompts, max_new_tokens=6)
    assert engine.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_top_p_samples_only_from_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(probs.log(), 1.0, 0.75, generator) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    draws = torch.stack([sample_next_token(probs.log(), 1.0, 1.0, generator) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3, 4}


def test_generation_stops_after_a_stop_token(device):
    engine = Engine(tiny_model("T,M", device))
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    free = engine.generate(prompts, max_new_tokens=8)
    stop = free[0][2]
    stopped = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[stop])
    assert stopped[0] == free[0][:free[0].index(stop) + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_generate_text_round_trips_through_the_tokenizer(device):
    class CharTokenizer:
        def encode(self, text):
            return [ord(c) % VOCAB for c in text]

        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(tiny_model("T,M", device), tokenizer=CharTokenizer())
    texts = engine.generate_text(["hello", "hi"], max_new_tokens=4)
    ids = engine.generate([CharTokenizer().encode("hello"), CharTokenizer().encode("hi")], max_new_tokens=4)
    assert texts == [CharTokenizer().decode(i) for i in ids]
    with pytest.raises(ValueError, match="needs an Engine built with a tokenizer"):
        Engine(engine.model).generate_text(["hi"], max_new_tokens=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(prompt_ids=[]), "prompt_ids is empty", id="no-prompts"),
        pytest.param(dict(prompt_ids=[[1], []]), "prompt 1 is empty", id="empty-prompt"),
        pytest.param(dict(doc_ids=[[0, 0]]), "one id per prompt token", id="doc-ids-length"),
        pytest.param(dict(max_new_tokens=-1), "max_new_tokens", id="negative-budget"),
        pytest.param(dict(temperature=-1.0), "temperature", id="negative-temperature"),
        pytest.param(dict(temperature=1.0, top_p=0.0), "top_p", id="zero-top-p"),
        pytest.param(dict(prompt_ids=[[VOCAB]]), "token ids must lie", id="token-out-of-range"),
    ],
)
def test_generate_rejects_bad_input(kwargs, message, device):
    engine = Engine(tiny_model("T,M", device))
    args = dict(prompt_ids=[[1, 2, 3]], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        engine.generate(**args)


def test_step_rejects_a_token_count_that_does_not_match_the_cache(device):
    model = tiny_model("T,M", device)
    _, cache = model.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]], device=device))
    with pytest.raises(ValueError, match="one per cache row"):
        model.step(torch.tensor([1], device=device), cache)


def test_timings_add_prefill_and_decode_seconds(device):
    """generate(timings=...) adds each call's prefill (time to first token) and decode seconds."""
    model = tiny_model("T,M", device)
    timings = {"decode_seconds": 1.0}
    Engine(model).generate([[1, 2, 3]], 4, timings=timings)
    first = dict(timings)
    assert first["prefill_seconds"] > 0 and first["decode_seconds"] > 1.0
    Engine(model).generate([[1, 2]], 1, timings=timings)  # one token: sampled from the prefill logits
    assert timings["prefill_seconds"] > first["prefill_seconds"]
