"""Chapter 9's checks fail on the stub and on plausible wrong answers, and pass on the solution and
on correct answers written differently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch09_instruction_tuning import CHECKS

from answers import fails_on, solution, stub_and_solution_test

SOLUTIONS = solution("ch09_instruction_tuning")
SYSTEM = SOLUTIONS["SMOLLM2_SYSTEM"]
fails = fails_on(CHECKS)
test_stub_fails_and_solution_passes = stub_and_solution_test(CHECKS, SOLUTIONS)


# ----- tokenize_chat --------------------------------------------------------------------------


def _chat(messages, encode, *, default_system=True, always_system=False, mask_end=True, mask_header=False,
          mask_newline=False, generation_prompt=False):
    if always_system or (default_system and messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": SYSTEM}, *messages]
    ids, mask = [], []
    for m in messages:
        a = int(m["role"] == "assistant")
        for text, bit in ((f"<|im_start|>{m['role']}\n", a and mask_header), (m["content"], a),
                          ("<|im_end|>", a and mask_end), ("\n", a and mask_newline)):
            piece = encode(text) if text else []
            ids += piece
            mask += [int(bool(bit))] * len(piece)
    if generation_prompt:
        piece = encode("<|im_start|>assistant\n")
        ids += piece
        mask += [0] * len(piece)
    return {"input_ids": ids, "assistant_masks": mask}


@pytest.mark.parametrize("options", [
    dict(default_system=False),       # no default system message
    dict(always_system=True),         # a default system message even after the conversation's own
    dict(mask_end=False),             # <|im_end|> of the answers not learned
    dict(mask_header=True),           # the assistant header learned too
    dict(mask_newline=True),          # the newline after <|im_end|> learned too
    dict(generation_prompt=True),     # an assistant header appended at the end
], ids=lambda o: next(iter(o)))
def test_tokenize_chat_wrong(options):
    assert fails("tokenize_chat", lambda m, e: _chat(m, e, **options))


def test_tokenize_chat_whole_text_with_prefix_lengths_passes():
    def whole(messages, encode):
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM}] + messages
        text, spans = "", []
        for m in messages:
            text += f"<|im_start|>{m['role']}\n"
            start = text
            text += m["content"] + "<|im_end|>"
            if m["role"] == "assistant":
                spans.append((len(encode(start)), len(encode(text))))
            text += "\n"
        ids = encode(text)
        mask = [0] * len(ids)
        for a, b in spans:
            mask[a:b] = [1] * (b - a)
        return {"input_ids": ids, "assistant_masks": mask}

    assert CHECKS["tokenize_chat"](whole) is None  # a check returns None on a right answer and raises otherwise


# ----- sft_collate ----------------------------------------------------------------------------


def _collate(examples, pad, max_length=None, mode="keep_start", side="right", multiple=None, *, ignore_mode=False,
             round_down=False, ignore_side=False, pad_label=None, labels_keep_start=False, shift=False):
    rows = []
    for ex in examples:
        ids = list(ex["input_ids"])
        labels = [t if m else -100 for t, m in zip(ids, ex["assistant_masks"])]
        if shift:
            labels = labels[1:] + [-100]
        if max_length is not None:
            use = "keep_start" if ignore_mode else mode
            cut = slice(None, max_length) if use == "keep_start" else slice(-max_length, None)
            ids = ids[cut]
            labels = labels[:max_length] if labels_keep_start else labels[cut]
        rows.append((ids, labels))
    width = max(len(i) for i, _ in rows)
    if multiple:
        width = (width // multiple) * multiple if round_down else -(-width // multiple) * multiple
        width = max(width, max(len(i) for i, _ in rows)) if not round_down else width
    out = {"input_ids": torch.full((len(rows), width), pad), "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
           "labels": torch.full((len(rows), width), -100 if pad_label is None else pad_label)}
    for r, (ids, labels) in enumerate(rows):
        n = min(len(ids), width)
        right = side == "right" or ignore_side
        cols = slice(0, n) if right else slice(width - n, width)
        out["input_ids"][r, cols] = torch.tensor(ids[:n], dtype=torch.long)
        out["attention_mask"][r, cols] = 1
        out["labels"][r, cols] = torch.tensor(labels[:n], dtype=torch.long)
    return out


@pytest.mark.parametrize("options", [
    dict(ignore_mode=True),           # always keeps the start
    dict(round_down=True),            # rounds the width down to the multiple
    dict(ignore_side=True),           # always pads on the right
    dict(pad_label=0),                # padding labelled with an id, not -100
    dict(labels_keep_start=True),     # keep_end applied to the ids but not to the labels
    dict(shift=True),                 # labels shifted by one
], ids=lambda o: next(iter(o)))
def test_sft_collate_wrong(options):
    assert fails("sft_collate", lambda *a: _collate(*a, **options))


def test_sft_collate_with_tensor_ops_passes():
    def with_f_pad(examples, pad, max_length=None, mode="keep_start", side="right", multiple=None):
        ids = [torch.tensor(e["input_ids"]) for e in examples]
        masks = [torch.tensor(e["assistant_masks"], dtype=torch.bool) for e in examples]
        if max_length is not None:
            ids = [t[:max_length] if mode == "keep_start" else t[-max_length:] for t in ids]
            masks = [m[:max_length] if mode == "keep_start" else m[-max_length:] for m in masks]
        width = max(len(t) for t in ids)
        width += (-width) % multiple if multiple else 0

        def pad_to(t, value):
            gap = (0, width - len(t)) if side == "right" else (width - len(t), 0)
            return F.pad(t, gap, value=value)

        return {"input_ids": torch.stack([pad_to(t, pad) for t in ids]),
                "attention_mask": torch.stack([pad_to(torch.ones_like(t), 0) for t in ids]),
                "labels": torch.stack([pad_to(torch.where(m, t, -100), -100) for t, m in zip(ids, masks)])}

    assert CHECKS["sft_collate"](with_f_pad) is None  # a check returns None on a right answer and raises otherwise


# ----- padding_free_collate -------------------------------------------------------------------


def _free(examples, *, global_positions=False, keep_first=False, int64=False, no_zero=False, first_of_row=False):
    ids, labels, pos, cu = [], [], [], [0]
    for k, ex in enumerate(examples):
        n = len(ex["input_ids"])
        lab = [t if m else -100 for t, m in zip(ex["input_ids"], ex["assistant_masks"])]
        if not keep_first and (not first_of_row or k == 0):
            lab[0] = -100
        ids += ex["input_ids"]
        labels += lab
        pos += list(range(len(pos), len(pos) + n)) if global_positions else list(range(n))
        cu.append(cu[-1] + n)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "cu_seq_lens": torch.tensor(cu[1:] if no_zero else cu, dtype=torch.long if int64 else torch.int32)}


@pytest.mark.parametrize("options", [
    dict(global_positions=True),      # positions run on across examples
    dict(keep_first=True),            # the first token of each example keeps its label
    dict(int64=True),                 # cu_seq_lens in int64
    dict(no_zero=True),               # cu_seq_lens without the leading 0
    dict(first_of_row=True),          # only the row's very first label ignored
], ids=lambda o: next(iter(o)))
def test_padding_free_wrong(options):
    assert fails("padding_free_collate", lambda e: _free(e, **options))


def test_padding_free_vectorised_passes():
    def vectorised(examples):
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        ids = torch.tensor([t for e in examples for t in e["input_ids"]])
        mask = torch.tensor([m for e in examples for m in e["assistant_masks"]], dtype=torch.bool)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        pos = torch.arange(len(ids)) - starts.repeat_interleave(lengths)
        labels = torch.where(mask & (pos > 0), ids, -100)
        return {"input_ids": ids[None], "labels": labels[None], "position_ids": pos[None],
                "cu_seq_lens": torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)}

    assert CHECKS["padding_free_collate"](vectorised) is None  # a check returns None on a right answer and raises otherwise


# ----- sft_train ------------------------------------------------------------------------------

collate = SOLUTIONS["sft_collate"]


def _sft(model, examples, batches, config, *, per_micro_mean=False, no_divide=False, unshifted=False, no_mask=False,
         clip=True, hf_loss=False):
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=config["lr"], betas=tuple(config["betas"]), weight_decay=config["weight_decay"])
    losses = []
    for indices in batches:
        size = len(indices) // config["grad_accum_steps"]
        chunks = [[examples[i] for i in indices[j:j + size]] for j in range(0, len(indices), size)]
        if no_mask:
            chunks = [[{"input_ids": e["input_ids"], "assistant_masks": [1] * len(e["input_ids"])} for e in c]
                      for c in chunks]
        micro = [collate(c, config["pad_token_id"], config["max_length"]) for c in chunks]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            if hf_loss:
                loss = model(**b, num_items_in_batch=n).loss
            else:
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                if unshifted:
                    lg, lb = logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1)
                else:
                    lg, lb = logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1)
                if per_micro_mean or no_divide:
                    loss = F.cross_entropy(lg, lb, ignore_index=-100) / (1 if no_divide else len(micro))
                else:
                    loss = F.cross_entropy(lg, lb, ignore_index=-100, reduction="sum") / n
            loss.backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return {"losses": losses, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("options", [
    dict(per_micro_mean=True),        # the mean of each micro-batch, averaged: the pre-2024 Trainer bug
    dict(no_divide=True),             # micro-batch means added up, not averaged
    dict(unshifted=True),             # logits[:, t] scored against labels[:, t]
    dict(no_mask=True),               # the prompt is learned too
    dict(clip=False),                 # no clipping
], ids=lambda o: next(iter(o)))
def test_sft_train_wrong(options):
    assert fails("sft_train", lambda *a: _sft(*a, **options))


def test_sft_train_with_transformers_loss_passes():
    assert CHECKS["sft_train"](lambda *a: _sft(*a, hf_loss=True)) is None


# ----- conversation_xy --------------------------------------------------------------------------

tokenize_chat = SOLUTIONS["tokenize_chat"]


def _xy(messages, encode, *, all_turns=False, last_turn_only=False, no_end=False, unshifted=False,
        shift_both=False, keep_newline=False):
    chat = tokenize_chat(messages, encode)
    ids, mask = chat["input_ids"], list(chat["assistant_masks"])
    end_id = encode("<|im_end|>")[0]
    if last_turn_only:   # only the last assistant turn: clear the mask before the last header
        starts = [t for t in range(1, len(mask)) if mask[t] and not mask[t - 1]]
        mask = [m if t >= starts[-1] else 0 for t, m in enumerate(mask)]
    if no_end:
        mask = [0 if ids[t] == end_id else m for t, m in enumerate(mask)]
    end = len(ids) if keep_newline else max(t for t, m in enumerate(chat["assistant_masks"]) if m) + 1
    ids, mask = ids[:end], mask[:end]
    labels = list(ids) if all_turns else [i if m else -100 for i, m in zip(ids, mask)]
    if unshifted:        # the labels not shifted: y[t] is the label of x[t] itself
        return torch.tensor(ids[:-1]), torch.tensor(labels[:-1])
    if shift_both:       # both shifted: x starts at the second token
        return torch.tensor(ids[1:]), torch.tensor(labels[1:])
    return torch.tensor(ids[:-1]), torch.tensor(labels[1:])


@pytest.mark.parametrize("options", [
    dict(all_turns=True),         # loss on every turn (system, user, headers)
    dict(last_turn_only=True),    # only the last assistant turn learned
    dict(no_end=True),            # <|im_end|> of the answers not trained
    dict(unshifted=True),         # off by one: y not shifted against x
    dict(shift_both=True),        # off by one: x shifted along with y
    dict(keep_newline=True),      # the template's final newline kept in the sequence
], ids=lambda o: next(iter(o)))
def test_conversation_xy_wrong(options):
    assert fails("conversation_xy", lambda m, e: _xy(m, e, **options))


def test_conversation_xy_from_the_text_as_lists_passes():
    """Written differently: the whole text rendered and tokenized once, the answers found by the
    lengths of encoded prefixes, and plain lists returned."""
    def from_text(messages, encode):
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM}] + messages
        text, spans = "", []
        for m in messages:
            text += f"<|im_start|>{m['role']}\n"
            start = len(encode(text))
            text += m["content"] + "<|im_end|>"
            if m["role"] == "assistant":
                spans.append((start, len(encode(text))))
            text += "\n"
        ids = encode(text)[:spans[-1][1]]
        targets = [-100] * len(ids)
        for a, b in spans:
            targets[a:b] = ids[a:b]
        return ids[:-1], targets[1:]

    assert CHECKS["conversation_xy"](from_text) is None
