"""The committed instruction dataset (data/instructions): reproducible, well-formed, correct.

Exact answers are recomputed here independently of build.py: by parsing the text of each question
(fractions.Fraction for arithmetic, Zeller's congruence for weekdays, a Roman-numeral parser, ...)
and by running the code answers.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from llama_from_scratch.instruct import load_instructions
from llama_from_scratch.self_instruct import rouge_l
from data_common import load_build_script

DATA = Path(__file__).resolve().parent.parent / "data" / "instructions"
CATEGORIES = {"explain", "rewrite", "classify", "extract", "summarise", "math", "code", "conversions", "lists",
              "refusal"}


@pytest.fixture(scope="module")
def build():
    return load_build_script("instructions")


@pytest.fixture(scope="module")
def train():
    return load_instructions("train")


@pytest.fixture(scope="module")
def test():
    return load_instructions("test")


def test_build_py_reproduces_the_committed_files(build):
    train, test = build.build()
    assert (DATA / "train.jsonl").read_text(encoding="utf-8") == build.to_jsonl(train)
    assert (DATA / "test.jsonl").read_text(encoding="utf-8") == build.to_jsonl(test)


def test_schema_and_non_empty_fields(train, test):
    for ex in train + test:
        assert list(ex) == ["instruction", "input", "output", "category", "exact"], ex
        assert isinstance(ex["input"], str) and isinstance(ex["exact"], bool)
        for key in ("instruction", "output"):
            assert isinstance(ex[key], str) and ex[key].strip() and ex[key] == ex[key].strip(), ex
        assert ex["input"] == ex["input"].strip()
        assert ex["category"] in CATEGORIES


def test_counts_and_stratified_split(train, test):
    assert len(train) + len(test) >= 550
    n_train, n_test = Counter(e["category"] for e in train), Counter(e["category"] for e in test)
    assert set(n_train) == set(n_test) == CATEGORIES
    for cat in CATEGORIES:
        total = n_train[cat] + n_test[cat]
        assert total >= 30, cat
        assert n_test[cat] == max(1, round(0.1 * total)), cat
    assert 0.08 <= len(test) / (len(train) + len(test)) <= 0.12
    # the README's table is up to date
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for cat in CATEGORIES:
        assert re.search(rf"\|\s*{cat}\s*\|\s*{n_train[cat]}\s*\|\s*{n_test[cat]}\s*\|", readme), cat


def test_outputs_are_short(train, test):
    words = [len(e["output"].split()) for e in train + test]
    assert max(words) <= 60
    assert sum(w < 40 for w in words) / len(words) > 0.9


def test_no_duplicates_and_no_near_duplicates_across_splits(train, test):
    keys = [(e["instruction"].lower(), e["input"].lower()) for e in train + test]
    assert len(set(keys)) == len(keys)

    def similar(a: str, b: str, empty_is_same: bool) -> bool:
        if not a.split() or not b.split():
            return empty_is_same and not a.split() and not b.split()
        return rouge_l(a, b) >= 0.7

    def quick_reject(a: str, b: str) -> bool:   # LCS <= shared tokens, so F <= 2 * shared / (m + n)
        ta, tb = a.lower().split(), b.lower().split()
        if not ta or not tb:
            return False
        return 2 * sum((Counter(ta) & Counter(tb)).values()) < 0.7 * (len(ta) + len(tb))

    near = []
    for t in test:
        for r in train:
            if quick_reject(t["input"], r["input"]):
                continue
            same_input = similar(t["input"], r["input"], empty_is_same=True)
            if not same_input:
                continue
            if min(len(t["input"].split()), len(r["input"].split())) >= 4 or (
                    not quick_reject(t["instruction"], r["instruction"])
                    and similar(t["instruction"], r["instruction"], empty_is_same=False)):
                near.append((t, r))
    assert not near, near[:3]


def test_classification_answers_are_single_words(train, test):
    for e in train + test:
        if e["category"] == "classify":
            assert e["exact"] and re.fullmatch(r"[A-Z][a-z]+", e["output"]), e
            options = re.findall(r"[A-Z][a-z]+", e["instruction"])
            if len(options) > 2:
                assert e["output"] in options or e["output"].lower() in e["instruction"].lower(), e


def test_refusals_are_brief_and_polite(train, test):
    refusals = [e for e in train + test if e["category"] == "refusal"]
    assert len(refusals) >= 25
    for e in refusals:
        assert re.match(r"(I can't|I won't|I'm sorry)", e["output"]), e
        assert len(e["output"].split()) <= 40


# ----- exact answers, recomputed ----------------------------------------------------------------

def num(s: str) -> Fraction:
    return Fraction(s.replace(",", ""))


WORD_PROBLEMS = [
    (r"has (\d+) apples and buys (\d+) more", lambda a, b: a + b),
    (r"box holds (\d+) pencils\. How many pencils are in (\d+) boxes", lambda a, b: a * b),
    (r"^(\d+) sweets are shared equally among (\d+) children", lambda a, b: a / b),
    (r"travels at (\d+) km/h for (\d+) hours", lambda a, b: a * b),
    (r"had (\d+) books on a shelf and lent out (\d+)", lambda a, b: a - b),
    (r"room (\d+) m long and (\d+) m wide", lambda a, b: a * b),
    (r"garden is (\d+) m by (\d+) m", lambda a, b: 2 * (a + b)),
    (r"cost \$(\d+) each\. How many dollars do (\d+) notebooks", lambda a, b: a * b),
    (r"is (\d+) years old\. Her father is three times", lambda a: 3 * a),
    (r"uses 3 eggs for every (\d+) cakes\. How many eggs are needed for (\d+) cakes", lambda a, b: 3 * b / a),
    (r"opens at (\d+) a\.m\. and stays open for (\d+) hours", lambda a, b: a + b - 12),
    (r"spider has 8 legs\. How many legs do (\d+) spiders", lambda a: 8 * a),
    (r"class of (\d+) pupils has (\d+) boys", lambda a, b: a - b),
    (r"\$12 for adults and \$7 for children\. What do 2 adults and (\d+) children", lambda c: 24 + 7 * c),
    (r"6 litres of fuel per 100 km\. How many litres does it use on a (\d+) km", lambda d: 6 * d / 100),
    (r"Each of (\d+) buses carries 45 passengers", lambda b: 45 * b),
]

UNITS = {  # (from, to): (from symbol, to symbol, factor), from the definitions of the units
    ("kilometres", "metres"): ("km", "m", 1000), ("metres", "centimetres"): ("m", "cm", 100),
    ("centimetres", "millimetres"): ("cm", "mm", 10), ("metres", "kilometres"): ("m", "km", Fraction(1, 1000)),
    ("inches", "centimetres"): ("in", "cm", Fraction("2.54")), ("feet", "inches"): ("ft", "in", 12),
    ("miles", "kilometres"): ("mi", "km", Fraction("1.609344")), ("kilograms", "grams"): ("kg", "g", 1000),
    ("grams", "kilograms"): ("g", "kg", Fraction(1, 1000)), ("tonnes", "kilograms"): ("t", "kg", 1000),
    ("litres", "millilitres"): ("L", "mL", 1000), ("millilitres", "litres"): ("mL", "L", Fraction(1, 1000)),
    ("hours", "minutes"): ("h", "min", 60), ("minutes", "seconds"): ("min", "s", 60),
    ("days", "hours"): ("d", "h", 24), ("seconds", "minutes"): ("s", "min", Fraction(1, 60)),
}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def zeller_weekday(y: int, m: int, d: int) -> str:
    """Zeller's congruence for the Gregorian calendar."""
    if m < 3:
        m, y = m + 12, y - 1
    k, j = y % 100, y // 100
    h = (d + 13 * (m + 1) // 5 + k + k // 4 + j // 4 + 5 * j) % 7
    return ["Saturday", "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday"][h]


def roman_to_int(s: str) -> int:
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for a, b in zip(s, s[1:] + " "):
        total += -values[a] if b != " " and values[a] < values[b] else values[a]
    return total


def canonical_roman(s: str) -> bool:
    return re.fullmatch(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})", s) is not None and s != ""


