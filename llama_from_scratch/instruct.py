"""Instruction tuning data (chapter 9): prompt templates, tokenized examples, prompt masking.

Supervised fine-tuning (SFT) trains a pretrained model on (instruction, input, output) examples
with the ordinary next-token loss, but only on the *response*: the prompt is given, not learned.

* **Templates.** Stanford Alpaca wraps every example in a fixed text template
  (:func:`format_alpaca`); chat models use their own chat template instead, ChatML for SmolLM2
  (:func:`format_chatml`, through the tokenizer's ``apply_chat_template``).
* **Tokenization** (:class:`InstructionDataset`): ``prompt_ids + response_ids + [eos]``. The EOS
  after the response is what teaches the model to stop. Bad examples (missing or empty fields,
  too long) are found when the dataset is built, counted in ``.skipped`` by reason and left
  out, so training never crashes mid-epoch on example 31,415.
* **Collation** (:func:`instruction_collate`): sequences are padded on the RIGHT (training runs
  every position at once; causal attention means a real token never sees the padding after it,
  so no attention mask is needed for the loss to be exact). ``labels`` are the input ids with
  ``-100`` (the ``ignore_index`` of the loss) on the padding and, with ``mask_prompt``, on the
  prompt tokens.

**Label convention.** ``labels`` are *not* shifted: ``labels[:, t]`` is the token at position
``t`` (the Hugging Face convention), and the loss shifts: logits at position ``t`` predict
``labels[:, t + 1]`` (:func:`sft_loss`). The pretraining :class:`~llama_from_scratch.trainer.Trainer`
instead takes pre-shifted ``(x, y)`` blocks and computes ``cross_entropy(model(x), y)``;
:func:`shift_for_trainer` turns a collated batch into that form, and both give the same loss.
Padding is masked through the labels, never by comparing with ``pad_token_id``: SmolLM2 pads
with its EOS token (id 2), and the real EOS after each response must keep its label.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llama_from_scratch.data_files import find_data_dir, read_jsonl
from llama_from_scratch.loss import cross_entropy

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "format_alpaca",
    "format_chatml",
    "chat_messages",
    "InstructionDataset",
    "instruction_collate",
    "sft_loss",
    "shift_for_trainer",
    "SFTBlocks",
    "load_instructions",
    "instructions_dir",
]

# The Stanford Alpaca templates, character for character (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def _field(example: Any, name: str, required: bool) -> str:
    if not isinstance(example, Mapping):
        raise TypeError(f"an example must be a dict with 'instruction', 'input', 'output', got {type(example).__name__}")
    value = example.get(name)
    if value is None:
        if required:
            raise ValueError(f"example has no {name!r} field: {dict(example)!r}")
        return ""
    if not isinstance(value, str):
        raise TypeError(f"example field {name!r} must be a str, got {type(value).__name__}")
    return value


def format_alpaca(example: Mapping[str, str], with_response: bool = True) -> str:
    """The Alpaca prompt of ``example`` (a dict with ``instruction``, optional ``input``, ``output``).

    With a non-empty ``input`` the "paired with an input" template is used, else the short one.
    ``with_response=True`` appends ``output`` right after ``"### Response:\\n"`` (the training
    text, without EOS: the tokenizer-level EOS is added by :class:`InstructionDataset`);
    ``with_response=False`` gives the prompt the model continues at inference time.
    Raises ``ValueError`` when ``instruction`` (or, with the response, ``output``) is missing.
    """
    instruction = _field(example, "instruction", required=True)
    inp = _field(example, "input", required=False)
    if inp.strip():
        text = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
    else:
        text = ALPACA_PROMPT.format(instruction=instruction)
    if with_response:
        text += _field(example, "output", required=True)
    return text


def chat_messages(example: Mapping[str, str], with_response: bool = True) -> list[dict[str, str]]:
    """The example as chat messages: the user turn is the instruction, followed by a blank line and
    the input when there is one; the assistant turn is the output."""
    instruction = _field(example, "instruction", required=True)
    inp = _field(example, "input", required=False)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages = [{"role": "user", "content": user}]
    if with_response:
        messages.append({"role": "assistant", "content": _field(example, "output", required=True)})
    return messages


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, bool) or not isinstance(eos, int):
        raise ValueError(f"the tokenizer needs an integer eos_token_id to end responses, got {eos!r}")
    return eos


def _ids(value: Any) -> list[int]:
    """apply_chat_template may return a list, a tensor or a BatchEncoding-like mapping."""
    if isinstance(value, Mapping):
        value = value["input_ids"]
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    return [int(t) for t in value]


def format_chatml(example: Mapping[str, str], tokenizer: Any, with_response: bool = True) -> list[int]:
    """Token ids of the example in the tokenizer's chat template (ChatML for SmolLM2).

    The prompt is ``tokenizer.apply_chat_template([user], add_generation_prompt=True,
    tokenize=True)``, which ends with ``<|im_start|>assistant\\n``. With the response, the ids
    of the full two-turn chat are taken from the template too, cut right after the end-of-turn
    token (``eos_token_id``, ``<|im_end|>`` for SmolLM2; the template's trailing newline is not
    trained on), so the result is ``prompt_ids + response_ids + [eos]``. If the template's
    tokenization of the full chat does not start with the prompt's ids, or has no EOS after the
    response, the response is encoded on its own and EOS appended.
    """
    prompt = _ids(tokenizer.apply_chat_template(chat_messages(example, with_response=False),
                                                add_generation_prompt=True, tokenize=True))
    if not with_response:
        return prompt
    eos = _eos_id(tokenizer)
    full = _ids(tokenizer.apply_chat_template(chat_messages(example, with_response=True),
                                              add_generation_prompt=False, tokenize=True))
    tail = full[len(prompt):]
    if full[:len(prompt)] == prompt and eos in tail:
        return prompt + tail[:tail.index(eos) + 1]
    return prompt + _encode_response(tokenizer, _field(example, "output", required=True)) + [eos]


def _encode_response(tokenizer: Any, text: str) -> list[int]:
    """Encode text that continues a prompt: without the BOS a Hugging Face tokenizer would add."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # not a transformers tokenizer (e.g. the package's SmolLM2Tokenizer: never adds BOS)
        ids = tokenizer.encode(text)
    return [int(t) for t in ids]


