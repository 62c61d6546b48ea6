"""Self-instruct: ROUGE-L from scratch, prompt building and parsing, filters, and the loop."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from rouge_score import rouge_scorer, tokenize  # Google's ROUGE (a dev dependency): what Self-Instruct and Alpaca call

from llama_from_scratch.instruct import load_instructions
from llama_from_scratch.self_instruct import (BLACKLIST, encode_prompt, filter_instruction, instance_prompt,
                                              is_classification, lcs_length, load_seed_tasks, max_rouge_l,
                                              parse_instance, parse_instructions, rouge_l, rouge_tokens,
                                              self_instruct, smollm2_generator)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_rouge_l(a: str, b: str) -> float:
    """rouge_score's ROUGE-L F, called as Self-Instruct calls it (scorer.score(new, existing))."""
    return SCORER.score(a, b)["rougeL"].fmeasure


# Strings that stress the tokenizer: case, digits, ASCII punctuation, non-ASCII letters (some of
# which lowercase to ASCII, e.g. the Kelvin sign and dotted capital I), ligatures, CJK, emoji,
# combining marks, and unusual whitespace.
EDGE_STRINGS = ["", " ", "\t\n", ".", "...", "!!! ???", "-- / --", "é", "日本語", "🙂🙂", "a", "A", "a a a a",
                "the the the", "Sort the words.", "sort the words", "What is 2/3 of 75?", "What is 3/4 of 60?",
                "don't stop", "dont stop", "e-mail", "e mail", "\u212a", "K", "\u0130stanbul", "istanbul",
                "straße strasse", "ﬁne fine", "café cafe", "naïve naive", "x\u00a0y", "x\u3000y", "ABC123def",
                "abc 123 def", "αβγ abc", "a_b", "a b", "Ωmega omega", "e\u0301t\u00e9", "1,000,000", "1 000 000"]
_ALPHABET = list("abcdeABCDE0123 .,;:!?'\"-/()_\t\n") + ["é", "ß", "\u0130", "\u212a", "日", "🙂", "\u0301", "\u00a0",
                                                           "Ω", "ﬁ"]
_WORDS = ["the", "The", "cat", "CAT", "cat.", "sat", "a", "on", "mat", "write", "Write", "poem", "2/3", "42", "x-y",
          "don't", "café", "naïve", "日本", "🙂", "...", "-", "İ", "K", "Straße"]


def random_strings(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30))))
        else:
            out.append(rng.choice([" ", "  ", "\n"]).join(rng.choice(_WORDS) for _ in range(rng.randint(0, 14))))
    return out

# ----- ROUGE-L --------------------------------------------------------------------------------


def test_lcs_hand_computed():
    assert lcs_length("ABCBDAB", "BDCABA") == 4          # the textbook example (BCBA)
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "") == 0
    assert lcs_length("abc", "abc") == 3 and lcs_length("abc", "def") == 0
    assert lcs_length([1, 2, 3, 4], [4, 3, 2, 1]) == 1


@pytest.mark.parametrize("a, b, expected", [
    ("the cat sat on the mat", "the cat lay on the mat", 2 * 5 / 12),    # LCS "the cat on the mat"
    ("a b c", "c b a", 2 * 1 / 6),
    ("Write a poem", "write A   POEM", 1.0),                            # lowercased, whitespace split
    ("one two three four", "two four", 2 * 2 / 6),
    ("x", "y", 0.0),
    ("", "anything", 0.0),
    ("", "", 0.0),
])
def test_rouge_l_hand_computed(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected, abs=1e-15)
    assert rouge_l(b, a) == pytest.approx(expected, abs=1e-15)


def test_rouge_tokens_are_rouge_score_tokens():
    rng = random.Random(0)
    for text in EDGE_STRINGS + random_strings(rng, 2000):
        assert rouge_tokens(text) == tokenize.tokenize(text, None), repr(text)
    assert rouge_tokens("Sort the words.") == ["sort", "the", "words"]
    assert rouge_tokens("What is 2/3?") == ["what", "is", "2", "3"]
    assert rouge_tokens("\u212aelvin café") == ["kelvin", "caf"]   # the Kelvin sign lowercases to ASCII k
    assert rouge_tokens("...!?") == [] and rouge_tokens("日本語") == []


