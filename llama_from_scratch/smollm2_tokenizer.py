"""SmolLM2's tokenizer, rebuilt from the metadata of its GGUF file.

A GGUF file carries its tokenizer as metadata: the vocabulary (`tokenizer.ggml.tokens`, 49152
strings), the BPE merges in priority order (`tokenizer.ggml.merges`, 48900 strings "a b"), a
type per token (1 normal, 3 control), the special ids, and a Jinja chat template. SmolLM2 uses
GPT-2 style byte-level BPE:

1. Special tokens (`<|im_start|>`, `<|im_end|>`, ...) are cut out of the text first and become
   their ids directly.
2. The rest is split into chunks by a regex (the "pre-tokenizer"): words with their leading
   space, numbers, punctuation runs, whitespace runs. Merges never cross chunk boundaries.
3. Each chunk's UTF-8 bytes are spelled with GPT-2's byte-to-unicode alphabet (every byte becomes
   a printable character, e.g. the space 0x20 becomes "Ġ"), which is how the vocabulary is written.
4. BPE: repeatedly merge the adjacent pair with the best (lowest) merge rank, until no adjacent
   pair is a merge. Each resulting symbol is a vocabulary entry.

Which regex? The file says `tokenizer.ggml.pre = "smollm"`. llama.cpp (and SmolLM2's original
`tokenizer.json`: `Digits(individual_digits=True)` then `ByteLevel`) first isolates every digit,
then applies the GPT-2 regex. transformers 5.x has no entry for "smollm" in its GGUF conversion
and falls back to the plain GPT-2 regex. The two agree except where two or more whitespace
characters precede a digit (`"a  1"`, `"\\n    42"`): GPT-2's regex leaves one space to the
number's chunk, the digit-first split keeps the whole run together. `pre_tokenizer="gpt2"` (the
default) reproduces transformers' tokenizer from the GGUF exactly, the reference this package's
tests and chapters compare against; `pre_tokenizer="smollm"` reproduces llama.cpp and SmolLM2's
original tokenizer (tested against a `tokenizers` pipeline built that way).

A byte that is not in the vocabulary (SmolLM2 lacks 21 of the 256, e.g. 0x04 and the UTF-8 lead
bytes 0xF1, 0xF2) is dropped from its chunk before merging, as the reference does.
"""

from __future__ import annotations

import functools
import os
import re as _stdlib_re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

from llama_from_scratch.gguf_reader import GGUFFile, read_gguf
from llama_from_scratch.weights import find_smollm2_gguf

__all__ = [
    "GPT2_SPLIT_PATTERN",
    "SMOLLM_SPLIT_PATTERN",
    "SMOLLM2_DEFAULT_SYSTEM_PROMPT",
    "SmolLM2Tokenizer",
    "bytes_to_unicode",
    "load_smollm2_tokenizer",
    "render_chatml",
]

# GPT-2's pre-tokenization regex (also what tokenizers' ByteLevel(use_regex=True) uses).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp's "smollm": split off every digit (\p{N}) first, then apply the GPT-2 regex to the
# pieces between digits. Folded into one regex: a digit is always a chunk on its own, and a
# whitespace run may end right before a digit (where a piece ended) as well as before whitespace.
SMOLLM_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
_PRE_TOKENIZERS = {"gpt2": GPT2_SPLIT_PATTERN, "smollm": SMOLLM_SPLIT_PATTERN}

SMOLLM2_DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>
_CACHE_LIMIT = 100_000  # chunks remembered by the BPE cache before it is cleared


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    (control bytes, space, ...) are moved to the characters 256, 257, ... in byte order, so that a
    vocabulary of byte strings can be written as ordinary text (the space 0x20 becomes 'Ġ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def render_chatml(
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    default_system_prompt: str | None = SMOLLM2_DEFAULT_SYSTEM_PROMPT,
) -> str:
    """SmolLM2's chat template written out by hand (ChatML).

    Each message becomes `<|im_start|>{role}\\n{content}<|im_end|>\\n`; when the first message is
    not a system message, a system message with the default prompt is put first; the generation
    prompt `<|im_start|>assistant\\n` is where the model continues. Equal to rendering the GGUF's
    Jinja template (tested).
    """
    _check_messages(messages)
    parts = []
    if messages and messages[0]["role"] != "system" and default_system_prompt is not None:
        parts.append(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must contain at least one message (an empty chat has no template)")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")


