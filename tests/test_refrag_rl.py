"""REFRAG training: reward, GRPO advantages, policy-gradient step, the RL loop, multi-hop SFT data, config."""
from __future__ import annotations

import json

import pytest
import torch

import refrag.train.rl as rl
from refrag.train.refrag import RefragConfig, load_refrag_config, main_refrag
from refrag.data import load_tokenizer, render_conversation, validate_conversation
from refrag.infer.multihop import ABSTAINED, ANSWERED, TRUNCATED, MultiHopTrace
from refrag.model import HybridLM, MambaConfig, ModelConfig
from refrag.train.config import TrainConfig
from test_multihop import FakeRetriever, ScriptedGenerator, doc

TWO_HOP = {"id": "q1", "question": "Where was the inventor of the Folding Sextant born?", "answer": "Pulbys",
           "type": "two_hop", "gold_doc_ids": ["invention-010", "person-116"],
           "hops": [{"query": "Who invented the Folding Sextant?", "doc_id": "invention-010", "answer": "Synstyl"},
                    {"query": "In which city was Synstyl Merkstesk born?", "doc_id": "person-116",
                     "answer": "Pulbys"}]}
UNANSWERABLE = {"id": "q2", "question": "In which country is Lethgrerk?", "answer": "I don't know",
                "type": "unanswerable", "gold_doc_ids": []}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tiny_policy(vocab: int, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, d_model=64, n_layer=1, block_pattern="T", n_head=2,
                         mamba=MambaConfig(d_state=16, headdim=32, chunk_size=16))
    model = HybridLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def trace(status: str, answer: str | None, doc_ids: list[list[str]]) -> MultiHopTrace:
    t = MultiHopTrace("q", [], answer=answer, status=status)
    t.hops = [{"hop": k + 1, "query": "q", "doc_ids": ids} for k, ids in enumerate(doc_ids)]
    return t


@pytest.mark.parametrize("t, record, expected", [
    pytest.param(trace(ANSWERED, "Pulbys", [["invention-010"], ["person-116"]]), TWO_HOP,
                 0.6 + 0.3 + 0.1 * (1 - 1 / 3), id="two-hop-perfect"),
    pytest.param(trace(ANSWERED, "Pulbys", [["invention-010", "x"]]), TWO_HOP, 0.6 + 0.3 * 0.5 + 0.1,
                 id="one-hop-half-relevant"),
    pytest.param(trace(ANSWERED, "Pulbys port", [["person-116"]]), TWO_HOP, 0.6 * (2 / 3) + 0.3 * 0.5 + 0.1,
                 id="partial-f1"),
    pytest.param(trace(ABSTAINED, "I don't know", [["x"]]), UNANSWERABLE, 1.0, id="correct-abstention"),
    pytest.param(trace(ANSWERED, "Paris", [["x"]]), UNANSWERABLE, 0.3 + 0.1, id="unanswerable-answered"),
    pytest.param(trace(ABSTAINED, "I don't know", [["invention-010"]]), TWO_HOP, 0.3 * 0.5 + 0.1,
                 id="wrong-abstention"),
    pytest.param(trace(TRUNCATED, None, [["invention-010"], ["person-116"], ["y"]]), TWO_HOP, 0.3,
                 id="truncated"),
])
def test_reward_components(t, record, expected):
    reward = rl.refrag_reward(t, record, max_hops=3)
    assert reward.total == pytest.approx(expected)
    w = rl.REWARD_WEIGHTS
    assert reward.total == pytest.approx(w["answer"] * reward.answer + w["relevance"] * reward.relevance
                                         + w["efficiency"] * reward.efficiency)


def test_group_advantages_normalize_each_group():
    adv = rl.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4]), group_size=2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-4)
    group = torch.tensor([0.1, 0.7, 0.4, 1.0])
    adv = rl.group_advantages(group, group_size=4)
    assert adv.mean().abs() < 1e-6 and adv.std(correction=0) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(torch.ones(3), group_size=2)


