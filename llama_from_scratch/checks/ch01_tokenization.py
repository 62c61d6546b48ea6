"""Checks for the exercises of chapter 1 (tokenization).

Every check draws fresh random inputs, so memorised answers fail, and compares the student's
function with the package's own BPE (``llama_from_scratch.bpe``) or with a reference written
here. Messages name the input, the expected value and what came back.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

from llama_from_scratch.bpe import BPETokenizer, get_stats, merge_pair

# One chunk = the whole text, so the encoding exercise can be compared with BPETokenizer
# without any regex pre-tokenization getting in the way.
_WHOLE_TEXT = r"[\s\S]+"
_ALPHABET = list("aabbbcd ee") + ["é", "ß", "日", "本", "🙂"]


def _show(value: Any, limit: int = 240) -> str:
    """``repr`` shortened for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _random_ids(rng: random.Random) -> list[int]:
    """Short id lists with many repeats (so pairs repeat and overlap, e.g. 5 5 5)."""
    n = rng.choice([0, 1, 2, 3, rng.randrange(4, 40)])
    symbols = rng.sample(range(300), rng.randrange(1, 5))
    return [rng.choice(symbols) for _ in range(n)]


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


def check_get_stats(get_stats_fn: Callable) -> None:
    rng = random.Random()
    cases = [[], [7], [1, 2, 3, 1, 2], [4, 4, 4, 4]] + [_random_ids(rng) for _ in range(30)]
    for ids in cases:
        expected = get_stats(ids)
        got = get_stats_fn(list(ids))
        assert isinstance(got, dict), f"get_stats({_show(ids)}) must return a dict, got {type(got).__name__}"
        got = dict(got)
        assert got == expected, (
            f"get_stats({_show(ids)}) returned {_show(got)}; expected {_show(expected)} "
            "(count every adjacent pair (ids[i], ids[i+1]), overlapping pairs included: [4, 4, 4] has (4, 4) twice)")


def check_merge(merge_fn: Callable) -> None:
    rng = random.Random()
    cases = [([5, 6, 5, 6, 7], (5, 6), 99), ([1, 1, 1], (1, 1), 9), ([], (1, 2), 3), ([1], (1, 2), 3),
             ([2, 1, 2], (1, 2), 256)]
    for _ in range(40):
        ids = _random_ids(rng)
        if len(ids) >= 2 and rng.random() < 0.8:
            i = rng.randrange(len(ids) - 1)
            pair = (ids[i], ids[i + 1])
        else:
            pair = (rng.randrange(300), rng.randrange(300))
        cases.append((ids, pair, 300 + rng.randrange(1000)))
    for ids, pair, new_id in cases:
        argument = list(ids)
        got = merge_fn(argument, pair, new_id)
        expected = merge_pair(ids, pair, new_id)
        assert argument == ids, f"merge({_show(ids)}, {pair}, {new_id}) changed its input list; return a new list"
        assert isinstance(got, list), f"merge must return a list, got {type(got).__name__}"
        assert got == expected, (
            f"merge({_show(ids)}, {pair}, {new_id}) returned {_show(got)}; expected {_show(expected)} "
            "(scan left to right; after merging at i, continue at i + 2, so [1, 1, 1] with (1, 1) gives [new, 1])")


def check_encode_with_merges(encode_fn: Callable) -> None:
    rng = random.Random()
    for trial in range(6):
        corpus = _random_text(rng, rng.randrange(60, 200))
        tokenizer = BPETokenizer.train(corpus, 256 + rng.randrange(5, 40), pattern=_WHOLE_TEXT)
        texts = ["", _random_text(rng, 1), corpus[: rng.randrange(1, len(corpus))], _random_text(rng, 50)]
        for text in texts:
            expected = tokenizer.encode(text)
            got = encode_fn(text, dict(tokenizer.merges))
            assert isinstance(got, list), f"encode_with_merges must return a list of ints, got {type(got).__name__}"
            assert got == expected, (
                f"encode_with_merges({_show(text)}, merges) returned {_show(got)}; expected {_show(expected)}. "
                f"merges (first 10) = {_show(dict(list(tokenizer.merges.items())[:10]))}. Start from the UTF-8 "
                "bytes; repeatedly merge the pair with the LOWEST merge id among those present; stop when no "
                "adjacent pair is in merges")


def check_decode_tokens(decode_fn: Callable) -> None:
    rng = random.Random()
    for trial in range(6):
        corpus = _random_text(rng, rng.randrange(60, 200))
        tokenizer = BPETokenizer.train(corpus, 256 + rng.randrange(5, 40), pattern=_WHOLE_TEXT)
        vocab = dict(tokenizer.vocab)
        for _ in range(8):
            text = _random_text(rng, rng.randrange(0, 30))
            ids = tokenizer.encode(text)
            if ids and rng.random() < 0.5:  # cut off at a random token: may split a character
                ids = ids[: rng.randrange(len(ids))] + [rng.choice([0xE6, 0xF0, 0x9F, 0x80])]
            expected = tokenizer.decode(ids)
            got = decode_fn(list(ids), vocab)
            assert got == expected, (
                f"decode_tokens({_show(ids)}, vocab) returned {_show(got)}; expected {_show(expected)} "
                "(join the bytes of every id, then .decode('utf-8', errors='replace'))")
        bad = max(vocab) + 1 + rng.randrange(100)
        try:
            decode_fn([0, bad], vocab)
        except ValueError as exc:
            assert str(bad) in str(exc), f"the ValueError for an unknown id should name it ({bad}); got {exc!r}"
        else:
            raise AssertionError(f"decode_tokens([0, {bad}], vocab) should raise ValueError: {bad} is not in vocab")


def _reference_split(text: str, specials: set[str]) -> list[str]:
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [piece for piece in re.split(pattern, text) if piece]


def check_split_special(split_fn: Callable) -> None:
    rng = random.Random()
    pool = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|end|>", "<|endoftext|>x"]
    cases = [("", {"<|endoftext|>"}), ("hello", set()), ("a<|endoftext|>b", {"<|endoftext|>"}),
             ("<|im_start|>user<|im_end|><|im_end|>", {"<|im_start|>", "<|im_end|>"}),
             ("x<|endoftext|>xy", {"<|endoftext|>", "<|endoftext|>x"})]
    for _ in range(40):
        specials = set(rng.sample(pool, rng.randrange(0, 4)))
        parts = [rng.choice(pool) if rng.random() < 0.4 else _random_text(rng, rng.randrange(0, 6))
                 for _ in range(rng.randrange(0, 8))]
        cases.append(("".join(parts), specials))
    for text, specials in cases:
        expected = _reference_split(text, specials)
        got = split_fn(text, set(specials))
        assert isinstance(got, list), f"split_special must return a list of strings, got {type(got).__name__}"
        assert got == expected, (
            f"split_special({_show(text)}, {_show(sorted(specials))}) returned {_show(got)}; expected "
            f"{_show(expected)} (special tokens become their own pieces, other text stays together, no empty "
            "strings; where two special tokens start at the same place the longer one wins)")


CHECKS = {
    "get_stats": check_get_stats,
    "merge": check_merge,
    "encode_with_merges": check_encode_with_merges,
    "decode_tokens": check_decode_tokens,
    "split_special": check_split_special,
}
