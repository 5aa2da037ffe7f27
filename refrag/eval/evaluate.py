"""Answer evaluation of a trained model: retrieve, generate (greedy, batched), score.

Each question gets one retrieval of ``top_k`` documents (no gold documents are inserted: this
is the deployed setting). The prompt is the question and its documents laid out and rendered in
the model's `PromptFormat` (the record saved in its checkpoint), ending with ``[ASST]``; the answer is the
generated text up to ``[/ASST]`` or ``[EOS]``. Hallucination is always judged against the
retrieved documents, also for a model that did not see them (see `refrag.eval.answers`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

from refrag.data import RagTokenizer
from refrag.data.prompt import FILE_NAME as PROMPT_FORMAT_FILE
from refrag.data.prompt import PromptFormat
from refrag.eval.answers import aggregate, score_answer
from refrag.infer.engine import Engine
from refrag.model import HybridLM, ModelConfig
from refrag.data.documents import document_text
from refrag.train.checkpoint import TOKENIZER_FILE, CheckpointError, latest_checkpoint, load_checkpoint
from refrag.train.config import TrainConfig


def answer_from_ids(ids: list[int], tokenizer: RagTokenizer) -> str:
    """Decoded answer: generated ids up to the first [/ASST] or [EOS], special tokens dropped."""
    stops = {tokenizer.token_id("[/ASST]"), tokenizer.eos_id}
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def generate_answers(model: HybridLM, tokenizer: RagTokenizer, conversations: list[dict], prompt: PromptFormat,
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for generation conversations rendered in `prompt`, `batch_size` prompts per batch."""
    engine = Engine(model, tokenizer)
    stop_ids = [tokenizer.token_id("[/ASST]"), tokenizer.eos_id]
    answers = []
    for start in range(0, len(conversations), batch_size):
        prompts = [prompt.render_for_generation(c, tokenizer) for c in conversations[start:start + batch_size]]
        outputs = engine.generate([p.input_ids.tolist() for p in prompts], max_new_tokens,
                                  stop_token_ids=stop_ids, doc_ids=[p.doc_ids.tolist() for p in prompts])
        answers += [answer_from_ids(ids, tokenizer) for ids in outputs]
    return answers


def evaluate_model(model: HybridLM, tokenizer: RagTokenizer, retrieval_manager, records: list[dict],
                   prompt: PromptFormat, *, top_k: int = 3, max_new_tokens: int = 24,
                   batch_size: int = 32) -> dict:
    """Metrics dict of `refrag.eval.answers.aggregate` plus ``predictions`` (one dict per question).

    retrieval_manager: a `refrag.retrieval.RetrievalManager` (anything with
    ``retrieve_many(questions, top_k)``); records: query records (`refrag.data.load_queries`);
    prompt: the model's `PromptFormat` (from its checkpoint: `load_trained_model(...).prompt`).
    Hallucination is judged against the full retrieved texts, also for a model shown none.
    """
    if not records:
        raise ValueError("evaluate_model needs at least one question record")
    documents = retrieval_manager.retrieve_many([r["question"] for r in records], top_k)
    conversations = [prompt.conversation(r["question"], docs) for r, docs in zip(records, documents)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        answers = generate_answers(model, tokenizer, conversations, prompt, max_new_tokens, batch_size)
    model.train(was_training)
    scored, predictions = [], []
    for record, docs, answer in zip(records, documents, answers):
        score = score_answer(answer, record["answer"], record["type"], [document_text(d) for d in docs])
        scored.append(score)
        predictions.append({"id": record["id"], "type": record["type"], "question": record["question"],
                            "gold": record["answer"], "prediction": answer,
                            "retrieved": [d["id"] for d in docs], **score})
    return {**aggregate(scored), "predictions": predictions}


class TrainedModel(NamedTuple):
    """A checkpoint ready to answer: model (eval mode), tokenizer, training config, prompt format, path."""

    model: HybridLM
    tokenizer: RagTokenizer
    config: TrainConfig
    prompt: PromptFormat
    path: Path


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """A verified checkpoint: a step directory, a run's ``checkpoints/`` directory or its out_dir
    (the newest step is used). The tokenizer and prompt format are read from inside the
    checkpoint; checkpoints from before they were stored there fall back to the training
    config. Relative KB and tokenizer paths of the config are resolved with `run_path`, so
    evaluation runs from any folder."""
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    model = HybridLM(ModelConfig.from_dict(state["config"]["model"]))
    model.load_state_dict(state["model"])
    train_config = TrainConfig.from_dict(state["config"]["train"])
    train_config = dataclasses.replace(train_config, **{key: str(run_path(path, getattr(train_config, key)))
                                                        for key in ("kb_dir", "kb_source") if getattr(train_config, key)})
    tokenizer = RagTokenizer.load(_tokenizer_path(path, train_config))
    prompt_file = path / PROMPT_FORMAT_FILE
    prompt = PromptFormat.load(prompt_file) if prompt_file.is_file() else train_config.prompt_format()
    return TrainedModel(model.to(device).eval(), tokenizer, train_config, prompt, path)


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The step directory of a checkpoint argument (step dir, checkpoints/ dir or run out_dir)."""
    checkpoint = Path(checkpoint)
    for root in (checkpoint, checkpoint / "checkpoints"):
        if root.is_dir() and not (root / "manifest.json").is_file():
            latest = latest_checkpoint(root)
            if latest is not None:
                return latest
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    return checkpoint


def run_path(checkpoint: Path, saved: str) -> Path:
    """A path from a training config: as saved when it exists (absolute, or relative to the
    current folder), else relative to the first folder above the checkpoint where it exists
    (training ran there), else as saved."""
    saved_path = Path(saved)
    if saved_path.is_absolute() or saved_path.exists():
        return saved_path
    return next((parent / saved_path for parent in checkpoint.resolve().parents if (parent / saved_path).exists()),
                saved_path)


def _tokenizer_path(path: Path, config: TrainConfig) -> Path:
    inside = path / TOKENIZER_FILE
    if inside.is_file():
        return inside
    candidate = run_path(path, config.tokenizer)
    if candidate.is_file():
        return candidate
    raise CheckpointError(f"checkpoint {path} has no {TOKENIZER_FILE} and its training tokenizer "
                          f"{config.tokenizer} is not found")


def write_predictions(path: str | Path, metrics: dict) -> None:
    """Write a metrics dict (with predictions) as indented JSON."""
    Path(path).write_text(json.dumps(metrics, indent=2))
