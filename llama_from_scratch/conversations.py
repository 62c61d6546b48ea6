"""Multi-turn conversations for supervised fine-tuning (chapter 9): ChatML rendering, labels on
the assistant turns only, a dataset the chapter's training code takes as it is.

Vicuna (Chiang et al., 2023) fine-tuned LLaMA on 70K conversations shared by ChatGPT users
(ShareGPT), and "compute[d] the fine-tuning loss solely on the chatbot's output": a conversation
is one sequence, rendered with the chat template, and every assistant turn is a response to
learn, each seeing the whole history before it. The user turns (and the system message, and the template's
headers) are context: their labels are ``-100``.

The convention is chapter 9's for one turn (:func:`~llama_from_scratch.instruct.format_chatml`):
an assistant turn's content and the ``<|im_end|>`` that closes it are trained (that token teaches
the model to stop and hand the turn back); the ``<|im_start|>assistant\\n`` header before it and
the template's newline after it are not. The sequence ends at the last ``<|im_end|>``, so a
conversation of one exchange gives exactly chapter 9's ``prompt + response + [eos]`` ids with the
prompt masked.

How the labels are found: the whole conversation is rendered and tokenized *once* (as the model
will read it), then the ids are scanned for the assistant header's ids; each assistant span runs
from there to the next end-of-turn id, inclusive. Each span is decoded and compared with the
message's content, so a tokenization that merged a header into the content (content starting
with whitespace, for instance) raises instead of training on a shifted mask. The tests check the
labels against an independent construction: each turn tokenized on its own as the difference of
``transformers``' ``apply_chat_template`` on the conversation up to and after that turn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llama_from_scratch.data_files import find_data_dir, read_jsonl
from llama_from_scratch.smollm2_tokenizer import render_chatml

__all__ = [
    "ASSISTANT_HEADER",
    "check_conversation",
    "render_conversation",
    "tokenize_conversation",
    "ConversationDataset",
    "few_shot_messages",
    "load_conversations",
    "conversations_dir",
]

ASSISTANT_HEADER = "<|im_start|>assistant\n"  # ChatML: what precedes every assistant turn
_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
_ROLES = ("system", "user", "assistant")


def check_conversation(messages: Any, final_role: str | None = "assistant") -> None:
    """Raise ``ValueError`` unless ``messages`` is a well-formed chat.

    Well-formed: a non-empty list of ``{"role", "content"}`` dicts; an optional ``system``
    message first; then ``user`` and ``assistant`` alternating, starting with ``user``; every
    content a non-empty string without ChatML's markers (``<|im_start|>``, ``<|im_end|>``: a
    message must not open or close turns of its own). ``final_role`` is the role the last
    message must have: ``"assistant"`` for training (there is a response to learn), ``"user"``
    for a prompt the model answers, ``None`` for either.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation is empty")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with exactly 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {_ROLES})")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
        elif role != expected:
            raise ValueError(f"message {i}: roles out of order, expected {expected!r} after "
                             f"{messages[i - 1]['role'] if i else 'the start'!r}, got {role!r}")
        else:
            expected = "assistant" if role == "user" else "user"
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"message {i} ({role}): empty content")
        for marker in _CHATML_MARKERS:
            if marker in content:
                raise ValueError(f"message {i} ({role}): content contains the chat-template marker {marker!r}")
    last = messages[-1]["role"]
    if last == "system":
        raise ValueError("the conversation has only a system message")
    if final_role is not None and last != final_role:
        raise ValueError(f"the conversation must end with a {final_role!r} message, got {last!r}")


