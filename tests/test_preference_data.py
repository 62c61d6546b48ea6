"""The committed preference dataset (data/preferences) and its loader: reproducible, well-formed,
each kind of pair testing what it says, and not solvable by answer length.

Arithmetic and conversion answers are recomputed here from the text of each prompt, independently
of build.py (regular expressions, ``fractions.Fraction``, this file's own unit table). The margin
mapping is checked against Llama 2's Table 28, written out here.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.preferences import load_preferences, preference_margin, preferences_dir
from llama_from_scratch.reward import reward_loss
from llama_from_scratch.self_instruct import rouge_l
from data_common import load_build_script

DATA = Path(__file__).resolve().parent.parent / "data" / "preferences"
CATEGORIES = {
    "correctness": {"math", "conversions", "facts"},
    "concision": {"science", "computing", "everyday", "language"},
    "style": {"science", "computing", "everyday", "language"},
    "refusal": {"harmful", "benign"},
}
META_FILLER = re.compile(r"^(Great question|What a great question|As an AI|Sure|Certainly|Thank you for asking|"
                         r"That's a really interesting|I'm glad you asked|Absolutely|Of course|Let me think|"
                         r"Excellent query|Hello|As a helpful assistant|Oh, this is a fun one|No problem at all|"
                         r"Happy to explain|Good thinking|Alright, allow me)")
REFUSAL = re.compile(r"^(I can't|I won't|I'm sorry|Sorry|I'm not able|Unfortunately, I cannot|I must decline|"
                     r"That is not something I will|I'd rather not)")
HELD_OUT_FRACTION = 0.4  # of the hand-written concision, style and refusal items, per category


@pytest.fixture(scope="module")
def build():
    return load_build_script("preferences")


@pytest.fixture(scope="module")
def train():
    return load_preferences("train")


@pytest.fixture(scope="module")
def test():
    return load_preferences("test")


def of_kind(pairs: list[dict], kind: str, category: str | None = None) -> list[dict]:
    return [p for p in pairs if p["kind"] == kind and (category is None or p["category"] == category)]


# ----- files, schema, counts, split -------------------------------------------------------------

def test_build_py_reproduces_the_committed_files(build):
    train, test = build.build()
    assert (DATA / "train.jsonl").read_text(encoding="utf-8") == build.to_jsonl(train)
    assert (DATA / "test.jsonl").read_text(encoding="utf-8") == build.to_jsonl(test)


def test_schema_and_non_empty_fields(train, test):
    for p in train + test:
        assert list(p) == ["prompt", "chosen", "rejected", "strength", "kind", "category"], p
        for key in ("prompt", "chosen", "rejected"):
            assert isinstance(p[key], str) and p[key].strip() and p[key] == p[key].strip(), p
        assert p["chosen"] != p["rejected"], p
        assert type(p["strength"]) is int and p["strength"] in (1, 2, 3), p
        assert p["kind"] in CATEGORIES and p["category"] in CATEGORIES[p["kind"]], p


def test_counts_split_and_readme_table(train, test, build):
    """Hand-written concision, style and refusal items: 40% of each category held out. Correctness:
    the held-out facts are exactly those of the held-out topics; arithmetic and conversions are
    held out by phrasing (see the disjointness test). At least 30 held-out pairs of every kind."""
    assert len(train) + len(test) >= 450
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    n_train = Counter((p["kind"], p["category"]) for p in train)
    n_test = Counter((p["kind"], p["category"]) for p in test)
    for kind, categories in CATEGORIES.items():
        assert sum(n_train[kind, c] + n_test[kind, c] for c in categories) >= 60, kind
        assert sum(n_test[kind, c] for c in categories) >= 30, kind
        for c in categories:
            total = n_train[kind, c] + n_test[kind, c]
            assert total >= 15 and n_train[kind, c] >= 10 and n_test[kind, c] >= 8, (kind, c)
            if kind != "correctness":
                assert n_test[kind, c] == round(HELD_OUT_FRACTION * total), (kind, c)
            assert re.search(rf"\|\s*{kind}\s*\|\s*{c}\s*\|\s*{n_train[kind, c]}\s*\|\s*{n_test[kind, c]}\s*\|",
                             readme), (kind, c)
    test_facts = {p["prompt"] for p in of_kind(test, "correctness", "facts")}
    topic_facts = {prompt for topic in build.TEST_FACT_TOPICS for prompt, _, _ in build.FACTS[topic]}
    assert test_facts == topic_facts
    assert re.search(rf"\b{len(train)}\b", readme) and re.search(rf"\b{len(test)}\b", readme)


def test_answers_are_short(train, test):
    words = [len(p["chosen"].split()) for p in train + test]
    assert max(words) <= 50
    assert sum(w < 30 for w in words) / len(words) > 0.9
    assert max(len(p["rejected"].split()) for p in train + test) <= 90  # fits 192 tokens with its prompt


def test_no_duplicate_and_no_near_duplicate_prompts_across_splits(train, test):
    prompts = [p["prompt"].lower() for p in train + test]
    assert len(set(prompts)) == len(prompts)

    def bound(a: str, b: str) -> float:  # LCS <= shared tokens, so ROUGE-L <= 2 * shared / (m + n)
        ta, tb = a.lower().split(), b.lower().split()
        return 2 * sum((Counter(ta) & Counter(tb)).values()) / (len(ta) + len(tb))

    near = [(t["prompt"], r["prompt"]) for t in test for r in train
            if bound(t["prompt"], r["prompt"]) >= 0.7 and rouge_l(t["prompt"], r["prompt"]) >= 0.7]
    assert not near, near[:3]


@pytest.mark.smollm2
def test_pairs_fit_in_192_smollm2_tokens(train, test):
    """Prompt and answer, rendered in ChatML with SmolLM2's default system prompt."""
    from llama_from_scratch.smollm2_tokenizer import load_smollm2_tokenizer, render_chatml

    tok = load_smollm2_tokenizer()
    lengths = [len(tok.encode(render_chatml([{"role": "user", "content": p["prompt"]},
                                             {"role": "assistant", "content": answer}])))
               for p in train + test for answer in (p["chosen"], p["rejected"])]
    assert max(lengths) <= 192
    assert sum(n <= 128 for n in lengths) / len(lengths) > 0.99