def twelve_hour(h: int, m: int) -> str:
    return f"{12 if h % 12 == 0 else h % 12}:{m:02d} {'AM' if h < 12 else 'PM'}"


def check_math(e: dict) -> bool:
    """Recomputes a math answer; returns False when no rule recognises the question."""
    i, x, out = e["instruction"], e["input"], e["output"]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b,
           "plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
           "divided by": lambda a, b: a / b}
    if m := re.fullmatch(r"(-?\d+) ([+\-×÷]) (\d+)", x):
        assert num(out) == ops[m[2]](num(m[1]), num(m[3])), e
    elif m := re.fullmatch(r"What is (\d+) (plus|minus|times|divided by) (\d+)\?", i):
        assert num(out) == ops[m[2]](num(m[1]), num(m[3])), e
    elif m := re.fullmatch(r"What is (\d+)% of (\d+)\?", i):
        assert num(out) == num(m[1]) * num(m[2]) / 100, e
    elif m := re.fullmatch(r"What is (\d+)/(\d+) of (\d+)\?", i):
        assert num(out) == num(m[1]) / num(m[2]) * num(m[3]), e
    elif m := re.fullmatch(r"What is the average of (.+)\?", i):
        values = [num(v) for v in re.split(r", | and ", m[1])]
        assert num(out) == sum(values) / len(values), e
    elif i == "Find the sale price after the discount.":
        m = re.search(r"costs \$(\d+\.\d\d) and is reduced by (\d+)%", x)
        assert re.fullmatch(r"\$\d+\.\d\d", out) and num(out[1:]) == num(m[1]) * (100 - num(m[2])) / 100, e
    elif m := re.fullmatch(r"Find the percentage (increase|decrease)\.", i):
        old, new = (num(v) for v in re.fullmatch(r"from ([\d.]+) to ([\d.]+)", x).groups())
        change = (new - old) / old * 100
        assert out.endswith("%") and num(out[:-1]) == abs(change) and (change > 0) == (m[1] == "increase"), e
    elif i == "Find the square root of this number.":
        assert num(out) ** 2 == num(x) and num(out) > 0, e
    elif i == "Square this number.":
        assert num(out) == num(x) ** 2, e
    elif i == "Evaluate this expression, following the order of operations.":
        assert re.fullmatch(r"[\d\s+\-×()]+", x)
        assert num(out) == eval(x.replace("×", "*")), e
    else:
        for pattern, f in WORD_PROBLEMS:
            if m := re.search(pattern, i):
                assert num(out) == f(*(num(g) for g in m.groups())), e
                return True
        return False
    return True