def toy_traces(tok) -> list[MultiHopTrace]:
    """Two trajectories of one prompt that differ in their generated answer."""
    prompt = tok.encode("Where was the inventor born?")
    traces = []
    for answer in ("Pulbys", "Ferro River"):
        t = MultiHopTrace("q", [])
        t.append([tok.bos_id] + prompt + [tok.token_id("[ASST]")], [0] * (len(prompt) + 2), generated=False)
        gen = tok.encode(answer) + [tok.token_id("[/ASST]")]
        t.append(gen, [0] * len(gen), generated=True)
        traces.append(t)
    return traces


def sequence_logprob(model, traces) -> torch.Tensor:
    with torch.no_grad():
        logp, owner = rl.generated_logprobs(model, traces, torch.device("cpu"))
    return torch.zeros(len(traces)).index_add_(0, owner, logp)


def test_generated_logprobs_score_only_generated_tokens(tok):
    model = tiny_policy(tok.vocab_size)
    traces = toy_traces(tok)
    logp, owner = rl.generated_logprobs(model, traces, torch.device("cpu"))
    assert owner.tolist() == [0] * sum(traces[0].generated_mask) + [1] * sum(traces[1].generated_mask)
    ids = torch.tensor(traces[0].input_ids)[None]
    with torch.no_grad():
        full = torch.log_softmax(model(ids)[0], dim=-1)
    start = traces[0].generated_mask.index(1)
    expected = full[start - 1:-1].gather(1, ids[0, start:, None])[:, 0]
    assert torch.allclose(logp[:len(expected)].detach(), expected, atol=1e-4)


def test_policy_step_moves_toward_the_higher_reward_sample(tok):
    model = tiny_policy(tok.vocab_size)
    traces = toy_traces(tok)
    before = sequence_logprob(model, traces)
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    loss, kl = rl.policy_loss(model, traces, advantages)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    after = sequence_logprob(model, traces)
    assert after[0] > before[0] and after[1] < before[1]
    assert kl == 0.0


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it(tok):
    import copy
    model = tiny_policy(tok.vocab_size)
    ref = copy.deepcopy(model)
    traces = toy_traces(tok)
    zero_adv = torch.zeros(2)
    loss, kl = rl.policy_loss(model, traces, zero_adv, ref_model=ref, kl_beta=0.5)
    assert kl == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
    loss, kl = rl.policy_loss(model, traces, zero_adv, ref_model=ref, kl_beta=0.5)
    assert kl > 0 and loss.item() > 0