def render_conversation(messages: Sequence[Mapping[str, str]], tokenizer: Any = None,
                        add_generation_prompt: bool = False) -> str:
    """The conversation as text in the chat template: the tokenizer's own
    (``apply_chat_template(..., tokenize=False)``) when it has one, else SmolLM2's ChatML written
    out by hand (:func:`~llama_from_scratch.smollm2_tokenizer.render_chatml`, default system
    message included). Checked with ``final_role=None``."""
    check_conversation(messages, final_role=None)
    messages = [dict(m) for m in messages]
    if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        if isinstance(text, str):
            return text
    return render_chatml(messages, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Encode a rendered chat: special tokens recognised, no BOS added (the template has none)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # the package's SmolLM2Tokenizer: recognises special tokens, never adds a BOS
        ids = tokenizer.encode(text)
    return [int(t) for t in ids]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise ValueError(f"the tokenizer needs an integer eos_token_id (the end-of-turn token), got {eos!r}")
    return eos


def tokenize_conversation(messages: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int | None = None,
                          ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` (1-D LongTensors) of a conversation for SFT.

    ``input_ids``: the conversation rendered with the chat template (:func:`render_conversation`)
    and tokenized, cut right after the last ``<|im_end|>`` (the tokenizer's ``eos_token_id``).
    ``labels``: the same ids on every assistant turn's content and its closing ``<|im_end|>``,
    ``ignore_index`` everywhere else (system, user turns, headers, the newlines between turns).
    Not shifted: the loss compares logits at ``t`` with ``labels[t + 1]``, as ``sft_loss`` does.

    ``max_length`` keeps the first ``max_length`` tokens (a turn cut there keeps the labels of
    its tokens that remain, without its ``<|im_end|>``). Raises ``ValueError`` on a malformed
    conversation (:func:`check_conversation`) or when the tokenization does not show each
    assistant turn after its own header (e.g. content starting with whitespace, which byte-level
    BPE merges with the header's newline).
    """
    check_conversation(messages, final_role="assistant")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    eos = _eos_id(tokenizer)
    ids = _encode(tokenizer, render_conversation(messages, tokenizer))
    header = _encode(tokenizer, ASSISTANT_HEADER)
    if eos not in ids:
        raise ValueError("the rendered conversation has no end-of-turn token: is the tokenizer's template ChatML?")
    ids = ids[:len(ids) - ids[::-1].index(eos)]  # up to and including the last <|im_end|>
    labels = [ignore_index] * len(ids)
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = []
    t = 0
    while t <= len(ids) - len(header):
        if ids[t:t + len(header)] == header:
            start = t + len(header)
            end = ids.index(eos, start) if eos in ids[start:] else len(ids) - 1
            spans.append((start, end))
            t = end + 1
        else:
            t += 1
    if len(spans) != len(contents):
        raise ValueError(f"found {len(spans)} assistant headers {ASSISTANT_HEADER!r} in the tokenized conversation "
                         f"for {len(contents)} assistant messages: the template or the tokenizer is not ChatML as "
                         "SmolLM2's, or a content starts with whitespace that merged with the header")
    for (start, end), content in zip(spans, contents):
        decoded = tokenizer.decode(ids[start:end])
        if decoded != content:
            raise ValueError(f"an assistant span decodes to {decoded!r}, not its message {content!r}: the "
                             "tokenization merged the turn with its header (strip leading whitespace)")
        labels[start:end + 1] = ids[start:end + 1]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class ConversationDataset(Dataset):
    """Tokenized multi-turn conversations for SFT, in the form chapter 9's training code takes.

    Each item is ``{"input_ids": LongTensor [L], "labels": LongTensor [L]}``
    (:func:`tokenize_conversation`): :func:`~llama_from_scratch.instruct.instruction_collate`
    pads such items and keeps their labels, so :class:`~llama_from_scratch.instruct.SFTBlocks`,
    :func:`~llama_from_scratch.instruct.sft_loss` and chapter 8's ``Trainer`` train on them
    unchanged.

    Args:
        conversations: lists of messages, or dicts with a ``"messages"`` list (the format of
            :func:`load_conversations`).
        tokenizer: with ``encode``, ``decode``, ``eos_token_id`` (and ``apply_chat_template``
            for its own template; else SmolLM2's ChatML is used).
        max_length: the longest sequence kept (None: no limit).
        truncation: ``"skip"`` (default) leaves out a conversation longer than ``max_length``
            and counts it in ``.skipped``; ``"truncate"`` keeps its first ``max_length`` tokens if
            at least one assistant token remains (``.truncated`` counts them), else skips it.

    A malformed conversation raises ``ValueError`` naming its index: the data is meant to be
    correct, and a silent skip would hide a bug in the data's generator.
    """

    def __init__(self, conversations: Iterable[Any], tokenizer: Any, max_length: int | None = None,
                 truncation: str = "skip") -> None:
        if truncation not in ("skip", "truncate"):
            raise ValueError(f"truncation must be 'skip' or 'truncate', got {truncation!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.skipped = 0
        self.truncated = 0
        self.kept: list[int] = []
        self.items: list[dict[str, torch.Tensor]] = []
        for index, conversation in enumerate(conversations):
            messages = conversation["messages"] if isinstance(conversation, Mapping) else conversation
            try:
                item = tokenize_conversation(messages, tokenizer)
            except ValueError as e:
                raise ValueError(f"conversation {index}: {e}") from None
            if max_length is not None and item["input_ids"].numel() > max_length:
                cut = {key: value[:max_length] for key, value in item.items()}
                if truncation == "truncate" and bool((cut["labels"] != -100).any()):
                    item = cut
                    self.truncated += 1
                else:
                    self.skipped += 1
                    continue
            self.kept.append(index)
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]

    def __repr__(self) -> str:
        return (f"ConversationDataset({len(self)} conversations, max_length={self.max_length}, "
                f"skipped={self.skipped}, truncated={self.truncated})")


def few_shot_messages(examples: Sequence[Any], messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """An in-context-learning prompt: the example conversations' turns, then ``messages``.

    The examples (lists of messages or dicts with ``"messages"``, each ending with the
    assistant) become earlier turns of the same chat, so the model sees k finished conversations
    in its own template before the one it continues. Raises ``ValueError`` if an example or the
    result is malformed (a system message may only start the first example)."""
    out: list[dict[str, str]] = []
    for i, example in enumerate(examples):
        turns = example["messages"] if isinstance(example, Mapping) else example
        try:
            check_conversation(turns, final_role="assistant")
        except ValueError as e:
            raise ValueError(f"example {i}: {e}") from None
        out += [dict(m) for m in turns]
    out += [dict(m) for m in messages]
    check_conversation(out, final_role=None)
    return out


# ---------------------------------------------------------------------------------------------
# The project's conversations
# ---------------------------------------------------------------------------------------------

def conversations_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the conversations' ``train.jsonl`` / ``test.jsonl``: ``data_dir``;
    ``$LFS_CONVERSATIONS_DIR``; else ``data/conversations`` (see
    :func:`~llama_from_scratch.data_files.find_data_dir`)."""
    return find_data_dir("conversations", "LFS_CONVERSATIONS_DIR", "conversation data", data_dir)


def load_conversations(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The project's multi-turn conversations: ``split`` is ``"train"``, ``"test"`` or ``"all"``.

    Each is ``{"messages": [...], "task": str, "answer": str}`` (``data/conversations/README.md``);
    every conversation is checked with :func:`check_conversation`."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = conversations_dir(data_dir)
    out: list[dict[str, Any]] = []
    for name in (["train", "test"] if split == "all" else [split]):
        path = folder / f"{name}.jsonl"
        for line_no, row in read_jsonl(path):
            if not isinstance(row, dict) or "messages" not in row:
                raise ValueError(f"{path}:{line_no}: expected an object with 'messages'")
            try:
                check_conversation(row["messages"])
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: {e}") from None
            out.append(row)
    return out
