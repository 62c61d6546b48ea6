"""Batch grading of a whole class: every notebook's code in its own limited process (a sandbox
where bubblewrap works, the labelled unsafe fallback elsewhere), so a notebook that hangs, crashes
the interpreter, floods its output or touches other files fails its own exercises and nothing
else, and nothing outside the submissions folder changes. The chapters are toys (a private checks
package written by the test), so that the machinery is tested apart from the book's exercises."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest

from llama_from_scratch.course.batch_grade import Limits, Settings, find_submissions, grade_batch, write_reports
from llama_from_scratch.course.grade import main
from llama_from_scratch.course.notebook_source import cell_source, read_notebook
from llama_from_scratch.course.release import dumps_notebook, make_exercise_notebook
from llama_from_scratch.course.sandbox import bubblewrap_problem

REPO = Path(__file__).resolve().parent.parent
CH1, CH2 = "ch01_toy", "ch02_toy"
CH1_POINTS = {"square": 1, "double": 2, "count_words": 3}
CH1_EXERCISES = list(CH1_POINTS)
TOY_CHECKS = {
    CH1: (
        "import random, torch\n\n"
        "def check_square(fn):\n    x = random.randint(-99, 99)\n    assert fn(x) == x * x, 'square: wrong value'\n\n"
        "def check_double(fn):\n    x = torch.randn(3, 4)\n    got = fn(x)\n"
        "    assert isinstance(got, torch.Tensor) and torch.equal(got, 2 * x), 'double: wrong tensor'\n\n"
        "def check_count_words(fn):\n    words = random.choice(['a b a', 'x y z x x'])\n"
        "    got = fn(words)\n    expected = {w: words.split().count(w) for w in set(words.split())}\n"
        "    assert got == expected, 'count_words: wrong counts'\n\n"
        "CHECKS = {'square': check_square, 'double': check_double, 'count_words': check_count_words}\n"),
    CH2: ("def check_negate(fn):\n    assert fn(3) == -3, 'negate: wrong'\n\nCHECKS = {'negate': check_negate}\n"),
}
SOLUTIONS = {
    CH1: ["import torch\n# EXERCISE square (1 point)\ndef square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION",
          "# EXERCISE double (2 points)\ndef double(x):\n    ### BEGIN SOLUTION\n    return x + x\n    ### END SOLUTION",
          "# EXERCISE count_words (3 points)\ndef count_words(text):\n    ### BEGIN SOLUTION\n    counts = {}\n"
          "    for w in text.split():\n        counts[w] = counts.get(w, 0) + 1\n    return counts\n    ### END SOLUTION"],
    CH2: ["# EXERCISE negate (5 points)\ndef negate(x):\n    ### BEGIN SOLUTION\n    return -x\n    ### END SOLUTION"],
}


def notebook(cells: list[str]) -> dict:
    return {"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None}
                      for c in cells], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def toy_course(tmp_path: Path) -> tuple[Settings, Path]:
    """A checks package (toychecks) and its solution notebooks, in ``tmp_path`` (forgetting any
    toychecks an earlier test imported from its own folder)."""
    for name in [m for m in sys.modules if m == "toychecks" or m.startswith("toychecks.")]:
        del sys.modules[name]
    package = tmp_path / "pkgs" / "toychecks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for chapter, code in TOY_CHECKS.items():
        (package / f"{chapter}.py").write_text(code)
    solutions = tmp_path / "solutions"
    for chapter, cells in SOLUTIONS.items():
        save(notebook(cells), solutions / f"{chapter}.ipynb")
    return Settings(checks_package="toychecks", python_path=[str(tmp_path / "pkgs")], solutions=solutions,
                    limits=Limits(timeout=3.0, grace=1.5, memory_mb=3072)), solutions


def solution(chapter: str) -> dict:
    return notebook(SOLUTIONS[chapter])


def sabotage(nb: dict, exercise: str, code: str) -> dict:
    """Put ``code`` (function-body lines) at the start of the exercise's function body."""
    for cell in nb["cells"]:
        source = cell_source(cell)
        if cell["cell_type"] == "code" and f"def {exercise}(" in source:
            lines = source.split("\n")
            at = next(i for i, line in enumerate(lines) if line.startswith(f"def {exercise}(")) + 1
            lines[at:at] = ["    " + line for line in code.strip("\n").split("\n")]
            cell["source"] = "\n".join(lines)
            return nb
    raise AssertionError(f"no cell defines {exercise}")


