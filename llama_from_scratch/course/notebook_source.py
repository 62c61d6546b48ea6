"""Reading exercise notebooks: cells, exercise markers and solution regions.

Shared by the grader (which imports a notebook's definitions) and the release command (which
turns solution notebooks into exercise notebooks). Notebooks are plain JSON (nbformat 4), read
with the standard library so that grading needs nothing beyond the package itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXERCISE_MARKER = re.compile(r"^#\s*EXERCISE\s+(?P<name>[A-Za-z_]\w*)\s*(?:\((?P<points>\d+)\s*points?\))?",
                             re.MULTILINE)
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"


@dataclass(frozen=True)
class Exercise:
    """An exercise declared in a notebook by a ``# EXERCISE name (N points)`` line."""

    name: str
    points: int
    cell_index: int


def read_notebook(path: str | Path) -> dict[str, Any]:
    """Load a notebook's JSON; ``ValueError`` with the reason if it is not a readable notebook."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"{path} is not a readable notebook: {exc}") from exc
    return parse_notebook(data, str(path))


def parse_notebook(data: bytes, name: str) -> dict[str, Any]:
    """A notebook from its bytes; ``ValueError`` if they are not a Jupyter notebook whose cells
    have string (or list of strings) sources."""
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{name} is not a readable notebook: {exc}") from exc
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{name} is not a Jupyter notebook (no 'cells' list)")
    for index, cell in enumerate(nb["cells"]):
        source = cell.get("source", "") if isinstance(cell, dict) else None
        if not isinstance(source, str) and not (isinstance(source, list) and all(isinstance(s, str) for s in source)):
            raise ValueError(f"{name}: cell {index} is not a notebook cell with a text source")
    return nb


def cell_source(cell: dict[str, Any]) -> str:
    """A cell's source as one string (nbformat allows a string or a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def exercises_in(nb: dict[str, Any]) -> list[Exercise]:
    """The exercises a notebook declares, in order. Points default to 1 when not given."""
    found = []
    for index, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        for match in EXERCISE_MARKER.finditer(cell_source(cell)):
            found.append(Exercise(match["name"], int(match["points"] or 1), index))
    return found


def replace_solutions(source: str, stub: str = 'raise NotImplementedError("Exercise: write your code here")') -> str:
    """Replace every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region with ``stub``.

    The stub takes the indentation of the BEGIN line, so a function body stays valid Python.
    Unbalanced markers raise ``ValueError`` (a solution must never leak into an exercise).
    """
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped.startswith(BEGIN_SOLUTION):
            if inside:
                raise ValueError(f"line {number}: {BEGIN_SOLUTION} inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            newline = "\n" if line.endswith("\n") else ""
            out.append(f"{indent}{stub}{newline}")
        elif stripped.startswith(END_SOLUTION):
            if not inside:
                raise ValueError(f"line {number}: {END_SOLUTION} without a {BEGIN_SOLUTION}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN_SOLUTION} without a matching {END_SOLUTION}")
    return "".join(out)
