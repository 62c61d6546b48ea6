"""Chapter 1's checks: they pass on the solutions and on correct but unusual answers, and fail on
the stub and on the mistakes a learner plausibly makes."""

from __future__ import annotations

import pytest
import regex

from llama_from_scratch.course.checks.ch01_tokenization import CHECKS

from answers import FAILS, solution, unanswered

NS = solution("ch01_tokenization")
stub = unanswered


def _merge(word: list, pair: tuple, joined) -> list:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(joined)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _trainer(choose, split: bool = True, extra: int = 0, merge=_merge):
    """A text-order BPE trainer whose pair choice, chunking, size and merge can be made wrong."""

    def train_bpe(text, vocab_size, pattern):
        ranks = {bytes([i]): i for i in range(256)}
        chunks = regex.findall(pattern, text) if split else [text]
        words = [[bytes([b]) for b in c.encode("utf-8")] for c in chunks]
        while len(ranks) < vocab_size + extra:
            stats: dict = {}
            for w in words:
                for pair in zip(w, w[1:]):
                    stats[pair] = stats.get(pair, 0) + 1
            if not stats:
                break
            best = choose(stats, ranks)
            joined = best[0] + best[1]
            ranks[joined] = len(ranks)
            words = [merge(w, best, joined) for w in words]
        return ranks

    return train_bpe


def _first_occurrence(stats, ranks):
    return max(stats, key=stats.__getitem__)


def _merge_right_to_left(word, pair, joined):
    out, i = [], len(word) - 1
    while i >= 0:
        if i >= 1 and (word[i - 1], word[i]) == pair:
            out.append(joined)
            i -= 2
        else:
            out.append(word[i])
            i -= 1
    return out[::-1]


def _train_with_ids(text, vocab_size, pattern):
    """Correct, unusual: integer ids and a merge table, recounting the whole text each round."""
    vocab = {i: bytes([i]) for i in range(256)}
    words = [list(c.encode("utf-8")) for c in regex.findall(pattern, text)]
    while len(vocab) < vocab_size:
        order: list = []
        counts: dict = {}
        for w in words:
            for pair in zip(w, w[1:]):
                if pair not in counts:
                    order.append(pair)
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        top = max(counts.values())
        best = next(p for p in order if counts[p] == top)
        new_id = len(vocab)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        words = [_merge(w, best, new_id) for w in words]
    return {token: i for i, token in vocab.items()}


TRAIN_WRONG = {
    "smallest pair wins ties (the chapter's rule)": _trainer(lambda s, r: min(s, key=lambda p: (-s[p], r[p[0]], r[p[1]]))),
    "last occurrence wins ties": _trainer(lambda s, r: max(reversed(list(s)), key=s.__getitem__)),
    "largest bytes win ties": _trainer(lambda s, r: max(s, key=lambda p: (s[p], p))),
    "no regex pre-split (merges across chunks)": _trainer(_first_occurrence, split=False),
    "one merge too many": _trainer(_first_occurrence, extra=1),
    "merges right to left": _trainer(_first_occurrence, merge=_merge_right_to_left),
}


def test_train_bpe_solution_and_unusual_pass():
    assert CHECKS["train_bpe"](NS["train_bpe"]) is None
    assert CHECKS["train_bpe"](_train_with_ids) is None
    assert CHECKS["train_bpe"](_trainer(_first_occurrence)) is None


@pytest.mark.parametrize("name", ["stub"] + list(TRAIN_WRONG))
def test_train_bpe_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["train_bpe"](stub if name == "stub" else TRAIN_WRONG[name])


# --------------------------------------------------------------------------- split_special

def _split_in_given_order(text, specials):
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(regex.escape(s) for s in specials) + ")"
    return [p for p in regex.split(pattern, text) if p]


def _split_scan(text, specials):
    """Correct, unusual: scan by hand."""
    out, start, i = [], 0, 0
    while i < len(text):
        hits = [s for s in specials if s and text.startswith(s, i)]
        if hits:
            best = max(hits, key=len)
            if i > start:
                out.append(text[start:i])
            out.append(best)
            i = start = i + len(best)
        else:
            i += 1
    if start < len(text):
        out.append(text[start:])
    return out


SPLIT_WRONG = {
    "joined in the given order": _split_in_given_order,
    "joined in set order": lambda text, specials: _split_in_given_order(text, list(set(specials))),
    "shortest first": lambda text, specials: _split_in_given_order(text, sorted(specials, key=len)),
    "keeps empty strings": lambda text, specials: (regex.split("(" + "|".join(regex.escape(s) for s in sorted(
        specials, key=len, reverse=True)) + ")", text) if specials else [text]),
    "str.split drops the special tokens": lambda text, specials: [p for p in regex.split(
        "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)), text) if p] if specials else (
        [text] if text else []),
}


def test_split_special_solution_and_unusual_pass():
    assert CHECKS["split_special"](NS["split_special"]) is None
    assert CHECKS["split_special"](_split_scan) is None


@pytest.mark.parametrize("name", ["stub"] + list(SPLIT_WRONG))
def test_split_special_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["split_special"](stub if name == "stub" else SPLIT_WRONG[name])


# --------------------------------------------------------------------------- Tokenizer

Solution = NS["Tokenizer"]


class StubTokenizer:
    def __init__(self, ranks, pattern, special_tokens):
        raise NotImplementedError("Exercise: write your code here")


class NoPreSplit(Solution):
    def encode_ordinary(self, text):
        saved, self.regex = self.regex, regex.compile(r"[\s\S]+")
        try:
            return Solution.encode_ordinary(self, text)
        finally:
            self.regex = saved


class LeftmostMergeFirst(Solution):
    """Merges the leftmost mergeable pair instead of the lowest-ranked one."""

    def encode_ordinary(self, text):
        ids = []
        for chunk in self.regex.findall(text):
            parts = [bytes([b]) for b in chunk.encode("utf-8")]
            while True:
                spots = [i for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in self.ranks]
                if not spots:
                    break
                i = spots[0]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(self.ranks[p] for p in parts)
        return ids


class GreedyLongestMatch(Solution):
    """Takes the longest token that matches at each position (not BPE)."""

    def encode_ordinary(self, text):
        ids = []
        for chunk in self.regex.findall(text):
            data, i = chunk.encode("utf-8"), 0
            while i < len(data):
                j = next(j for j in range(min(len(data), i + 64), i, -1) if data[i:j] in self.ranks)
                ids.append(self.ranks[data[i:j]])
                i = j
        return ids


class SpecialsAlwaysAllowed(Solution):
    def encode(self, text, allowed_special=frozenset()):
        return Solution.encode(self, text, allowed_special="all")


class SpecialsIgnored(Solution):
    def encode(self, text, allowed_special=frozenset()):
        return self.encode_ordinary(text)


class StrictDecode(Solution):
    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="ignore")


