"""Fine-tune a tiny Hugging Face Bamba (hybrid attention + Mamba-2) with the HF Trainer on packed RAG
conversations, its Mamba layers running on refrag's Triton kernels.

    python examples/hf_trainer_bamba.py --steps 30           # GPU: Triton; CPU: Triton interpreter (slow)

What it shows:
- conversations rendered by `refrag.data` (system prompt, retrieved documents, question, answer;
  loss on the answer only) from the embedded knowledge base;
- `DataCollatorWithFlattening(return_seq_idx=True)`: no padding, several conversations per row,
  sequence boundaries as `seq_idx` (Mamba layers) and `position_ids` (attention layers);
- `refrag_kernels.compat.enable_for_transformers()`: without mamba-ssm / causal-conv1d, transformers' own
  Mamba path refuses packed rows ("can't keep packed sequences apart"); with it they train.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import BambaConfig, BambaForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments  # noqa: E402

from refrag_kernels.compat import enable_for_transformers  # noqa: E402
from refrag.data import EMBEDDED_KB_DIR, load_queries, load_tokenizer, rag_conversation, render_conversation  # noqa: E402
from refrag.retrieval import read_documents  # noqa: E402


def rag_features(tokenizer, limit: int, max_doc_tokens: int) -> list[dict]:
    """Answerable training questions with their gold documents, rendered for the Trainer:
    input_ids and labels (-100 outside the answer)."""
    documents = {doc["id"]: doc for doc in read_documents(EMBEDDED_KB_DIR / "documents.jsonl")}
    features = []
    for record in load_queries("train"):
        if not record["gold_doc_ids"]:
            continue
        docs = [documents[i] for i in record["gold_doc_ids"]]
        with warnings.catch_warnings():  # documents cut to max_doc_tokens: intended here
            warnings.simplefilter("ignore", UserWarning)
            example = render_conversation(rag_conversation(record["question"], record["answer"], docs), tokenizer,
                                          max_doc_tokens=max_doc_tokens)
        ids = example.input_ids.tolist()
        labels = [t if m else -100 for t, m in zip(ids, example.loss_mask.tolist())]
        features.append({"input_ids": ids, "labels": labels})
        if len(features) == limit:
            break
    return features


def tiny_bamba(vocab_size: int, hidden: int) -> BambaForCausalLM:
    config = BambaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_layer_indices=[1], mamba_n_heads=4,
                         mamba_d_head=hidden // 2, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2,
                         mamba_chunk_size=16, use_cache=False)  # packed training: no cache (see README)
    return BambaForCausalLM(config)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=64, help="training conversations")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations flattened into one row")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-doc-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None, help="Trainer output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    enabled = enable_for_transformers(["bamba"])
    print(f"Mamba layers of {enabled} run on refrag's kernels")
    tokenizer = load_tokenizer()
    features = rag_features(tokenizer, args.examples, args.max_doc_tokens)
    torch.manual_seed(0)
    model = tiny_bamba(tokenizer.vocab_size, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=args.out or tmp, max_steps=args.steps, learning_rate=args.lr,
                                     per_device_train_batch_size=args.batch_size, logging_steps=max(1, args.steps // 5),
                                     save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=features,
                          data_collator=DataCollatorWithFlattening(return_seq_idx=True))
        result = trainer.train()
    print(f"trained {args.steps} steps on packed rows of {args.batch_size} conversations: "
          f"final mean loss {result.training_loss:.3f}")
    return result.training_loss


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