class SmolLM2Tokenizer:
    """Byte-level BPE tokenizer built from a GGUF's tokenizer metadata (pure Python).

    Attributes: `tokens` (id -> vocabulary string), `encoder` (string -> id), `merge_ranks`
    ((left, right) -> rank), `special_tokens` (string -> id, the control tokens), `pattern`,
    `pre_tokenizer`, `bos_token_id`, `eos_token_id`, `pad_token_id`, `unk_token_id`,
    `vocab_size`, `chat_template`.
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
        pre_tokenizer: str = "gpt2",
    ) -> None:
        if pre_tokenizer not in _PRE_TOKENIZERS:
            raise ValueError(f"pre_tokenizer must be one of {sorted(_PRE_TOKENIZERS)}, got {pre_tokenizer!r}")
        if token_types is not None and len(token_types) != len(tokens):
            raise ValueError(f"{len(token_types)} token types for {len(tokens)} tokens")
        self.tokens: list[str] = list(tokens)
        self.vocab_size = len(self.tokens)
        self.encoder: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        if len(self.encoder) != self.vocab_size:
            raise ValueError("the vocabulary contains duplicate tokens")
        self.merge_ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            left, sep, right = merge.partition(" ")
            if not sep or not left or not right:
                raise ValueError(f"merge {rank} is not of the form 'left right': {merge!r}")
            self.merge_ranks[(left, right)] = rank

        types = list(token_types) if token_types is not None else [1] * self.vocab_size
        self.special_tokens: dict[str, int] = {t: i for i, t in enumerate(self.tokens) if types[i] == _CONTROL}
        # Longest first, so that the regex alternation matches the longest special token.
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("|".join(regex.escape(t) for t in ordered)) if ordered else None

        self.byte_encoder = bytes_to_unicode()
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Each token's bytes: vocabulary strings are spelled in the byte alphabet; a token using
        # any other character (none in SmolLM2) stands for its own UTF-8 text.
        self._token_bytes: list[bytes] = [
            bytes(byte_decoder[c] for c in t) if all(c in byte_decoder for c in t) else t.encode("utf-8")
            for t in self.tokens
        ]
        self._is_special = [types[i] == _CONTROL for i in range(self.vocab_size)]

        self.pre_tokenizer = pre_tokenizer
        self.pattern = _PRE_TOKENIZERS[pre_tokenizer]
        self._split_re = regex.compile(self.pattern)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = None  # set by enable_tiktoken()

    # --- construction from a GGUF file ---

    @classmethod
    def from_gguf(cls, gguf: str | os.PathLike | GGUFFile, pre_tokenizer: str = "gpt2") -> SmolLM2Tokenizer:
        """Build the tokenizer from a GGUF file (a path or an already-read GGUFFile)."""
        f = gguf if isinstance(gguf, GGUFFile) else read_gguf(gguf)
        md = f.metadata
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{f.path!r}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if not isinstance(md.get(key), list):
                raise ValueError(f"{f.path!r} has no {key} list in its metadata")
        return cls(
            md["tokenizer.ggml.tokens"],
            md["tokenizer.ggml.merges"],
            md.get("tokenizer.ggml.token_type"),
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
            unk_token_id=md.get("tokenizer.ggml.unknown_token_id"),
            chat_template=md.get("tokenizer.chat_template"),
            pre_tokenizer=pre_tokenizer,
        )

    # --- names of special ids ---

    def _name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    @property
    def bos_token(self) -> str | None:
        return self._name(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._name(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._name(self.pad_token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        fast = ", tiktoken fast path" if self._tiktoken is not None else ""
        return (
            f"SmolLM2Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merge_ranks)}, "
            f"special={len(self.special_tokens)}, pre_tokenizer={self.pre_tokenizer!r}{fast})"
        )

    # --- encoding ---

    def _allowed(self, text: str, allowed_special: str | Iterable[str]) -> set[str]:
        """The special tokens to recognise in `text` (tiktoken's meaning of `allowed_special`)."""
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        if allowed_special == "none_raise":
            if self._special_re is not None and (m := self._special_re.search(text)):
                raise ValueError(
                    f"text contains the special token {m.group()!r}; pass allowed_special='all' to "
                    "encode it as a special token or 'none' to encode it as plain text"
                )
            return set()
        if isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'all', 'none', 'none_raise' or a set of special tokens, got {allowed_special!r}"
            )
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this vocabulary: {sorted(unknown)}")
        return allowed

    def encode(self, text: str, allowed_special: str | Iterable[str] = "all") -> list[int]:
        """Token ids of `text`.

        `allowed_special`: "all" (default, like transformers: `<|im_start|>` in the text becomes
        id 1), "none" (special tokens are encoded as ordinary text), "none_raise" (raise
        ValueError if the text contains one), or a set of the special-token strings to recognise.
        No BOS is added (SmolLM2's `add_bos_token` is false).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        allowed = self._allowed(text, allowed_special)
        ids: list[int] = []
        start = 0
        if allowed and self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.group() not in allowed:
                    continue
                ids.extend(self._encode_ordinary(text[start : m.start()]))
                ids.append(self.special_tokens[m.group()])
                start = m.end()
        ids.extend(self._encode_ordinary(text[start:]))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text that contains no special tokens."""
        if not text:
            return []
        if self._tiktoken is not None and not _UNENCODABLE.search(text):
            return self._tiktoken.encode_ordinary(text)
        ids: list[int] = []
        for chunk in self._split_re.findall(text):
            ids.extend(self._bpe_chunk(chunk))
        return ids

    def _bpe_chunk(self, chunk: str) -> list[int]:
        """BPE on one pre-tokenizer chunk, with a cache: frequent words are merged only once."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        # A byte missing from the vocabulary is dropped before merging (as the reference does):
        # its neighbours then become adjacent and may merge.
        symbols = [c for c in (self.byte_encoder[b] for b in chunk.encode("utf-8")) if c in self.encoder]
        ids = [self.encoder[s] for s in self.bpe(symbols)]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def bpe(self, symbols: list[str]) -> list[str]:
        """Merge a list of byte-alphabet symbols by merge rank; returns the final symbols.

        Each round finds the adjacent pair with the lowest rank and merges every occurrence of
        that pair, left to right; it stops when no adjacent pair is a merge.
        """
        ranks = self.merge_ranks
        word = list(symbols)
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            left, right = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    # --- decoding ---

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(i)
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The bytes the ids stand for (ids may be a list, tuple, 1-D tensor or array)."""
        checked = self._check_ids(ids)
        return b"".join(self._token_bytes[i] for i in checked if not (skip_special_tokens and self._is_special[i]))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of the ids; bytes that are not valid UTF-8 become U+FFFD (not an error).

        An id outside the vocabulary raises ValueError naming it.
        """
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string (in the byte alphabet, e.g. 'Ġthe'), or None."""
        return self.encoder.get(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of an id."""
        return self.tokens[self._check_ids([token_id])[0]]

    # --- chat template ---

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as text, rendered with the GGUF's Jinja template as transformers renders it
        (jinja2 sandbox, trim_blocks, lstrip_blocks); the hand-written ChatML when jinja2 is
        not installed or the file has no template."""
        _check_messages(messages)
        if self.chat_template is None:
            return render_chatml(messages, add_generation_prompt)
        try:
            template = _compile_template(self.chat_template)
        except ImportError:
            return render_chatml(messages, add_generation_prompt)
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            unk_token=self._name(self.unk_token_id),
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Token ids of the chat (or its text with `tokenize=False`), like transformers'
        `apply_chat_template`. Messages are `{"role": ..., "content": ...}` dicts."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, allowed_special="all") if tokenize else text

    # --- tiktoken fast path ---

    def to_tiktoken(self, name: str = "smollm2"):
        """A `tiktoken.Encoding` with this vocabulary, regex and special tokens.

        tiktoken ranks a merge by the id of the merged token; that equals merging by merge rank
        here because SmolLM2's merges create tokens in id order (checked: each merge's result has
        a larger id than the previous one's). Where the two algorithms could still differ in
        principle (a token reachable by a split other than its own merge), they were compared on
        several megabytes of varied text and agreed exactly (tests/test_smollm2_tokenizer.py).
        tiktoken cannot handle a byte missing from the vocabulary: `encode` only uses it on text
        without such bytes.
        """
        import tiktoken

        previous = -1
        for (left, right), _rank in sorted(self.merge_ranks.items(), key=lambda kv: kv[1]):
            token_id = self.encoder.get(left + right)
            if token_id is None or token_id <= previous:
                raise ValueError(
                    "this vocabulary's merges do not create tokens in id order; tiktoken's "
                    "rank-by-id BPE would differ, so there is no exact tiktoken fast path"
                )
            previous = token_id
        ranks = {self._token_bytes[i]: i for i in range(self.vocab_size) if not self._is_special[i]}
        return tiktoken.Encoding(
            name=name, pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=dict(self.special_tokens)
        )

    def enable_tiktoken(self) -> SmolLM2Tokenizer:
        """Use `to_tiktoken()` for ordinary text in `encode` (same ids, many times faster)."""
        self._tiktoken = self.to_tiktoken()
        return self

    def disable_tiktoken(self) -> SmolLM2Tokenizer:
        """Go back to the pure-Python BPE."""
        self._tiktoken = None
        return self


# Characters whose UTF-8 bytes include one of the bytes SmolLM2's vocabulary lacks: control
# characters 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D and code points U+40000..U+BFFFF (lead bytes
# 0xF1, 0xF2). The reference drops such bytes; tiktoken cannot, so they take the Python path.
# (Computed for SmolLM2; a vocabulary lacking other bytes makes `enable_tiktoken` refuse, below.)
_UNENCODABLE = _stdlib_re.compile("[\x04\x06\x13\x14\x16\x1d\U00040000-\U000bffff]")


def _missing_bytes(tok: SmolLM2Tokenizer) -> set[int]:
    return {b for b, c in tok.byte_encoder.items() if c not in tok.encoder}


_SMOLLM2_MISSING = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    """Compile a chat template with the settings transformers uses (raises ImportError without jinja2)."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_smollm2_tokenizer(
    path: str | os.PathLike | GGUFFile | None = None,
    pre_tokenizer: str = "gpt2",
    use_tiktoken: bool = True,
) -> SmolLM2Tokenizer:
    """SmolLM2-135M-Instruct's tokenizer from its GGUF file (found with `find_smollm2_gguf`).

    `use_tiktoken=True` encodes through an equivalent tiktoken.Encoding (identical ids, much
    faster) when the vocabulary allows it; the pure-Python BPE is used otherwise.
    """
    source = path if isinstance(path, GGUFFile) else find_smollm2_gguf(path)
    tok = SmolLM2Tokenizer.from_gguf(source, pre_tokenizer=pre_tokenizer)
    if use_tiktoken and _missing_bytes(tok) <= _SMOLLM2_MISSING:
        try:
            tok.enable_tiktoken()
        except (ImportError, ValueError):
            pass  # no tiktoken, or a vocabulary it cannot represent exactly: stay in pure Python
    return tok
