"""The grader: one tool for students, teachers and CI.

    python -m llama_from_scratch.grade exercises/ch01_tokenization.ipynb
    python -m llama_from_scratch.grade --batch submissions/ --out report.csv   # a whole class
    pytest tests/exercises --notebooks exercises

How it works. The grader never runs a notebook top to bottom (that would re-run training cells).
It reads the code cells, keeps only the *definitions* (imports, ``def``, ``class`` and ALL_CAPS
constants), executes those, and then calls each exercise's check from
``llama_from_scratch.checks`` with the student's function. Every exercise gets a verdict and a
reason; a stub, a syntax error, a missing function, an exception, ``sys.exit`` or an endless loop
inside the student's code all become a failed exercise with a message, never a crashed grader.

Inside a notebook, ``check(my_function)`` runs the same check on one function and prints the
verdict.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llama_from_scratch import checks as checks_registry
from llama_from_scratch.notebook_source import cell_source, exercises_in, read_notebook

DEFAULT_TIMEOUT_S = 60.0
_KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class GradingTimeout(Exception):
    """Raised inside a check that ran longer than its time limit."""


@dataclass
class ExerciseResult:
    """The verdict on one exercise."""

    notebook: str
    exercise: str
    passed: bool
    reason: str
    points: int
    max_points: int
    seconds: float


@dataclass
class LoadedNotebook:
    """The definitions of a notebook and what went wrong while loading them, per cell."""

    namespace: dict[str, Any]
    cell_errors: dict[int, str]
    exercise_cells: dict[str, int]
    points: dict[str, int]


def _is_constant_assignment(node: ast.stmt) -> bool:
    """``NAME = ...`` or ``NAME: T = ...`` where every target is an ALL_CAPS name."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets = [node.target]
    else:
        return False
    return all(isinstance(t, ast.Name) and t.id.isupper() for t in targets)


def _strip_ipython(source: str) -> str:
    """Comment out IPython-only lines (``%magic``, ``!shell``) so the cell parses as Python."""
    lines = []
    for line in source.splitlines():
        lines.append("# " + line if line.lstrip().startswith(("%", "!")) else line)
    return "\n".join(lines)


def load_definitions(path: str | Path) -> LoadedNotebook:
    """Execute the definitions of every code cell of a notebook, in order, in one namespace.

    A cell that does not parse, or whose definitions raise when executed (a failing import, say),
    is recorded in ``cell_errors`` and skipped; the other cells still load.
    """
    nb = read_notebook(path)
    namespace: dict[str, Any] = {"__name__": "__lfs_notebook__"}
    cell_errors: dict[int, str] = {}
    for index, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        source = _strip_ipython(cell_source(cell))
        filename = f"<cell {index}>"
        try:
            tree = ast.parse(source, filename=filename)
        except SyntaxError as exc:
            cell_errors[index] = f"syntax error in cell {index}, line {exc.lineno}: {exc.msg}"
            continue
        tree.body = [n for n in tree.body if isinstance(n, _KEPT_NODES) or _is_constant_assignment(n)]
        if not tree.body:
            continue
        try:
            with _silenced():
                exec(compile(tree, filename, "exec"), namespace)
        except BaseException as exc:  # noqa: BLE001 - a student's cell may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            cell_errors[index] = f"cell {index} failed while defining its names: {type(exc).__name__}: {exc}"
    exercises = exercises_in(nb)
    return LoadedNotebook(
        namespace=namespace,
        cell_errors=cell_errors,
        exercise_cells={e.name: e.cell_index for e in exercises},
        points={e.name: e.points for e in exercises},
    )


class _Sink(io.TextIOBase):
    """A text stream that keeps the first ``limit`` characters written to it and drops the rest,
    so a function printing megabytes in a loop costs neither memory nor a flooded report."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        super().__init__()
        self.kept: list[str] = []
        self.room = limit

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.room > 0:
            self.kept.append(text[: self.room])
            self.room -= len(self.kept[-1])
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.kept)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Swallow what student code prints, so a chatty notebook cannot flood the report."""
    sink = _Sink()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ``GradingTimeout`` in the main thread after ``seconds`` (Unix; no-op elsewhere)."""
    usable = (seconds and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise GradingTimeout(f"did not finish within {seconds:g} s (an endless loop?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _explain(exc: BaseException, name: str) -> str:
    """Turn an exception from a check (or the student code it called) into a reason."""
    if isinstance(exc, NotImplementedError):
        return f"not implemented yet: `{name}` still raises NotImplementedError (replace the stub with your code)"
    if isinstance(exc, AssertionError):
        return str(exc) or "wrong answer (the check gave no details)"
    if isinstance(exc, GradingTimeout):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"your code called sys.exit({exc.code!r}); return a value instead"
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<cell")]
    if frames:
        where = f" ({frames[-1].filename[1:-1]}, line {frames[-1].lineno})"
    if isinstance(exc, MemoryError):
        return f"ran out of memory (MemoryError{where}): does it build something far too large?"
    return f"raised {type(exc).__name__}: {exc}{where}"


def run_check(check_fn: Callable[[Callable], None], student_fn: Callable, name: str,
              timeout: float | None = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Run one check; returns ``(passed, reason)`` and never lets the student's code escape."""
    try:
        with _silenced(), _time_limit(timeout):
            check_fn(student_fn)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends are verdicts too
        return False, _explain(exc, name)
    return True, "passed"


