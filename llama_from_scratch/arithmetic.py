"""Arithmetic problems with checkable answers (chapter 14): the task for rewards that need no reward model.

GRPO with *verifiable rewards* (DeepSeekMath, DeepSeek-R1) replaces the learned reward model of
chapters 12-13 by a program that checks the answer: 1 if the completion's final number equals the
true result, 0 otherwise. Such a reward cannot be hacked by style, only by getting the answer right.

Problems are generated from templates. The training and held-out problems use **disjoint sets of
templates** (different phrasings, see :data:`TRAIN_TEMPLATES` and :data:`HELDOUT_TEMPLATES`), so a
gain on the held-out set is a gain in arithmetic, not in recognising a phrasing seen in training.
"""

from __future__ import annotations

import random
import re
from typing import Any

__all__ = [
    "TRAIN_TEMPLATES",
    "HELDOUT_TEMPLATES",
    "make_arithmetic_problems",
    "extract_final_number",
    "arithmetic_reward",
]

# {a}, {b}: the operands; {op}: the symbol (+ or -); {word}: the same operation in words.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}.",
    "What is {a} {word} {b}?",
    "Find the value of {a} {op} {b}.",
    "Evaluate {a} {op} {b}.",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "How much is {a} {word} {b}?",
    "Work out {a} {op} {b}.",
    "Tell me the result of {a} {op} {b}.",
    "Solve: {a} {op} {b} =",
)
_OPERATIONS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b)}
_SUFFIX = " Reply with the number only."

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def make_arithmetic_problems(
    n: int,
    split: str = "train",
    seed: int = 0,
    low: int = 10,
    high: int = 99,
    operations: str = "+-",
) -> list[dict[str, Any]]:
    """``n`` problems ``{"prompt", "answer", "template"}`` with operands drawn from ``[low, high]``.

    ``split="train"`` phrases them with :data:`TRAIN_TEMPLATES`, ``"heldout"`` with
    :data:`HELDOUT_TEMPLATES` (no template in common). Every prompt ends with "Reply with the number
    only." ``answer`` is the exact integer result. Same ``seed``, same problems.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not low <= high:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    if not operations or any(op not in _OPERATIONS for op in operations):
        raise ValueError(f"operations must be a non-empty string of {''.join(_OPERATIONS)}, got {operations!r}")
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    rng = random.Random(f"{split}-{seed}")
    problems = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        op = rng.choice(operations)
        word, fn = _OPERATIONS[op]
        template = rng.choice(templates)
        prompt = template.format(a=a, b=b, op=op, word=word) + _SUFFIX
        problems.append({"prompt": prompt, "answer": fn(a, b), "template": template})
    return problems


def extract_final_number(text: str) -> float | None:
    """The last number written in ``text`` (``"-12"``, ``"1,234"``, ``"3.5"``), or None if there is none.

    Taking the *last* number is the usual convention for checking free-form maths answers (as in
    GSM8K evaluations): "45 + 23 = 68" and "The answer is 68." both give 68. Thousands separators
    are dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def arithmetic_reward(completion: str, answer: int | float) -> float:
    """The verifiable reward: 1.0 if the completion's last number equals ``answer``, else 0.0."""
    value = extract_final_number(completion)
    return 1.0 if value is not None and value == float(answer) else 0.0
