"""Checks of chapter 9's exercises: multi-turn chat tokenization with an assistant mask, the padded
SFT collate (truncation, padding side), the padding-free collate, the capstone SFT loop, and the
pre-shifted training pair of a multi-turn conversation (loss on the assistant turns only).

References (independent of this package, except where said):

- ``tokenize_chat`` and ``conversation_xy``: ``transformers``'
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` with SmolLM2's chat template,
  its assistant turns tagged ``{% generation %}``, on a fast tokenizer built by ``tokenizers``
  from SmolLM2's vocabulary and merges (read from the GGUF file by the package's reader: the
  data, not the algorithm); ``conversation_xy`` also on the project's multi-turn conversations
  (``data/conversations``);
- ``sft_collate``: TRL's label building and truncation (``SFTTrainer``'s dataset preparation) and
  its ``DataCollatorForLanguageModeling`` / ``pad``;
- ``padding_free_collate``: TRL's ``DataCollatorForLanguageModeling(padding_free=True)``;
- ``sft_train``: the same steps in the grader with TRL's collator and ``transformers``' own loss
  (``labels`` and ``num_items_in_batch``), on a tiny ``transformers`` Llama and the project's
  instruction data (``data/instructions``); the held-out response loss must fall.

Inputs are drawn fresh at every grading run; failure messages say what differed, never the
expected values.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch07_decoding import call, construct_llama, one_thread, tiny_llama
from llama_from_scratch.course.checks.common import Callback, as_tensor, assert_close, assert_equal, fresh_generator, fresh_rng

IGNORE = -100
SYSTEM_PROMPTS = ["You are a concise assistant.", "Answer in one sentence.", "You are a helpful tutor. Be brief.",
                  "Reply with the answer only."]

# ----- the reference tokenizer and template --------------------------------------------------


@lru_cache(maxsize=1)
def reference_tokenizer():
    """``(tokenizer, template, tagged_template)``: a ``transformers`` fast tokenizer built by
    ``tokenizers`` from SmolLM2's vocabulary and merges (byte-level BPE, GPT-2 pre-tokenization,
    its 17 control tokens special), its chat template, and the template with each assistant turn's
    content and ``<|im_end|>`` inside ``{% generation %}`` tags."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer

    source = load_smollm2_tokenizer()
    ranked = sorted(source.merge_ranks.items(), key=lambda item: item[1])
    bpe = models.BPE(vocab={t: i for i, t in enumerate(source.tokens)}, merges=[pair for pair, _ in ranked])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in source.special_tokens])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    template = source.chat_template
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if turn not in template:
        raise RuntimeError("SmolLM2's chat template is not the one this check knows how to tag")
    tagged_turn = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                   "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + turn +
                   "{% endif %}")
    return tokenizer, template, template.replace(turn, tagged_turn)


def encode_text(text: Any) -> list[int]:
    """What the student's code gets as ``encode``: text -> SmolLM2 token ids, special tokens included."""
    if not isinstance(text, str):
        raise AssertionError(f"encode takes a str, got {type(text).__name__}")
    return reference_tokenizer()[0].encode(text, add_special_tokens=False)


def reference_chat(messages: list[dict]) -> dict[str, list[int]]:
    tokenizer, template, tagged = reference_tokenizer()
    out = tokenizer.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    plain = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True)
    if list(plain["input_ids"]) != list(out["input_ids"]):
        raise RuntimeError("tagging the template changed its tokens")
    return {"input_ids": list(out["input_ids"]), "assistant_masks": [int(m) for m in out["assistant_masks"]]}


@lru_cache(maxsize=1)
def instructions() -> tuple[list[dict], list[dict]]:
    from llama_from_scratch.instruct import load_instructions

    return load_instructions("train"), load_instructions("test")


def _user_text(example: dict) -> str:
    return example["instruction"] + ("\n\n" + example["input"] if example.get("input", "").strip() else "")


def _conversation(rng: random.Random, examples: list[dict]) -> list[dict]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 2, 3])):
        example = rng.choice(examples)
        messages.append({"role": "user", "content": _user_text(example)})
        messages.append({"role": "assistant", "content": example["output"]})
    if rng.random() < 0.2:
        messages.append({"role": "user", "content": _user_text(rng.choice(examples))})   # no answer yet
    return messages


