"""Generate the exercise notebooks from the solution notebooks (one source of truth).

    python -m llama_from_scratch.release                # solutions/ -> exercises/
    python -m llama_from_scratch.release --check        # exit 1 if exercises/ is out of date

Every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes
``raise NotImplementedError(...)``, and all outputs are cleared (an output could show an answer).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from llama_from_scratch.notebook_source import cell_source, read_notebook, replace_solutions


def make_exercise_notebook(solution: dict[str, Any]) -> dict[str, Any]:
    """The exercise version of a solution notebook (a new dict; the input is left untouched)."""
    nb = copy.deepcopy(solution)
    for index, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") == "code":
            try:
                cell["source"] = replace_solutions(cell_source(cell))
            except ValueError as exc:
                raise ValueError(f"cell {index}: {exc}") from exc
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def dumps_notebook(nb: dict[str, Any]) -> str:
    """Serialise a notebook the way Jupyter does (indent 1, keys sorted, trailing newline)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def release(solutions: Path, out: Path) -> list[Path]:
    """Write ``out/<name>.ipynb`` for every ``solutions/ch*.ipynb``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(solutions.glob("ch*.ipynb")):
        target = out / path.name
        target.write_text(dumps_notebook(make_exercise_notebook(read_notebook(path))), encoding="utf-8")
        written.append(target)
    return written


def stale_exercises(solutions: Path, exercises: Path) -> list[str]:
    """Names of exercise notebooks that are missing, extra, or differ from what would be generated."""
    problems = []
    expected = {p.name: p for p in sorted(solutions.glob("ch*.ipynb"))}
    present = {p.name for p in exercises.glob("ch*.ipynb")}
    for name, path in expected.items():
        generated = dumps_notebook(make_exercise_notebook(read_notebook(path)))
        committed = exercises / name
        if name not in present:
            problems.append(f"{name}: missing from {exercises}")
        elif committed.read_text(encoding="utf-8") != generated:
            problems.append(f"{name}: differs from the version generated from {path}")
    problems += [f"{name}: has no solution notebook" for name in sorted(present - expected.keys())]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.release", description=__doc__.split("\n\n")[0])
    parser.add_argument("--solutions", type=Path, default=Path("solutions"))
    parser.add_argument("--out", type=Path, default=Path("exercises"))
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        print(f"no solutions folder at {args.solutions}", file=sys.stderr)
        return 2
    if args.check:
        problems = stale_exercises(args.solutions, args.out)
        for p in problems:
            print(p)
        print("exercises are up to date" if not problems else "run: python -m llama_from_scratch.release")
        return 1 if problems else 0
    for path in release(args.solutions, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
