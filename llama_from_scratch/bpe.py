"""Byte-level byte-pair encoding (BPE), written from scratch (chapter 1).

A language model reads integers, not text. A byte-level BPE tokenizer turns text into integers in
three steps:

1. **Bytes.** The text is encoded as UTF-8, so every possible string becomes a sequence of
   integers 0..255 and nothing is ever "out of vocabulary".
2. **Pre-tokenization.** A regular expression (:data:`GPT4_SPLIT_PATTERN`) cuts the text into
   chunks (words with their leading space, runs of up to three digits, punctuation, whitespace).
   Merges never cross a chunk boundary, so " dog" is learned once instead of once per neighbour.
3. **Merges.** Training repeatedly finds the most frequent adjacent pair of ids and replaces it
   by a new id (256, 257, ...). Encoding replays those merges: within each chunk it repeatedly
   merges the adjacent pair that was learned *earliest* (the lowest merge id) until no learned
   pair is left.

:class:`BPETokenizer` implements training, encoding, decoding, special tokens and a readable
file format, and converts to and from tiktoken: :meth:`BPETokenizer.from_tiktoken` recovers the
merges of OpenAI's cl100k_base (encoding is then identical to tiktoken's), and
:meth:`BPETokenizer.to_tiktoken` hands our merges to tiktoken's Rust core, the fast path.

Training is incremental (see :meth:`BPETokenizer.train`): pair counts are kept per *unique* chunk
weighted by its frequency, with an index from each pair to the chunks containing it, so a merge
only touches the chunks it changes. The textbook version recounts every pair of the whole text
after every merge; ``benchmarks/bpe_training.py`` measures the difference.
"""

from __future__ import annotations

import heapq
import json
import operator
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Iterable, Literal, Sequence, Union

import regex

if TYPE_CHECKING:  # tiktoken is only needed for the conversions
    import tiktoken

__all__ = [
    "GPT4_SPLIT_PATTERN",
    "BPETokenizer",
    "get_stats",
    "merge_pair",
]

#: The pre-tokenization regex of OpenAI's cl100k_base (GPT-4), exactly as tiktoken defines it.
#: Alternatives, tried left to right at each position:
#:
#: * ``'(?i:[sdmt]|ll|ve|re)``: English contractions ('s, 't, 'll, ...), any case;
#: * ``[^\r\n\p{L}\p{N}]?+\p{L}++``: a word (letters), with at most one leading non-letter such
#:   as a space;
#: * ``\p{N}{1,3}+``: numbers, in groups of at most three digits;
#: * `` ?[^\s\p{L}\p{N}]++[\r\n]*+``: punctuation / symbols, optional leading space, with any
#:   newlines that follow;
#: * ``\s++$``, ``\s*[\r\n]``, ``\s+(?!\S)``, ``\s``: whitespace; a run of spaces before a word
#:   leaves its last space to that word (" dog"), newlines are kept together.
#:
#: ``?+`` / ``++`` are possessive quantifiers (no backtracking); Python's ``re`` lacks ``\p{..}``
#: classes before 3.13, so this module uses the ``regex`` package.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

#: The special token that ends a document; its id is what ``eos_token_id`` reports.
ENDOFTEXT = "<|endoftext|>"

AllowedSpecial = Union[Literal["all", "none", "none_raise"], AbstractSet[str]]
Pair = tuple[int, int]

_FILE_HEADER = "# llama_from_scratch BPE tokenizer, format 1"
_CACHE_LIMIT = 200_000  # chunk encodings kept in memory before the cache is reset


# ------------------------------------------------------------------------------------------------
# The two primitive operations of BPE
# ------------------------------------------------------------------------------------------------


