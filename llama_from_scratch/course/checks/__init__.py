"""The grading checks of every chapter's exercises.

Each module ``chNN_<topic>.py`` in this package defines ``CHECKS``: a dict from an exercise name
(the name of the function the student writes) to a check. A check takes the student's function,
calls it on inputs drawn at grading time, compares with a reference, and raises ``AssertionError``
with a message the student can act on. A module may also define ``FORBIDDEN``: a dict from an
exercise name to the dotted names its answer must not use (``"torch.nn.functional.cross_entropy"``,
``"torch.Tensor.logsumexp"``, ``"torch.autograd"``); the grader enforces them, and forbids the
package itself (``llama_from_scratch``) in every answer. ``common.py`` holds what checks share.
Chapters are discovered by module name, so adding a chapter's checks needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

Check = Callable[[Callable], None]


def chapters() -> list[str]:
    """Names of the chapters that have checks, e.g. ``["ch01_tokenization", ...]``, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("ch"))


def chapter_checks(chapter: str) -> dict[str, Check]:
    """The ``CHECKS`` dict of one chapter; ``KeyError`` naming the known chapters if unknown."""
    if chapter not in chapters():
        raise KeyError(f"no checks for chapter {chapter!r}; known chapters: {', '.join(chapters())}")
    module = importlib.import_module(f"{__name__}.{chapter}")
    return dict(module.CHECKS)


def chapter_forbidden(chapter: str) -> dict[str, list[str]]:
    """The ``FORBIDDEN`` dict of one chapter (exercise -> dotted names its answer must not use)."""
    chapter_checks(chapter)
    module = importlib.import_module(f"{__name__}.{chapter}")
    return {name: list(names) for name, names in getattr(module, "FORBIDDEN", {}).items()}


def find_check(exercise: str) -> tuple[str, Check]:
    """Find an exercise by name in any chapter: returns ``(chapter, check)``."""
    for chapter in chapters():
        checks = chapter_checks(chapter)
        if exercise in checks:
            return chapter, checks[exercise]
    raise KeyError(f"no exercise named {exercise!r} in any chapter's checks")