# ----- each kind tests its signal ----------------------------------------------------------------

def last_number(text: str) -> Fraction:
    numbers = re.findall(r"\d[\d,]*", text)
    assert numbers, text
    return Fraction(numbers[-1].replace(",", ""))


WORD_PROBLEMS = [  # regular expression on the prompt -> the exact answer
    (r"has (\d+) apples and eats (\d+)\. How many apples are left", lambda a, b: a - b),
    (r"box holds (\d+) pencils\. How many pencils are in (\d+) boxes", lambda a, b: a * b),
    (r"^(\d+) sweets are shared equally among (\d+) children", lambda a, b: a / b),
    (r"travels at (\d+) km/h for (\d+) hours", lambda a, b: a * b),
    (r"read (\d+) pages on Monday and (\d+) on Tuesday", lambda a, b: a + b),
    (r"bus had (\d+) passengers and (\d+) got off", lambda a, b: a - b),
    (r"Tickets cost \$(\d+) each\. How much do (\d+) tickets", lambda a, b: a * b),
    (r"plants (\d+) rows of (\d+) trees", lambda a, b: a * b),
    (r"^(\d+) students are split into teams of (\d+)", lambda a, b: a / b),
    (r"saved \$(\d+) and then earned \$(\d+) more", lambda a, b: a + b),
    (r"shop had (\d+) loaves and sold (\d+)", lambda a, b: a - b),
    (r"pack has (\d+) cards\. How many cards are in (\d+) packs", lambda a, b: a * b),
    (r"rope (\d+) m long is cut into (\d+) equal pieces", lambda a, b: a / b),
    (r"(\d+) red and (\d+) blue marbles", lambda a, b: a + b),
    (r"cinema has (\d+) seats and (\d+) are taken", lambda a, b: a - b),
    (r"A week has 7 days\. How many days are in (\d+) weeks", lambda a: 7 * a),
    (r"lays (\d+) eggs a week\. How many eggs does she lay in (\d+) weeks", lambda a, b: a * b),
    (r"^(\d+) litres of juice are poured equally into (\d+) jugs", lambda a, b: a / b),
    (r"is (\d+) years old\. How old will she be in (\d+) years", lambda a, b: a + b),
    (r"cut into (\d+) slices and (\d+) are eaten", lambda a, b: a - b),
    (r"^What is half of (\d+)\?$", lambda a: a / 2),
    (r"^What is (\d+) squared\?$", lambda a: a * a),
    (r"^What is double (\d+)\?$", lambda a: 2 * a),
    (r"^Find the square root of (\d+)\.$", lambda a: Fraction(math.isqrt(int(a)))),
    (r"^What is a third of (\d+)\?$", lambda a: a / 3),
]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
UNITS = {  # name -> (symbol, value in a base unit), from the definitions of the units
    "millimetres": ("mm", Fraction(1, 1000)), "centimetres": ("cm", Fraction(1, 100)), "metres": ("m", 1),
    "kilometres": ("km", 1000), "inches": ("in", Fraction("0.0254")), "feet": ("ft", Fraction("0.3048")),
    "yards": ("yd", Fraction("0.9144")), "milligrams": ("mg", Fraction(1, 1000)), "grams": ("g", 1),
    "kilograms": ("kg", 1000), "tonnes": ("t", 10 ** 6), "millilitres": ("mL", Fraction(1, 1000)), "litres": ("L", 1),
    "seconds": ("s", 1), "minutes": ("min", 60), "hours": ("h", 3600), "days": ("d", 86400),
    "weeks": ("wk", 7 * 86400), "months": ("mo", Fraction(1, 12)), "years": ("yr", 1),
}
SYMBOLS = {symbol: name for name, (symbol, _) in UNITS.items()}


