"""Training configuration: one flat dataclass, read from JSON and `--key value` overrides.

Every key is validated: an unknown key (in the file or an override) raises a ValueError that
names it; numbers go through `refrag.validate.require` (finite, in range: NaN and infinity are
refused), and files and overrides are parsed with `refrag.fileio.loads_strict` (no NaN/Infinity
literals, no duplicate keys). The ``model`` key is a dict of `refrag.model.preset` overrides (for example
``{"block_pattern": "T,M,T,M"}``); override one of them on the command line with
``--model.block_pattern T,M``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from refrag.data.prompt import PromptFormat
from refrag.fileio import check_finite_tree, loads_strict
from refrag.validate import require

GROUPS = {
    "model": ("preset", "model", "init_from"),
    "data": ("kb_source", "kb_dir", "tokenizer", "vocab_size", "top_k", "retrieval", "question_first", "retriever", "seq_len",
             "max_doc_tokens", "min_doc_tokens", "doc_cut_keeps_answers", "generated_worlds", "extra_questions", "counterfactual_copies",
             "fresh_names", "multihop_copies", "document_loss", "batch_size", "val_rows"),
    "optimization": ("max_steps", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                     "beta1", "beta2", "grad_clip"),
    "system": ("device", "seed", "deterministic", "fsdp", "bf16"),
    "logging and checkpoints": ("out_dir", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"),
}

HELP = {
    "preset": "model preset: tiny (CPU demo), d12, d16, d20",
    "model": "dict of ModelConfig overrides applied to the preset (e.g. block_pattern)",
    "init_from": "transformers checkpoint directory (config.json + model.safetensors; Mamba2 or Bamba) to fine-tune "
                 "instead of a fresh preset model (refrag.model.hf_import; its tokenizer.json when present)",
    "kb_source": "KB source directory with documents.jsonl and queries/ (empty: the embedded KB)",
    "kb_dir": "prepared knowledge base directory (python -m refrag.retrieval prepare-kb)",
    "tokenizer": "tokenizer.json path; trained on kb_source (rank 0) when it does not exist",
    "vocab_size": "tokenizer vocabulary size when a tokenizer has to be trained",
    "top_k": "documents retrieved per question",
    "retrieval": "include the retrieval message (false: no-retrieval baseline)",
    "question_first": "put the user question before the retrieval block (documents are read knowing it)",
    "retriever": "retriever kind: dense, bm25, hybrid",
    "seq_len": "tokens per packed row",
    "max_doc_tokens": "each retrieved document is cut to this many tokens (recorded in the prompt format)",
    "min_doc_tokens": "train: when > 0, each conversation's documents are cut at a length drawn from "
                      "[min_doc_tokens, max_doc_tokens], and answers the cut removed become \"I don't know\"",
    "doc_cut_keeps_answers": "train, with min_doc_tokens: a document is cut after the answers it holds "
                             "(within max_doc_tokens) instead of turning the answers the cut removed into \"I don't know\"",
    "generated_worlds": "train: procedurally generated worlds (make_kb --names training --varied-documents, "
                        "fresh names each) whose questions are added to the training conversations",
    "extra_questions": "train: up to this many further questions about the shown documents per conversation",
    "counterfactual_copies": "train, with retrieval: copies of each conversation with its answers swapped consistently",
    "fresh_names": "train: counterfactual copies (and multi-hop trace copies after the first) also replace every "
                   "generated name with a fresh, never-seen one (refrag.data.augment.fresh_names)",
    "multihop_copies": "train, with retrieval: copies of a teacher-forced multi-hop trace (the model asks the "
                       "follow-up query itself, [QUERY] ... [/QUERY], then reads hop 2's documents) of every two-hop "
                       "question, generated worlds included (refrag.train.rl.multihop_conversations)",
    "document_loss": "train: also learn next-token prediction on the retrieved documents' tokens",
    "batch_size": "packed rows per micro-step (flattened into one varlen row)",
    "val_rows": "packed rows (per rank) of the validation loss",
    "max_steps": "optimizer steps",
    "grad_accum": "micro-steps per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of lr (cosine decay)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (matrices only; norms, biases, embeddings get none)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "max global grad norm (0 disables clipping)",
    "device": "auto, cpu or cuda",
    "seed": "random seed",
    "deterministic": "torch.use_deterministic_algorithms (bit-exact resume)",
    "fsdp": "shard parameters with FSDP2 fully_shard (torchrun, 2+ processes: NCCL on CUDA, gloo on CPU)",
    "bf16": "bf16 autocast (CUDA only; ignored on CPU)",
    "out_dir": "directory for metrics.jsonl and checkpoints/",
    "log_every": "steps between progress-bar metric updates",
    "eval_every": "steps between validation losses (0: only at the end)",
    "ckpt_every": "steps between checkpoints (0: only at the end)",
    "keep_checkpoints": "checkpoints kept on disk (oldest deleted first)",
}


@dataclass
class TrainConfig:
    """All settings of one SFT run; see `HELP` for each key."""

    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    init_from: str = ""
    kb_source: str = ""
    kb_dir: str = "out/kb"
    tokenizer: str = "out/tokenizer.json"
    vocab_size: int = 4096
    top_k: int = 3
    retrieval: bool = True
    question_first: bool = False
    retriever: str = "bm25"
    seq_len: int = 1024
    max_doc_tokens: int = 256
    min_doc_tokens: int = 0
    doc_cut_keeps_answers: bool = False
    generated_worlds: int = 0
    extra_questions: int = 0
    counterfactual_copies: int = 0
    fresh_names: bool = False
    multihop_copies: int = 0
    document_loss: bool = False
    batch_size: int = 1
    val_rows: int = 8
    max_steps: int = 100
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    device: str = "auto"
    seed: int = 1337
    deterministic: bool = False
    fsdp: bool = False
    bf16: bool = True
    out_dir: str = "out/sft"
    log_every: int = 1
    eval_every: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "top_k", "seq_len", "max_doc_tokens", "batch_size", "max_steps", "grad_accum", "log_every",
                     "keep_checkpoints"):
            require(name, getattr(self, name), int, minimum=1)
        for name in ("min_doc_tokens", "generated_worlds", "extra_questions", "counterfactual_copies", "multihop_copies", "val_rows", "warmup_steps", "eval_every", "ckpt_every", "seed"):
            require(name, getattr(self, name), int, minimum=0)
        for name in ("lr", "weight_decay", "grad_clip"):
            require(name, getattr(self, name), float, minimum=0)
        require("min_lr_ratio", self.min_lr_ratio, float, minimum=0, maximum=1)
        for name in ("beta1", "beta2"):
            require(name, getattr(self, name), float, minimum=0, below=1)
        for name in ("retrieval", "question_first", "doc_cut_keeps_answers", "fresh_names", "document_loss", "deterministic", "fsdp", "bf16"):
            require(name, getattr(self, name), bool)
        if self.min_doc_tokens > self.max_doc_tokens:
            raise ValueError(f"config key min_doc_tokens ({self.min_doc_tokens}) must not exceed "
                             f"max_doc_tokens ({self.max_doc_tokens})")
        if not isinstance(self.init_from, str):
            raise ValueError(f"config key init_from must be a directory path string, got {self.init_from!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"config key model must be a dict of ModelConfig overrides, got {self.model!r}")
        check_finite_tree(self.model, "config key model")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"config key device must be auto, cpu or cuda, got {self.device!r}")
        if self.retriever not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"config key retriever must be dense, bm25 or hybrid, got {self.retriever!r}")

    def prompt_format(self) -> PromptFormat:
        """The prompt-format record of this run (saved in every checkpoint as prompt_format.json)."""
        return PromptFormat(retrieval=self.retrieval, question_first=self.question_first,
                            max_doc_tokens=self.max_doc_tokens)

    def to_dict(self) -> dict:
        """Plain JSON-able dict; `from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Config from a dict; unknown keys raise ValueError naming them."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                             f"valid keys: {', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**values)


def parse_value(raw: str, key: str = "value"):
    """JSON value when it parses (numbers, true/false, dicts), else the raw string. NaN, Infinity
    and duplicate keys are refused (ValueError naming config key `key`), so ``--lr NaN`` never
    reaches a config."""
    try:
        return loads_strict(raw)
    except json.JSONDecodeError:
        return raw
    except ValueError as err:
        raise ValueError(f"config key {key}: {raw!r} refused: {err}") from None


def apply_overrides(values: dict, overrides: dict[str, str]) -> dict:
    """Apply ``{"lr": "1e-3", "model.block_pattern": "M*4"}`` string overrides to a config dict."""
    values = {**values, "model": dict(values.get("model", {}))}
    for key, raw in overrides.items():
        top, _, sub = key.partition(".")
        if sub and top != "model":
            raise ValueError(f"unknown config key {key!r}: only model.<name> keys may be dotted")
        if sub:
            values["model"][sub] = parse_value(raw, key)
        elif key in ("preset", "init_from", "kb_source", "kb_dir", "tokenizer", "retriever", "out_dir", "device"):
            values[key] = raw
        else:
            values[key] = parse_value(raw, key)
    return values


def read_config_file(path: str | Path | None) -> dict:
    """The JSON object of a config file ({} when path is None); ValueError when missing or not an object."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        values = loads_strict(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"config file {path}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    return values


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """TrainConfig from a JSON file (or defaults when path is None) plus string overrides."""
    return TrainConfig.from_dict(apply_overrides(read_config_file(path), overrides or {}))
