"""Answer evaluation of a trained model: retrieve, generate (greedy, batched), score.

Each question of a split gets one retrieval of ``top_k`` documents (no gold documents are
inserted: this is the deployed setting). The prompt is the rendered conversation system,
retrieval (unless ``use_retrieval=False``), user, ending with ``[ASST]``; the answer is the
generated text up to ``[/ASST]`` or ``[EOS]``. Hallucination is always judged against the
retrieved documents, also for a model that did not see them (see `refrag.eval.answers`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from refrag.data import EMBEDDED_KB_DIR, SYSTEM_PROMPT, RagTokenizer, load_queries, render_for_generation
from refrag.eval.answers import aggregate, score_answer
from refrag.infer.engine import Engine
from refrag.model import HybridLM, ModelConfig
from refrag.retrieval.documents import document_text
from refrag.train.checkpoint import load_checkpoint
from refrag.train.config import TrainConfig


def question_conversation(question: str, documents: list[dict], use_retrieval: bool,
                          question_first: bool = False) -> dict:
    """Generation prompt conversation: system, retrieval (optional), user; or system, user,
    retrieval with question_first (the order the model was trained with)."""
    user = {"role": "user", "content": question}
    retrieval = [{"role": "retrieval", "documents": documents}] if use_retrieval else []
    body = [user] + retrieval if question_first else retrieval + [user]
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}] + body}


def answer_from_ids(ids: list[int], tokenizer: RagTokenizer) -> str:
    """Decoded answer: generated ids up to the first [/ASST] or [EOS], special tokens dropped."""
    stops = {tokenizer.token_id("[/ASST]"), tokenizer.eos_id}
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def generate_answers(model: HybridLM, tokenizer: RagTokenizer, conversations: list[dict],
                     max_new_tokens: int, batch_size: int, max_doc_tokens: int) -> list[str]:
    """Greedy answers for generation conversations, `batch_size` prompts per packed batch."""
    engine = Engine(model, tokenizer)
    stop_ids = [tokenizer.token_id("[/ASST]"), tokenizer.eos_id]
    answers = []
    for start in range(0, len(conversations), batch_size):
        prompts = [render_for_generation(c, tokenizer, max_doc_tokens)
                   for c in conversations[start:start + batch_size]]
        outputs = engine.generate([p.input_ids.tolist() for p in prompts], max_new_tokens,
                                  stop_token_ids=stop_ids, doc_ids=[p.doc_ids.tolist() for p in prompts])
        answers += [answer_from_ids(ids, tokenizer) for ids in outputs]
    return answers


def evaluate_model(model: HybridLM, tokenizer: RagTokenizer, retrieval_manager, split: str = "test",
                   top_k: int = 3, max_new_tokens: int = 24, *, use_retrieval: bool = True,
                   kb_source: str | Path = EMBEDDED_KB_DIR, batch_size: int = 32,
                   max_doc_tokens: int = 256, question_first: bool = False, limit: int | None = None) -> dict:
    """Metrics dict of `refrag.eval.answers.aggregate` plus ``predictions`` (one dict per question).

    retrieval_manager: a `refrag.retrieval.RetrievalManager`; kb_source: directory with
    queries/{split}.jsonl; max_doc_tokens, question_first: as in training; limit: evaluate
    only the first `limit` questions.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of questions or None, got {limit!r}")
    records = load_queries(split, kb_source)[:limit]
    documents = retrieval_manager.retrieve_many([r["question"] for r in records], top_k)
    conversations = [question_conversation(r["question"], docs, use_retrieval, question_first)
                     for r, docs in zip(records, documents)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        answers = generate_answers(model, tokenizer, conversations, max_new_tokens, batch_size, max_doc_tokens)
    model.train(was_training)
    scored, predictions = [], []
    for record, docs, answer in zip(records, documents, answers):
        score = score_answer(answer, record["answer"], record["type"], [document_text(d) for d in docs])
        scored.append(score)
        predictions.append({"id": record["id"], "type": record["type"], "question": record["question"],
                            "gold": record["answer"], "prediction": answer,
                            "retrieved": [d["id"] for d in docs], **score})
    return {**aggregate(scored), "predictions": predictions}


def load_trained_model(checkpoint: str | Path,
                       device: str | torch.device = "cpu") -> tuple[HybridLM, RagTokenizer, TrainConfig]:
    """(model in eval mode, its tokenizer, its training config) from a verified checkpoint."""
    state = load_checkpoint(checkpoint)
    model = HybridLM(ModelConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    train_config = TrainConfig.from_dict(state["config"]["train"])
    tokenizer = RagTokenizer.load(train_config.tokenizer)
    return model.to(device).eval(), tokenizer, train_config


def write_predictions(path: str | Path, metrics: dict) -> None:
    """Write a metrics dict (with predictions) as indented JSON."""
    Path(path).write_text(json.dumps(metrics, indent=2))