def chapter_of(path: str | Path) -> str:
    """The chapter a notebook belongs to, from its file name (``ch01_tokenization.ipynb``)."""
    stem = Path(path).stem
    if stem not in checks_registry.chapters():
        known = ", ".join(checks_registry.chapters())
        raise ValueError(f"{Path(path).name}: no chapter named {stem!r} has checks (known: {known}); "
                         "keep the file name of the exercise notebook or pass --chapter")
    return stem


def grade_exercise(loaded: LoadedNotebook, name: str, check_fn: Callable[[Callable], None],
                   notebook: str = "", points: int | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT_S) -> ExerciseResult:
    """Grade one exercise of a loaded notebook. ``points`` overrides what the notebook declares
    (the batch grader takes the points from the solution notebooks, which a student cannot edit)."""
    started = time.perf_counter()
    if points is None:
        points = loaded.points.get(name, 1)
    cell = loaded.exercise_cells.get(name)
    student_fn = loaded.namespace.get(name)
    if cell is not None and cell in loaded.cell_errors:
        passed, reason = False, loaded.cell_errors[cell]
    elif not callable(student_fn):
        passed = False
        reason = f"`{name}` is not defined in the notebook (was its cell deleted or the function renamed?)"
        if loaded.cell_errors:
            reason += "; problems while loading: " + "; ".join(loaded.cell_errors.values())
    else:
        passed, reason = run_check(check_fn, student_fn, name, timeout)
    return ExerciseResult(notebook, name, passed, reason, points if passed else 0, points,
                          round(time.perf_counter() - started, 3))


def grade_notebook(path: str | Path, chapter: str | None = None,
                   checks: dict[str, Callable[[Callable], None]] | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT_S, only: list[str] | None = None,
                   points: dict[str, int] | None = None) -> list[ExerciseResult]:
    """Grade every exercise of one notebook against its chapter's checks.

    The list of exercises comes from the checks (so deleting an exercise cell fails it rather than
    hiding it); points come from the notebook's ``# EXERCISE name (N points)`` lines unless
    ``points`` gives them. ``only`` restricts grading to the named exercises.
    """
    path = Path(path)
    if checks is None:
        checks = checks_registry.chapter_checks(chapter or chapter_of(path))
    if only:
        unknown = sorted(set(only) - set(checks))
        if unknown:
            raise KeyError(f"no exercise named {', '.join(unknown)} in this chapter's checks "
                           f"(known: {', '.join(checks)})")
        checks = {name: fn for name, fn in checks.items() if name in only}
    loaded = load_definitions(path)
    return [grade_exercise(loaded, name, check_fn, str(path), (points or {}).get(name), timeout)
            for name, check_fn in checks.items()]


def check(fn: Callable, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Check one exercise function from inside a notebook; raises ``AssertionError`` if it fails."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"check() expects the exercise function itself, got {type(fn).__name__}")
    _, check_fn = checks_registry.find_check(name)
    passed, reason = run_check(check_fn, fn, name, timeout)
    if not passed:
        raise AssertionError(f"{name}: {reason}")
    print(f"✓ {name}: passed")


def format_report(results: list[ExerciseResult]) -> str:
    """A human-readable report: one line per exercise, then the score."""
    lines = []
    for r in results:
        mark = "PASS" if r.passed else "FAIL"
        lines.append(f"{mark}  {r.exercise:<28} {r.points}/{r.max_points}  {r.reason if not r.passed else ''}".rstrip())
    got, total = sum(r.points for r in results), sum(r.max_points for r in results)
    n_passed = sum(r.passed for r in results)
    lines.append(f"{n_passed} passed, {len(results) - n_passed} failed; score {got}/{total}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: grade one or more notebooks (exit 0 only if every exercise passed), or a whole
    class with ``--batch`` (exit 0 once the reports are written)."""
    parser = argparse.ArgumentParser(prog="python -m llama_from_scratch.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="exercise notebooks to grade")
    parser.add_argument("--chapter", help="chapter name when the file was renamed, e.g. ch01_tokenization")
    parser.add_argument("--only", action="append", metavar="EXERCISE",
                        help="grade only this exercise (repeatable)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per exercise")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    from llama_from_scratch import batch_grade

    batch_grade.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch is not None:
        if args.notebooks:
            parser.error("give either notebooks or --batch SUBMISSIONS_DIR, not both")
        return batch_grade.run_batch_cli(args)
    if not args.notebooks:
        parser.error("give the notebooks to grade, or --batch SUBMISSIONS_DIR")
    all_results: list[ExerciseResult] = []
    status = 0
    for nb in args.notebooks:
        try:
            results = grade_notebook(nb, chapter=args.chapter, timeout=args.timeout, only=args.only)
        except (OSError, ValueError, KeyError) as exc:
            print(f"{nb}: cannot grade: {exc}", file=sys.stderr)
            status = 2
            continue
        all_results.extend(results)
        if not args.json:
            print(f"== {nb}")
            print(format_report(results))
        if not all(r.passed for r in results):
            status = max(status, 1)
    if args.json:
        import json

        print(json.dumps([asdict(r) for r in all_results], indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
