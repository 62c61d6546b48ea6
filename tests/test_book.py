"""The committed notebooks hold what a reader is promised: every figure a cell draws, no error
outputs, no paths of the machine they ran on, every code cell executed, and every repository file
they name present in the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "chapters").glob("*.ipynb")) + sorted((REPO / "solutions").glob("*.ipynb"))
# A cell draws when its code (comments aside) makes or shows a matplotlib figure.
DRAWS = re.compile(r"\bplt\.(show|subplots|subplot|figure|plot|imshow|hist|bar|barh|scatter|matshow)\(|\bfig\.show\(")
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/|/tmp/)")
# Paths of repository files as prose and code name them: docs/REFERENCES.md, data/stories/README.md, ...
REPO_PATH = re.compile(r"\b((?:docs|data|tools|benchmarks|tests|chapters|solutions|exercises|llama_from_scratch)"
                       r"/[\w./-]*\w\.(?:md|py|ipynb|json|jsonl|gz|csv|toml|yml))\b")
BARE_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _code(cell: dict) -> str:
    return "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith("#"))


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_checks_see_the_notebooks() -> None:
    assert len(NOTEBOOKS) >= 27
    drawing = [p for p in NOTEBOOKS for c in _cells(p) if c["cell_type"] == "code" and DRAWS.search(_code(c))]
    assert len(drawing) >= 20   # the detector finds the book's plots


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_every_cell_that_draws_holds_its_image(path: Path) -> None:
    missing = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and DRAWS.search(_code(c))
               and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not missing, f"{_name(path)}: cells {missing} draw a figure but hold no image (execute with the inline backend)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_executed_without_errors_or_machine_paths(path: Path) -> None:
    problems = []
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code" or not _code(cell).strip():
            continue
        if cell.get("execution_count") is None:
            problems.append(f"cell {i} was not executed")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell {i} has an error output")
            text = json.dumps({"text": output.get("text", ""),
                               "data": {k: v for k, v in output.get("data", {}).items() if not k.startswith("image/")}})
            if MACHINE_PATH.search(text):
                problems.append(f"cell {i} shows a machine path {MACHINE_PATH.search(text).group(0)}")
    assert not problems, f"{_name(path)}: {problems}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_files_the_notebook_names_are_in_the_repository(path: Path) -> None:
    missing = set()
    for cell in _cells(path):
        text = "".join(cell["source"])
        missing |= {p for p in REPO_PATH.findall(text) if not (REPO / p).exists()}
        missing |= {n for n in BARE_DOC.findall(text) if not ((REPO / n).exists() or (REPO / "docs" / n).exists())}
    assert not missing, f"{_name(path)} names files that are not in the repository: {sorted(missing)}"