class DecodeEachToken(Solution):
    def decode(self, ids):
        return "".join(self.token_bytes[i].decode("utf-8", errors="replace") for i in ids)


class CachingTokenizer(Solution):
    """Correct, unusual: a chunk cache and a merge-everywhere loop."""

    def __init__(self, ranks, pattern, special_tokens):
        super().__init__(ranks, pattern, special_tokens)
        self.cache: dict = {}

    def encode_ordinary(self, text):
        ids = []
        for chunk in self.regex.findall(text):
            if chunk not in self.cache:
                parts = [bytes([b]) for b in chunk.encode("utf-8")]
                while True:
                    ranked = [self.ranks.get(a + b) for a, b in zip(parts, parts[1:])]
                    ranked = [r for r in ranked if r is not None]
                    if not ranked:
                        break
                    best, merged, i = min(ranked), [], 0
                    while i < len(parts):
                        if i + 1 < len(parts) and self.ranks.get(parts[i] + parts[i + 1]) == best:
                            merged.append(parts[i] + parts[i + 1])
                            i += 2
                        else:
                            merged.append(parts[i])
                            i += 1
                    parts = merged
                self.cache[chunk] = [self.ranks[p] for p in parts]
            ids.extend(self.cache[chunk])
        return ids


TOKENIZER_WRONG = {
    "stub": StubTokenizer, "no regex pre-split": NoPreSplit, "leftmost merge first": LeftmostMergeFirst,
    "greedy longest match": GreedyLongestMatch, "disallowed specials encoded": SpecialsAlwaysAllowed,
    "special tokens never recognised": SpecialsIgnored, "decode drops invalid bytes": StrictDecode,
    "decode token by token": DecodeEachToken,
}


def test_tokenizer_solution_and_unusual_pass():
    assert CHECKS["Tokenizer"](Solution) is None
    assert CHECKS["Tokenizer"](CachingTokenizer) is None


@pytest.mark.parametrize("name", list(TOKENIZER_WRONG))
def test_tokenizer_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["Tokenizer"](TOKENIZER_WRONG[name])


# --------------------------------------------------------------------------- stream_decode

def _decode_each(pieces):
    return [p.decode("utf-8", errors="replace") for p in pieces] + [""]


def _hold_any_lead(pieces):
    """Holds back any trailing lead-looking byte, C0, C1 and F5-FF included."""
    out, pending = [], b""
    for piece in pieces:
        pending += piece
        keep = 0
        for back in range(1, min(3, len(pending)) + 1):
            byte = pending[-back]
            if 0x80 <= byte <= 0xBF:
                continue
            need = 2 if byte >= 0xC0 and byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if byte >= 0xF0 else 1
            keep = back if need > back else 0
            break
        out.append(pending[:len(pending) - keep].decode("utf-8", errors="replace"))
        pending = pending[len(pending) - keep:]
    return out + [pending.decode("utf-8", errors="replace")]


def _no_flush(pieces):
    return NS["stream_decode"](pieces)[:-1] + [""]


def _drop_incomplete(pieces):
    """Decodes with errors='ignore' and never holds back: broken characters vanish."""
    return [p.decode("utf-8", errors="ignore") for p in pieces] + [""]


def _try_decode(pieces):
    """Correct, unusual: try strict decoding, and on 'unexpected end of data' hold back from there."""
    out, pending = [], b""
    for piece in pieces:
        pending += piece
        text = []
        while True:
            try:
                text.append(pending.decode("utf-8"))
                pending = b""
                break
            except UnicodeDecodeError as error:
                text.append(pending[:error.start].decode("utf-8"))
                if error.reason == "unexpected end of data":
                    pending = pending[error.start:]
                    break
                text.append("\ufffd" * 1)
                pending = pending[error.end:]
        out.append("".join(text))
    return out + [pending.decode("utf-8", errors="replace")]


STREAM_WRONG = {"stub": stub, "each piece on its own": _decode_each, "C0/F5 held back": _hold_any_lead,
                "no flush at the end": _no_flush, "drops broken characters": _drop_incomplete}


def test_stream_decode_solution_and_unusual_pass():
    assert CHECKS["stream_decode"](NS["stream_decode"]) is None
    assert CHECKS["stream_decode"](_try_decode) is None


@pytest.mark.parametrize("name", list(STREAM_WRONG))
def test_stream_decode_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["stream_decode"](STREAM_WRONG[name])
