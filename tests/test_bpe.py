"""BPETokenizer: training, encoding, decoding, files, and identity with tiktoken's cl100k_base."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llama_from_scratch.bpe import GPT4_SPLIT_PATTERN, BPETokenizer, get_stats, merge_pair
from llama_from_scratch.tokenizers import get_tiktoken_encoding

VARIED_TEXTS = [
    "",
    "a",
    " ",
    "\n",
    "Hello, world! It's a beautiful day, isn't it? WE'LL SEE, they'd say.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🎉🚀 👍🏽 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "lots    of   spaces\t\ttabs\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 1,000,000 -42 0x1F 1e-9",
    "Ünïcödé àccents, ñ, ß, Ωμέγα, Привет мир, مرحبا",
    "mixed<|endoftext|>special <|fim_prefix|>tokens<|fim_suffix|> here",
    "    \n\n    \n",
    "'s 'S 'll 'LL 're 've 'd 'm 't",
]


@pytest.fixture(scope="module")
def cl100k():
    return get_tiktoken_encoding("cl100k_base")


@pytest.fixture(scope="module")
def ours(cl100k) -> BPETokenizer:
    return BPETokenizer.from_tiktoken(cl100k)


@pytest.fixture(scope="module")
def small_text() -> str:
    rng = random.Random(0)
    syllables = ["to", "ken", "ize", "the", "cat", "sat", "on", "mat", "dog", "ran", "über", "naï", "ve",
                 "日本", "語", "pre", "fix", "ing", "ed", "s"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randrange(1, 4))) for _ in range(300)]
    words += ["42", "1999", "!", ",", ".", "\n"]
    return " ".join(rng.choice(words) for _ in range(3000))


@pytest.fixture(scope="module")
def trained(small_text) -> BPETokenizer:
    return BPETokenizer.train(small_text, vocab_size=256 + 60, special_tokens=["<|endoftext|>", "<|pad|>"])


# --- identity with tiktoken cl100k_base -----------------------------------------------------------


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_from_tiktoken_encodes_like_cl100k(ours, cl100k, text):
    assert ours.encode(text, allowed_special="all") == cl100k.encode(text, allowed_special="all")
    assert ours.encode(text, allowed_special="none") == cl100k.encode_ordinary(text)


def test_from_tiktoken_on_a_longer_mixed_text(ours, cl100k):
    rng = random.Random(1)
    pieces = [t for t in VARIED_TEXTS if "<|" not in t]
    text = "".join(rng.choice(pieces) + rng.choice(["", " ", "\n", "  "]) for _ in range(200))
    assert ours.encode(text) == cl100k.encode(text)


def test_from_tiktoken_on_random_unicode(ours, cl100k):
    rng = random.Random(2)
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x3040, 0x30FF), 0x1F600, 0x1F44D]]
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        assert ours.encode(text, allowed_special="none") == cl100k.encode_ordinary(text), repr(text)


def test_from_tiktoken_keeps_ids_specials_and_pattern(ours, cl100k):
    assert ours.vocab_size == cl100k.n_vocab == 100277
    assert ours.special_tokens == cl100k._special_tokens
    assert ours.eos_token_id == cl100k.eot_token == 100257
    assert ours.pattern == cl100k._pat_str == GPT4_SPLIT_PATTERN
    assert len(ours.merges) == len(cl100k._mergeable_ranks) - 256
    assert all(cl100k.decode_single_token_bytes(i) == b for i, b in ours.vocab.items())


def test_to_tiktoken_round_trip_of_cl100k_gives_the_same_ranks(ours, cl100k):
    back = ours.to_tiktoken("cl100k_again")
    assert back._mergeable_ranks == cl100k._mergeable_ranks
    assert back._special_tokens == cl100k._special_tokens


def test_allowed_special_set_semantics(ours, cl100k):
    text = "a<|endoftext|>b<|fim_prefix|>c"
    assert ours.encode(text, allowed_special={"<|endoftext|>", "<|fim_prefix|>"}) == cl100k.encode(
        text, allowed_special={"<|endoftext|>", "<|fim_prefix|>"})
    with pytest.raises(ValueError, match="fim_prefix"):
        ours.encode(text, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError):
        cl100k.encode(text, allowed_special={"<|endoftext|>"})


def test_disallowed_special_raises_by_default(ours):
    with pytest.raises(ValueError, match="disallowed special token '<\\|endoftext\\|>'"):
        ours.encode("hello <|endoftext|>")
    with pytest.raises(ValueError, match="allowed_special"):
        ours.encode("hello", allowed_special="some")


def test_special_strings_are_plain_text_with_none(ours):
    ids = ours.encode("<|endoftext|>", allowed_special="none")
    assert len(ids) > 1 and ours.eos_token_id not in ids
    assert ours.encode("<|endoftext|>", allowed_special="all") == [ours.eos_token_id]


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_decode_round_trip(ours, text):
    ids = ours.encode(text, allowed_special="all")
    assert ours.decode(ids) == text
    assert ours.decode_bytes(ids) == text.encode("utf-8")


def test_decode_replaces_invalid_utf8_like_tiktoken(ours, cl100k):
    ids = ours.encode("🎉")
    assert len(ids) > 1, "the emoji should span several byte tokens"
    partial = ids[:1]
    assert "\ufffd" in ours.decode(partial)
    assert ours.decode(partial) == cl100k.decode(partial)


def test_decode_accepts_numpy_and_torch_ints(ours):
    ids = ours.encode("hello world")
    assert ours.decode(np.array(ids)) == ours.decode(torch.tensor(ids)) == "hello world"


@pytest.mark.parametrize("bad_id", [100256, 100277, 10**9, -1])
def test_decode_unknown_id_raises_naming_it(ours, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} "):
        ours.decode([15339, bad_id])


# --- training -------------------------------------------------------------------------------------


def test_train_known_small_example():
    # "aaabdaaabac": (a,a) occurs 4 times -> 256. Then (256,a) and (a,b) both occur twice; the
    # smaller pair (97, 98) wins the tie -> 257. Then (256, 257) = "aaab" occurs twice -> 258.
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=259)
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tok.vocab[258] == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.eos_token_id is None


def test_ties_go_to_the_smallest_pair_not_the_first_seen():
    # All three pairs occur once; (a, b) is the smallest although it appears last.
    assert BPETokenizer.train("cdab", 257).merges == {(97, 98): 256}
    assert BPETokenizer.train("abcd", 257).merges == {(97, 98): 256}


def _naive_train(text: str, n_merges: int) -> dict[tuple[int, int], int]:
    """The textbook algorithm: recount every pair of every chunk after every merge."""
    import regex

    chunks = [list(c.encode("utf-8")) for c in regex.findall(GPT4_SPLIT_PATTERN, text)]
    merges = {}
    for step in range(n_merges):
        counts: dict = {}
        for chunk in chunks:
            get_stats(chunk, counts)
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges[best] = 256 + step
        chunks = [merge_pair(c, best, 256 + step) for c in chunks]
    return merges


def test_incremental_training_equals_naive_recount(small_text):
    text = small_text[:6000] + " aaaa aaaaaaa  \n\n 🎉🎉🎉 1234567"
    assert BPETokenizer.train(text, 256 + 80).merges == _naive_train(text, 80)


def test_train_is_deterministic(small_text):
    a = BPETokenizer.train(small_text, 256 + 50)
    b = BPETokenizer.train(small_text, 256 + 50)
    assert a.merges == b.merges and len(a.merges) == 50


def test_train_special_tokens_and_vocab_size(trained, small_text):
    assert trained.vocab_size == len(trained) == 256 + 60
    assert trained.special_tokens == {"<|endoftext|>": 314, "<|pad|>": 315}
    assert trained.eos_token_id == 314
    # special tokens are cut out of the training text: no merge learns their pieces
    tok = BPETokenizer.train("<|endoftext|>" * 50 + "ab ab", 256 + 5, special_tokens=["<|endoftext|>"])
    assert all(b"<" not in tok.vocab[i] and b"|" not in tok.vocab[i] for i in tok.merges.values())
    # the chunks are "ab" and " ab": (a, b) twice, then (" ", ab) once; nothing else to merge
    assert tok.merges == {(97, 98): 256, (32, 256): 257}
    assert tok.special_tokens == {"<|endoftext|>": 258}


def test_train_stops_when_pairs_run_out():
    tok = BPETokenizer.train("abc", 1000)
    assert len(tok.merges) == 2


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", 256, special_tokens=["<|endoftext|>"])
    with pytest.raises(TypeError):
        BPETokenizer.train("abc", 300, special_tokens="<|endoftext|>")


def test_trained_round_trip_and_tiktoken_equivalence(trained, small_text):
    fast = trained.to_tiktoken("trained_small")
    texts = [small_text[:2000], "unseen words: zebra quokka 🎉 12345", "über naïve<|endoftext|>tokens"] + VARIED_TEXTS
    for text in texts:
        ids = trained.encode(text, allowed_special="all")
        assert fast.encode(text, allowed_special="all") == ids, repr(text[:40])
        assert trained.decode(ids) == text
    assert len(trained.encode(small_text)) < len(small_text.encode("utf-8")) / 2, "merges should compress"


# --- files ----------------------------------------------------------------------------------------


def _assert_same(a: BPETokenizer, b: BPETokenizer) -> None:
    assert a.pattern == b.pattern
    assert list(a.merges.items()) == list(b.merges.items())
    assert a.special_tokens == b.special_tokens
    assert a.byte_ids == b.byte_ids
    assert a.vocab == b.vocab


def test_save_load_round_trip_trained(trained, tmp_path):
    path = tmp_path / "small.bpe"
    trained.save(path)
    loaded = BPETokenizer.load(path)
    _assert_same(trained, loaded)
    loaded.save(tmp_path / "again.bpe")
    assert (tmp_path / "again.bpe").read_bytes() == path.read_bytes()
    text = path.read_text(encoding="utf-8")
    assert '"<|endoftext|>" 314' in text and "# " in text  # human-readable


def test_save_load_round_trip_cl100k(ours, tmp_path):
    path = tmp_path / "cl100k.bpe"
    ours.save(path)
    loaded = BPETokenizer.load(path)
    _assert_same(ours, loaded)
    assert loaded.encode("Round trip of the real thing 🎉") == ours.encode("Round trip of the real thing 🎉")


def _edit_last_merge(text: str, right: str) -> str:
    """Replace the right id of the last merge line (the file ends with a newline)."""
    *head, last, end = text.split("\n")
    left, _, rest = last.split(" ", 2)
    return "\n".join([*head, f"{left} {right} {rest}", end])


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: "not a tokenizer\n" + s, "line 1: expected the header"),
    (lambda s: s.replace("pattern ", "patern ", 1), "line 2: expected 'pattern"),
    (lambda s: s.replace("bytes identity", "bytes some"), "line 3"),
    (lambda s: s.replace("special_tokens 2", "special_tokens two"), "special_tokens <count>"),
    (lambda s: s.rsplit("\n", 3)[0] + "\n", "file ends early"),
    (lambda s: s + "extra line\n", "expected the end of the file"),
    (lambda s: _edit_last_merge(s, "x"), "left> <right> <new>"),
    (lambda s: _edit_last_merge(s, "9999"), "not defined by an earlier merge"),
])
def test_corrupt_file_gives_a_clear_error(trained, tmp_path, corrupt, message):
    path = tmp_path / "tok.bpe"
    trained.save(path)
    path.write_text(corrupt(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        BPETokenizer.load(path)
    assert str(path) in str(info.value)


def test_binary_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "garbage.bpe"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a BPETokenizer file|expected the header"):
        BPETokenizer.load(path)


# --- primitives -----------------------------------------------------------------------------------


def test_get_stats_and_merge_pair():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_stats([7, 7], {(7, 7): 1}, weight=3) == {(7, 7): 4}
    assert merge_pair([5, 6, 5, 6, 7], (5, 6), 99) == [99, 99, 7]
    assert merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    assert merge_pair([], (1, 1), 9) == []
