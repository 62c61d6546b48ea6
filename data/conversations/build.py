"""Builds the project's multi-turn conversations: ``train.jsonl`` and ``test.jsonl``.

Run ``python data/conversations/build.py`` to (re)write both files next to this script, or
``python data/conversations/build.py --check`` to verify that the committed files equal what this
script produces (``tests/test_conversation_data.py`` does the same). Output is deterministic: the
phrasings and vocabularies are fixed Python data below, the conversations are drawn with
``random.Random(SEED)``.

Every conversation is ``{"messages", "task", "answer"}``: ``messages`` alternate
``user``/``assistant``, starting with the user and ending with the assistant, 2 to 4 exchanges;
every follow-up after the first exchange depends on an earlier turn ("and now double it",
"translate your last answer into French", "what did I ask first?"). ``answer`` is the checkable
core of the last assistant turn (a number, a word, a quoted question): a reply is right when it
contains it (case-insensitive). ``task`` is one of ``TASKS``.

The split holds out phrasings and topics, not only conversations. Every user phrasing comes from a
pool with a training part and a held-out part (``Phrasings(train=..., test=...)``); a conversation
uses only its own split's part. Topics are held out too: the held-out translation questions ask
about days, months and food (training: colours and animals), the held-out conversions are of time
(training: length), the names, sorted words and spelled words of the held-out split never occur in
training. The assistant's *style* (short replies, "7 + 5 = 12.", "You first asked: ...") is the
same in both splits: that is what fine-tuning is meant to teach.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 20241207
HERE = Path(__file__).resolve().parent
TASKS = ("arithmetic", "translation", "recall", "personal", "sorting", "units", "spelling")
PER_TASK = {"train": 44, "test": 12}  # conversations per task and split


@dataclass(frozen=True)
class Phrasings:
    """The ways a user asks one thing: ``train`` for the training split, ``test`` held out."""

    train: tuple[str, ...]
    test: tuple[str, ...]

    def pick(self, rng: random.Random, split: str, **fields) -> str:
        return rng.choice(self.train if split == "train" else self.test).format(**fields)


# ---------------------------------------------------------------------------------------------
# Phrasing pools (user turns)
# ---------------------------------------------------------------------------------------------

PHRASINGS = {
    "add": Phrasings(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
                     ("How much do {a} and {b} make together?", "Work out the sum of {a} and {b}.")),
    "multiply": Phrasings(("What is {a} times {b}?", "Multiply {a} by {b}."),
                          ("Give me the product of {a} and {b}.",)),
    "double": Phrasings(("And now double it.", "Multiply that by 2."), ("Twice that, please?",)),
    "subtract": Phrasings(("Now take away {c}.", "Subtract {c} from that."),
                          ("What do I get if I remove {c} from it?",)),
    "increase": Phrasings(("Add {c} to it.", "Now add {c}."), ("Increase that by {c}.",)),
    "halve": Phrasings(("Now halve it.", "Divide that by 2."), ("Split that into two equal parts: how much is each?",)),
    "translate": Phrasings(("Translate your last answer into {lang}.", "How do you say that in {lang}?"),
                           ("Give me that word in {lang}.", "And in {lang}, what would that be?")),
    "translate_again": Phrasings(("And in {lang}?", "What about {lang}?"), ("Now the {lang} word, please.",)),
    "recall_first": Phrasings(("What did I ask first?", "Remind me what my first question was."),
                              ("Which question did I start with?", "Repeat my very first question.")),
    "introduce": Phrasings(("My name is {name} and I am {age} years old.", "Hi! I'm {name}, {age} years old."),
                           ("Hello there, {name} here. I turned {age} this year.",)),
    "age_later": Phrasings(("How old will I be in {k} years?", "What will my age be {k} years from now?"),
                           ("In {k} years, how old am I going to be?",)),
    "age_before": Phrasings(("How old was I {k} years ago?",), ("What was my age {k} years back?",)),
    "name": Phrasings(("What is my name?", "Do you remember my name?"), ("Who am I, again?",)),
    "sort": Phrasings(("Sort these words alphabetically: {words}.", "Put these in alphabetical order: {words}."),
                      ("Arrange the following from A to Z: {words}.",)),
    "reverse_list": Phrasings(("Now reverse the list.", "Give me the list backwards."),
                              ("Flip that order around.",)),
    "first_item": Phrasings(("Which word is first now?", "What is the first word of the list now?"),
                            ("Which one leads the list at this point?",)),
    "count_items": Phrasings(("How many words are in the list?",), ("Count the entries for me.",)),
    "convert": Phrasings(("Convert {x} {big} to {mid}.", "How many {mid} are in {x} {big}?"),
                         ("Express {x} {big} in {mid}.",)),
    "convert_again": Phrasings(("And in {small}?", "Now convert that to {small}."),
                               ("What is that in {small}?",)),
    "capitals": Phrasings(("Write the word '{w}' in capital letters.", "Uppercase the word '{w}'."),
                          ("Make '{w}' all caps.",)),
    "backwards": Phrasings(("Now spell it backwards.", "Reverse its letters."), ("Read it from right to left.",)),
    "letters": Phrasings(("How many letters does it have?",), ("What is its length in letters?",)),
}

# ---------------------------------------------------------------------------------------------
# Topics: single-word facts with their translations (English, French, Spanish, German)
# ---------------------------------------------------------------------------------------------

FACTS = {  # topic -> [(question, English, French, Spanish, German)]
    "colours": [
        ("What colour is a ripe banana?", "Yellow", "Jaune", "Amarillo", "Gelb"),
        ("What colour is fresh grass?", "Green", "Vert", "Verde", "Grün"),
        ("What colour is snow?", "White", "Blanc", "Blanco", "Weiß"),
        ("What colour is the sky on a clear day?", "Blue", "Bleu", "Azul", "Blau"),
        ("What colour is coal?", "Black", "Noir", "Negro", "Schwarz"),
        ("What colour is a ripe strawberry?", "Red", "Rouge", "Rojo", "Rot"),
    ],
    "animals": [
        ("Which animal says moo?", "Cow", "Vache", "Vaca", "Kuh"),
        ("Which animal barks?", "Dog", "Chien", "Perro", "Hund"),
        ("Which animal purrs?", "Cat", "Chat", "Gato", "Katze"),
        ("Which animal neighs?", "Horse", "Cheval", "Caballo", "Pferd"),
        ("Which animal has a long trunk?", "Elephant", "Éléphant", "Elefante", "Elefant"),
        ("Which animal hops and has long ears?", "Rabbit", "Lapin", "Conejo", "Kaninchen"),
    ],
    "days and months": [
        ("What day comes after Monday?", "Tuesday", "Mardi", "Martes", "Dienstag"),
        ("What day comes just before Sunday?", "Saturday", "Samedi", "Sábado", "Samstag"),
        ("What day follows Thursday?", "Friday", "Vendredi", "Viernes", "Freitag"),
        ("What is the first month of the year?", "January", "Janvier", "Enero", "Januar"),
        ("What month comes after May?", "June", "Juin", "Junio", "Juni"),
    ],
    "food": [
        ("What do bees make?", "Honey", "Miel", "Miel", "Honig"),
        ("What white drink comes from cows?", "Milk", "Lait", "Leche", "Milch"),
        ("Which sour yellow fruit is used in lemonade?", "Lemon", "Citron", "Limón", "Zitrone"),
        ("Which red fruit is the base of ketchup?", "Tomato", "Tomate", "Tomate", "Tomate"),
        ("What is bread mainly made from?", "Flour", "Farine", "Harina", "Mehl"),
    ],
}
FACT_TOPICS = {"train": ("colours", "animals"), "test": ("days and months", "food")}
LANGUAGES = ("French", "Spanish", "German")

NAMES = {"train": ("Alice", "Bruno", "Chen", "Dara", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko",
                   "Liam"),
         "test": ("Mira", "Nikolai", "Olga", "Pablo", "Quentin", "Rosa")}
SORT_WORDS = {"train": ("apple", "pear", "fig", "grape", "melon", "cherry", "plum", "kiwi", "mango", "peach"),
              "test": ("hammer", "saw", "drill", "wrench", "chisel", "pliers", "ladder")}
SPELL_WORDS = {"train": ("garden", "pencil", "window", "silver", "rocket", "castle", "guitar", "planet", "basket",
                         "forest", "candle", "bridge"),
               "test": ("lantern", "compass", "harbour", "velvet", "meadow", "thunder")}
UNITS = {  # split -> (big, mid, small, big->mid factor, mid->small factor)
    "train": [("kilometres", "metres", "centimetres", 1000, 100)],
    "test": [("hours", "minutes", "seconds", 60, 60)],
}
ABBREVIATIONS = {"kilometres": "km", "metres": "m", "centimetres": "cm", "hours": "h", "minutes": "min",
                 "seconds": "s"}

# ---------------------------------------------------------------------------------------------
# One generator per task: (messages, answer)
# ---------------------------------------------------------------------------------------------


def _chat(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def _exchanges(rng: random.Random, low: int = 2, high: int = 4) -> int:
    return rng.randint(low, high)


def arithmetic(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        value = a + b
        pairs = [(PHRASINGS["add"].pick(rng, split, a=a, b=b), f"{a} + {b} = {value}.")]
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value = a * b
        pairs = [(PHRASINGS["multiply"].pick(rng, split, a=a, b=b), f"{a} × {b} = {value}.")]
    for _ in range(_exchanges(rng) - 1):
        step = rng.choice(["double", "subtract", "increase", "halve"] if value % 2 == 0 else
                          ["double", "subtract", "increase"])
        if step == "double":
            new, text = value * 2, f"{value} × 2 = {value * 2}."
            user = PHRASINGS["double"].pick(rng, split)
        elif step == "halve":
            new, text = value // 2, f"{value} ÷ 2 = {value // 2}."
            user = PHRASINGS["halve"].pick(rng, split)
        elif step == "subtract":
            c = rng.randint(1, max(1, value - 1))
            new, text = value - c, f"{value} − {c} = {value - c}."
            user = PHRASINGS["subtract"].pick(rng, split, c=c)
        else:
            c = rng.randint(1, 30)
            new, text = value + c, f"{value} + {c} = {value + c}."
            user = PHRASINGS["increase"].pick(rng, split, c=c)
        pairs.append((user, text))
        value = new
    return _chat(pairs), str(value)


def translation(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    topic = rng.choice(FACT_TOPICS[split])
    question, *words = rng.choice(FACTS[topic])
    languages = rng.sample(LANGUAGES, _exchanges(rng, 2, 4) - 1)
    pairs = [(question, f"{words[0]}.")]
    for i, lang in enumerate(languages):
        key = "translate" if i == 0 else "translate_again"
        word = words[1 + LANGUAGES.index(lang)]
        pairs.append((PHRASINGS[key].pick(rng, split, lang=lang), f"In {lang}: {word}."))
    return _chat(pairs), word


def _opening(rng: random.Random, split: str) -> tuple[str, str]:
    """A first exchange on any topic of the split, for the recall task."""
    kind = rng.choice(["fact", "add", "capitals"])
    if kind == "fact":
        question, english, *_ = rng.choice(FACTS[rng.choice(FACT_TOPICS[split])])
        return question, f"{english}."
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return PHRASINGS["add"].pick(rng, split, a=a, b=b), f"{a} + {b} = {a + b}."
    w = rng.choice(SPELL_WORDS[split])
    return PHRASINGS["capitals"].pick(rng, split, w=w), f"{w.upper()}."


def recall(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    n = _exchanges(rng, 2, 4)
    pairs = []
    while len(pairs) < n - 1:
        pair = _opening(rng, split)
        if all(pair[0] != p[0] for p in pairs):
            pairs.append(pair)
    first = pairs[0][0]
    pairs.append((PHRASINGS["recall_first"].pick(rng, split), f'You first asked: "{first}"'))
    return _chat(pairs), first


def personal(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    name, age = rng.choice(NAMES[split]), rng.randint(18, 70)
    pairs = [(PHRASINGS["introduce"].pick(rng, split, name=name, age=age), f"Nice to meet you, {name}!")]
    steps = rng.sample(["age_later", "age_before", "name"], _exchanges(rng) - 1)
    answer = name
    for step in steps:
        if step == "name":
            pairs.append((PHRASINGS["name"].pick(rng, split), f"Your name is {name}."))
            answer = name
        else:
            k = rng.randint(2, 15)
            value = age + k if step == "age_later" else age - k
            verb = "will be" if step == "age_later" else "were"
            pairs.append((PHRASINGS[step].pick(rng, split, k=k), f"You {verb} {value}."))
            answer = str(value)
    return _chat(pairs), answer


def sorting(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    words = rng.sample(SORT_WORDS[split], rng.randint(3, 5))
    listed = sorted(words)
    pairs = [(PHRASINGS["sort"].pick(rng, split, words=", ".join(words)), ", ".join(listed) + ".")]
    steps = ["reverse_list"] + rng.sample(["first_item", "count_items"], _exchanges(rng) - 2)
    answer = ""
    for step in steps:
        if step == "reverse_list":
            listed = listed[::-1]
            pairs.append((PHRASINGS[step].pick(rng, split), ", ".join(listed) + "."))
            answer = ", ".join(listed)
        elif step == "first_item":
            pairs.append((PHRASINGS[step].pick(rng, split), f"{listed[0].capitalize()}."))
            answer = listed[0]
        else:
            pairs.append((PHRASINGS[step].pick(rng, split), f"{len(listed)}."))
            answer = str(len(listed))
    return _chat(pairs), answer


def _number(n: int) -> str:
    return f"{n:,}"


def units(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    big, mid, small, f1, f2 = rng.choice(UNITS[split])
    x = rng.randint(2, 9)
    a, b, c = ABBREVIATIONS[big], ABBREVIATIONS[mid], ABBREVIATIONS[small]
    pairs = [(PHRASINGS["convert"].pick(rng, split, x=x, big=big, mid=mid), f"{x} {a} = {_number(x * f1)} {b}.")]
    answer = _number(x * f1)
    if _exchanges(rng, 2, 3) >= 2:
        pairs.append((PHRASINGS["convert_again"].pick(rng, split, small=small),
                      f"{_number(x * f1)} {b} = {_number(x * f1 * f2)} {c}."))
        answer = _number(x * f1 * f2)
    if rng.random() < 0.4:  # a third exchange that goes back to the first one
        pairs.append((PHRASINGS["recall_first"].pick(rng, split), f'You first asked: "{pairs[0][0]}"'))
        answer = pairs[0][0]
    return _chat(pairs), answer


def spelling(rng: random.Random, split: str) -> tuple[list[dict[str, str]], str]:
    w = rng.choice(SPELL_WORDS[split])
    pairs = [(PHRASINGS["capitals"].pick(rng, split, w=w), f"{w.upper()}.")]
    steps = rng.sample(["backwards", "letters"], _exchanges(rng, 2, 3) - 1)
    answer = w.upper()
    for step in steps:
        if step == "backwards":
            pairs.append((PHRASINGS[step].pick(rng, split), f"{w.upper()[::-1]}."))
            answer = w.upper()[::-1]
        else:
            pairs.append((PHRASINGS[step].pick(rng, split), f"{len(w)}."))
            answer = str(len(w))
    return _chat(pairs), answer


GENERATORS = {"arithmetic": arithmetic, "translation": translation, "recall": recall, "personal": personal,
              "sorting": sorting, "units": units, "spelling": spelling}


def build() -> tuple[list[dict], list[dict]]:
    """The training and held-out conversations, each task's in turn, without duplicates."""
    rng = random.Random(SEED)
    splits: dict[str, list[dict]] = {}
    for split in ("train", "test"):
        rows: list[dict] = []
        seen: set[str] = set()
        for task in TASKS:
            made = 0
            while made < PER_TASK[split]:
                messages, answer = GENERATORS[task](rng, split)
                key = json.dumps(messages)
                if key in seen:
                    continue
                seen.add(key)
                rows.append({"messages": messages, "task": task, "answer": answer})
                made += 1
        splits[split] = rows
    return splits["train"], splits["test"]


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    train, test = build()
    files = {"train.jsonl": to_jsonl(train), "test.jsonl": to_jsonl(test)}
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).exists() or (args.out / n).read_text(encoding="utf-8") != text]
        if stale:
            print("out of date:", ", ".join(stale), file=sys.stderr)
            return 1
        print("up to date")
        return 0
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(train)} training and {len(test)} held-out conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
