"""The GitHub Classroom autograding config: one test per chapter awarding the chapter's points
(from the solutions), and the committed file is what the generator writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_from_scratch.course.classroom import CONFIG_PATH, autograding_config, chapter_points, dumps_config, main
from llama_from_scratch.course.notebook_source import exercises_in, read_notebook

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "solutions"
KEYS = {"name", "setup", "run", "input", "output", "comparison", "timeout", "points"}

pytestmark = pytest.mark.skipif(not list(SOLUTIONS.glob("ch*.ipynb")), reason="no solution notebooks yet")


def test_committed_autograding_json_matches_the_generator() -> None:
    committed = (REPO / CONFIG_PATH).read_text(encoding="utf-8")
    assert committed == dumps_config(autograding_config(SOLUTIONS)), (
        "run: python -m llama_from_scratch.classroom  (the solutions' chapters or points changed)")


def test_one_test_per_chapter_with_its_points() -> None:
    config = autograding_config(SOLUTIONS)
    chapters = sorted(p.stem for p in SOLUTIONS.glob("ch*.ipynb"))
    assert [t["name"] for t in config["tests"]] == chapters
    for test in config["tests"]:
        assert set(test) == KEYS
        assert test["comparison"] in ("exact", "included", "regex") and test["output"] == "" and test["input"] == ""
        assert isinstance(test["timeout"], int) and 1 <= test["timeout"] <= 60  # minutes
        assert test["run"] == f"python -m llama_from_scratch.grade exercises/{test['name']}.ipynb"
        declared = exercises_in(read_notebook(SOLUTIONS / f"{test['name']}.ipynb"))
        assert test["points"] == sum(e.points for e in declared) > 0
    assert "pip install" in config["tests"][0]["setup"] and all(t["setup"] == "" for t in config["tests"][1:])


def test_per_exercise_variant_sums_to_the_same_points() -> None:
    config = autograding_config(SOLUTIONS, per_exercise=True)
    assert sum(t["points"] for t in config["tests"]) == sum(sum(p.values()) for p in chapter_points(SOLUTIONS).values())
    assert all(" --only " in t["run"] for t in config["tests"])


def test_cli_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "autograding.json"
    assert main(["--solutions", str(SOLUTIONS), "--check", "--out", str(out)]) == 1
    assert main(["--solutions", str(SOLUTIONS), "--out", str(out)]) == 0
    assert main(["--solutions", str(SOLUTIONS), "--check", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == autograding_config(SOLUTIONS)


def test_the_run_command_grades_a_chapter_and_its_exit_code_decides(tmp_path: Path) -> None:
    """What GitHub Classroom runs: exit 0 on the solution, non-zero on the stubs, --only works."""
    from llama_from_scratch.course.grade import main as grade_main
    from llama_from_scratch.course.release import student_release

    solution = sorted(SOLUTIONS.glob("ch*.ipynb"))[0]
    assert grade_main([str(solution)]) == 0
    student_release(SOLUTIONS, tmp_path / "rel")
    stub = tmp_path / "rel" / "exercises" / solution.name
    assert grade_main([str(stub)]) == 1
    first = exercises_in(read_notebook(solution))[0].name
    assert grade_main([str(solution), "--only", first]) == 0
    assert grade_main([str(solution), "--only", "no_such_exercise"]) == 2
