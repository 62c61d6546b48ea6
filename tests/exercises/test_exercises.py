"""The pytest route of the grader: one test per exercise of the chosen notebooks.

    pytest tests/exercises                         # the solutions: everything must pass
    pytest tests/exercises --notebooks exercises   # a student's work
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from llama_from_scratch.course.grade import ExerciseResult, grade_notebook


@lru_cache(maxsize=None)
def _graded(notebook: Path) -> dict[str, ExerciseResult]:
    return {r.exercise: r for r in grade_notebook(notebook)}


def test_exercise(exercise_case: tuple[Path, str]) -> None:
    notebook, name = exercise_case
    result = _graded(notebook)[name]
    assert result.passed, f"{notebook.name} :: {name}: {result.reason}"