def save(nb: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_notebook(nb), encoding="utf-8")


def tree_hashes(root: Path, skip: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


def make_class(tmp_path: Path) -> tuple[Path, Path]:
    subs = tmp_path / "submissions"
    canary = tmp_path / "canary.txt"
    canary.write_text("do not delete me")
    alice_nb = subs / "alice" / f"{CH1}.ipynb"
    save(solution(CH1), alice_nb)                                             # all correct, 2 chapters
    save(solution(CH2), subs / "alice" / f"{CH2}.ipynb")
    save(make_exercise_notebook(solution(CH1)), subs / "bob" / f"{CH1}.ipynb")  # untouched stubs
    nb = sabotage(solution(CH1), "square", "while True:\n    pass")             # endless loops, one
    save(sabotage(nb, "count_words",                                            # swallowing the alarm
                  "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n    except BaseException:\n        pass"),
         subs / "carol" / f"{CH1}.ipynb")
    save(sabotage(solution(CH1), "count_words", "return ("), subs / "dave" / f"{CH1}.ipynb")  # syntax error
    nb = sabotage(solution(CH1), "double", "import os\nos._exit(0)")           # kills the interpreter
    save(sabotage(nb, "count_words", "import sys\nsys.exit(3)"), subs / "erin" / f"{CH1}.ipynb")
    nb = sabotage(solution(CH1), "square", f"open({str(tmp_path / 'evil.txt')!r}, 'w').write('x')")
    nb = sabotage(nb, "double", f"print(open({str(alice_nb)!r}).read())")       # a classmate's work
    save(sabotage(nb, "count_words", f"import os\nos.remove({str(canary)!r})"), subs / "frank" / f"{CH1}.ipynb")
    save(sabotage(solution(CH1), "square",                                      # megabytes of output
                  "import os, sys\nprint('y' * 3_000_000)\nos.write(1, b'x' * 3_000_000)\nsys.stderr.write('z' * 100_000)"),
         subs / "grace" / f"{CH1}.ipynb")
    nb = sabotage(solution(CH1), "double", "import ctypes\nctypes.string_at(0)")  # segfault
    save(sabotage(nb, "count_words", "block = bytearray(16 * 1024 ** 3)"), subs / "heidi" / f"{CH1}.ipynb")
    (subs / "ivan").mkdir()
    (subs / "ivan" / "notes.ipynb").write_text('{"cells": []}')                   # nothing gradable
    judy = solution(CH1)
    for cell in judy["cells"]:                                                   # inflates her points
        cell["source"] = cell_source(cell).replace("# EXERCISE square (1 point)", "# EXERCISE square (100 points)")
    save(judy, subs / "judy" / "work" / f"{CH1} (1).ipynb")                      # renamed, in a subfolder
    return subs, canary


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["sandbox", "unsafe"])
def test_a_class_with_broken_and_hostile_notebooks(tmp_path: Path, isolation: str) -> None:
    if isolation == "sandbox" and bubblewrap_problem():
        pytest.skip(f"bubblewrap unavailable: {bubblewrap_problem()}")
    settings, _ = toy_course(tmp_path)
    settings.isolation = isolation
    subs, canary = make_class(tmp_path)
    out = tmp_path / "out"
    before = tree_hashes(tmp_path, skip=out)
    report = grade_batch(subs, settings, jobs=2)
    csv_path, json_path, summary_path = write_reports(report, out / "report.csv")

    assert tree_hashes(tmp_path, skip=out) == before, "grading changed files outside its temp folders"
    assert canary.read_text() == "do not delete me" and not (tmp_path / "evil.txt").exists()

    assert report.students == ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
    assert report.chapters == [CH1, CH2]
    rows = {(r.student, r.chapter, r.exercise): r for r in report.rows}
    assert len(rows) == len(report.rows) == 10 * 4

    def verdicts(student: str) -> dict[str, tuple[bool, str]]:
        return {e: (rows[student, CH1, e].passed, rows[student, CH1, e].reason) for e in CH1_EXERCISES}

    def expect(student: str, failures: dict[str, str]) -> None:
        for e, (passed, reason) in verdicts(student).items():
            if e in failures:
                assert not passed and failures[e] in reason, (student, e, reason)
                assert rows[student, CH1, e].points == 0
            else:
                assert passed, (student, e, reason)
                assert rows[student, CH1, e].points == CH1_POINTS[e]
            assert rows[student, CH1, e].max_points == CH1_POINTS[e]

    expect("alice", {})
    assert rows["alice", CH2, "negate"].passed
    expect("bob", {e: "NotImplementedError" for e in CH1_EXERCISES})
    expect("carol", {"square": "did not finish within 3 s", "count_words": "did not finish within 3 s"})
    expect("dave", {"count_words": "syntax error"})
    expect("erin", {"double": "ended the student's process", "count_words": "sys.exit(3)"})
    if isolation == "sandbox":  # nothing outside the sandbox exists for it (its writes land nowhere)
        expect("frank", {e: "No such file" for e in CH1_EXERCISES})
    else:  # the unsafe fallback refuses writes outside its folder but does not hide files
        expect("frank", {"square": "refused", "count_words": "refused"})
    expect("grace", {})
    expect("heidi", {"double": "segmentation fault", "count_words": "MemoryError"})
    expect("ivan", {e: "no notebook submitted" for e in CH1_EXERCISES})
    expect("judy", {})
    for student in report.students[1:]:
        assert not rows[student, CH2, "negate"].passed and "no notebook submitted" in rows[student, CH2, "negate"].reason

    logs = {(n.student, n.chapter): n for n in report.notebooks}
    assert logs["judy", CH1].notebook == f"judy/work/{CH1} (1).ipynb"
    assert any("ivan" in w and "notes.ipynb" in w for w in report.warnings)

    # the files: rows in CSV, totals in JSON and in the summary
    with open(csv_path, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["student"], r["chapter"], r["exercise"]) for r in csv_rows] == [
        (r.student, r.chapter, r.exercise) for r in report.rows]
    assert {(r["student"], r["passed"]) for r in csv_rows if r["exercise"] == "square"} >= {("alice", "True"), ("bob", "False")}
    data = json.loads(json_path.read_text())
    assert data["students"]["alice"]["points"] == 11 == data["students"]["alice"]["max_points"]
    assert data["students"]["judy"]["points"] == 6 and data["students"]["judy"]["max_points"] == 11
    assert data["students"]["heidi"]["chapters"][CH1] == {"points": 1, "max_points": 6, "passed": 1, "failed": 2,
                                                          "submitted": True}
    assert data["chapters"][CH1]["max_points"] == 6 and data["chapters"][CH1]["submitted"] == 9
    with open(summary_path, newline="") as f:
        summary = {r["student"]: r for r in csv.DictReader(f)}
    assert summary["bob"]["points"] == "0" and summary["alice"]["percent"] == "100.0"
    assert summary["dave"][f"{CH1}_points"] == "3"
    table = report.table()
    assert "alice" in table and "missing" in table and "100.0" in table
    assert report.seconds < 180