class InstructionDataset(Dataset):
    """Tokenized instruction examples for SFT.

    Each item is ``{"input_ids": LongTensor [L], "prompt_length": int}``: the prompt (template
    applied), the response, and the tokenizer's EOS. The first ``prompt_length`` ids are the
    prompt, which :func:`instruction_collate` masks out of the loss.

    Args:
        examples: dicts with ``instruction``, optional ``input``, ``output`` (Alpaca format).
        tokenizer: an object with ``encode(text) -> list[int]`` and ``eos_token_id`` (and, for
            ``template="chatml"``, ``apply_chat_template``): the package's SmolLM2 tokenizer or a
            Hugging Face one.
        template: ``"alpaca"`` (:func:`format_alpaca`; the prompt is encoded as the tokenizer
            encodes a whole text, e.g. with a BOS for Llama tokenizers, the response without
            special tokens) or ``"chatml"`` (:func:`format_chatml`).
        max_length: the longest allowed sequence, EOS included (None: no limit).
        truncation: what to do with a sequence longer than ``max_length``: ``"skip"`` leaves the
            example out (the default: a response cut before its EOS teaches the model not to
            stop); ``"truncate"`` keeps the first ``max_length`` tokens if at least one response
            token remains, else skips it.

    Examples are checked when the dataset is built. Left out, counted in ``.skipped`` (a
    ``Counter``) under: ``"not_a_dict"``, ``"missing_instruction"``, ``"missing_output"``,
    ``"bad_field_type"`` (a field that is not a string), ``"empty_instruction"``,
    ``"empty_output"`` (only whitespace), ``"too_long"``. ``.truncated`` counts examples cut
    to ``max_length``; ``.kept`` lists the indices of the examples kept.
    """

    SKIP_REASONS = ("not_a_dict", "missing_instruction", "missing_output", "bad_field_type",
                    "empty_instruction", "empty_output", "too_long")

    def __init__(self, examples: Iterable[Mapping[str, Any]], tokenizer: Any, template: str = "alpaca",
                 max_length: int | None = None, truncation: str = "skip") -> None:
        if template not in ("alpaca", "chatml"):
            raise ValueError(f"template must be 'alpaca' or 'chatml', got {template!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 (a prompt token and EOS) or None, got {max_length!r}")
        if truncation not in ("skip", "truncate"):
            raise ValueError(f"truncation must be 'skip' or 'truncate', got {truncation!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.truncation = truncation
        self.eos_token_id = _eos_id(tokenizer)
        self.skipped: Counter[str] = Counter()
        self.truncated = 0
        self.kept: list[int] = []
        self.items: list[dict[str, Any]] = []
        for index, example in enumerate(examples):
            reason = self._problem(example)
            if reason is None:
                prompt, full = self._tokenize(example)
                if max_length is not None and len(full) > max_length:
                    if truncation == "truncate" and len(prompt) < max_length:
                        full = full[:max_length]
                        self.truncated += 1
                    else:
                        reason = "too_long"
            if reason is not None:
                self.skipped[reason] += 1
                continue
            self.kept.append(index)
            self.items.append({"input_ids": torch.tensor(full, dtype=torch.long), "prompt_length": len(prompt)})

    @staticmethod
    def _problem(example: Any) -> str | None:
        if not isinstance(example, Mapping):
            return "not_a_dict"
        for name in ("instruction", "output"):
            if example.get(name) is None:
                return f"missing_{name}"
        for name in ("instruction", "input", "output"):
            if example.get(name) is not None and not isinstance(example[name], str):
                return "bad_field_type"
        for name in ("instruction", "output"):
            if not example[name].strip():
                return f"empty_{name}"
        return None

    def _tokenize(self, example: Mapping[str, str]) -> tuple[list[int], list[int]]:
        if self.template == "chatml":
            prompt = format_chatml(example, self.tokenizer, with_response=False)
            full = format_chatml(example, self.tokenizer, with_response=True)
        else:
            prompt = [int(t) for t in self.tokenizer.encode(format_alpaca(example, with_response=False))]
            full = prompt + _encode_response(self.tokenizer, example["output"]) + [self.eos_token_id]
        return prompt, full

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    def __repr__(self) -> str:
        return (f"InstructionDataset({len(self)} examples, template={self.template!r}, max_length={self.max_length}, "
                f"skipped={dict(self.skipped)}, truncated={self.truncated})")


def instruction_collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int, ignore_index: int = -100,
                        mask_prompt: bool = True, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pads a list of :class:`InstructionDataset` items into a training batch (right padding).

    Args:
        batch: items ``{"input_ids": 1-D ids (list or LongTensor), "prompt_length": int}``, or
            items that carry their own ``"labels"`` (same length as the ids, ``ignore_index`` where
            not trained: the multi-turn items of
            :class:`~llama_from_scratch.conversations.ConversationDataset`).
        pad_token_id: the id written into padded positions (its value never decides a label).
        ignore_index: the label of positions the loss skips.
        mask_prompt: also give the prompt tokens ``ignore_index`` (train on the response only).
        max_length: cut every sequence to its first ``max_length`` tokens first (None: no cut).

    Returns ``{"input_ids", "labels", "attention_mask"}``, each ``LongTensor [B, T]`` with ``T``
    the longest (cut) sequence: ``attention_mask`` is 1 on real tokens, 0 on padding; ``labels``
    equal ``input_ids`` except ``ignore_index`` on padding and, when ``mask_prompt``, on the first
    ``prompt_length`` tokens of each row (for items with ``"labels"``: those labels, when
    ``mask_prompt``). Labels are unshifted (see the module docstring).
    Raises ``ValueError`` for an empty batch, an empty sequence, a ``prompt_length`` outside
    ``[0, len]``, or a bad ``max_length``; ``TypeError`` for non-integer ids.
    """
    if len(batch) == 0:
        raise ValueError("instruction_collate needs at least one example")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    rows: list[torch.Tensor] = []
    prompt_lengths: list[int] = []
    own_labels: list[torch.Tensor | None] = []
    for i, item in enumerate(batch):
        ids = item["input_ids"]
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"example {i}: input_ids must be 1-D integer ids, got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"example {i} has no tokens")
        own = item.get("labels")
        if own is not None:
            own = own if isinstance(own, torch.Tensor) else torch.tensor(list(own), dtype=torch.long)
            if own.shape != ids.shape:
                raise ValueError(f"example {i}: labels of shape {tuple(own.shape)} for input_ids of shape "
                                 f"{tuple(ids.shape)}")
        p = item.get("prompt_length", 0)
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= ids.numel():
            raise ValueError(f"example {i}: prompt_length must be an int in [0, {ids.numel()}], got {p!r}")
        if max_length is not None:
            ids = ids[:max_length]
            own = None if own is None else own[:max_length]
        rows.append(ids.long())
        own_labels.append(None if own is None else own.long())
        prompt_lengths.append(min(p, ids.numel()))
    T = max(r.numel() for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), ignore_index, dtype=torch.long)
    for i, (ids, p, own) in enumerate(zip(rows, prompt_lengths, own_labels)):
        n = ids.numel()
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        if own is not None and mask_prompt:
            labels[i, :n] = own
            continue
        start = p if mask_prompt else 0
        labels[i, start:n] = ids[start:]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def shift_for_trainer(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y) = (input_ids[:, :-1], labels[:, 1:])``: the pre-shifted pair that the pretraining
    loss ``cross_entropy(model(x), y)`` expects; equal to :func:`sft_loss` on the batch."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be [B, T], got {tuple(input_ids.shape)} and {tuple(labels.shape)}")
    return input_ids[:, :-1], labels[:, 1:]


class SFTBlocks:
    """Instruction examples in the form chapter 8's :class:`~llama_from_scratch.trainer.Trainer` trains on.

    The pretraining ``Trainer`` asks its data for ``batch(indices) -> (x, y)`` and scores
    ``cross_entropy(model(x), y)`` with ``-100`` targets skipped. This wraps an
    :class:`InstructionDataset` so that each batch is :func:`instruction_collate` (right padding,
    prompt masking) followed by :func:`shift_for_trainer`: the Trainer then does supervised
    fine-tuning with everything it already has (accumulation, clipping, schedule, bf16, eval,
    checkpoints, DDP), and its loss equals :func:`sft_loss` on the same batch. A
    :class:`~llama_from_scratch.conversations.ConversationDataset` (multi-turn items with their
    own labels, loss on the assistant turns) is wrapped the same way.

    ``block_size`` is the longest ``x`` a batch can have (the longest example minus one); batches
    are padded only to their own longest example.
    """

    def __init__(self, dataset: Any, pad_token_id: int, mask_prompt: bool = True,
                 ignore_index: int = -100) -> None:
        if len(dataset) == 0:
            raise ValueError("the instruction dataset is empty (every example was skipped?)")
        if ignore_index != -100:
            raise ValueError("the Trainer skips targets equal to -100; other ignore_index values are not supported")
        self.dataset = dataset
        self.pad_token_id = pad_token_id
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index

    @property
    def block_size(self) -> int:
        return max(item["input_ids"].numel() for item in self.dataset.items) - 1

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both ``[len(indices), T - 1]`` with ``T`` the batch's longest example."""
        items = [self.dataset[int(i)] for i in torch.as_tensor(indices).reshape(-1).tolist()]
        collated = instruction_collate(items, self.pad_token_id, self.ignore_index, self.mask_prompt)
        return shift_for_trainer(collated)

    def __repr__(self) -> str:
        return f"SFTBlocks({len(self)} examples, mask_prompt={self.mask_prompt}, block_size={self.block_size})"


def sft_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens of a collated batch.

    ``logits = model(input_ids)``; the logits at position ``t`` are scored against
    ``labels[:, t + 1]``; positions labelled ``ignore_index`` (prompt, padding) do not count, and
    the mean is over all counted tokens of the batch (each token weighs the same, as in Hugging
    Face's causal-LM loss). No attention mask is passed: with right padding, causal attention
    already keeps every real token from seeing the padding after it.

    A batch with no labelled token (e.g. every response truncated away) returns a zero that
    still depends on the logits (so ``backward`` works and the step does nothing) instead of NaN.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and labels must both be [B, T], got {tuple(input_ids.shape)} and {tuple(labels.shape)}")
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    logits = model(input_ids)
    targets = labels[:, 1:]
    shifted = logits[:, :-1].float()
    if not (targets != ignore_index).any():
        return shifted.sum() * 0.0
    return cross_entropy(shifted, targets, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------
# The project's instruction data
# ---------------------------------------------------------------------------------------------

def instructions_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``train.jsonl`` / ``test.jsonl``.

    Looked up in order: ``data_dir``; ``$LFS_INSTRUCTIONS_DIR``; ``data/instructions`` in the
    repository root next to the package (``<repo>/llama_from_scratch/../data/instructions``, the
    editable-install / source-checkout case); ``data/instructions`` under the current directory.
    Raises ``FileNotFoundError`` listing the places tried.
    """
    return find_data_dir("instructions", "LFS_INSTRUCTIONS_DIR", "instruction data", data_dir)


def load_instructions(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The project's instruction examples: ``split`` is ``"train"``, ``"test"`` or ``"all"``.

    Each is ``{"instruction", "input", "output", "category", "exact"}`` (see
    ``data/instructions/README.md``); the folder is found by :func:`instructions_dir`.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    folder = instructions_dir(data_dir)
    out: list[dict[str, Any]] = []
    for name in (["train", "test"] if split == "all" else [split]):
        out.extend(row for _, row in read_jsonl(folder / f"{name}.jsonl"))
    return out