def test_rouge_l_equals_rouge_score_bit_for_bit():
    """The same float, not just close: the 0.7 threshold sits where rounding decides (see below)."""
    rng = random.Random(0)
    texts = EDGE_STRINGS + random_strings(rng, 400)
    n_pairs = n_nonzero = 0
    for a in texts:
        for b in rng.sample(texts, 25) + EDGE_STRINGS[:5]:
            ours, ref = rouge_l(a, b), reference_rouge_l(a, b)
            assert ours == ref, (a, b, ours, ref)
            assert rouge_l(b, a) == ours
            n_pairs += 1
            n_nonzero += ref > 0
    assert n_pairs > 10000 and n_nonzero > 3000   # the comparison is not all zeros
    # every pair of edge-case strings
    for a in EDGE_STRINGS:
        for b in EDGE_STRINGS:
            assert rouge_l(a, b) == reference_rouge_l(a, b), (a, b)


def test_rouge_l_on_the_project_instructions_equals_rouge_score():
    instructions = [ex["instruction"] for ex in load_instructions("test")]
    for i, a in enumerate(instructions):
        for b in instructions[i:]:
            assert rouge_l(a, b) == reference_rouge_l(a, b), (a, b)


def test_rouge_l_rounding_at_the_threshold_is_rouge_score_s():
    # LCS 7 of 7 and 13 tokens: 2 * 7 / 20 is 0.7, but rouge_score's 2PR / (P + R) rounds to
    # 0.7000000000000001, which is > 0.7: Self-Instruct would reject it. 7 of 10 and 10 gives 0.7.
    seven = "a b c d e f g"
    thirteen = "a b c d e f g h i j k l m"
    assert reference_rouge_l(seven, thirteen) > 0.7 and rouge_l(seven, thirteen) > 0.7
    assert reference_rouge_l("a b c d e f g h i j", "a b c d e f g x y z") == 0.7
    assert rouge_l("a b c d e f g h i j", "a b c d e f g x y z") == 0.7
    assert filter_instruction("alpha beta gamma delta epsilon zeta eta", [
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"]) == "too_similar"
    assert filter_instruction("alpha beta gamma delta epsilon zeta eta theta iota kappa",
                              ["alpha beta gamma delta epsilon zeta eta x y z"]) is None   # exactly 0.7 is kept


def test_max_rouge_l_equals_brute_force():
    rng = random.Random(1)
    vocab = "write a short poem about the sea list five facts on cats Write. poem, sea!".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(60)]
    texts += random_strings(rng, 60) + EDGE_STRINGS
    for t in texts[:40] + texts[60:80] + EDGE_STRINGS:
        others = texts[40:60] + texts[80:]
        assert max_rouge_l(t, others) == max(reference_rouge_l(t, o) for o in others)
    assert max_rouge_l("anything", []) == 0.0
    with pytest.raises(TypeError):
        rouge_l("a", None)


# ----- prompts and parsing --------------------------------------------------------------------

def test_encode_prompt_exact():
    assert encode_prompt(["Name a colour.", "Add  two\nnumbers."]) == (
        "Come up with a series of new and diverse tasks:\nTask 1: Name a colour.\nTask 2: Add two numbers.\nTask 3:")
    with pytest.raises(ValueError):
        encode_prompt([])


def test_parse_instructions():
    completion = (" Write a haiku about autumn.\nTask 4: Translate the sentence into Spanish,\n"
                  "keeping the tone.\n\nTask 5:   \nTask 6: Give three uses for a brick.\n"
                  "Task 2: Restarted list item.\nTask 3: more")
    assert parse_instructions(completion, start=3) == [
        "Write a haiku about autumn.", "Translate the sentence into Spanish, keeping the tone.",
        "Give three uses for a brick."]
    # without a start number, every numbered line is an item ("7." style too)
    assert parse_instructions("1. First task here\n2) Second task here\n3: Third") == [
        "First task here", "Second task here", "Third"]
    assert parse_instructions("") == []


@pytest.mark.parametrize("instruction, reason", [
    ("Sort this", "too_short"),
    ("Sort the words.", "too_short"),                                   # 3 words: both references drop it
    ("Sort these four words.", None),                                   # 4 words: kept
    ("   Sort \n the   words   ", "too_short"),                         # whitespace does not count
    (" ".join(["word"] * 150), None),
    (" ".join(["word"] * 151), "too_long"),
    ("Draw a cat for my sister please", "blacklisted"),
    ("Describe the image in detail please", "blacklisted"),
    ("Explain the GRAPH of sales", "blacklisted"),                      # any case
    ("Explain the graphs of sales", "blacklisted"),
    ("Compose a song about summer music", "blacklisted"),               # Alpaca's addition
    ("Explain why people go to school", "blacklisted"),                 # the two-word entry
    ("Explain why people go\nto school", "blacklisted"),                # after whitespace normalisation
    ("Explain what a mapping between sets is", None),                   # whole words only: "mapping" is not "map"
    ("Explain the profile of a typical customer", None),                # nor "profile" "file"
    ("Write a program that adds two numbers", "write_a_program"),
    ("write a Program that adds two numbers", "write_a_program"),      # Self-Instruct capitalizes first
    ("Write a programme that adds two numbers", "write_a_program"),    # a prefix test, as theirs
    ("Write a Python program that adds two numbers", None),
    ("- Write a poem about rain", "starts_with_punctuation"),
    ('"Rain" is the topic of this poem', "starts_with_punctuation"),
    ("1. Write a poem about rain", None),                               # digits are not punctuation
    ("«Write» a poem about rain", "non_ascii_start"),
    ("Écrivez un poème sur la pluie", "non_ascii_start"),
    ("Name a colour of the rainbow", "duplicate"),
    ("NAME a colour   of the rainbow", "duplicate"),
    ("Name a colour of the rainbow.", "too_similar"),                  # ROUGE-L 1.0, but not the same string
    ("Name one colour of the rainbow", "too_similar"),
    ("Write a limerick about a cat", None),
])
def test_filter_instruction(instruction, reason):
    existing = ["name a colour   of the rainbow", "Add two numbers together"]
    assert filter_instruction(instruction, existing) == reason


def test_blacklist_is_alpacas():
    assert BLACKLIST == ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                         "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")