def test_submissions_are_matched_to_chapters(tmp_path: Path) -> None:
    for name in [f"a/{CH1}.ipynb", f"a/ch01-copy.ipynb", f"b/sub/ch2.ipynb", "b/.ipynb_checkpoints/ch01_x.ipynb",
                 "c/homework.ipynb", ".hidden/ch01_tokenization.ipynb"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    warnings: list[str] = []
    students, subs = find_submissions(tmp_path, [CH1, CH2], warnings)
    assert students == ["a", "b", "c"]
    assert [(s.student, s.chapter, s.path.name) for s in subs] == [
        ("a", CH1, f"{CH1}.ipynb"), ("b", CH2, "ch2.ipynb")]
    assert any("several notebooks" in w and "ch01-copy" in w for w in warnings)
    assert any("homework.ipynb" in w for w in warnings)


def test_cli_batch_writes_reports_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    settings, solutions = toy_course(tmp_path)
    save(solution(CH1), tmp_path / "subs" / "ann" / f"{CH1}.ipynb")
    save(make_exercise_notebook(solution(CH1)), tmp_path / "subs" / "ben" / f"{CH1}.ipynb")
    code = main(["--batch", str(tmp_path / "subs"), "--out", str(tmp_path / "r" / "grades.csv"), "--jobs", "2",
                 "--timeout", "5", "--solutions", str(solutions), "--checks-package", "toychecks",
                 "--checks-path", str(tmp_path / "pkgs")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ann" in printed and "6/6" in printed and "0/6" in printed
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"grades.csv", "grades.json", "grades_summary.csv"}
    assert main(["--batch", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit):
        main(["--batch", str(tmp_path / "subs"), str(tmp_path / "x.ipynb")])


def test_private_checks_package_and_points_without_solutions(tmp_path: Path) -> None:
    """An instructor's own checks (not installed: --checks-path) grade a chapter; with no solution
    notebook the points come from the student's notebook, with a warning."""
    package = tmp_path / "pkgs" / "privchecks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ch01_square.py").write_text(
        "import random\n\ndef check_square(fn):\n    x = random.randint(-99, 99)\n"
        "    assert fn(x) == x * x, f'square({x}) returned {fn(x)!r}'\n\nCHECKS = {'square': check_square}\n")
    cells = ["# EXERCISE square (4 points)\ndef square(x):\n    return x * x", "# EXERCISE square (4 points)\ndef square(x):\n    return 10 ** 6"]
    for student, cell in zip(["ok", "memorised"], cells):
        nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": cell}],
              "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        save(nb, tmp_path / "subs" / student / "ch01_square.ipynb")
    settings = Settings(checks_package="privchecks", python_path=[str(tmp_path / "pkgs")], solutions=None,
                        limits=Limits(timeout=5.0))
    report = grade_batch(tmp_path / "subs", settings, jobs=2)
    rows = {r.student: r for r in report.rows}
    assert rows["ok"].passed and rows["ok"].points == 4 == rows["ok"].max_points
    assert not rows["memorised"].passed and "returned 1000000" in rows["memorised"].reason
    assert any("no solution notebook" in w for w in report.warnings)


def test_points_without_solutions_for_a_student_missing_a_chapter(tmp_path: Path) -> None:
    """With no solution notebooks, a student who submitted nothing for a chapter is scored out of
    the chapter's real points (the most common declaration among the other students' notebooks,
    measured before: 1 point an exercise, 10/15 instead of 10/20), as is an exercise cell the
    student deleted; the warning says where the points came from."""
    settings, _ = toy_course(tmp_path)
    settings = Settings(settings.checks_package, settings.python_path, None, settings.limits)
    subs = tmp_path / "subs"
    for student in ("alice", "bob", "carol"):
        save(solution(CH1), subs / student / f"{CH1}.ipynb")
    save(solution(CH2), subs / "alice" / f"{CH2}.ipynb")
    save(solution(CH2), subs / "bob" / f"{CH2}.ipynb")                 # carol skipped chapter 2
    dave = solution(CH1)
    dave["cells"] = [c for c in dave["cells"] if "def double(" not in cell_source(c)]
    save(dave, subs / "dave" / f"{CH1}.ipynb")                         # deleted the double cell, no chapter 2
    report = grade_batch(subs, settings, jobs=2)
    got = {(r.student, r.chapter, r.exercise): (r.points, r.max_points) for r in report.rows}
    assert got["carol", CH2, "negate"] == (0, 5) == got["dave", CH2, "negate"]
    assert got["alice", CH2, "negate"] == (5, 5)
    assert got["dave", CH1, "double"] == (0, 2)
    assert {e: got["carol", CH1, e][1] for e in CH1_EXERCISES} == CH1_POINTS
    assert any("no solution notebook" in w and "--solutions" in w for w in report.warnings)
