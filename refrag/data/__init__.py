"""refrag.data: conversation schema, tokenizer, rendering, packing, loader, embedded KB.

Public API (all importable from `refrag.data`):

    EMBEDDED_KB_DIR                       refrag/data/kb: documents.jsonl, queries/{train,val,test}.jsonl, tokenizer.json
    load_queries(split="train", kb_dir=EMBEDDED_KB_DIR) -> list[dict]
        records {id, question, answer, type, gold_doc_ids, hops?}
    build_conversations(records, manager, top_k=5, *, ensure_gold=True, multi_hop=True, seed=0) -> list[dict]
        manager: refrag.retrieval.RetrievalManager; two-hop records become REFRAG conversations
    rag_conversation(question, answer, documents, system=SYSTEM_PROMPT) -> dict
    refrag_conversation(question, answer, hops=[(query, documents), ...], system=SYSTEM_PROMPT) -> dict
    validate_conversation(conv) -> conv                      (ValueError naming the problem)

    load_tokenizer(path=None) -> RagTokenizer                 (default: the shipped tokenizer.json)
    RagTokenizer.train(texts, vocab_size=4096) / .load(path) / .save(path)
    tok.encode(text) -> list[int]; tok.decode(ids); tok.token_id("[DOC_3]"); tok.pad_id/bos_id/eos_id; tok.vocab_size
    SPECIAL_TOKENS

    render_conversation(conv, tokenizer, max_doc_tokens=256) -> RenderedExample
        .input_ids int32 (T,), .loss_mask uint8 (T,), .doc_ids int32 (T,), .doc_spans() -> [(start, end)]
    render_for_generation(conv, tokenizer, max_doc_tokens=256) -> RenderedExample   (prompt ends with [ASST])
    render_conversations(convs, tokenizer, *, max_len, max_doc_tokens=256) -> (list[RenderedExample], RenderStats)

    pack_examples(examples, max_len, pad_id) -> list[PackedRow]
        PackedRow: input_ids, targets (-100 = no loss) int64 (max_len,), doc_ids int32, examples, num_tokens,
        .loss_mask (targets != -100); row.layout(device=None) -> refrag_kernels.DocLayout
    packing_efficiency(rows) -> float
    PackedLoader(rows, batch_size=1, *, rank=0, world_size=1, seed=0, shuffle=True)
        iter -> PackedBatch(input_ids (B,L), targets (B,L), doc_ids (B,L), examples, num_tokens, .loss_mask);
        batch.layout() -> DocLayout of the batch flattened to (1, B*L); state_dict() / load_state_dict()

    refrag.data.prompt.PromptFormat(retrieval, question_first, max_doc_tokens, system_prompt)
        .arrange(conv) / .conversation(question, documents) / .render(...) / .render_for_generation(...)
        the prompt-format record every checkpoint stores (prompt_format.json) and evaluation reuses
    refrag.data.augment: add_questions / counterfactual (training-data augmentations, see its docstring)
    refrag.data.make_kb.build_kb(seed, names="embedded"|"training"|"heldout", varied_documents=False)

Regenerate the embedded KB: python -m refrag.data.make_kb; its tokenizer:
python -m refrag.data.tokenizer train --kb refrag/data/kb --out refrag/data/kb/tokenizer.json
"""
from refrag.data.conversations import (EMBEDDED_KB_DIR, SYSTEM_PROMPT, build_conversations, load_queries,
                                       rag_conversation, refrag_conversation)
from refrag.data.loader import PackedBatch, PackedLoader
from refrag.data.packing import IGNORE_INDEX, PackedRow, pack_examples, packing_efficiency
from refrag.data.render import (RenderedExample, RenderStats, render_conversation, render_conversations,
                                render_for_generation)
from refrag.data.schema import validate_conversation
from refrag.data.tokenizer import SPECIAL_TOKENS, RagTokenizer, load_tokenizer

__all__ = [
    "EMBEDDED_KB_DIR", "SYSTEM_PROMPT", "build_conversations", "load_queries", "rag_conversation",
    "refrag_conversation", "validate_conversation", "SPECIAL_TOKENS", "RagTokenizer", "load_tokenizer",
    "RenderedExample", "RenderStats", "render_conversation", "render_conversations", "render_for_generation",
    "IGNORE_INDEX", "PackedRow", "pack_examples", "packing_efficiency", "PackedBatch", "PackedLoader",
]