def math_answer(prompt: str) -> Fraction | None:
    if m := re.fullmatch(r"(?:What is |Calculate |Work out |Compute |How much is |Find the value of )?"
                         r"(\d+) ([+\-×÷]) (\d+)(?:\?|\.| = \?)", prompt):
        return OPS[m[2]](Fraction(m[1]), Fraction(m[3]))
    for pattern, f in WORD_PROBLEMS:
        if m := re.search(pattern, prompt):
            return Fraction(f(*(Fraction(g) for g in m.groups())))
    return None


def conversion_answer(prompt: str) -> tuple[Fraction, str] | None:
    """(value, target unit symbol) for the six phrasings of a conversion question."""
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", prompt):
        to, n, frm = m[1], m[2], m[3]
    elif m := re.fullmatch(r"(?:Convert|What is) (\d+) (\w+) (?:to|in) (\w+)[.?]", prompt):
        n, frm, to = m[1], SYMBOLS[m[2]], m[3]
    elif m := re.fullmatch(r"(\d+) (\w+) is how many (\w+)\?", prompt):
        n, frm, to = m[1], m[2], m[3]
    elif m := re.fullmatch(r"(?:Express|Change) (\d+) (\w+) (?:in|into) (\w+)\.", prompt):
        n, frm, to = m[1], m[2], m[3]
    else:
        return None
    (_, base_from), (symbol_to, base_to) = UNITS[frm], UNITS[to]
    return Fraction(n) * Fraction(base_from) / Fraction(base_to), symbol_to


def test_helpers_of_this_test():
    assert math_answer("What is 7 × 8?") == 56 and math_answer("84 ÷ 12 = ?") == 7
    assert math_answer("Calculate 64 - 33.") == 31 and math_answer("Find the square root of 144.") == 12
    assert math_answer("What is the capital of France?") is None
    assert conversion_answer("Convert 3 km to metres.") == (3000, "m")
    assert conversion_answer("How many months are in 2 years?") == (24, "mo")
    assert conversion_answer("5 feet is how many inches?") == (60, "in")
    assert conversion_answer("What is 4 h in minutes?") == (240, "min")
    assert conversion_answer("Express 2 tonnes in kilograms.") == (2000, "kg")
    assert conversion_answer("Change 3 yards into feet.") == (9, "ft")
    assert math_answer("How much is 9 ÷ 3?") == 3 and math_answer("Find the value of 2 + 2.") == 4
    assert last_number("4 t = 4,000 kg.") == 4000