def test_filter_similarity_decision_is_rouge_score_above_threshold():
    """On instructions that pass the other rules, rejection as similar <=> max rouge_score F > 0.7."""
    rng = random.Random(2)
    pool = [ex["instruction"] for ex in load_instructions("train")][:200]
    candidates = []
    for text in rng.sample(pool, 100):
        words = text.split()
        for _ in range(3):   # perturb: drop, duplicate or replace words, change case and punctuation
            w = list(words)
            for _ in range(rng.randint(0, 4)):
                i = rng.randrange(len(w))
                op = rng.choice(["drop", "dup", "new", "case", "punct"])
                if op == "drop" and len(w) > 5:
                    del w[i]
                elif op == "dup":
                    w.insert(i, w[i])
                elif op == "new":
                    w[i] = rng.choice(["quickly", "three", "story", "number", "list"])
                elif op == "case":
                    w[i] = w[i].upper()
                else:
                    w[i] = w[i] + rng.choice([".", ",", "?", "!"])
            candidates.append("Please " + " ".join(w))
    decided = Counter()
    for c in candidates:
        reason = filter_instruction(c, pool)
        assert reason in (None, "too_similar", "duplicate", "too_long"), (c, reason)
        if reason == "too_long":
            continue
        rejected = max(reference_rouge_l(c, p) for p in pool) > 0.7
        assert (reason is not None) == rejected, (c, reason)
        decided[reason] += 1
    assert decided[None] >= 10 and decided["too_similar"] >= 10   # both outcomes are exercised