def test_rl_loop_calls_the_reward_function_and_logs_its_components(tok, tmp_path, monkeypatch):
    calls = []
    reward_fn = rl.refrag_reward

    def recording_reward(t, record, max_hops):
        reward = reward_fn(t, record, max_hops)
        calls.append((t.status, record["id"], reward.total))
        return reward

    monkeypatch.setattr(rl, "refrag_reward", recording_reward)
    retriever = FakeRetriever({
        TWO_HOP["question"]: [doc("invention-010", "Synstyl Merkstesk invented the Folding Sextant.")],
        "In which city was Synstyl Merkstesk born?": [doc("person-116", "Synstyl Merkstesk was born in Pulbys.")],
    })
    follow_up = ("query", "In which city was Synstyl Merkstesk born?")
    generator = ScriptedGenerator(tok, {TWO_HOP["question"]: [follow_up, follow_up, ("answer", "Ferro"),
                                                              ("answer", "Pulbys")]})
    model = tiny_policy(tok.vocab_size)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(top_k=2, bf16=False)
    rcfg = RefragConfig(rl_steps=1, questions_per_step=1, group_size=2, kl_beta=0.1, rl_lr=1e-2)
    [record] = rl.train_rl(model, tok, retriever, [TWO_HOP], cfg, rcfg, device=torch.device("cpu"),
                           out_dir=tmp_path, generator=generator)
    assert [c[:2] for c in calls] == [(ANSWERED, "q1"), (ANSWERED, "q1")]
    assert record["reward"] == pytest.approx(sum(c[2] for c in calls) / 2)
    assert record["reward_relevance"] == 1.0 and record["hops"] == 2.0
    assert record["answer_f1"] == pytest.approx(0.5) and record["abstention_rate"] == 0.0
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["reward"] == pytest.approx(record["reward"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class StubManager:
    """RetrievalManager stand-in: fixed distractors for every query, KB documents by id."""

    class KB:
        def document(self, doc_id):
            return {"id": doc_id, "title": doc_id, "content": f"text of {doc_id}", "source": "kb", "metadata": {}}

    knowledge_base = KB()

    def retrieve_many(self, queries, top_k):
        return [[doc(f"distractor-{i}", "noise") for i in range(top_k)] for _ in queries]


def test_multihop_sft_conversations_use_the_gold_chain(tok):
    two_hop, unanswerable = rl.multihop_conversations([TWO_HOP, UNANSWERABLE], StubManager(), top_k=3, seed=0)
    for conv in (two_hop, unanswerable):
        validate_conversation(conv)
    msgs = two_hop["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "retrieval", "assistant", "retrieval", "assistant"]
    assert msgs[2]["query"] == TWO_HOP["question"] and msgs[3] == {"role": "assistant",
                                                                  "query": TWO_HOP["hops"][1]["query"]}
    assert "invention-010" in [d["id"] for d in msgs[2]["documents"]]
    assert "person-116" in [d["id"] for d in msgs[4]["documents"]]
    assert len(msgs[2]["documents"]) == 3 and msgs[5]["content"] == "Pulbys"
    assert [m["role"] for m in unanswerable["messages"]] == ["system", "user", "retrieval", "assistant"]
    example = render_conversation(two_hop, tok)
    trained = tok.decode(example.input_ids[example.loss_mask.astype(bool)].tolist(), skip_special_tokens=True)
    assert "Synstyl Merkstesk" in trained and "Pulbys" in trained


def test_multihop_sft_conversations_documents_first(tok):
    two_hop, = rl.multihop_conversations([TWO_HOP], StubManager(), top_k=2, seed=0, question_first=False)
    msgs = two_hop["messages"]
    assert [m["role"] for m in msgs] == ["system", "retrieval", "user", "assistant", "retrieval", "assistant"]
    text = tok.decode(render_conversation(two_hop, tok).input_ids.tolist())
    assert text.index("[RETRIEVAL_END]") < text.index("[USER]") and text.count(TWO_HOP["question"]) == 1


def test_config_splits_keys_and_names_unknown_ones(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "group_size": 8, "top_k": 4}))
    cfg, rcfg = load_refrag_config(path, {"kl_beta": "0.1", "model.block_pattern": "M,M"})
    assert (cfg.top_k, rcfg.group_size, rcfg.kl_beta, cfg.model) == (4, 8, 0.1, {"block_pattern": "M,M"})
    with pytest.raises(ValueError, match="'group_sise'"):
        load_refrag_config(None, {"group_sise": "8"})
    with pytest.raises(ValueError, match="max_hops"):
        load_refrag_config(None, {"max_hops": "0"})
    with pytest.raises(ValueError, match="sft_steps and rl_steps"):
        load_refrag_config(None, {"max_steps": "10"})


def test_cli_reports_bad_keys_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_refrag(["--group_sise", "3"])
    assert exit_info.value.code == 2 and "'group_sise'" in capsys.readouterr().err


# ---------------------------------------------------------------------- GRPO learns (through train_rl itself)

QUESTION = "In which city was Synstyl Merkstesk born?"
BORN = {"id": "born", "question": QUESTION, "answer": "Pulbys", "type": "single_hop", "gold_doc_ids": ["person-116"]}
WRONG = ["Ferro", "Gindvrask", "Kavstav", "Norvel", "Tesk"]


def cloned_policy(tok, retriever) -> HybridLM:
    """A policy that answers the question with one of six names, the right one (Pulbys) rarely
    (about 1 in 26): behaviour cloning of 1 right and 5 x 5 wrong answer trajectories."""
    from refrag.infer.multihop import run_multihop

    model = tiny_policy(tok.vocab_size)
    answers = ["Pulbys"] + WRONG * 5
    traces = [run_multihop(ScriptedGenerator(tok, {QUESTION: [("answer", a)]}), tok, retriever, [QUESTION],
                           max_hops=1)[0] for a in answers]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = rl.policy_loss(model, traces, torch.ones(len(traces)), bf16=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def sampled_reward(model, tok, retriever, n: int = 48) -> float:
    """Mean reward of n trajectories sampled at temperature 1 with a fixed seed."""
    from refrag.infer import Engine
    from refrag.infer.multihop import run_multihop

    model.eval()
    traces = run_multihop(Engine(model, tok), tok, retriever, [QUESTION] * n, max_hops=1, max_new_tokens=8,
                          temperature=1.0, seed=123)
    return sum(rl.refrag_reward(t, BORN, max_hops=1).total for t in traces) / n


@pytest.mark.slow
@pytest.mark.parametrize("mutation", [None, "zero_advantages", "no_baseline"])
def test_train_rl_raises_the_reward_only_with_group_baselined_advantages(tok, tmp_path, monkeypatch, mutation):
    """train_rl (real sampling, weight decay 0, no KL) moves the policy to the known best answer:
    mean reward from about 0.4 (a wrong name: 0.3 relevance + 0.1 efficiency) to 1.0. The same
    loop with every advantage zeroed does not move at all, and without the group baseline
    (advantage = raw reward, all positive) it reinforces whatever it sampled and collapses on a
    wrong answer, so both mutations fail the first assertion."""
    import refrag_kernels.common.dispatch as dispatch

    monkeypatch.setattr(dispatch, "INTERPRET", False)  # the loop, not the kernels
    retriever = FakeRetriever({QUESTION: [doc("person-116", "Synstyl Merkstesk was born in Pulbys.")]})
    model = cloned_policy(tok, retriever)
    before = sampled_reward(model, tok, retriever)
    if mutation == "zero_advantages":
        monkeypatch.setattr(rl, "group_advantages", lambda rewards, group_size: torch.zeros_like(rewards))
    elif mutation == "no_baseline":
        monkeypatch.setattr(rl, "group_advantages", lambda rewards, group_size: rewards.float())
    cfg = TrainConfig(weight_decay=0.0, bf16=False, seed=0, top_k=1)
    rcfg = RefragConfig(rl_steps=15, questions_per_step=1, group_size=8, kl_beta=0.0, rl_lr=3e-3, max_hops=1,
                           max_new_tokens=8, temperature=1.0, top_p=1.0)
    rl.train_rl(model, tok, retriever, [BORN], cfg, rcfg, device=torch.device("cpu"), out_dir=tmp_path)
    after = sampled_reward(model, tok, retriever)
    assert before < 0.5
    learned = after > 0.9
    assert learned == (mutation is None), f"mutation {mutation}: mean reward {before:.3f} -> {after:.3f}"


def test_samples_of_one_question_form_one_group(tok, tmp_path, monkeypatch):
    """Two questions, four samples each: advantages are normalized within each question's samples
    (a question whose samples all score alike gets zero advantages), never across questions."""
    other = {"id": "q3", "question": "Which river flows through Gindvrask?", "answer": "Ferro River",
             "type": "single_hop", "gold_doc_ids": ["city-003"]}
    retriever = FakeRetriever({BORN["question"]: [doc("person-116", "Synstyl Merkstesk was born in Pulbys.")],
                               other["question"]: [doc("city-003", "The Ferro River flows through Gindvrask.")]})
    generator = ScriptedGenerator(tok, {BORN["question"]: [("answer", a) for a in ("Pulbys", "Tesk", "Pulbys", "Tesk")],
                                        other["question"]: [("answer", "Ferro River")] * 4})
    seen = []
    real_loss = rl.policy_loss

    def recording_loss(model, traces, advantages, **kwargs):
        seen.append(([t.question for t in traces], advantages.clone()))
        return real_loss(model, traces, advantages, **kwargs)

    monkeypatch.setattr(rl, "policy_loss", recording_loss)
    rcfg = RefragConfig(rl_steps=1, questions_per_step=2, group_size=4, kl_beta=0.0, max_hops=1)
    rl.train_rl(tiny_policy(tok.vocab_size), tok, retriever, [BORN, other], TrainConfig(top_k=1, bf16=False),
                rcfg, device=torch.device("cpu"), out_dir=tmp_path, generator=generator)
    [(questions, advantages)] = seen
    groups = [questions[i:i + 4] for i in (0, 4)]
    assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]
    by_question = {g[0]: advantages[i * 4:(i + 1) * 4] for i, g in enumerate(groups)}
    assert torch.allclose(by_question[other["question"]], torch.zeros(4))
    assert torch.allclose(by_question[BORN["question"]], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)