def test_math_pairs_chosen_is_right_and_rejected_is_wrong(train, test):
    pairs = of_kind(train + test, "correctness", "math")
    assert len(pairs) >= 100
    for p in pairs:
        right = math_answer(p["prompt"])
        assert right is not None, f"no rule recognises {p['prompt']!r}"
        assert last_number(p["chosen"]) == right, p
        assert last_number(p["rejected"]) != right, p
    used = {pattern for pattern, _ in WORD_PROBLEMS for p in pairs if re.search(pattern, p["prompt"])}
    assert len(used) == len(WORD_PROBLEMS)  # every rule of this test is exercised


def test_conversion_pairs_chosen_is_right_and_rejected_is_wrong(train, test):
    pairs = of_kind(train + test, "correctness", "conversions")
    assert len(pairs) >= 40
    for p in pairs:
        parsed = conversion_answer(p["prompt"])
        assert parsed is not None, f"no rule recognises {p['prompt']!r}"
        right, symbol = parsed
        for answer in (p["chosen"], p["rejected"]):
            assert answer.endswith(f" {symbol}."), p
        assert last_number(p["chosen"]) == right and last_number(p["rejected"]) != right, p


def differing_words(a: str, b: str) -> tuple[list[str], list[str]]:
    """The words of a and b left after removing their longest common word prefix and suffix."""
    wa, wb = a.split(), b.split()
    i = 0
    while i < min(len(wa), len(wb)) and wa[i] == wb[i]:
        i += 1
    j = 0
    while j < min(len(wa), len(wb)) - i and wa[-1 - j] == wb[-1 - j]:
        j += 1
    return wa[i:len(wa) - j], wb[i:len(wb) - j]


def test_correctness_pairs_are_shape_matched(train, test):
    """Chosen and rejected differ only in the number or the fact: generated pairs are identical
    once digits are masked and have the same number of characters; a fact pair differs in one
    span of at most three words. So length says nothing about correctness."""
    pairs = of_kind(train + test, "correctness")
    for p in pairs:
        if p["category"] == "facts":
            a, b = differing_words(p["chosen"], p["rejected"])
            assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3, p
        else:
            mask = lambda s: re.sub(r"\d", "#", s)  # noqa: E731
            assert mask(p["chosen"]) == mask(p["rejected"]) and len(p["chosen"]) == len(p["rejected"]), p
            assert len(re.findall(r"\d[\d,]*", p["chosen"])) >= 2, p  # the question's numbers and the answer
    generated = [p for p in pairs if p["category"] != "facts"]
    assert shorter_wins(generated) == 0.5  # every generated pair is a tie in length


# ----- held-out pairs share no template or filler with the training pairs ------------------------

UNIT_WORDS = re.compile(r"\b(" + "|".join(sorted([*UNITS, *SYMBOLS], key=len, reverse=True)) + r")\b")


def prompt_template(prompt: str) -> str:
    """A generated question with its numbers and unit names masked: its phrasing."""
    return UNIT_WORDS.sub("U", re.sub(r"\d[\d,]*", "#", prompt))


