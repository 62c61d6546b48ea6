"""The committed multi-turn conversations (data/conversations): reproducible, well-formed, right,
and the held-out split shares no phrasing or topic with the training split.

Answers are recomputed here from the text of the turns, independently of build.py: the
arithmetic statements are evaluated, the spelled and sorted words redone, the ages recomputed from
the introduction, the recalled question compared with the first user turn.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from llama_from_scratch.conversations import check_conversation, load_conversations
from data_common import load_build_script

DATA = Path(__file__).resolve().parent.parent / "data" / "conversations"
TASKS = {"arithmetic", "translation", "recall", "personal", "sorting", "units", "spelling"}


@pytest.fixture(scope="module")
def build():
    return load_build_script("conversations")


@pytest.fixture(scope="module")
def train():
    return load_conversations("train")


@pytest.fixture(scope="module")
def test():
    return load_conversations("test")


def users(c: dict) -> list[str]:
    return [m["content"] for m in c["messages"] if m["role"] == "user"]


def replies(c: dict) -> list[str]:
    return [m["content"] for m in c["messages"] if m["role"] == "assistant"]


def test_build_py_reproduces_the_committed_files(build):
    train, test = build.build()
    assert (DATA / "train.jsonl").read_text(encoding="utf-8") == build.to_jsonl(train)
    assert (DATA / "test.jsonl").read_text(encoding="utf-8") == build.to_jsonl(test)
    assert sum(f.stat().st_size for f in DATA.glob("*.jsonl")) < 1_000_000


def test_schema_counts_and_turns(train, test):
    for c in train + test:
        assert list(c) == ["messages", "task", "answer"] and c["task"] in TASKS
        check_conversation(c["messages"])
        assert c["messages"][0]["role"] == "user" and 2 <= len(c["messages"]) // 2 <= 4
        assert all(m["content"] == m["content"].strip() for m in c["messages"])
        assert c["answer"].lower() in replies(c)[-1].lower(), c   # the answer is in the last reply
    assert len(train) + len(test) >= 300 and len(test) >= 60
    assert set(Counter(c["task"] for c in train)) == set(Counter(c["task"] for c in test)) == TASKS
    assert {len(c["messages"]) // 2 for c in test} == {2, 3, 4}
    keys = [str(c["messages"]) for c in train + test]
    assert len(set(keys)) == len(keys)                               # no duplicates, within or across splits
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for task in TASKS:
        n_train = sum(c["task"] == task for c in train)
        n_test = sum(c["task"] == task for c in test)
        assert re.search(rf"\|\s*{task}\s*\|\s*{n_train}\s*\|\s*{n_test}\s*\|", readme), task


STATEMENT = re.compile(r"^([\d,]+) ([+×−÷]) ([\d,]+) = ([\d,]+)\.$")


def test_arithmetic_and_follow_ups_are_right(train, test):
    ops = {"+": lambda a, b: a + b, "×": lambda a, b: a * b, "−": lambda a, b: a - b, "÷": lambda a, b: a / b}
    for c in train + test:
        if c["task"] != "arithmetic":
            continue
        previous = None
        for user, reply in zip(users(c), replies(c)):
            a, op, b, result = STATEMENT.match(reply).groups()
            a, b, result = int(a), int(b), int(result)
            assert ops[op](a, b) == result, reply
            if previous is None:
                assert [int(n) for n in re.findall(r"\d+", user)] == [a, b]
            else:
                assert a == previous                                   # the follow-up uses the last result
                numbers = [int(n) for n in re.findall(r"\d+", user)]
                assert numbers in ([b], []) or (numbers == [2] and b == 2), (user, reply)
            previous = result
        assert c["answer"] == str(previous)


def test_other_tasks_are_right(train, test):
    for c in train + test:
        u, r = users(c), replies(c)
        if c["task"] in ("recall", "units") and re.search(r"first|start", u[-1]):
            assert r[-1] == f'You first asked: "{u[0]}"' and c["answer"] == u[0]
        if c["task"] == "spelling":
            word = re.search(r"'(\w+)'", u[0])[1]
            assert r[0] == word.upper() + "."
            for user, reply in zip(u[1:], r[1:]):
                assert reply in (word.upper()[::-1] + ".", f"{len(word)}.")
        if c["task"] == "sorting":
            words = re.search(r": (.+)\.$", u[0])[1].split(", ")
            assert r[0] == ", ".join(sorted(words)) + "."
            assert r[1] == ", ".join(sorted(words, reverse=True)) + "."
            for reply in r[2:]:
                assert reply in (sorted(words)[-1].capitalize() + ".", f"{len(words)}.")
        if c["task"] == "personal":
            name = re.search(r"(?:name is |I'm |there, )([A-Z][a-z]+)", u[0])[1]
            age = re.search(r"\d+", u[0])[0]
            for user, reply in zip(u[1:], r[1:]):
                k = re.findall(r"\d+", user)
                if not k:
                    assert reply == f"Your name is {name}."
                elif re.search(r"will|going to", user):
                    assert reply == f"You will be {int(age) + int(k[0])}."
                else:
                    assert reply == f"You were {int(age) - int(k[0])}."
        if c["task"] == "units":
            x = int(re.search(r"\d+", u[0])[0])
            factor = {"km": 1000, "h": 60}[r[0].split()[1]]
            assert r[0].startswith(f"{x} ") and f"= {x * factor:,} " in r[0]


def template(text: str, build) -> str:
    """A user turn with its numbers and topic words masked: its phrasing."""
    words = [w for split in ("train", "test") for pool in (build.NAMES, build.SORT_WORDS, build.SPELL_WORDS)
             for w in pool[split]] + list(build.LANGUAGES) + list(build.ABBREVIATIONS)
    text = re.sub(r"\d+", "#", text)
    text = re.sub(r"\b(" + "|".join(sorted(words, key=len, reverse=True)) + r")\b", "W", text)
    return re.sub(r"W(, W)+", "W", text)


def test_held_out_phrasings_and_topics_never_occur_in_training(train, test, build):
    """No held-out user phrasing is a training phrasing (numbers and topic words masked), no first
    question of a held-out translation is a training one, and no held-out name, sorted word,
    spelled word, fact word or unit occurs anywhere in the training conversations."""
    fact_questions = {q for facts in build.FACTS.values() for q, *_ in facts}
    train_templates = {template(u, build) for c in train for u in users(c) if u not in fact_questions}
    test_templates = {template(u, build) for c in test for u in users(c) if u not in fact_questions}
    assert not train_templates & test_templates, sorted(train_templates & test_templates)[:5]
    assert len(test_templates) >= 20
    train_questions = {u for c in train for u in users(c) if u in fact_questions}
    test_questions = {u for c in test for u in users(c) if u in fact_questions}
    assert test_questions and not train_questions & test_questions
    train_text = " ".join(m["content"] for c in train for m in c["messages"])
    held_out = [*build.NAMES["test"], *build.SORT_WORDS["test"], *build.SPELL_WORDS["test"],
                *(w for topic in build.FACT_TOPICS["test"] for _, *words in build.FACTS[topic] for w in words
                  if w not in ("Tomate", "Miel")),  # shared spellings across languages checked below
                "hours", "minutes", "seconds"]
    for word in held_out:
        assert not re.search(rf"\b{re.escape(word)}\b", train_text, flags=re.IGNORECASE), word
        assert word.upper() not in train_text and word.upper()[::-1] not in train_text
    for word in ("Tomate", "Miel"):
        assert word not in train_text
