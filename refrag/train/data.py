"""SFT data from a TrainConfig: tokenizer, retrieval, RAG conversations, packed rows, loaders.

Training conversations retrieve ``top_k`` documents per question and always contain the
gold documents (inserted at random ranks, so rank does not reveal them); two-hop questions
are single retrievals whose list holds both gold documents. With ``retrieval=False`` the
retrieval message is dropped (the no-retrieval baseline sees the same questions and answers).
With ``question_first`` the order is system, user, retrieval, assistant (the REFRAG hop-1
order): document tokens see the earlier question, so each document is read knowing what is
asked (attention and the Mamba state entering the block both carry it).
The train split can be augmented (`refrag.data.augment`): ``extra_questions`` more turns about
the shown documents, ``counterfactual_copies`` rewritten copies with swapped answers (with
retrieval only), and ``document_loss`` adds next-token loss on document tokens.
"""
from __future__ import annotations

import random
from pathlib import Path

from refrag.data import (EMBEDDED_KB_DIR, PackedLoader, RagTokenizer, build_conversations, load_queries,
                         pack_examples, render_conversations)
from refrag.data.augment import AnswerPools, QuestionIndex, add_questions, counterfactual
from refrag.data.tokenizer import corpus_texts
from refrag.retrieval import RetrievalManager
from refrag.train.config import TrainConfig
from refrag.train.shims import DistEnv, barrier


def kb_source(cfg: TrainConfig) -> Path:
    """Directory with documents.jsonl and queries/ (the embedded KB when cfg.kb_source is empty)."""
    source = Path(cfg.kb_source) if cfg.kb_source else EMBEDDED_KB_DIR
    if not (source / "queries").is_dir():
        raise ValueError(f"KB source {source} has no queries/ directory")
    return source


def prepare_tokenizer(cfg: TrainConfig, env: DistEnv) -> RagTokenizer:
    """The tokenizer at cfg.tokenizer, trained on the KB source by rank 0 when it does not exist."""
    path = Path(cfg.tokenizer)
    if path.is_dir():
        raise ValueError(f"config key tokenizer: {path} is a directory; give the path of a tokenizer.json file "
                         "(trained there when it does not exist)")
    if env.is_main and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        RagTokenizer.train(corpus_texts(kb_source(cfg)), vocab_size=cfg.vocab_size).save(path)
    barrier(env)
    return RagTokenizer.load(path)


def retrieval_manager(cfg: TrainConfig) -> RetrievalManager:
    """RetrievalManager over the prepared KB cfg.kb_dir (clear error when it is missing)."""
    if not Path(cfg.kb_dir).is_dir():
        raise ValueError(f"knowledge base {cfg.kb_dir} does not exist; build it with "
                         f"python -m refrag.retrieval prepare-kb --docs DOCS --out {cfg.kb_dir}")
    return RetrievalManager(cfg.retriever, knowledge_base=cfg.kb_dir)


def without_retrieval(conversation: dict) -> dict:
    """The conversation minus its retrieval messages (no-retrieval baseline)."""
    return {**conversation, "messages": [m for m in conversation["messages"] if m["role"] != "retrieval"]}


def question_first(conversation: dict) -> dict:
    """The conversation with its first user message moved before the retrieval messages."""
    messages = conversation["messages"]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    first_retrieval = next(i for i, m in enumerate(messages) if m["role"] == "retrieval")
    if first_user < first_retrieval:
        return conversation
    rest = messages[:first_user] + messages[first_user + 1:]
    return {**conversation, "messages": rest[:first_retrieval] + [messages[first_user]] + rest[first_retrieval:]}


def augmented(conversations: list[dict], records: list[dict], cfg: TrainConfig) -> list[dict]:
    """Training conversations with cfg.extra_questions further turns each and, with retrieval,
    cfg.counterfactual_copies rewritten copies of every conversation (refrag.data.augment)."""
    if not cfg.extra_questions and not (cfg.counterfactual_copies and cfg.retrieval):
        return conversations
    index, pools = QuestionIndex(records), AnswerPools(records)
    out = []
    for copy in range(1 + (cfg.counterfactual_copies if cfg.retrieval else 0)):
        for conv, rec in zip(conversations, records):
            rng = random.Random(f"{cfg.seed}:{copy}:{rec['id']}")
            conv, asked = add_questions(conv, rec, index, cfg.extra_questions, rng)
            out.append(counterfactual(conv, asked, pools, rng) if copy else conv)
    return out


def sft_conversations(split: str, cfg: TrainConfig, manager: RetrievalManager) -> list[dict]:
    """Single-retrieval conversations of a query split (gold documents ensured)."""
    records = load_queries(split, kb_source(cfg))
    conversations = build_conversations(records, manager, cfg.top_k, ensure_gold=True, multi_hop=False,
                                        seed=cfg.seed)
    if split == "train":
        conversations = augmented(conversations, records, cfg)
    if not cfg.retrieval:
        return [without_retrieval(c) for c in conversations]
    return [question_first(c) for c in conversations] if cfg.question_first else conversations


def packed_loader(split: str, cfg: TrainConfig, tokenizer: RagTokenizer, manager: RetrievalManager,
                  env: DistEnv, shuffle: bool) -> PackedLoader:
    """This rank's PackedLoader over the split's conversations packed into cfg.seq_len rows."""
    examples, _ = render_conversations(sft_conversations(split, cfg, manager), tokenizer, max_len=cfg.seq_len,
                                       max_doc_tokens=cfg.max_doc_tokens)
    if split == "train" and cfg.document_loss:
        for example in examples:
            example.loss_mask[example.doc_ids > 0] = 1
    if not examples:
        raise ValueError(f"no {split} example fits seq_len={cfg.seq_len}")
    rows = pack_examples(examples, cfg.seq_len, tokenizer.pad_id)
    return PackedLoader(rows, cfg.batch_size, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                        shuffle=shuffle)


def build_loaders(cfg: TrainConfig, tokenizer: RagTokenizer, manager: RetrievalManager,
                  env: DistEnv) -> tuple[PackedLoader, PackedLoader | None]:
    """(train loader, validation loader or None when cfg.val_rows is 0)."""
    train = packed_loader("train", cfg, tokenizer, manager, env, shuffle=True)
    val = packed_loader("val", cfg, tokenizer, manager, env, shuffle=False) if cfg.val_rows else None
    return train, val