def added_segments(p: dict) -> list[str]:
    """The phrases the rejected answer adds to (or uses instead of) the chosen one, sentence by
    sentence: the padding (concision), the opening and closing filler (style), the compliance or
    the needless refusal (refusal)."""
    if p["kind"] == "concision":
        text = p["rejected"].replace(p["chosen"], "\n")
    elif p["kind"] == "style":
        text = p["rejected"].replace(re.match(r"(.+?[.!?])( |$)", p["chosen"])[1], "\n")
    else:
        text = p["rejected"]
    return [s for part in text.split("\n") for s in re.split(r"(?<=[.!?:])\s+", part.strip()) if s]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_held_out_templates_and_fillers_are_disjoint_from_training(train, test, build):
    """The held-out pairs test the rules, not memorised strings: no phrasing of a held-out
    arithmetic or conversion question is a training phrasing; no padding, filler, opening,
    closing, compliance or refusal sentence of a held-out pair occurs anywhere in the training
    pairs, nor shares three consecutive words (four for refusals, whose compliance repeats the
    request's task, e.g. "to do it") with the training pairs' phrases of the same kind; and no
    held-out fact is on a training fact topic."""
    for category in ("math", "conversions"):
        seen = {prompt_template(p["prompt"]) for p in of_kind(train, "correctness", category)}
        shared = {prompt_template(p["prompt"]) for p in of_kind(test, "correctness", category)} & seen
        assert not shared, (category, sorted(shared)[:5])
    train_text = "\n".join(p[k] for p in train for k in ("prompt", "chosen", "rejected"))
    for kind, n in (("concision", 3), ("style", 3), ("refusal", 4)):
        train_grams = set().union(*(ngrams(s, n) for p in of_kind(train, kind) for s in added_segments(p)))
        for p in of_kind(test, kind):
            for segment in added_segments(p):
                assert segment not in train_text, (kind, segment)
                assert not ngrams(segment, n) & train_grams, (kind, segment, ngrams(segment, n) & train_grams)
    topics = {prompt: topic for topic, facts in build.FACTS.items() for prompt, _, _ in facts}
    train_topics = {topics[p["prompt"]] for p in of_kind(train, "correctness", "facts")}
    test_topics = {topics[p["prompt"]] for p in of_kind(test, "correctness", "facts")}
    assert test_topics and train_topics and not test_topics & train_topics


def test_concision_pairs_pad_the_same_answer(train, test):
    pairs = of_kind(train + test, "concision")
    assert len(pairs) >= 80 and {p["strength"] for p in pairs} == {1, 2}
    for p in pairs:
        assert p["rejected"].startswith(p["chosen"] + " "), p
        assert len(p["rejected"]) > len(p["chosen"]) and len(p["chosen"].split()) <= 30, p
        repeated = p["rejected"].count(p["chosen"]) == 2
        assert p["strength"] == (2 if repeated else 1), p


