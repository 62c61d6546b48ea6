"""Wall time of grading a class: 20 students x 2 chapters with ``--batch``.

Measured on a 2-core AMD EPYC (AVX2) CPU, 2026-12-07, jobs=2, time limit 5 s per exercise, every
notebook's code in its bubblewrap sandbox: 40 notebooks, 160 exercises in 80 s, 2.0 s per notebook
(including five endless loops that cost their time limit and five crashed processes).

The class is built from the solution notebooks in a temporary folder: of every four students one
hands in the solutions, one the untouched stubs, one a notebook with one broken exercise (an
endless loop in chapter 1, which costs the time limit; a crash of the interpreter in chapter 2,
which costs a fresh process for the exercise after it) and one a notebook with one wrong answer. Every
notebook's code runs in its own sandboxed process (Python start and ``import torch``: most of the
cost), the checks in the grader, ``--jobs`` notebooks at a time.

    python benchmarks/batch_grading.py                  # 20 students, jobs = CPU cores
    python benchmarks/batch_grading.py --students 40 --jobs 4 --timeout 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from llama_from_scratch.course.batch_grade import Limits, Settings, grade_batch
from llama_from_scratch.course.notebook_source import cell_source, exercises_in, read_notebook
from llama_from_scratch.course.release import dumps_notebook, make_exercise_notebook

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = ("ch01_tokenization", "ch02_cross_entropy")


def _break(nb: dict, exercise: str, body: str) -> dict:
    """Put ``body`` at the start of the exercise's function."""
    for cell in nb["cells"]:
        source = cell_source(cell)
        if f"def {exercise}(" in source:
            lines = source.split("\n")
            at = next(i for i, line in enumerate(lines) if line.startswith(f"def {exercise}(")) + 1
            lines[at:at] = ["    " + line for line in body.split("\n")]
            cell["source"] = "\n".join(lines)
    return nb


def build_class(root: Path, students: int) -> None:
    for i in range(students):
        for chapter in CHAPTERS:
            solution = read_notebook(REPO / "solutions" / f"{chapter}.ipynb")
            names = [e.name for e in exercises_in(solution)
                     if f"def {e.name}(" in cell_source(solution["cells"][e.cell_index])]  # functions only
            kind = i % 4
            if kind == 1:
                nb = make_exercise_notebook(solution)
            elif kind == 2:
                nb = _break(solution, names[-2], "while True:\n    pass" if chapter == CHAPTERS[0] else "import os\nos._exit(1)")
            elif kind == 3:
                nb = _break(solution, names[-1], "return None")
            else:
                nb = solution
            path = root / f"student{i:02d}" / f"{chapter}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dumps_notebook(nb), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per exercise")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "submissions"
        build_class(root, args.students)
        settings = Settings(solutions=REPO / "solutions", limits=Limits(timeout=args.timeout, grace=2.0))
        started = time.perf_counter()
        report = grade_batch(root, settings, jobs=args.jobs)
        seconds = time.perf_counter() - started
    print(report.table())
    print(f"\n{args.students} students x {len(CHAPTERS)} chapters = {len(report.notebooks)} notebooks, "
          f"{len(report.rows)} exercises, jobs={args.jobs}, {os.cpu_count()} CPU cores, "
          f"isolation: {report.settings['isolation']}")
    print(f"wall time {seconds:.1f} s: {seconds / len(report.notebooks):.2f} s per notebook")
    return 0


if __name__ == "__main__":
    sys.exit(main())