# ----- tokenize_chat ---------------------------------------------------------------------------


@one_thread
def check_tokenize_chat(fn: Callable) -> None:
    """``fn(messages, encode)`` returns SmolLM2's chat-template ids of a multi-turn conversation and
    the mask of its assistant tokens, equal to ``apply_chat_template(return_assistant_tokens_mask=True)``."""
    rng = fresh_rng()
    train, _ = instructions()
    cases = [[{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
              {"role": "assistant", "content": "6"}]]
    cases += [_conversation(rng, train) for _ in range(10)]
    for messages in cases:
        expected = reference_chat(messages)
        roles = [m["role"] for m in messages]
        what = f"tokenize_chat(a conversation with roles {roles})"
        got = call(fn, [dict(m) for m in messages], Callback(encode_text))
        if not isinstance(got, dict) or set(got) != {"input_ids", "assistant_masks"}:
            raise AssertionError(f"{what}: expected a dict with the keys 'input_ids' and 'assistant_masks', got "
                                 f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
        ids, mask = got["input_ids"], got["assistant_masks"]
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(mask, torch.Tensor):
            mask = mask.tolist()
        assert_equal(list(ids) if isinstance(ids, (list, tuple)) else ids, expected["input_ids"], f"{what}: input_ids",
                     "SmolLM2's template: a default system turn when the first message is not 'system'; each message "
                     "as <|im_start|>{role}\\n{content}<|im_end|>\\n; no generation prompt at the end.")
        assert_equal([int(m) for m in mask] if isinstance(mask, (list, tuple)) else mask, expected["assistant_masks"],
                     f"{what}: assistant_masks",
                     "1 on the tokens of each assistant message's content and on the <|im_end|> that closes it; 0 on "
                     "its '<|im_start|>assistant\\n' header, on the newline after <|im_end|>, and on every other turn.")


# ----- sft_collate -----------------------------------------------------------------------------


def _example(rng: random.Random, g: torch.Generator, vocab: int = 60) -> dict:
    """A tokenized example: a prompt (mask 0), then 1-3 answered turns (mask 1 on the answers)."""
    ids: list[int] = []
    mask: list[int] = []
    for turn in range(rng.choice([1, 1, 2, 3])):
        n_prompt, n_answer = rng.randrange(1 if turn else 2, 9), rng.randrange(1, 7)
        ids += torch.randint(0, vocab, (n_prompt + n_answer,), generator=g).tolist()
        mask += [0] * n_prompt + [1] * n_answer
    return {"input_ids": ids, "assistant_masks": mask}


def reference_labels(example: dict) -> list[int]:
    """TRL's ``build_labels``: the id where the assistant mask is 1, else -100."""
    return [t if m else IGNORE for t, m in zip(example["input_ids"], example["assistant_masks"])]


def reference_collate(examples: list[dict], pad_token_id: int, max_length: int | None = None,
                      truncation_mode: str = "keep_start", padding_side: str = "right",
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """TRL's SFT pipeline: labels from the masks, its truncation slice, then its collator (right
    padding) or its ``pad`` (left padding)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import pad

    features = []
    for ex in examples:
        ids, labels = list(ex["input_ids"]), reference_labels(ex)
        if max_length is not None:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[cut], labels[cut]
        features.append({"input_ids": ids, "labels": labels})
    if padding_side == "right":
        out = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)(features)
        return {k: out[k] for k in ("input_ids", "attention_mask", "labels")}
    tensors = {"input_ids": [torch.tensor(f["input_ids"]) for f in features],
               "labels": [torch.tensor(f["labels"]) for f in features]}
    return {"input_ids": pad(tensors["input_ids"], pad_token_id, "left", pad_to_multiple_of),
            "attention_mask": pad([torch.ones_like(t) for t in tensors["input_ids"]], 0, "left", pad_to_multiple_of),
            "labels": pad(tensors["labels"], IGNORE, "left", pad_to_multiple_of)}


def _compare_batch(got: Any, expected: dict[str, torch.Tensor], what: str, hints: dict[str, str]) -> None:
    if not isinstance(got, dict):
        raise AssertionError(f"{what}: expected a dict of tensors, got {type(got).__name__}")
    if set(got) != set(expected):
        raise AssertionError(f"{what}: expected the keys {sorted(expected)}, got {sorted(got)}")
    for key, value in expected.items():
        tensor = as_tensor(got[key], f"{what}: {key}")
        if tensor.dtype != value.dtype:
            raise AssertionError(f"{what}: {key} must have dtype {value.dtype}, got {tensor.dtype}")
        assert_equal(tensor, value, f"{what}: {key}", hints.get(key, ""))


def check_sft_collate(fn: Callable) -> None:
    """``fn(examples, pad_token_id, max_length, truncation_mode, padding_side, pad_to_multiple_of)``
    equals TRL's labels, truncation and padding."""
    rng, g = fresh_rng(), fresh_generator()
    hints = {"input_ids": "Each row: the (truncated) ids, then pad_token_id on the padding side.",
             "attention_mask": "1 on real tokens, 0 on padding.",
             "labels": "The id where the assistant mask is 1, -100 elsewhere and on the padding; truncate the labels "
                       "with the ids (keep_start keeps the first max_length tokens, keep_end the last)."}
    for trial in range(24):
        examples = [_example(rng, g) for _ in range(rng.randrange(1, 6))]
        pad_id = rng.randrange(60)
        longest = max(len(e["input_ids"]) for e in examples)
        max_length = rng.choice([None, None, rng.randrange(2, longest + 3)])
        truncation = rng.choice(["keep_start", "keep_end"])
        if trial % 4 < 2 and longest > 2:  # every run cuts some example, from each end
            max_length = rng.randrange(2, longest)
            truncation = ["keep_end", "keep_start"][trial % 4]
        side = ["right", "left"][trial % 2]
        multiple = rng.choice([None, None, 4, 8]) if trial % 6 else rng.choice([4, 8])
        expected = reference_collate(examples, pad_id, max_length, truncation, side, multiple)
        what = (f"sft_collate({len(examples)} examples of lengths {[len(e['input_ids']) for e in examples]}, "
                f"pad_token_id={pad_id}, max_length={max_length}, truncation_mode={truncation!r}, "
                f"padding_side={side!r}, pad_to_multiple_of={multiple})")
        got = call(fn, [{k: list(v) for k, v in e.items()} for e in examples], pad_id, max_length, truncation, side,
                   multiple)
        _compare_batch(got, expected, what, hints)


# ----- padding_free_collate --------------------------------------------------------------------


def reference_padding_free(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    features = [{"input_ids": list(ex["input_ids"]), "labels": reference_labels(ex)} for ex in examples]
    out = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)(features)
    return {"input_ids": out["input_ids"], "labels": out["labels"], "position_ids": out["position_ids"],
            "cu_seq_lens": out["cu_seq_lens_q"]}


def check_padding_free_collate(fn: Callable) -> None:
    """``fn(examples)`` equals TRL's padding-free collator: one row, positions restarting per
    example, the first label of each example ignored, cumulative sequence lengths."""
    rng, g = fresh_rng(), fresh_generator()
    hints = {"input_ids": "All examples one after the other in a single row: shape [1, total length].",
             "position_ids": "Positions restart at 0 at the first token of each example.",
             "labels": "Labels from the assistant masks (-100 where 0), and -100 on the first token of each example "
                       "(nothing before it in its own sequence predicts it).",
             "cu_seq_lens": "int32 [number of examples + 1]: 0, then the running total of the lengths."}
    for _ in range(20):
        examples = [_example(rng, g) for _ in range(rng.randrange(1, 6))]
        for example in examples:      # examples whose very first token is an answer token
            if rng.random() < 0.4:
                example["assistant_masks"][0] = 1
        expected = reference_padding_free(examples, 0)
        what = f"padding_free_collate({len(examples)} examples of lengths {[len(e['input_ids']) for e in examples]})"
        got = call(fn, [{k: list(v) for k, v in e.items()} for e in examples])
        _compare_batch(got, expected, what, hints)


# ----- sft_train (the capstone) ----------------------------------------------------------------

SFT_MODEL = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None)


@lru_cache(maxsize=1)
def sft_corpus() -> tuple[list[dict], list[dict], int, int]:
    """The instruction data as one-turn SmolLM2 chats (reference tokenization and assistant masks),
    its token ids renumbered 0..V-1 in order of first use so that a tiny model can have a tiny
    vocabulary. Returns ``(train, test, vocab_size, pad_id)`` (the pad id is ``<|im_end|>``'s)."""
    train, test = instructions()

    def chat(ex: dict) -> list[dict]:
        return [{"role": "user", "content": _user_text(ex)}, {"role": "assistant", "content": ex["output"]}]

    encoded = [[reference_chat(chat(ex)) for ex in split] for split in (train, test)]
    renumber: dict[int, int] = {}
    for split in encoded:
        for ex in split:
            ex["input_ids"] = [renumber.setdefault(t, len(renumber)) for t in ex["input_ids"]]
    eos = reference_tokenizer()[0].convert_tokens_to_ids("<|im_end|>")
    return encoded[0], encoded[1], len(renumber), renumber[eos]


def _response_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def heldout_response_loss(model, examples: list[dict], pad_id: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), 16):
        loss, n = _response_loss_sum(model, reference_collate(examples[start:start + 16], pad_id))
        total, count = total + float(loss), count + n
    return total / count


def _reference_sft(model, examples: list[dict], batches: list[list[int]], config: dict) -> list[float]:
    """TRL's collator, transformers' loss with num_items_in_batch, clip_grad_norm_, AdamW."""
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config["lr"], betas=tuple(config["betas"]),
                                  weight_decay=config["weight_decay"], foreach=False)
    losses = []
    for indices in batches:
        size = len(indices) // config["grad_accum_steps"]
        micro = [reference_collate([examples[i] for i in indices[j:j + size]], config["pad_token_id"],
                                   config["max_length"]) for j in range(0, len(indices), size)]
        n_items = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        total = 0.0
        for batch in micro:
            loss = model(**batch, num_items_in_batch=n_items).loss
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"], foreach=False)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


