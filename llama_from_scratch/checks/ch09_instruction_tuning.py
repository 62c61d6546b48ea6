"""Checks of chapter 9's exercises: the Alpaca template, the masking collate, ROUGE-L, the masked
next-token loss, and answer normalisation for exact match.

Each check draws fresh random inputs at grading time (random words, odd lengths, whitespace-only
inputs, a pad id equal to the EOS that ends every response, empty strings, ...), compares the
student's function with the package (``llama_from_scratch.instruct``, ``llama_from_scratch.self_instruct``,
``llama_from_scratch.loss``) or with the rule stated in the exercise, and raises ``AssertionError``
naming the input, what was expected and what came back.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.instruct import format_alpaca, instruction_collate
from llama_from_scratch.self_instruct import rouge_l

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "Paris", "is", "capital", "of", "France",
         "what", "convert", "25", "°C", "list", "three", "fruits", "apple", "x", "y", "3.5", "e.g.", "Tokyo"]


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _words(rng: random.Random, lo: int = 1, hi: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


# --------------------------------------------------------------------------------------------
# format_alpaca_prompt
# --------------------------------------------------------------------------------------------


def _random_example(rng: random.Random) -> dict:
    example = {"instruction": _words(rng, 2, 12), "output": _words(rng, 1, 8)}
    if rng.random() < 0.2:
        example["instruction"] += "\n" + _words(rng, 1, 5)   # multi-line instructions stay as they are
    kind = rng.choice(["words", "words", "empty", "whitespace", "missing"])
    if kind == "words":
        example["input"] = _words(rng, 1, 12)
    elif kind == "empty":
        example["input"] = ""
    elif kind == "whitespace":
        example["input"] = rng.choice([" ", "  \n", "\t"])
    return example


def check_format_alpaca_prompt(fn: Callable) -> None:
    rng = _rng()
    for _ in range(40):
        example = _random_example(rng)
        with_response = rng.random() < 0.5
        expected = format_alpaca(example, with_response=with_response)
        got = fn(dict(example), with_response=with_response)
        if not isinstance(got, str):
            raise AssertionError(f"format_alpaca_prompt must return a str, got {type(got).__name__}")
        if got != expected:
            hint = ""
            if "input" not in example:
                hint = " This example has no 'input' key at all: treat it like an empty input."
            elif not example["input"].strip():
                hint = (f" The input is {example['input']!r}: an input that is empty or only whitespace counts "
                        "as no input (use the template without '### Input:').")
            elif not with_response:
                hint = " With with_response=False the text must end right after '### Response:\\n'."
            raise AssertionError(
                f"format_alpaca_prompt({_short(example)}, with_response={with_response}):\nexpected {expected!r}\n"
                f"     got {got!r}.{hint}")


# --------------------------------------------------------------------------------------------
# collate_with_masking
# --------------------------------------------------------------------------------------------


def check_collate_with_masking(fn: Callable) -> None:
    rng = _rng()
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    for trial in range(30):
        eos = rng.randrange(0, 50)
        items = []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 17)
            ids = torch.randint(0, 60, (n,), generator=g)
            ids[-1] = eos                                   # every sequence ends with EOS, as in SFT
            items.append({"input_ids": ids, "prompt_length": rng.randint(0, n)})
        pad_token_id = eos if trial % 2 == 0 else rng.randrange(0, 60)   # SmolLM2 pads with its EOS
        mask_prompt = rng.random() < 0.7
        ignore_index = rng.choice([-100, -100, -1])
        expected = instruction_collate(items, pad_token_id=pad_token_id, ignore_index=ignore_index,
                                       mask_prompt=mask_prompt)
        call = (f"collate_with_masking(items with lengths {[len(it['input_ids']) for it in items]} and prompt_lengths "
                f"{[it['prompt_length'] for it in items]}, pad_token_id={pad_token_id}, mask_prompt={mask_prompt}, "
                f"ignore_index={ignore_index})")
        got = fn([{"input_ids": it["input_ids"].clone(), "prompt_length": it["prompt_length"]} for it in items],
                 pad_token_id, mask_prompt=mask_prompt, ignore_index=ignore_index)
        if not isinstance(got, dict):
            raise AssertionError(f"{call}: expected a dict with input_ids, labels, attention_mask; got {type(got).__name__}")
        for key in ("input_ids", "labels", "attention_mask"):
            if key not in got:
                raise AssertionError(f"{call}: the result has no {key!r} (keys: {sorted(got)})")
            value = got[key]
            if not isinstance(value, torch.Tensor):
                raise AssertionError(f"{call}: {key} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AssertionError(f"{call}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} "
                                     "([batch, longest sequence])")
            if value.dtype != torch.long:
                raise AssertionError(f"{call}: {key} must have dtype torch.long, got {value.dtype}")
            if not torch.equal(value, expected[key]):
                row = int((value != expected[key]).any(dim=1).nonzero()[0])
                hint = {
                    "input_ids": " Sequences go at the START of each row (right padding); the rest is pad_token_id.",
                    "attention_mask": " 1 on the real tokens of a row, 0 on its padding.",
                    "labels": (" labels = input_ids, but ignore_index on the padding (found by POSITION: the pad id may "
                               "equal the EOS that ends every response, whose label must stay) and, with mask_prompt, "
                               "on the first prompt_length positions."),
                }[key]
                raise AssertionError(f"{call}: {key} row {row} is {value[row].tolist()}, expected "
                                     f"{expected[key][row].tolist()}.{hint}")


# --------------------------------------------------------------------------------------------
# rouge_l_f1
# --------------------------------------------------------------------------------------------


def _messy(rng: random.Random, text: str) -> str:
    """The same words with random capitalisation and whitespace."""
    words = [w.upper() if rng.random() < 0.2 else (w.capitalize() if rng.random() < 0.2 else w) for w in text.split()]
    out = rng.choice(["", " ", "\n"])
    for w in words:
        out += w + rng.choice([" ", " ", "  ", "\t", "\n"])
    return out


def check_rouge_l_f1(fn: Callable) -> None:
    rng = _rng()
    cases = [("the cat sat", "the cat ate"), ("", "the cat"), ("   ", "a"), ("a b c d", "d c b a"),
             ("a b a b", "b a b a"), ("x", "x")]
    for _ in range(60):
        a = _words(rng, 1, 14)
        if rng.random() < 0.5:  # shuffled / overlapping versions of the same words
            words = a.split()
            rng.shuffle(words)
            b = " ".join(words[: rng.randint(1, len(words))] + _words(rng, 0, 4).split())
        else:
            b = _words(rng, 1, 14)
        cases.append((_messy(rng, a), _messy(rng, b)))
    for a, b in cases:
        expected = rouge_l(a, b)
        got = fn(a, b)
        if not isinstance(got, (float, int)) or isinstance(got, bool):
            raise AssertionError(f"rouge_l_f1({a!r}, {b!r}) must return a float, got {type(got).__name__}")
        if abs(got - expected) > 1e-9:
            wa, wb = a.lower().split(), b.lower().split()
            raise AssertionError(
                f"rouge_l_f1({a!r}, {b!r}) = {got!r}, expected {expected!r}. Compare lowercased words "
                f"({wa} vs {wb}); the LCS keeps word ORDER (it is not the number of shared words); "
                "F = 2 * LCS / (len(a) + len(b)), and 0.0 when either has no words.")


# --------------------------------------------------------------------------------------------
# masked_token_loss
# --------------------------------------------------------------------------------------------


def check_masked_token_loss(fn: Callable) -> None:
    rng = _rng()
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    for _ in range(12):
        B, T, V = rng.randint(1, 5), rng.randint(2, 19), rng.choice([2, 3, 7, rng.randint(10, 300)])
        ignore_index = rng.choice([-100, -100, -1])
        logits = (torch.randn(B, T, V, generator=g) * rng.choice([0.5, 2.0, 6.0])).requires_grad_(True)
        labels = torch.randint(0, V, (B, T), generator=g)
        for b in range(B):  # a masked prompt at the start, padding at the end, both ignore_index
            prompt = rng.randint(0, T - 1)
            end = rng.randint(prompt + 1, T)
            labels[b, :prompt] = ignore_index
            labels[b, end:] = ignore_index
        if not (labels[:, 1:] != ignore_index).any():
            labels[0, -1] = 0
        expected = F.cross_entropy(logits.detach()[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                   ignore_index=ignore_index)
        what = (f"masked_token_loss(logits {tuple(logits.shape)}, labels {labels.tolist() if B * T <= 40 else tuple(labels.shape)}, "
                f"ignore_index={ignore_index})")
        got = fn(logits, labels.clone(), ignore_index=ignore_index)
        if not isinstance(got, torch.Tensor) or got.dim() != 0:
            raise AssertionError(f"{what}: expected a scalar tensor, got "
                                 f"{type(got).__name__}{'' if not isinstance(got, torch.Tensor) else ' of shape ' + str(tuple(got.shape))}")
        if not got.requires_grad:
            raise AssertionError(f"{what}: the loss must be differentiable (computed from the logits with torch "
                                 "operations, no .item() / .detach()).")
        if not torch.isfinite(got):
            raise AssertionError(f"{what}: got {got.item()}, expected {expected.item():.6f}. Leave the ignored positions "
                                 "out (do not index the vocabulary with ignore_index).")
        if abs(got.item() - expected.item()) > 1e-5 * max(1.0, abs(expected.item())):
            raise AssertionError(
                f"{what}: got {got.item():.6f}, expected {expected.item():.6f}. logits[:, t] predict labels[:, t + 1] "
                "(shift by one), positions labelled ignore_index do not count, and the mean is over ALL counted "
                "tokens of the batch together (not a mean per sequence).")


# --------------------------------------------------------------------------------------------
# exact_match_normalise
# --------------------------------------------------------------------------------------------


def _normalise_reference(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(". ")


def check_exact_match_normalise(fn: Callable) -> None:
    rng = _rng()
    cases = ["Paris.", "  Tokyo  ", "77 °F", "3.5", "e.g. this.", "...", "", "A . .", "Yes.\n", ".Hidden",
             "Positive", "Line one\nline two.", "0.75 kg."]
    for _ in range(50):
        text = _messy(rng, _words(rng, 0, 6))
        text += rng.choice(["", ".", "..", ". ", " .", "\n", ".\n", " . ."])
        if rng.random() < 0.3:
            text = rng.choice([" ", "\t", "\n"]) + text
        cases.append(text)
    for text in cases:
        expected = _normalise_reference(text)
        got = fn(text)
        if got != expected:
            raise AssertionError(
                f"exact_match_normalise({text!r}) = {got!r}, expected {expected!r}. Lowercase; split on any "
                "whitespace and join with single spaces (this also removes leading and trailing whitespace); then "
                "remove every period and space at the end (str.rstrip('. ')).")


CHECKS = {
    "format_alpaca_prompt": check_format_alpaca_prompt,
    "collate_with_masking": check_collate_with_masking,
    "rouge_l_f1": check_rouge_l_f1,
    "masked_token_loss": check_masked_token_loss,
    "exact_match_normalise": check_exact_match_normalise,
}
