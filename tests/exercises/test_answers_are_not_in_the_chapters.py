"""The chapters explain and demonstrate; the exercises make the learner build. No answer may stand
in its chapter (a learner would retype a shown cell), and answers are real work: at most two short
warm-ups (3 lines or fewer) per chapter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llama_from_scratch.course.notebook_source import cell_source, exercises_in, read_notebook

REPO = Path(__file__).resolve().parents[2]
SOLUTIONS = sorted((REPO / "solutions").glob("ch*.ipynb"))
SHORT, MAX_SHORT = 3, 2


def answer_lines(source: str) -> list[str]:
    """Code lines between the solution markers, whitespace-normalised, comments dropped."""
    lines, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("### BEGIN SOLUTION"):
            inside = True
        elif stripped.startswith("### END SOLUTION"):
            inside = False
        elif inside and stripped and not stripped.startswith("#"):
            lines.append(re.sub(r"\s+", " ", stripped.split("  #")[0]).strip())
    return lines


def chapter_of(solution: Path) -> Path:
    number = solution.stem[2:4]
    (chapter,) = (REPO / "chapters").glob(f"{number}_*.ipynb")
    return chapter


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_no_answer_is_retyped_from_its_chapter(solution: Path) -> None:
    chapter = read_notebook(chapter_of(solution))
    shown = {re.sub(r"\s+", " ", line.strip()) for cell in chapter["cells"] if cell["cell_type"] == "code"
             for line in cell_source(cell).splitlines()}
    nb = read_notebook(solution)
    for exercise in exercises_in(nb):
        lines = [line for line in answer_lines(cell_source(nb["cells"][exercise.cell_index])) if len(line) >= 25]
        if len(lines) < 3:
            continue
        copied = [line for line in lines if line in shown]
        assert len(copied) <= len(lines) // 2, (
            f"{solution.name} :: {exercise.name}: {len(copied)} of its {len(lines)} substantial lines stand in "
            f"{chapter_of(solution).name} (e.g. {copied[0]!r}); ask for the real thing or an extension instead")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_at_most_two_warm_ups_per_chapter(solution: Path) -> None:
    nb = read_notebook(solution)
    lengths = {e.name: len(answer_lines(cell_source(nb["cells"][e.cell_index]))) for e in exercises_in(nb)}
    short = sorted(name for name, n in lengths.items() if n <= SHORT)
    assert len(short) <= MAX_SHORT, f"{solution.name}: {len(short)} answers of {SHORT} lines or fewer: {short}"