def test_filter_threshold_boundary():
    # rouge_l = 2 * 3 / (4 + 4) = 0.75: rejected at 0.7, kept at 0.8
    assert filter_instruction("write a long poem", ["write a short poem"]) == "too_similar"
    assert filter_instruction("write a long poem", ["write a short poem"], threshold=0.8) is None
    # the length rule is a parameter: min_words=3 keeps three words
    assert filter_instruction("Sort the words.", [], min_words=3) is None


def test_is_classification_heuristic_and_model():
    assert is_classification("Classify the review as positive or negative.")
    assert is_classification("Is this email spam?")
    assert not is_classification("Write a story about a dragon.")
    assert is_classification("Write a story about a dragon.", lambda p: " Yes, it is.")
    assert not is_classification("Classify the review.", lambda p: "no")
    # an unreadable answer falls back to the heuristic
    assert is_classification("Classify the review.", lambda p: "???")


def test_instance_prompts_and_parsing():
    demo = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}
    gen = instance_prompt("Double the number.", classification=False, demos=[demo])
    assert gen.endswith("Task: Add the numbers.\nInput: 2 + 3\nOutput: 5\n\nTask: Double the number.\nInput:")
    cls = instance_prompt("Is the number even?", classification=True,
                          demos=[{"instruction": "Say hi", "input": "", "output": "Hi"}])
    assert cls.endswith("Task: Say hi\nClass label: Hi\nInput: <noinput>\n\nTask: Is the number even?\nClass label:")
    assert parse_instance(" 21\nOutput: 42\n\nTask: something else", classification=False) == ("21", "42")
    assert parse_instance(" <noinput>\nOutput: Hello there.", classification=False) == ("", "Hello there.")
    assert parse_instance(" Even\nInput: 8\nTask: next", classification=True) == ("8", "Even")
    assert parse_instance(" just rambling", classification=False) is None


# ----- the loop with a fake deterministic model -----------------------------------------------