@one_thread
def check_sft_train(fn: Callable) -> None:
    """``fn(model, examples, batches, config)`` takes the grader's SFT steps (same losses and
    weights as TRL's collator + transformers' loss + AdamW) and lowers the held-out response loss."""
    rng, g = fresh_rng(), fresh_generator()
    train, test, vocab, pad_id = sft_corpus()
    model_config = dict(SFT_MODEL, vocab_size=vocab)
    steps, batch = 12, 8
    examples = [train[i] for i in torch.randperm(len(train), generator=g)[:64].tolist()]
    batches = [torch.randperm(len(examples), generator=g)[:batch].tolist() for _ in range(steps)]
    config = dict(grad_accum_steps=rng.choice([2, 4]), lr=rng.choice([3e-3, 5e-3]), max_grad_norm=1.0,
                  weight_decay=rng.choice([0.0, 0.01]), betas=(0.9, 0.95), pad_token_id=pad_id,
                  max_length=rng.choice([80, 128]))
    reference_model = tiny_llama(model_config, rng.randrange(2**31))
    weights = {k: v.detach().clone() for k, v in reference_model.state_dict().items()}
    held_out = test[:32]
    before = heldout_response_loss(reference_model, held_out, pad_id)
    expected_losses = _reference_sft(reference_model, examples, batches, config)
    what = (f"sft_train(tiny Llama with {vocab} tokens, {len(examples)} examples, {steps} steps of {batch}, "
            f"config={config})")
    result = call(fn, construct_llama(model_config, weights), [dict(e) for e in examples], batches, dict(config))
    if not isinstance(result, dict) or set(result) != {"losses", "state_dict"}:
        raise AssertionError(f"{what}: expected a dict with the keys 'losses' and 'state_dict', got "
                             f"{sorted(result) if isinstance(result, dict) else type(result).__name__}")
    losses = result["losses"]
    if not isinstance(losses, (list, tuple)) or not all(isinstance(v, (int, float)) for v in losses):
        raise AssertionError(f"{what}: result['losses'] must be a list of floats, one per step")
    assert_close(torch.tensor([float(v) for v in losses], dtype=torch.float64),
                 torch.tensor(expected_losses, dtype=torch.float64), f"{what}: the loss of each step",
                 rtol=1e-4, atol=1e-6,
                 hint="A step's loss is the mean over ALL labelled tokens of its batch: add up the summed "
                      "cross-entropy of every micro-batch and divide by the step's total number of labelled targets "
                      "(not a mean per micro-batch); logits[:, t] predict labels[:, t + 1].")
    state = result["state_dict"]
    expected = reference_model.state_dict()
    if not isinstance(state, dict) or sorted(state) != sorted(expected):
        raise AssertionError(f"{what}: result['state_dict'] must be model.state_dict() after training (the same names)")
    for name, value in expected.items():
        assert_close(state[name], value, f"{what}: trained weight {name!r}", rtol=0.0, atol=2e-4,
                     hint="Each micro-batch's summed loss is divided by the labelled-token count of the whole step "
                          "before backward; clip to max_grad_norm, then one AdamW step per optimizer step.")
    with torch.no_grad():
        trained = tiny_llama(model_config, 0)
        trained.load_state_dict({k: as_tensor(v, k) for k, v in state.items()})
        after = heldout_response_loss(trained, held_out, pad_id)
    if not after < before - 0.5:
        raise AssertionError(f"{what}: held-out response loss {before:.3f} before SFT and {after:.3f} after: it should "
                             "fall by more than 0.5.")


