"""One source of truth: the exercise notebooks are generated from the solutions, and every check
fails on the untouched stubs."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_from_scratch.course import checks
from llama_from_scratch.course.grade import grade_notebook
from llama_from_scratch.course.notebook_source import exercises_in, read_notebook, replace_solutions
from llama_from_scratch.course.release import make_exercise_notebook, stale_exercises

REPO = Path(__file__).resolve().parents[2]
SOLUTIONS = sorted((REPO / "solutions").glob("ch*.ipynb"))


def test_there_are_solution_notebooks() -> None:
    assert SOLUTIONS, "no solutions/ch*.ipynb found"


def test_committed_exercises_match_generated() -> None:
    problems = stale_exercises(REPO / "solutions", REPO / "exercises")
    assert not problems, "exercises/ drifted from solutions/ (run python -m llama_from_scratch.release):\n" + "\n".join(problems)


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_notebook_declares_exactly_the_checked_exercises(solution: Path) -> None:
    declared = [e.name for e in exercises_in(read_notebook(solution))]
    assert len(declared) == len(set(declared)), f"duplicate exercise markers: {declared}"
    assert set(declared) == set(checks.chapter_checks(solution.stem)), (
        f"{solution.name}: exercise markers {sorted(declared)} != checks {sorted(checks.chapter_checks(solution.stem))}")
    assert len(declared) >= 3, "each chapter has at least 3 exercises"


@pytest.mark.parametrize("exercise", sorted((REPO / "exercises").glob("ch*.ipynb")), ids=lambda p: p.stem)
def test_every_check_fails_on_the_untouched_stub(exercise: Path) -> None:
    results = grade_notebook(exercise)
    assert results
    for r in results:
        assert not r.passed, f"{exercise.name} :: {r.exercise} passes on the stub: its check cannot fail"
        assert "NotImplementedError" in r.reason, r.reason


def test_exercise_notebooks_carry_no_solutions_or_outputs() -> None:
    for solution in SOLUTIONS:
        nb = make_exercise_notebook(read_notebook(solution))
        for cell in nb["cells"]:
            text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None


def test_all_exercise_names_are_unique_across_chapters() -> None:
    names = [n for ch in checks.chapters() for n in checks.chapter_checks(ch)]
    assert len(names) == len(set(names)), "check() finds exercises by name: names must be unique"


def test_replace_solutions_keeps_indentation_and_code_around() -> None:
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert replace_solutions(source, stub="raise NotImplementedError()") == (
        "def f(x):\n    y = 1\n    raise NotImplementedError()\n")


@pytest.mark.parametrize("bad", [
    "### BEGIN SOLUTION\nx = 1\n",
    "x = 1\n### END SOLUTION\n",
    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n",
])
def test_unbalanced_markers_are_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="SOLUTION"):
        replace_solutions(bad)