SEEDS = [
    {"instruction": "Name a colour of the rainbow.", "input": "", "output": "Red."},
    {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Classify the sentiment of the review.", "input": "Great food!", "output": "Positive"},
]


class FakeModel:
    """Canned continuations chosen by the kind of prompt; records every prompt it saw."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if prompt.startswith("Come up with a series"):
            return (" Write a limerick about a lazy cat.\n"
                    "Task 5: Name a colour of the rainbow.\n"                       # duplicate of a seed
                    "Task 6: Sort it\n"                                             # too short
                    "Task 7: Draw a map of your town.\n"                            # blacklisted
                    "Task 8: Name one colour of the rainbow.\n"                     # too similar to a seed
                    "Task 9: Decide whether the email is spam or not spam.\n"       # classification
                    "Task 10: Write a limerick about a lazy dog.\n"                 # similar to task 4, same round
                    "Task 11: Summarise the story of a famous novel in a sentence.\n"
                    "Task 12: Give me nothing at all please.")
        if "Class label:" in prompt:
            return " Spam\nInput: You won a free phone! Click now.\n\nTask: ignored"
        if "Summarise the story" in prompt:
            return " <noinput>\nOutput: A boy wizard fights a dark lord."
        if "Give me nothing" in prompt:
            return " <noinput>\nOutput:"
        return " <noinput>\nOutput: There once was a cat who was lazy,\nwhose plans were all terribly hazy."


def test_self_instruct_with_fake_model():
    model = FakeModel()
    tasks, rejected = self_instruct(model, SEEDS, num_rounds=1, num_prompt_instructions=3, seed=0)
    assert [t["instruction"] for t in tasks] == [
        "Write a limerick about a lazy cat.", "Decide whether the email is spam or not spam.",
        "Summarise the story of a famous novel in a sentence."]
    assert tasks[0] == {"instruction": "Write a limerick about a lazy cat.", "input": "",
                        "output": "There once was a cat who was lazy,\nwhose plans were all terribly hazy.",
                        "is_classification": False}
    assert tasks[1]["is_classification"] and tasks[1]["output"] == "Spam"
    assert tasks[1]["input"] == "You won a free phone! Click now."
    assert rejected == Counter({"duplicate": 1, "too_short": 1, "blacklisted": 1, "too_similar": 2,
                                "empty_output": 1})
    # the generation prompt showed the three seeds
    assert all(s["instruction"] in model.prompts[0] for s in SEEDS)


def test_self_instruct_second_round_reuses_machine_tasks_and_is_deterministic():
    a = self_instruct(FakeModel().generate, SEEDS, num_rounds=2, num_prompt_instructions=3, seed=5)
    b = self_instruct(FakeModel().generate, SEEDS, num_rounds=2, num_prompt_instructions=3, seed=5)
    assert a == b
    model = FakeModel()
    tasks, rejected = self_instruct(model, SEEDS, num_rounds=2, num_prompt_instructions=3, seed=5)
    second_prompt = [p for p in model.prompts if p.startswith("Come up with a series")][1]
    assert sum(t["instruction"] in second_prompt for t in tasks) == 2   # num_machine_instructions
    # round 2 gets the same canned list: its four accepted-or-seed instructions are now duplicates
    assert len(tasks) == 3 and rejected["duplicate"] == 1 + 4 and rejected["empty_output"] == 2


def test_self_instruct_argument_errors():
    with pytest.raises(TypeError, match="generator"):
        self_instruct(object(), SEEDS)
    with pytest.raises(ValueError, match="seed"):
        self_instruct(lambda p: "", [])
    with pytest.raises(ValueError, match="instruction"):
        self_instruct(lambda p: "", [{"output": "x"}])
    assert self_instruct(lambda p: "", SEEDS, num_rounds=0) == ([], Counter())
    with pytest.raises(ValueError, match="max_instructions_per_round"):
        self_instruct(lambda p: "", SEEDS, max_instructions_per_round=0)


def test_self_instruct_max_instructions_per_round():
    model = FakeModel()
    tasks, rejected = self_instruct(model, SEEDS, num_prompt_instructions=3, max_instructions_per_round=2, seed=0)
    assert [t["instruction"] for t in tasks] == ["Write a limerick about a lazy cat."]
    assert rejected == Counter({"duplicate": 1}) and len(model.prompts) == 2


def test_load_seed_tasks_from_the_dataset():
    seeds = load_seed_tasks(25)
    assert len(seeds) == 25 and load_seed_tasks(25) == seeds
    cats = Counter(s["category"] for s in seeds)
    assert "refusal" not in cats and len(cats) == 9 and max(cats.values()) - min(cats.values()) <= 1
    assert len({s["instruction"] + s["input"] for s in seeds}) == 25


@pytest.mark.smollm2
def test_self_instruct_one_round_with_smollm2():
    from llama_from_scratch.loading import load_smollm2
    model, tokenizer = load_smollm2()
    t0 = time.perf_counter()
    fn = smollm2_generator(model, tokenizer, max_new_tokens=12, temperature=0.7, seed=0)
    tasks, rejected = self_instruct(fn, load_seed_tasks(25), num_rounds=1, num_prompt_instructions=3,
                                    max_instructions_per_round=1, seed=0)
    elapsed = time.perf_counter() - t0
    assert isinstance(rejected, Counter) and isinstance(tasks, list)
    for t in tasks:
        assert set(t) == {"instruction", "input", "output", "is_classification"} and t["output"].strip()
        assert filter_instruction(t["instruction"], []) is None
    # Two model calls of 12 tokens: ~10 s on an idle 2-core CPU. Not asserted (shared CI machines).
    print(f"one self-instruct round with SmolLM2: {elapsed:.1f} s, {len(tasks)} accepted, rejected {dict(rejected)}")


def test_parse_instructions_stops_items_at_blank_lines_and_drops_a_dangling_task_label():
    completion = ("Write a poem about cats.\nTask 3: Name a famous Star Wars film? Task\n\n"
                  "I think there is a very good way to make a website\nTask 4: Explain why\nthe sky is blue.")
    assert parse_instructions(completion, start=2) == [
        "Write a poem about cats.", "Name a famous Star Wars film?", "Explain why the sky is blue."]
