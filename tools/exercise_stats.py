"""Length of every exercise's answer in the solution notebooks: the non-blank, non-comment lines
between ``### BEGIN SOLUTION`` and ``### END SOLUTION``.

    python tools/exercise_stats.py            # per chapter, then the median and the short answers
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_from_scratch.course.notebook_source import cell_source, exercises_in, read_notebook  # noqa: E402

SHORT = 3  # an answer of at most this many lines is a warm-up


def answer_lines(source: str) -> int:
    """Code lines inside the solution regions of one cell."""
    count, inside = 0, False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("### BEGIN SOLUTION"):
            inside = True
        elif stripped.startswith("### END SOLUTION"):
            inside = False
        elif inside and stripped and not stripped.startswith("#"):
            count += 1
    return count


def solution_lengths(solutions: Path) -> dict[str, dict[str, int]]:
    """chapter -> exercise -> answer lines."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted(solutions.glob("ch*.ipynb")):
        nb = read_notebook(path)
        out[path.stem] = {e.name: answer_lines(cell_source(nb["cells"][e.cell_index])) for e in exercises_in(nb)}
    return out


def main() -> int:
    lengths = solution_lengths(Path(__file__).resolve().parent.parent / "solutions")
    every = []
    for chapter, answers in lengths.items():
        print(f"{chapter}: " + ", ".join(f"{name} {n}" for name, n in answers.items()))
        every += list(answers.values())
    short = sum(n <= SHORT for n in every)
    print(f"\n{len(every)} exercises; median answer {statistics.median(every):g} lines; "
          f"{short} of {len(every)} answers are {SHORT} lines or fewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