def check_conversion(e: dict) -> bool:
    i, x, out = e["instruction"], e["input"], e["output"]
    if i == "Convert this temperature from Celsius to Fahrenheit.":
        assert out.endswith(" °F") and num(out[:-3]) == num(x[:-3]) * 9 / 5 + 32, e
    elif i == "Convert this temperature from Fahrenheit to Celsius.":
        assert out.endswith(" °C") and num(out[:-3]) == (num(x[:-3]) - 32) * 5 / 9, e
    elif i == "Convert this temperature from Celsius to kelvin.":
        assert out.endswith(" K") and num(out[:-2]) == num(x[:-3]) + Fraction("273.15"), e
    elif m := re.fullmatch(r"Convert from (\w+) to (\w+)\.", i):
        sym_from, sym_to, factor = UNITS[(m[1], m[2])]
        value, unit = x.split()
        out_value, out_unit = out.split()
        assert unit == sym_from and out_unit == sym_to and num(out_value) == num(value) * factor, e
    elif i == "Rewrite this ISO date in the format DD/MM/YYYY.":
        y, mo, d = x.split("-")
        assert out == f"{d}/{mo}/{y}", e
    elif i == "Write this date in ISO 8601 format (YYYY-MM-DD).":
        d, month, y = x.split()
        assert out == f"{int(y):04d}-{MONTHS.index(month) + 1:02d}-{int(d):02d}", e
    elif i == "On which day of the week did this date fall?":
        assert out == zeller_weekday(*(int(v) for v in x.split("-"))), e
    elif i == "Convert this 24-hour time to 12-hour time.":
        h, mi = (int(v) for v in x.split(":"))
        assert out == twelve_hour(h, mi), e
    elif i == "Convert this 12-hour time to 24-hour time.":
        h, mi = (int(v) for v in out.split(":"))
        assert re.fullmatch(r"\d\d:\d\d", out) and x == twelve_hour(h, mi), e
    elif i == "Convert this decimal number to binary.":
        assert set(out) <= {"0", "1"} and int(out, 2) == int(x), e
    elif i == "Convert this binary number to decimal.":
        assert int(x, 2) == int(out), e
    elif i == "Convert this decimal number to hexadecimal.":
        assert out == out.upper() and int(out, 16) == int(x), e
    elif i == "Convert this hexadecimal number to decimal.":
        assert int(x, 16) == int(out), e
    elif i == "Write this number in Roman numerals.":
        assert canonical_roman(out) and roman_to_int(out) == int(x), e
    elif i == "Convert this Roman numeral to an ordinary number.":
        assert canonical_roman(x) and roman_to_int(x) == int(out), e
    else:
        return False
    return True


