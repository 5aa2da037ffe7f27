"""SFT data from a TrainConfig: tokenizer, retrieval, RAG conversations, packed rows, loaders.

Training conversations retrieve ``top_k`` documents per question and always contain the
gold documents (inserted at random ranks, so rank does not reveal them); two-hop questions
are single retrievals whose list holds both gold documents. With ``retrieval=False`` the
retrieval message is dropped (the no-retrieval baseline sees the same questions and answers).
The layout (retrieval on/off, question first, document cut) is the run's
`refrag.data.prompt.PromptFormat` (`TrainConfig.prompt_format()`), the record its checkpoints store.
The train split can be augmented (`refrag.data.augment`): ``extra_questions`` more turns about
the shown documents, ``counterfactual_copies`` rewritten copies with swapped answers (with
retrieval only), and ``document_loss`` adds next-token loss on document tokens. With
``multihop_copies`` the RAG run also learns the REFRAG multi-hop format (`multihop_traces`): on
two-hop questions it asks the follow-up query itself and answers from the second hop's documents.
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

from refrag.data import (EMBEDDED_KB_DIR, PackedLoader, RagTokenizer, build_conversations, load_queries,
                         pack_examples, render_conversations)
from refrag.data.augment import (IDK, AnswerPools, QuestionIndex, add_questions, counterfactual, fresh_names,
                                 whole_word)
from refrag.data.make_kb import build_kb
from refrag.data.tokenizer import corpus_texts
from refrag.retrieval import KnowledgeBase, RetrievalManager
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


def init_tokenizer(cfg: TrainConfig, env: DistEnv, model_vocab: int) -> tuple[RagTokenizer, TrainConfig]:
    """Tokenizer of a run that starts from the transformers checkpoint cfg.init_from, and the
    config whose `tokenizer` names it (checkpoints copy that file).

    The checkpoint's own tokenizer.json when it has one: extended with the special tokens
    (RagTokenizer.extend) and written by rank 0 to <out_dir>/tokenizer.json. Otherwise
    cfg.tokenizer as for a fresh model (trained on the KB when missing), which must fit the
    checkpoint's model_vocab embedding rows (its ids then mean nothing to the pretrained embeddings).
    """
    source = Path(cfg.init_from) / "tokenizer.json"
    if not source.is_file():
        tokenizer = prepare_tokenizer(cfg, env)
        if tokenizer.vocab_size > model_vocab:
            raise ValueError(f"init_from {cfg.init_from} has no tokenizer.json and config key tokenizer "
                             f"{cfg.tokenizer} has {tokenizer.vocab_size} tokens, more than the checkpoint's "
                             f"{model_vocab} embedding rows; put the checkpoint's tokenizer.json in {cfg.init_from}")
        return tokenizer, cfg
    target = Path(cfg.out_dir) / "tokenizer.json"
    if env.is_main:
        tmp = target.with_name(f".{target.name}.tmp")
        RagTokenizer.extend(source).save(tmp)
        tmp.replace(target)
    barrier(env)
    return RagTokenizer.load(target), dataclasses.replace(cfg, tokenizer=str(target))


def retrieval_manager(cfg: TrainConfig) -> RetrievalManager:
    """RetrievalManager over the prepared KB cfg.kb_dir (clear error when it is missing)."""
    if not Path(cfg.kb_dir).is_dir():
        raise ValueError(f"knowledge base {cfg.kb_dir} does not exist; build it with "
                         f"python -m refrag.retrieval prepare-kb --docs DOCS --out {cfg.kb_dir}")
    return RetrievalManager(cfg.retriever, knowledge_base=cfg.kb_dir)


def augmented(conversations: list[dict], records: list[dict], cfg: TrainConfig) -> list[dict]:
    """Training conversations with cfg.extra_questions further turns each and, with retrieval,
    cfg.counterfactual_copies rewritten copies of every conversation (refrag.data.augment), with
    cfg.fresh_names their names also replaced by fresh ones."""
    if not cfg.extra_questions and not (cfg.counterfactual_copies and cfg.retrieval):
        return conversations
    index, pools = QuestionIndex(records), AnswerPools(records)
    out = []
    for copy in range(1 + (cfg.counterfactual_copies if cfg.retrieval else 0)):
        for conv, rec in zip(conversations, records):
            rng = random.Random(f"{cfg.seed}:{copy}:{rec['id']}")
            conv, asked = add_questions(conv, rec, index, cfg.extra_questions, rng)
            if copy:
                conv = counterfactual(conv, asked, pools, rng)
                conv = fresh_names(conv, rng) if cfg.fresh_names else conv
            out.append(conv)
    return out


def world_seed(cfg: TrainConfig, world: int) -> int:
    """Seed of generated training world `world` (never the embedded KB's seed)."""
    return 1_000_003 * (cfg.seed + 1) + 7919 * (world + 1)


def generated_world(cfg: TrainConfig, world: int) -> tuple[list[dict], RetrievalManager]:
    """(every query record, a BM25 manager over its documents) of generated training world `world`:
    `refrag.data.make_kb.build_kb` with the "training" name style and varied documents."""
    docs, splits = build_kb(world_seed(cfg, world), names="training", varied_documents=True)
    kb = KnowledgeBase.build(docs, "hashing:64", show_progress=False)  # BM25 retrieval; dense unused
    records = [{**r, "id": f"world{world}-{r['id']}"} for split in ("train", "val", "test") for r in splits[split]]
    return records, RetrievalManager("bm25", knowledge_base=kb)


def cut_documents(conversation: dict, tokenizer: RagTokenizer, max_tokens: int, cache: dict | None = None,
                  keep_answers_within: int = 0) -> dict:
    """`conversation` with each document cut to `max_tokens` tokens (title included, as rendered)
    and every answer that no longer occurs in the shown documents replaced by "I don't know".
    cache: optional {document text: token ids} shared across calls (documents repeat).
    keep_answers_within: when > 0, a document is instead cut after the last answer of the
    conversation it contains if that answer ends within this many tokens (the cut varies the
    documents' length without hiding answers the model is trained to give)."""
    cache = {} if cache is None else cache
    answers = [m["content"] for m in conversation["messages"]
               if m["role"] == "assistant" and m.get("content") and m["content"] != IDK]
    messages, shown = [], []
    for m in conversation["messages"]:
        if m["role"] == "retrieval":
            docs = []
            for d in m["documents"]:
                text = f"{d['title']}\n{d['content']}"
                ids = cache[text] if text in cache else cache.setdefault(text, tokenizer.encode(text))
                cut = max_tokens
                if keep_answers_within and len(ids) > max_tokens:
                    ends = [match.end() for a in answers for match in re.finditer(whole_word(a), text)]
                    needed = [len(tokenizer.encode(text[:end])) for end in ends]
                    cut = max([max_tokens] + [n for n in needed if n <= keep_answers_within])
                if len(ids) > cut:
                    title, _, content = tokenizer.decode(ids[:cut]).partition("\n")
                    d = {**d, "title": title or d["title"], "content": content}
                docs.append(d)
                shown.append(f"{d['title']} {d['content']}")
            m = {**m, "documents": docs}
        messages.append(m)
    visible = " ".join(shown)
    for i, m in enumerate(messages):
        answer = m.get("content") if m["role"] == "assistant" else None
        if answer and answer != IDK and not re.search(whole_word(answer), visible):
            messages[i] = {**m, "content": IDK}
    return {**conversation, "messages": messages}


def rag_conversations(records: list[dict], manager: RetrievalManager, cfg: TrainConfig, augment: bool,
                      counterfactual_copies: int) -> list[dict]:
    """Single-retrieval conversations (gold documents ensured), augmented when `augment`."""
    conversations = build_conversations(records, manager, cfg.top_k, ensure_gold=True, multi_hop=False,
                                        seed=cfg.seed)
    if augment:
        conversations = augmented(conversations, records, dataclasses.replace(
            cfg, counterfactual_copies=counterfactual_copies))
    return conversations


def multihop_traces(records: list[dict], manager: RetrievalManager, cfg: TrainConfig) -> list[dict]:
    """cfg.multihop_copies teacher-forced multi-hop conversations of every two-hop record (with
    retrieval only; `refrag.train.rl.multihop_conversations`: hop 1 retrieves with the question, the
    assistant asks the second hop's query, hop 2's documents, the answer). Copies differ in where
    the gold documents are inserted among the retrieved ones; with cfg.fresh_names every copy after
    the first has fresh names (`refrag.data.augment.fresh_names`)."""
    if not (cfg.multihop_copies and cfg.retrieval):
        return []
    from refrag.train.rl import multihop_conversations  # the REFRAG module imports the model stack

    two_hop = [r for r in records if r["type"] == "two_hop"]
    out = []
    for copy in range(cfg.multihop_copies):
        for conv in multihop_conversations(two_hop, manager, cfg.top_k, cfg.seed + copy, cfg.question_first):
            fresh = cfg.fresh_names and copy > 0  # seeded by the trace's position in the list
            out.append(fresh_names(conv, random.Random(f"{cfg.seed}:{copy}:trace:{len(out)}")) if fresh else conv)
    return out


def sft_conversations(split: str, cfg: TrainConfig, manager: RetrievalManager,
                      tokenizer: RagTokenizer | None = None) -> list[dict]:
    """Conversations of a query split in the run's prompt format. The train split adds the
    augmentations, cfg.generated_worlds generated worlds and, with cfg.min_doc_tokens and a
    tokenizer, a varied document cut per conversation (`cut_documents`)."""
    train = split == "train"
    records = load_queries(split, kb_source(cfg))
    conversations = rag_conversations(records, manager, cfg, train, cfg.counterfactual_copies)
    conversations += multihop_traces(records, manager, cfg) if train else []
    for world in range(cfg.generated_worlds if train else 0):
        records, world_manager = generated_world(cfg, world)
        conversations += rag_conversations(records, world_manager, cfg, True, 0)
        conversations += multihop_traces(records, world_manager, cfg)
    if train and cfg.min_doc_tokens and tokenizer is not None and cfg.retrieval:
        rng, cache = random.Random(f"{cfg.seed}:cut"), {}
        keep = cfg.max_doc_tokens if cfg.doc_cut_keeps_answers else 0
        conversations = [cut_documents(c, tokenizer, rng.randint(cfg.min_doc_tokens, cfg.max_doc_tokens), cache, keep)
                         for c in conversations]
    prompt = cfg.prompt_format()
    return [prompt.arrange(c) for c in conversations]


def packed_loader(split: str, cfg: TrainConfig, tokenizer: RagTokenizer, manager: RetrievalManager,
                  env: DistEnv, shuffle: bool) -> PackedLoader:
    """This rank's PackedLoader over the split's conversations packed into cfg.seq_len rows."""
    examples, _ = render_conversations(sft_conversations(split, cfg, manager, tokenizer), tokenizer, max_len=cfg.seq_len,
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