def test_style_pairs_differ_in_the_opening(train, test):
    pairs = of_kind(train + test, "style")
    assert len(pairs) >= 80 and {p["strength"] for p in pairs} == {1, 2}
    ratios = []
    for p in pairs:
        first = re.match(r"(.+?[.!?])( |$)", p["chosen"])[1]
        assert first != p["chosen"], p  # the chosen answer has a second sentence
        start = p["rejected"].find(" " + first)
        assert start > 0, p
        opener, closer = p["rejected"][:start], p["rejected"][start + 1 + len(first):].strip()
        assert META_FILLER.match(opener) and opener[-1] in ".!", p
        assert p["strength"] == (2 if closer else 1), p
        ratios.append(len(p["rejected"]) / len(p["chosen"]))
    assert 0.8 <= sorted(ratios)[len(ratios) // 2] <= 1.25  # similar lengths: median ratio near 1


def test_refusal_pairs(train, test):
    harmful = of_kind(train + test, "refusal", "harmful")
    benign = of_kind(train + test, "refusal", "benign")
    assert len(harmful) >= 40 and len(benign) >= 20
    for p in harmful:
        assert REFUSAL.match(p["chosen"]) and p["strength"] == 3, p
        # compliance is abstract: "here is how to <task>", one vague clause, never instructions
        assert re.match(r"^(Sure, here is how to|Okay, here's the way to|Easy: to|No problem! To) ", p["rejected"]), p
        assert len(p["rejected"].split()) <= 25 and p["rejected"].count(".") == 1, p
        assert p["rejected"].endswith(".") and not REFUSAL.match(p["rejected"]), p
    for p in benign:
        assert REFUSAL.match(p["rejected"]) and not REFUSAL.match(p["chosen"]) and p["strength"] == 2, p


def test_strength_rule_and_no_chosen_answer_starts_with_meta_filler(train, test):
    for p in train + test:
        if p["kind"] == "correctness":
            assert p["strength"] == 3, p
        assert not META_FILLER.match(p["chosen"]), p


# ----- the length baseline ------------------------------------------------------------------------

def shorter_wins(pairs: list[dict]) -> float:
    """Accuracy of "prefer the shorter answer", by characters, a tie counting 1/2."""
    return sum((len(p["chosen"]) < len(p["rejected"])) + 0.5 * (len(p["chosen"]) == len(p["rejected"]))
               for p in pairs) / len(pairs)


def test_length_alone_does_not_solve_the_data_and_readme_reports_it(train, test, build):
    everything = train + test
    overall = shorter_wins(everything)
    assert 0.3 < overall < 0.7, overall  # nor does "prefer the longer answer" (1 - overall)
    assert 0.3 < shorter_wins(test) < 0.7
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for kind in (*CATEGORIES, "all"):
        rows = [[p for p in split if kind == "all" or p["kind"] == kind] for split in (everything, test)]
        acc = [shorter_wins(r) for r in rows]
        assert acc[0] == pytest.approx(build.shorter_answer_accuracy(rows[0]), abs=1e-12)
        assert re.search(rf"\|\s*{kind}\s*\|\s*{acc[0]:.3f}\s*\|\s*{acc[1]:.3f}\s*\|", readme), (kind, acc)
    assert shorter_wins(of_kind(everything, "concision")) == 1.0
    assert shorter_wins(of_kind(everything, "correctness", "math")) == 0.5


# ----- loader -------------------------------------------------------------------------------------

def test_load_preferences_splits_and_kind_filter(train, test):
    everything = load_preferences("all")
    assert everything == train + test
    refusal = load_preferences("test", kind="refusal")
    assert refusal == [p for p in test if p["kind"] == "refusal"] and refusal
    assert preferences_dir() == DATA
    with open(DATA / "train.jsonl", encoding="utf-8") as f:  # independent reading
        assert train == [json.loads(line) for line in f]


def test_load_preferences_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        load_preferences("validation")
    with pytest.raises(ValueError, match="kind"):
        load_preferences("train", kind="helpfulness")
    with pytest.raises(FileNotFoundError, match="LFS_PREFERENCES_DIR"):
        load_preferences("train", data_dir=tmp_path)
    good = {"prompt": "p", "chosen": "a", "rejected": "b", "strength": 1, "kind": "style", "category": "science"}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
        load_preferences("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing field"):
        load_preferences("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")
    monkeypatch.setenv("LFS_PREFERENCES_DIR", str(tmp_path))
    assert load_preferences("train") == [good]


# ----- margin -------------------------------------------------------------------------------------

LLAMA2_TABLE_28 = {  # rating: (margin small, margin large)
    "significantly better": (1.0, 3.0), "better": (2 / 3, 2.0), "slightly better": (1 / 3, 1.0),
}
STRENGTH_TO_RATING = {3: "significantly better", 2: "better", 1: "slightly better"}


def test_preference_margin_matches_llama2_table_28():
    for strength, rating in STRENGTH_TO_RATING.items():
        small, large = LLAMA2_TABLE_28[rating]
        assert preference_margin(strength) == small == preference_margin(strength, scale="small")
        assert preference_margin(strength, scale="large") == large
    s = torch.tensor([[1, 3], [2, 2]])
    got = preference_margin(s)
    assert got.dtype == torch.float32 and got.shape == (2, 2)
    assert torch.equal(got, torch.tensor([[1 / 3, 1.0], [2 / 3, 2 / 3]], dtype=torch.float32))
    assert torch.equal(preference_margin(torch.tensor([3], dtype=torch.uint8), "large"), torch.tensor([3.0]))
    assert preference_margin(torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_preference_margin_in_reward_loss_equals_the_formula(train):
    batch = train[:6]
    strengths = torch.tensor([p["strength"] for p in batch])
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        chosen, rejected = torch.randn(6).to(dtype), torch.randn(6).to(dtype)
        margin = preference_margin(strengths).to(dtype)
        expected = -F.logsigmoid(chosen.float() - rejected.float() - margin.float()).mean()
        got = reward_loss(chosen, rejected, margin)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_preference_margin_errors():
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="1, 2 or 3"):
            preference_margin(bad)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        preference_margin(torch.tensor([1, 5]))
    with pytest.raises(TypeError):
        preference_margin(2.0)
    with pytest.raises(TypeError):
        preference_margin(True)
    with pytest.raises(TypeError, match="integer tensor"):
        preference_margin(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="scale"):
        preference_margin(1, scale="medium")
