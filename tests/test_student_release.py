"""The student release: exercise notebooks, a README, requirements and the autograding config,
generated from the solutions, with no solution text anywhere in it (folder or zip)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from llama_from_scratch.classroom import RELEASE_SETUP, autograding_config, dumps_config
from llama_from_scratch.grade import grade_notebook
from llama_from_scratch.notebook_source import BEGIN_SOLUTION, END_SOLUTION, cell_source, read_notebook
from llama_from_scratch.release import dumps_notebook, main, make_exercise_notebook, student_release

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"

pytestmark = pytest.mark.skipif(not list(SOLUTIONS.glob("ch*.ipynb")), reason="no solution notebooks yet")


def solution_regions(nb: dict) -> tuple[list[str], str]:
    """The text of every BEGIN/END SOLUTION region, and the notebook's code outside them."""
    regions, outside = [], []
    for cell in nb["cells"]:
        inside, current = False, []
        for line in cell_source(cell).splitlines():
            if line.strip().startswith(BEGIN_SOLUTION):
                inside, current = True, []
            elif line.strip().startswith(END_SOLUTION):
                inside = False
                regions.append("\n".join(current))
            elif inside:
                current.append(line)
            else:
                outside.append(line)
    return regions, "\n".join(outside)


def solution_needles() -> list[str]:
    """What must not appear in a release: each solution region as a whole, and each of its lines,
    when specific to the solution (not trivial, not also written outside the solution regions)."""
    all_regions, all_outside = [], ""
    for path in sorted(SOLUTIONS.glob("ch*.ipynb")):
        regions, outside = solution_regions(read_notebook(path))
        assert regions, f"{path.name} has no solution regions"
        all_regions += regions
        all_outside += "\n" + outside
    # a line also written outside the solutions of any notebook (say `with torch.no_grad():` in a
    # demo cell of another chapter) is no leak
    return [text for region in all_regions
            for text in [region.strip()] + [line.strip() for line in region.splitlines()]
            if len(text) >= 12 and text not in all_outside]


def notebook_text(nb: dict) -> str:
    """Every cell's source, outputs and attachments/metadata, as plain text."""
    parts = []
    for cell in nb["cells"]:
        parts.append(cell_source(cell))
        parts.append(json.dumps(cell.get("outputs", []), ensure_ascii=False))
        for output in cell.get("outputs", []):
            for value in list(output.get("data", {}).values()) + [output.get("text", "")]:
                parts.append("".join(value) if isinstance(value, list) else str(value))
    return "\n".join(parts)


def test_needles_are_found_in_the_solutions_themselves() -> None:
    """The leak test can fail: every needle is found in the solution notebooks' decoded text."""
    text = "\n".join(notebook_text(read_notebook(p)) for p in SOLUTIONS.glob("ch*.ipynb"))
    assert all(needle in text for needle in solution_needles())


def release_texts(target: Path) -> dict[str, str]:
    if target.suffix == ".zip":
        with zipfile.ZipFile(target) as zf:
            return {name: zf.read(name).decode("utf-8") for name in zf.namelist()}
    return {str(p.relative_to(target)): p.read_text(encoding="utf-8") for p in target.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["release", "release.zip"])
def test_release_has_exercises_readme_and_no_solution_text(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    assert main(["--solutions", str(SOLUTIONS), "--student-release", str(target),
                 "--package-spec", "llama-from-scratch @ git+https://example.org/course.git"]) == 0
    texts = release_texts(target)
    prefix = "release/" if name.endswith(".zip") else ""
    chapters = sorted(p.name for p in SOLUTIONS.glob("ch*.ipynb"))
    assert sorted(texts) == sorted([f"{prefix}exercises/{c}" for c in chapters]
                                   + [f"{prefix}{n}" for n in ("README.md", "requirements.txt",
                                                               ".github/classroom/autograding.json")])
    needles = solution_needles()
    assert len(needles) > 10
    for file, text in texts.items():
        if file.endswith(".ipynb"):  # the JSON escapes quotes and newlines: search the decoded text too
            text += "\n" + notebook_text(json.loads(text))
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, file
        for needle in needles:
            assert needle not in text, f"solution text {needle!r} leaked into {file}"
    for chapter in chapters:
        nb = json.loads(texts[f"{prefix}exercises/{chapter}"])
        assert dumps_notebook(nb) == dumps_notebook(make_exercise_notebook(read_notebook(SOLUTIONS / chapter)))
        assert all(c.get("outputs", []) == [] for c in nb["cells"])
    readme = texts[f"{prefix}README.md"]
    assert "check(" in readme and "python -m llama_from_scratch.grade" in readme and "NotImplementedError" in readme
    assert texts[f"{prefix}requirements.txt"] == "llama-from-scratch @ git+https://example.org/course.git\n"
    assert texts[f"{prefix}.github/classroom/autograding.json"] == dumps_config(
        autograding_config(SOLUTIONS, "exercises", RELEASE_SETUP))


def test_released_notebooks_fail_every_exercise_as_stubs(tmp_path: Path) -> None:
    student_release(SOLUTIONS, tmp_path / "rel")
    notebook = sorted((tmp_path / "rel" / "exercises").glob("ch*.ipynb"))[0]
    results = grade_notebook(notebook)
    assert results and all(not r.passed and "NotImplementedError" in r.reason for r in results)


def test_release_refuses_a_folder_in_use(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "homework.txt").write_text("mine")
    assert main(["--solutions", str(SOLUTIONS), "--student-release", str(tmp_path / "busy")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "homework.txt").read_text() == "mine"