def test_helpers_of_this_test():
    assert zeller_weekday(2000, 1, 1) == "Saturday" and zeller_weekday(2024, 2, 29) == "Thursday"
    assert roman_to_int("MCMXCIV") == 1994 and canonical_roman("XLII") and not canonical_roman("IIII")
    assert twelve_hour(0, 5) == "12:05 AM" and twelve_hour(12, 0) == "12:00 PM" and twelve_hour(23, 59) == "11:59 PM"


def test_math_answers_are_correct(train, test):
    math = [e for e in train + test if e["category"] == "math"]
    assert len(math) >= 60
    unchecked = [e for e in math if not check_math(e)]
    assert not unchecked, unchecked
    assert all(e["exact"] for e in math)


def test_conversion_answers_are_correct(train, test):
    conv = [e for e in train + test if e["category"] == "conversions"]
    assert len(conv) >= 60
    unchecked = [e for e in conv if not check_conversion(e)]
    assert not unchecked, unchecked
    assert all(e["exact"] for e in conv)


def test_code_answers_run(train, test, build, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = [e for e in train + test if e["category"] == "code"]
    checked = 0
    for e in code:
        if e["instruction"] == "What does this Python expression evaluate to?":
            assert e["exact"] and repr(eval(e["input"], {})) == e["output"], e
            checked += 1
        elif e["instruction"] in build.CODE_CHECKS:
            setup, assertions = build.CODE_CHECKS[e["instruction"]]
            namespace: dict = {}
            exec(setup, namespace)
            exec(e["output"], namespace)
            for a in assertions:
                assert eval(a, namespace), (e["instruction"], a)
            checked += 1
        elif e["instruction"].startswith("Fix the error"):
            with pytest.raises(Exception):
                exec(compile(e["input"], "<input>", "exec"), {})
            exec(compile(e["output"], "<output>", "exec"), {"print": lambda *a: None})
            checked += 1
        else:  # explanations: no code to run
            assert not e["output"].startswith(("def ", "from ", "import ")), e
    assert checked >= 40
    assert set(build.CODE_CHECKS) <= {e["instruction"] for e in code}