# ----- conversation_xy -------------------------------------------------------------------------


@lru_cache(maxsize=1)
def conversations() -> list[dict]:
    from llama_from_scratch.conversations import load_conversations

    return load_conversations("train")


def reference_xy(messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from the reference's assistant mask: the ids cut after the last ``<|im_end|>``,
    labels = ids on the mask and -100 elsewhere, then ``x = ids[:-1]``, ``y = labels[1:]``."""
    chat = reference_chat(messages)
    eos = reference_tokenizer()[0].convert_tokens_to_ids("<|im_end|>")
    ids, mask = chat["input_ids"], chat["assistant_masks"]
    end = len(ids) - ids[::-1].index(eos)
    labels = [i if m else IGNORE for i, m in zip(ids[:end], mask[:end])]
    return torch.tensor(ids[:end - 1]), torch.tensor(labels[1:])


@one_thread
def check_conversation_xy(fn: Callable) -> None:
    """``fn(messages, encode)`` returns the pre-shifted training pair ``(x, y)`` of a multi-turn
    conversation: loss on every assistant turn (content and ``<|im_end|>``), nothing else."""
    rng = fresh_rng()
    train, _ = instructions()
    cases = [[{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12"}]]
    cases += [list(c["messages"]) for c in rng.sample(conversations(), 6)]
    cases += [[{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + list(c["messages"])
              for c in rng.sample(conversations(), 2)]
    while len(cases) < 12:
        messages = _conversation(rng, train)
        if messages[-1]["role"] == "assistant":
            cases.append(messages)
    for messages in cases:
        x_ref, y_ref = reference_xy(messages)
        n_turns = sum(m["role"] == "assistant" for m in messages)
        what = f"conversation_xy(a conversation with {n_turns} assistant turns)"
        got = call(fn, [dict(m) for m in messages], Callback(encode_text))
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"{what}: expected a pair (x, y), got {type(got).__name__}")
        x, y = (torch.as_tensor(v) if isinstance(v, (list, tuple)) else v for v in got)
        assert_equal(x, x_ref, f"{what}: x",
                     "x is the rendered conversation's ids (default system turn, no generation prompt) up to its last "
                     "<|im_end|>, without that last token: the model reads x and predicts y.")
        assert_equal(y, y_ref, f"{what}: y",
                     "y[t] is the target of position t: the id at t + 1 when that token is in an assistant message's "
                     "content or its closing <|im_end|> (every assistant turn, not only the last), -100 otherwise "
                     "(system and user turns, role headers, the newline after <|im_end|>).")


CHECKS = {
    "tokenize_chat": check_tokenize_chat,
    "sft_collate": check_sft_collate,
    "padding_free_collate": check_padding_free_collate,
    "sft_train": check_sft_train,
    "conversation_xy": check_conversation_xy,
}

FORBIDDEN = {
    "tokenize_chat": ["transformers", "tokenizers", "jinja2"],
    "sft_collate": ["trl", "transformers", "torch.nn.utils.rnn.pad_sequence"],
    "padding_free_collate": ["trl", "transformers"],
    "sft_train": ["trl", "transformers.Trainer", "transformers.DataCollatorForSeq2Seq",
                  "transformers.DataCollatorForLanguageModeling"],
    "conversation_xy": ["transformers", "tokenizers", "jinja2"],
}
