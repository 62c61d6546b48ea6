"""The grader must report every exercise with a verdict and a reason, and never crash on what a
student's notebook contains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_from_scratch.course.grade import grade_notebook, load_definitions, main


def check_square(fn) -> None:
    import random

    x = random.randint(-1000, 1000)
    got = fn(x)
    assert got == x * x, f"square({x}) returned {got!r}, expected {x * x}"


def check_double(fn) -> None:
    assert fn(3) == 6, f"double(3) returned {fn(3)!r}, expected 6"


CHECKS = {"square": check_square, "double": check_double}


def write_notebook(path: Path, *cells: str) -> Path:
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None}
                    for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def grade(path: Path, timeout: float = 5.0) -> dict:
    return {r.exercise: r for r in grade_notebook(path, checks=CHECKS, timeout=timeout)}


def test_correct_answers_pass_with_points(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb",
                        "# EXERCISE square (3 points)\ndef square(x):\n    return x * x",
                        "# EXERCISE double\ndef double(x):\n    return helper(x)",
                        "def helper(x):\n    return 2 * x\n\nrun_training_forever()")  # the call is not executed
    results = grade(nb)
    assert results["square"].passed and results["square"].points == 3 == results["square"].max_points
    assert results["double"].passed and results["double"].points == 1


def test_stub_wrong_answer_and_missing_function(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb",
                        "# EXERCISE square (2 points)\ndef square(x):\n    raise NotImplementedError()")
    results = grade(nb)
    assert not results["square"].passed and "NotImplementedError" in results["square"].reason
    assert results["square"].points == 0 and results["square"].max_points == 2
    assert not results["double"].passed and "not defined" in results["double"].reason
    wrong = write_notebook(tmp_path / "wrong.ipynb", "def square(x):\n    return x + x")
    reason = grade(wrong)["square"].reason
    assert "expected" in reason


def test_syntax_error_fails_only_its_exercise(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb",
                        "# EXERCISE square\ndef square(x):\n    return x *",
                        "def double(x):\n    return 2 * x")
    results = grade(nb)
    assert not results["square"].passed and "syntax error" in results["square"].reason
    assert results["double"].passed


def test_exceptions_exit_and_endless_loops_become_verdicts(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb",
                        "import sys\ndef square(x):\n    sys.exit(3)",
                        "def double(x):\n    while True:\n        pass")
    results = grade(nb, timeout=1.0)
    assert "sys.exit(3)" in results["square"].reason
    assert "within 1 s" in results["double"].reason
    crash = write_notebook(tmp_path / "crash.ipynb", "def square(x):\n    return {}[x]")
    assert "KeyError" in grade(crash)["square"].reason and "cell 0, line 2" in grade(crash)["square"].reason


def test_failing_import_is_reported_and_other_cells_load(tmp_path: Path) -> None:
    nb = write_notebook(tmp_path / "nb.ipynb", "import not_a_module_anywhere", "%matplotlib inline\ndef square(x):\n    return x*x")
    loaded = load_definitions(nb)
    assert "not_a_module_anywhere" in loaded.cell_errors[0]
    assert grade(nb)["square"].passed


def test_not_a_notebook_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "ch01_tokenization.ipynb"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="not a readable notebook"):
        grade_notebook(bad, checks=CHECKS)


def test_cli_reports_each_exercise_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    unknown = write_notebook(tmp_path / "homework.ipynb", "x = 1")
    assert main([str(unknown)]) == 2
    assert "no chapter named 'homework'" in capsys.readouterr().err


def test_cli_runs_as_a_module_on_a_solution(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    solution = sorted((repo / "solutions").glob("ch*.ipynb"))[0]
    done = subprocess.run([sys.executable, "-m", "llama_from_scratch.grade", str(solution)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout and " 0 failed" in done.stdout
