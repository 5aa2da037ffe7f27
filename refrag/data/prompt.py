"""The prompt format a model is trained with, recorded in its checkpoint and reused everywhere.

A `PromptFormat` holds everything rendering depends on besides the tokenizer: whether the
retrieval message is shown (``retrieval``), whether the user's question comes before the
documents (``question_first``), how many tokens of each document are kept (``max_doc_tokens``)
and the system prompt. Training data (`refrag.train.data`), evaluation (`refrag.eval`), the
demo and inference all build their conversations with `arrange` / `conversation` and render
them with `render` / `render_for_generation`, so a checkpoint is evaluated exactly as it was
trained. Every checkpoint stores its record as ``prompt_format.json`` (`refrag.train.sft`).

Layouts (``question_first`` False / True)::

    system, retrieval, user, assistant          system, user, retrieval, assistant

With the question first, document tokens are read knowing what is asked (the REFRAG hop-1 order).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from refrag.data.conversations import SYSTEM_PROMPT
from refrag.data.render import (ANSWER_PREFIX, DEFAULT_MAX_DOC_TOKENS, RenderedExample, render_conversation,
                                render_for_generation)

FILE_NAME = "prompt_format.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PromptFormat:
    """How conversations are laid out and rendered; see the module docstring."""

    retrieval: bool = True
    question_first: bool = False
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS
    system_prompt: str = SYSTEM_PROMPT
    answer_prefix: str = ANSWER_PREFIX

    def __post_init__(self):
        for name in ("retrieval", "question_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"prompt format {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.max_doc_tokens, bool) or not isinstance(self.max_doc_tokens, int) or self.max_doc_tokens < 1:
            raise ValueError(f"prompt format max_doc_tokens must be an int >= 1, got {self.max_doc_tokens!r}")
        if self.answer_prefix != ANSWER_PREFIX:
            raise ValueError(f"prompt format answer_prefix {self.answer_prefix!r} is not supported by this "
                             f"version (renders answers after {ANSWER_PREFIX!r})")

    # ------------------------------------------------------------------ conversations
    def arrange(self, conversation: dict) -> dict:
        """A training conversation in this format: without its retrieval messages when
        ``retrieval`` is off, else with the first user message before the first retrieval
        message when ``question_first`` (other conversations are returned unchanged)."""
        messages = conversation["messages"]
        if not self.retrieval:
            return {**conversation, "messages": [m for m in messages if m["role"] != "retrieval"]}
        if not self.question_first:
            return conversation
        roles = [m["role"] for m in messages]
        if "user" not in roles or "retrieval" not in roles:
            return conversation
        first_user, first_retrieval = roles.index("user"), roles.index("retrieval")
        if first_user < first_retrieval:
            return conversation
        rest = messages[:first_user] + messages[first_user + 1:]
        return {**conversation, "messages": rest[:first_retrieval] + [messages[first_user]] + rest[first_retrieval:]}

    def conversation(self, question: str, documents: list[dict]) -> dict:
        """Generation conversation (no assistant message) for one question and its documents."""
        return self.arrange({"messages": [{"role": "system", "content": self.system_prompt},
                                          {"role": "retrieval", "documents": documents},
                                          {"role": "user", "content": question}]})

    # ------------------------------------------------------------------ rendering
    def render(self, conversation: dict, tokenizer, max_doc_tokens: int | None = None) -> RenderedExample:
        """Training example (`render_conversation`); max_doc_tokens overrides the record's cut."""
        return render_conversation(conversation, tokenizer, max_doc_tokens or self.max_doc_tokens)

    def render_for_generation(self, conversation: dict, tokenizer) -> RenderedExample:
        """Prompt ending with [ASST] (`refrag.data.render.render_for_generation`); cutting documents
        to max_doc_tokens is the format itself here, so it is not warned about."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return render_for_generation(conversation, tokenizer, self.max_doc_tokens)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "PromptFormat":
        """Record from `to_dict` output; unknown keys or another format version raise ValueError."""
        values = dict(values)
        version = values.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"prompt format version {version!r} is not supported (expected {FORMAT_VERSION})")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown prompt format key(s) {unknown}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "PromptFormat":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt format file {path} not found")
        return cls.from_dict(json.loads(path.read_text()))

    def replace(self, **changes) -> "PromptFormat":
        """A copy with some fields changed (e.g. evaluating at another document cut)."""
        return dataclasses.replace(self, **changes)