def get_stats(ids: Sequence[int], counts: dict[Pair, int] | None = None, weight: int = 1) -> dict[Pair, int]:
    """Count how often each adjacent pair occurs in ``ids`` (added to ``counts`` if given).

    ``weight`` counts every pair that many times: a chunk that occurs 7 times in the text
    contributes its pairs 7 times, without being stored 7 times.

    >>> get_stats([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, scanning left to right.

    Occurrences do not overlap: in ``[a, a, a]`` the pair ``(a, a)`` is merged once, at the
    left, giving ``[new_id, a]``, the same choice tiktoken makes.

    >>> merge_pair([5, 6, 5, 6, 7], (5, 6), 99)
    [99, 99, 7]
    """
    merged: list[int] = []
    i = 0
    n = len(ids)
    first, second = pair
    while i < n:
        if i + 1 < n and ids[i] == first and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _render(token: bytes) -> str:
    """A token as a printable Python string literal (bytes that are not UTF-8 shown as ``\\xNN``)."""
    return repr(token.decode("utf-8", errors="backslashreplace"))


def _recover_split(mergeable_ranks: dict[bytes, int], token: bytes, rank: int) -> list[bytes]:
    """Run tiktoken's byte-level BPE on ``token`` using only ranks below ``rank``.

    For a token that BPE produced, this stops with exactly two parts: the pair that was merged
    to make it. (This is how the merges of a tiktoken encoding, which stores only
    ``bytes -> rank``, are recovered.)
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_index, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = mergeable_ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_index, best_rank = i, r
        if best_index < 0:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------


class BPETokenizer:
    """A byte-level BPE tokenizer: 256 byte tokens, a list of merges, optional special tokens.

    Attributes:
        pattern: the pre-tokenization regex (a string; :data:`GPT4_SPLIT_PATTERN` by default).
        merges: ``{(left_id, right_id): new_id}`` in the order learned; a lower ``new_id`` means
            an earlier merge, which encoding applies first.
        byte_ids: ``byte_ids[b]`` is the id of the single byte ``b``. For a trained tokenizer
            this is ``b`` itself; tiktoken's cl100k numbers its 256 byte tokens in another order.
        vocab: ``{id: bytes}`` for every ordinary token (bytes and merges).
        special_tokens: ``{string: id}``, e.g. ``{"<|endoftext|>": 100257}``; never produced by
            merges, only by :meth:`encode` when allowed.

    Build one with :meth:`train`, :meth:`from_tiktoken` or :meth:`load`; the constructor takes
    the parts directly and checks that they fit together.
    """

    def __init__(
        self,
        merges: dict[Pair, int] | None = None,
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: dict[str, int] | None = None,
        byte_ids: Sequence[int] | None = None,
    ) -> None:
        self.pattern = pattern
        try:
            self.compiled_pattern = regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"the pre-tokenization pattern does not compile: {exc}") from exc

        byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        if len(byte_ids) != 256 or len(set(byte_ids)) != 256 or min(byte_ids) < 0:
            raise ValueError("byte_ids must give 256 distinct non-negative ids, one per byte value")
        self.byte_ids = byte_ids
        self.vocab: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(byte_ids)}

        # Replay the merges in id order; each must build on tokens that already exist.
        self.merges: dict[Pair, int] = {}
        for (left, right), new_id in sorted((merges or {}).items(), key=lambda item: item[1]):
            if left not in self.vocab or right not in self.vocab:
                missing = left if left not in self.vocab else right
                raise ValueError(f"merge ({left}, {right}) -> {new_id} uses id {missing}, which is not "
                                 "defined by an earlier merge or a byte")
            if new_id in self.vocab:
                raise ValueError(f"merge ({left}, {right}) -> {new_id} reuses id {new_id}")
            self.merges[(left, right)] = new_id
            self.vocab[new_id] = self.vocab[left] + self.vocab[right]

        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        for text, token_id in self.special_tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty string")
            if token_id in self.vocab:
                raise ValueError(f"special token {text!r} has id {token_id}, already used by "
                                 f"the ordinary token {_render(self.vocab[token_id])}")
        self.inverse_special_tokens = {i: s for s, i in self.special_tokens.items()}
        if len(self.inverse_special_tokens) != len(self.special_tokens):
            raise ValueError("two special tokens share an id")
        self._cache: dict[str, list[int]] = {}

    # --------------------------------------------------------------------------------------------
    # Sizes and conveniences
    # --------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (what an embedding table needs; tiktoken's ``n_vocab``).

        Equal to ``len(self)`` unless some ids are unused (cl100k_base leaves 100256 and
        100261..100275 empty).
        """
        ids = list(self.vocab) + list(self.inverse_special_tokens)
        return max(ids) + 1

    def __len__(self) -> int:
        """The number of tokens: 256 bytes + merges + special tokens."""
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eos_token_id(self) -> int | None:
        """The id of ``<|endoftext|>`` if this tokenizer has that special token, else ``None``."""
        return self.special_tokens.get(ENDOFTEXT)

    def __repr__(self) -> str:
        return (f"BPETokenizer(merges={len(self.merges)}, special_tokens={len(self.special_tokens)}, "
                f"vocab_size={self.vocab_size})")

    # --------------------------------------------------------------------------------------------
    # Training
    # --------------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: Iterable[str] | None = None,
        verbose: bool = False,
    ) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        ``vocab_size`` is the size of the finished vocabulary, special tokens included: ids
        0..255 are the bytes, merges get 256, 257, ... in the order learned, and the special
        tokens (strings, e.g. ``["<|endoftext|>"]``) get the ids after the last merge, in the
        order given. Occurrences of special tokens in ``text`` are cut out before training, so
        no merge ever spans one. Training stops early, with a smaller vocabulary, if the text
        runs out of pairs.

        **Tie-breaking.** When several pairs are equally frequent, the pair with the smallest
        ``(left_id, right_id)`` wins. The result therefore depends only on the pair counts, not
        on the order in which pairs happen to appear in the text or in a dict.

        **Incremental counting.** The text is split into chunks by ``pattern`` and identical
        chunks are counted once, with a frequency (English text has far fewer distinct words
        than words). We keep the pair counts weighted by frequency, an index
        ``pair -> {chunks containing it}``, and a heap of pairs ordered by count. A merge
        rewrites only the chunks the index names and adjusts the counts of the pairs in those
        chunks, instead of recounting the whole text; stale heap entries are skipped when popped.
        """
        special_list = cls._special_list(special_tokens)
        n_merges = vocab_size - 256 - len(special_list)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is smaller than 256 byte tokens + "
                             f"{len(special_list)} special tokens")
        compiled = regex.compile(pattern)

        # 1. Unique chunks and their frequencies (special tokens removed from the text first).
        segments = [text]
        if special_list:
            splitter = re.compile("|".join(re.escape(s) for s in sorted(special_list, key=len, reverse=True)))
            segments = splitter.split(text)
        chunk_counts: Counter[str] = Counter()
        for segment in segments:
            chunk_counts.update(compiled.findall(segment))
        words: list[list[int]] = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
        freqs: list[int] = list(chunk_counts.values())

        # 2. Pair counts (weighted by chunk frequency) and the index pair -> chunks.
        pair_counts: dict[Pair, int] = {}
        where: dict[Pair, set[int]] = defaultdict(set)
        for index, (word, freq) in enumerate(zip(words, freqs)):
            get_stats(word, pair_counts, freq)
            for pair in zip(word, word[1:]):
                where[pair].add(index)
        # Max-heap by count via negation; equal counts pop the smallest pair first (tie-break).
        heap = [(-count, pair) for pair, count in pair_counts.items()]
        heapq.heapify(heap)

        merges: dict[Pair, int] = {}
        vocab = {i: bytes([i]) for i in range(256)}
        for step in range(n_merges):
            # 3. The most frequent pair: pop until an entry matches the current count.
            best = None
            while heap:
                negative_count, pair = heapq.heappop(heap)
                if pair_counts.get(pair) == -negative_count:
                    best = pair
                    break
            if best is None:
                if verbose:
                    print(f"no pairs left after {step} merges; stopping early")
                break
            count = pair_counts[best]
            new_id = 256 + step
            merges[best] = new_id
            vocab[new_id] = vocab[best[0]] + vocab[best[1]]

            # 4. Rewrite only the chunks that contain the pair, adjusting counts and index.
            changed: set[Pair] = set()
            for index in sorted(where.pop(best)):
                old = words[index]
                new = merge_pair(old, best, new_id)
                freq = freqs[index]
                old_pairs = list(zip(old, old[1:]))
                new_pairs = list(zip(new, new[1:]))
                for pair in old_pairs:
                    pair_counts[pair] -= freq
                for pair in new_pairs:
                    pair_counts[pair] = pair_counts.get(pair, 0) + freq
                changed.update(old_pairs)
                changed.update(new_pairs)
                for pair in set(old_pairs) - set(new_pairs):
                    if pair != best:
                        where[pair].discard(index)
                for pair in set(new_pairs) - set(old_pairs):
                    where[pair].add(index)
                words[index] = new
            for pair in changed:
                if pair_counts.get(pair, 0) > 0:
                    heapq.heappush(heap, (-pair_counts[pair], pair))
                else:
                    pair_counts.pop(pair, None)
                    where.pop(pair, None)

            if verbose:
                print(f"merge {step + 1}/{n_merges}: {best} -> {new_id} "
                      f"{_render(vocab[new_id])} ({count} occurrences)")

        first_special = 256 + len(merges)
        specials = {s: first_special + k for k, s in enumerate(special_list)}
        return cls(merges, pattern=pattern, special_tokens=specials)

    @staticmethod
    def _special_list(special_tokens: Iterable[str] | None) -> list[str]:
        """Validate the special tokens given to :meth:`train`: distinct non-empty strings."""
        if special_tokens is None:
            return []
        if isinstance(special_tokens, (str, dict)):
            raise TypeError("special_tokens must be a list of strings such as ['<|endoftext|>'] "
                            "(their ids are assigned after the merges)")
        special_list = list(special_tokens)
        if not all(isinstance(s, str) and s for s in special_list):
            raise ValueError(f"special tokens must be non-empty strings, got {special_list!r}")
        if len(set(special_list)) != len(special_list):
            raise ValueError(f"duplicate special tokens in {special_list!r}")
        return special_list

    # --------------------------------------------------------------------------------------------
    # tiktoken interoperability
    # --------------------------------------------------------------------------------------------

    @classmethod
    def from_tiktoken(cls, encoding: "tiktoken.Encoding | str") -> "BPETokenizer":
        """Recover a tiktoken encoding's merges so that :meth:`encode` gives identical ids.

        tiktoken stores only ``mergeable_ranks: {token bytes: rank}``; the rank is both the id
        and the merge priority. For each multi-byte token we run BPE on its bytes allowing only
        lower ranks: what is left is the two tokens it was merged from. ``encoding`` may also be
        a name (``"cl100k_base"``), loaded offline through :func:`llama_from_scratch.tokenizers.
        get_tiktoken_encoding`.
        """
        if isinstance(encoding, str):
            from llama_from_scratch.tokenizers import get_tiktoken_encoding

            encoding = get_tiktoken_encoding(encoding)
        # tiktoken has no public accessor for these; they are the constructor's arguments.
        mergeable_ranks: dict[bytes, int] = encoding._mergeable_ranks
        byte_ids = []
        for b in range(256):
            if bytes([b]) not in mergeable_ranks:
                raise ValueError(f"encoding {encoding.name!r} has no token for the byte {b}: not byte-level BPE")
            byte_ids.append(mergeable_ranks[bytes([b])])
        merges: dict[Pair, int] = {}
        for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
            if len(token) == 1:
                continue
            parts = _recover_split(mergeable_ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {_render(token)} (rank {rank}) is not a merge of two lower-ranked "
                                 f"tokens; these ranks did not come from BPE")
            merges[(mergeable_ranks[parts[0]], mergeable_ranks[parts[1]])] = rank
        return cls(merges, pattern=encoding._pat_str, special_tokens=dict(encoding._special_tokens),
                   byte_ids=byte_ids)

    def to_tiktoken(self, name: str) -> "tiktoken.Encoding":
        """The same tokenizer as a ``tiktoken.Encoding``: same ranks, pattern and special tokens.

        tiktoken runs BPE in Rust, typically tens of times faster than :meth:`encode`.
        """
        import tiktoken

        ranks: dict[bytes, int] = {}
        for token_id, token in self.vocab.items():
            if token in ranks:
                raise ValueError(f"ids {ranks[token]} and {token_id} are the same bytes {_render(token)}; "
                                 "tiktoken needs one id per byte string")
            ranks[token] = token_id
        return tiktoken.Encoding(name=name, pat_str=self.pattern, mergeable_ranks=ranks,
                                 special_tokens=dict(self.special_tokens))

    # --------------------------------------------------------------------------------------------
    # Encoding
    # --------------------------------------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> list[int]:
        """Encode one pre-token chunk: bytes, then merges lowest id first (cached per chunk)."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        merges = self.merges
        while len(ids) >= 2:
            # The adjacent pair learned earliest; every occurrence of it is merged at once.
            best_pair, best_id = None, None
            for pair in zip(ids, ids[1:]):
                new_id = merges.get(pair)
                if new_id is not None and (best_id is None or new_id < best_id):
                    best_pair, best_id = pair, new_id
            if best_pair is None:
                break
            ids = merge_pair(ids, best_pair, best_id)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as ordinary text."""
        ids: list[int] = []
        for chunk in self.compiled_pattern.findall(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Encode ``text`` into token ids, with tiktoken's rules for special tokens.

        ``allowed_special``:

        * ``"none_raise"`` (default, tiktoken's default): a special-token string in ``text``
          raises ``ValueError`` (text from users should not be able to inject an end-of-text);
        * ``"none"``: special-token strings are encoded as ordinary text;
        * ``"all"``: every special-token string becomes its special id;
        * a set of strings: those become special ids, any other special token raises.
        """
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                allowed, disallowed = set(self.special_tokens), set()
            elif allowed_special == "none":
                allowed, disallowed = set(), set()
            elif allowed_special == "none_raise":
                allowed, disallowed = set(), set(self.special_tokens)
            else:
                raise ValueError(f"allowed_special={allowed_special!r}: use 'all', 'none', 'none_raise' "
                                 "or a set of special-token strings")
        else:
            allowed = set(allowed_special) & set(self.special_tokens)
            disallowed = set(self.special_tokens) - allowed

        if disallowed:
            found = re.search("|".join(re.escape(s) for s in sorted(disallowed, key=len, reverse=True)), text)
            if found:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {found.group()!r}. "
                    f"Pass allowed_special={{{found.group()!r}}} or 'all' to encode it as a special token, "
                    "or allowed_special='none' to encode it as ordinary text.")
        if not allowed:
            return self.encode_ordinary(text)

        # Split around the allowed special tokens (the capture group keeps them in the list).
        splitter = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for piece in re.split(splitter, text):
            if piece in allowed:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    # --------------------------------------------------------------------------------------------
    # Decoding
    # --------------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids (special tokens as their UTF-8 text)."""
        pieces = []
        for token_id in ids:
            token_id = operator.index(token_id)  # accepts numpy / torch integers too
            token = self.vocab.get(token_id)
            if token is None:
                special = self.inverse_special_tokens.get(token_id)
                if special is None:
                    raise ValueError(f"token id {token_id} is not in the vocabulary "
                                     f"(vocab_size={self.vocab_size})")
                token = special.encode("utf-8")
            pieces.append(token)
        return b"".join(pieces)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken.

        A single token may hold part of a multi-byte character, so decoding a prefix of a valid
        sequence can produce a replacement character that the full sequence does not.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --------------------------------------------------------------------------------------------
    # Saving and loading
    # --------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as UTF-8 text, one fact per line, readable by a person.

        Layout: a header line; ``pattern <JSON string>``; ``bytes identity`` or ``bytes 256``
        followed by 256 lines ``<byte> <id>``; ``special_tokens <n>`` followed by ``<JSON
        string> <id>`` lines; ``merges <n>`` followed by ``<left> <right> <new>`` lines, each
        with a comment showing the tokens (ignored when loading).
        """
        lines = [_FILE_HEADER, f"pattern {json.dumps(self.pattern)}"]
        if self.byte_ids == list(range(256)):
            lines.append("bytes identity")
        else:
            lines.append("bytes 256")
            lines += [f"{b} {i}" for b, i in enumerate(self.byte_ids)]
        lines.append(f"special_tokens {len(self.special_tokens)}")
        lines += [f"{json.dumps(s)} {i}" for s, i in self.special_tokens.items()]
        lines.append(f"merges {len(self.merges)}")
        for (left, right), new_id in self.merges.items():
            lines.append(f"{left} {right} {new_id}  # {_render(self.vocab[left])} + "
                         f"{_render(self.vocab[right])} -> {_render(self.vocab[new_id])}")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """Read a file written by :meth:`save`; ``ValueError`` naming the line if it is ill-formed."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a BPETokenizer file (not UTF-8 text: {exc})") from exc
        if lines and lines[-1] == "":
            lines.pop()
        position = 0

        def next_line(expected: str) -> str:
            nonlocal position
            if position >= len(lines):
                raise ValueError(f"{path}: file ends early; expected {expected} at line {position + 1}")
            position += 1
            return lines[position - 1]

        def fail(expected: str, line: str) -> ValueError:
            return ValueError(f"{path}: line {position}: expected {expected}, found {line[:80]!r}")

        def keyword(name: str) -> str:
            line = next_line(f"'{name} ...'")
            if not line.startswith(name + " "):
                raise fail(f"'{name} ...'", line)
            return line[len(name) + 1:]

        def count(name: str) -> int:
            value = keyword(name)
            if not value.isdigit():
                raise fail(f"'{name} <count>'", f"{name} {value}")
            return int(value)

        header = next_line("the header")
        if header != _FILE_HEADER:
            raise fail(f"the header {_FILE_HEADER!r} (is this a BPETokenizer file?)", header)
        try:
            pattern = json.loads(keyword("pattern"))
            if not isinstance(pattern, str):
                raise ValueError
        except ValueError:
            raise fail("'pattern <JSON string>'", lines[position - 1]) from None

        byte_ids: list[int] | None = None
        bytes_spec = keyword("bytes")
        if bytes_spec == "256":
            byte_ids = []
            for b in range(256):
                line = next_line("'<byte> <id>'")
                fields = line.split()
                if len(fields) != 2 or not all(f.isdigit() for f in fields) or int(fields[0]) != b:
                    raise fail(f"'{b} <id>'", line)
                byte_ids.append(int(fields[1]))
        elif bytes_spec != "identity":
            raise fail("'bytes identity' or 'bytes 256'", f"bytes {bytes_spec}")

        special_tokens: dict[str, int] = {}
        for _ in range(count("special_tokens")):
            line = next_line("'<JSON string> <id>'")
            text, _, token_id = line.rpartition(" ")
            try:
                special = json.loads(text)
            except ValueError:
                raise fail("'<JSON string> <id>'", line) from None
            if not isinstance(special, str) or not token_id.isdigit() or special in special_tokens:
                raise fail("'<JSON string> <id>' with a new special token", line)
            special_tokens[special] = int(token_id)

        merges: dict[Pair, int] = {}
        for _ in range(count("merges")):
            line = next_line("'<left> <right> <new>'")
            fields = line.split("#", 1)[0].split()
            if len(fields) != 3 or not all(f.isdigit() for f in fields):
                raise fail("'<left> <right> <new>  # comment'", line)
            left, right, new_id = map(int, fields)
            if (left, right) in merges:
                raise fail("a pair not merged before", line)
            merges[(left, right)] = new_id
        if position != len(lines):
            position += 1
            raise fail("the end of the file", lines[position - 1])
        try:
            return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_ids=byte_ids)
        except ValueError as exc:
            raise ValueError(f"{path}: inconsistent tokenizer file: {exc}") from exc
