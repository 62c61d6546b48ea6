"""The grader: one tool for students, teachers and CI.

    python -m llama_from_scratch.grade exercises/ch01_tokenization.ipynb
    python -m llama_from_scratch.grade --batch submissions/ --out report.csv   # a whole class
    pytest tests/exercises --notebooks exercises

How it works. The grader never runs a notebook top to bottom (that would re-run training cells).
It reads the code cells and sends them to a separate process (``llama_from_scratch.course.sandbox``,
isolated with bubblewrap where available), which executes only their *definitions* (imports,
``def``, ``class`` and ALL_CAPS constants). Each exercise's check runs here, in the grader: it
draws inputs, sends them to the student's function in that process, gets the outputs back as data
and compares them with a reference computed here. The student's process never sees an expected
value, and its exit status, its output and whatever it patches inside itself decide nothing.

Every exercise gets a verdict and a reason; a stub, a syntax error, a missing function, an
exception, ``sys.exit``, ``os._exit``, a crash or an endless loop all become a failed exercise with
a message (a fresh process grades the exercises after one that killed its process). An answer that
uses what its exercise forbids (``FORBIDDEN`` in the chapter's checks; always the package itself)
fails with "uses X, which this exercise asks you to write".

Inside a notebook, ``check(my_function)`` runs the same check in the notebook's own process (the
learner checking their own work) and prints the verdict.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llama_from_scratch.course import checks as checks_registry
from llama_from_scratch.course.answer_rules import ALWAYS_FORBIDDEN, first_violation
from llama_from_scratch.course.notebook_source import cell_source, exercises_in, read_notebook
from llama_from_scratch.course.sandbox import (UNSAFE_WARNING, Limits, RemoteObject, Sandbox, StudentCrashed, StudentError,
                                        StudentTimeout, isolation_mode)
from llama_from_scratch.course.sandbox_worker import LoadedNotebook, definitions_of, load_cells, silenced
from llama_from_scratch.course.wire import Callback, Construct

DEFAULT_TIMEOUT_S = 60.0


class GradingTimeout(Exception):
    """Raised inside a check (in the grader's process) that ran longer than its time limit."""


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


def notebook_cells(nb: dict[str, Any]) -> list[str | None]:
    """The source of every cell, ``None`` for the non-code ones (indices stay the notebook's)."""
    return [cell_source(c) if c.get("cell_type") == "code" else None for c in nb.get("cells", [])]


def load_definitions(path: str | Path) -> LoadedNotebook:
    """Execute a notebook's definitions in THIS process (trusted notebooks only: the solutions, in
    tests). Grading never does this: it runs them in the student's sandboxed process."""
    return load_cells(notebook_cells(read_notebook(path)))


def _parsed_cells(cells: list[str | None]) -> list[ast.Module]:
    trees = []
    for index, source in enumerate(cells):
        if source is None:
            continue
        try:
            trees.append(definitions_of(source, index))
        except SyntaxError:
            continue
    return trees


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
    where = ""
    if isinstance(exc, StudentError):
        where = f" ({exc.where})" if exc.where else ""
        if exc.forbidden:
            return f"{exc}{where}"
        if isinstance(exc, NotImplementedError):
            return f"not implemented yet: `{name}` still raises NotImplementedError (replace the stub with your code)"
        if exc.remote_type == "SystemExit":
            return f"your code called sys.exit({exc.exit_code!r}); return a value instead"
        if exc.remote_type == "MemoryError":
            return f"ran out of memory (MemoryError{where}): does it build something far too large?"
        return f"raised {exc.remote_type}: {exc}{where}"
    if isinstance(exc, NotImplementedError):
        return f"not implemented yet: `{name}` still raises NotImplementedError (replace the stub with your code)"
    if isinstance(exc, AssertionError):
        return str(exc) or "wrong answer (the check gave no details)"
    if isinstance(exc, (GradingTimeout, StudentTimeout)):
        return str(exc)
    if isinstance(exc, StudentCrashed):
        return f"{exc}"
    if isinstance(exc, SystemExit):
        return f"your code called sys.exit({exc.code!r}); return a value instead"
    if isinstance(exc, MemoryError):
        return "ran out of memory (MemoryError): does it build something far too large?"
    return f"raised {type(exc).__name__}: {exc}"


def run_check(check_fn: Callable[[Callable], None], student_fn: Any, name: str,
              timeout: float | None = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Run one check; returns ``(passed, reason)`` and never lets an exception escape."""
    try:
        with _time_limit(timeout):
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


def grade_cells(cells: list[str | None], exercise_cells: dict[str, int], declared_points: dict[str, int],
                checks: dict[str, Callable[[Callable], None]], forbidden: dict[str, list[str]] | None = None,
                notebook: str = "", points: dict[str, int] | None = None,
                timeout: float = DEFAULT_TIMEOUT_S, limits: Limits | None = None,
                isolation: str = "auto") -> list[ExerciseResult]:
    """Grade the exercises ``checks`` names against a notebook's cells, the student's code in a
    sandboxed process (restarted after an exercise that kills it), every check here."""
    limits = limits or Limits(timeout=timeout)
    forbidden = forbidden or {}
    with _one_torch_thread():
        return _grade_cells(cells, exercise_cells, declared_points, checks, forbidden, notebook, points, limits,
                            isolation)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Checks work on tiny tensors while the student's process computes beside them: one thread
    each avoids the two fighting over the cores (tiny matmuls ran ~80x slower with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _grade_cells(cells: list[str | None], exercise_cells: dict[str, int], declared_points: dict[str, int],
                 checks: dict[str, Callable[[Callable], None]], forbidden: dict[str, list[str]], notebook: str,
                 points: dict[str, int] | None, limits: Limits, isolation: str) -> list[ExerciseResult]:
    trees = _parsed_cells(cells)
    every_rule = sorted({n for names in forbidden.values() for n in names})
    results: list[ExerciseResult] = []
    sandbox: Sandbox | None = None
    load_problem: str | None = None
    cell_errors: dict[int, str] = {}
    defined: dict[str, str] = {}
    try:
        for name, check_fn in checks.items():
            started = time.perf_counter()
            max_points = (points or {}).get(name, declared_points.get(name, 1))
            reason = None
            if sandbox is None or not sandbox.alive:
                if sandbox is not None:
                    sandbox.close()
                sandbox, load_problem = Sandbox(limits, isolation), None
                try:
                    sandbox.start()
                    sandbox.new_budget()
                    cell_errors, defined = sandbox.load(cells, every_rule)
                except (StudentTimeout, StudentCrashed) as exc:
                    load_problem = f"the notebook's definitions could not be loaded: {_explain(exc, name)}"
            cell = exercise_cells.get(name)
            if load_problem is not None:
                reason = load_problem
            elif cell is not None and cell in cell_errors:
                reason = cell_errors[cell]
            elif defined.get(name) not in ("callable", "class"):
                reason = f"`{name}` is not defined in the notebook (was its cell deleted or the function renamed?)"
                if cell_errors:
                    reason += "; problems while loading: " + "; ".join(cell_errors.values())
            else:
                reason = first_violation(name, trees, forbidden.get(name, []))
            if reason is None:
                sandbox.forbidden = list(forbidden.get(name, [])) + list(ALWAYS_FORBIDDEN)
                sandbox.new_budget()
                passed, reason = run_check(check_fn, RemoteObject(sandbox, name=name), name,
                                           timeout=limits.timeout * 4 + limits.startup_timeout)
            else:
                passed = False
            results.append(ExerciseResult(notebook, name, passed, "passed" if passed else reason,
                                          max_points if passed else 0, max_points,
                                          round(time.perf_counter() - started, 3)))
    finally:
        if sandbox is not None:
            sandbox.close()
    return results


def grade_notebook(path: str | Path, chapter: str | None = None,
                   checks: dict[str, Callable[[Callable], None]] | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT_S, only: list[str] | None = None,
                   points: dict[str, int] | None = None, forbidden: dict[str, list[str]] | None = None,
                   limits: Limits | None = None, isolation: str = "auto",
                   notebook: dict[str, Any] | None = None) -> list[ExerciseResult]:
    """Grade every exercise of one notebook against its chapter's checks.

    The list of exercises comes from the checks (so deleting an exercise cell fails it rather than
    hiding it); points come from the notebook's ``# EXERCISE name (N points)`` lines unless
    ``points`` gives them. ``only`` restricts grading to the named exercises. ``notebook``: the
    already-read notebook (the batch grader reads submissions itself, refusing links)."""
    path = Path(path)
    if checks is None:
        chapter = chapter or chapter_of(path)
        checks = checks_registry.chapter_checks(chapter)
        if forbidden is None:
            forbidden = checks_registry.chapter_forbidden(chapter)
    if only:
        unknown = sorted(set(only) - set(checks))
        if unknown:
            raise KeyError(f"no exercise named {', '.join(unknown)} in this chapter's checks "
                           f"(known: {', '.join(checks)})")
        checks = {name: fn for name, fn in checks.items() if name in only}
    nb = notebook if notebook is not None else read_notebook(path)
    exercises = exercises_in(nb)
    if limits is None:
        limits = Limits(timeout=timeout or DEFAULT_TIMEOUT_S)
    return grade_cells(notebook_cells(nb), {e.name: e.cell_index for e in exercises},
                       {e.name: e.points for e in exercises}, checks, forbidden, str(path), points,
                       limits.timeout, limits, isolation)


class LocalObject:
    """What a check gets inside a notebook: the learner's own function or object, with the
    check's ``Construct``/``Callback`` arguments made real, so one check serves both paths."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.__name__ = getattr(target, "__name__", type(target).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _local(self._target(*_real(args), **_real(kwargs)))

    def __getattr__(self, attr: str) -> Any:
        return _local(getattr(self._target, attr))

    def _lfs_value_and_grad(self, args: tuple, kwargs: dict, grad_output: Any) -> Any:
        from llama_from_scratch.course.checks.common import local_value_and_grad

        return local_value_and_grad(self._target, tuple(_real(args)), _real(kwargs), grad_output)


def _real(value: Any) -> Any:
    if isinstance(value, Construct):
        return Construct(value.target, *_real(list(value.args)), method=value.method, **_real(dict(value.kwargs))).build()
    if isinstance(value, Callback):
        return value.fn
    if isinstance(value, LocalObject):
        return value._target
    if isinstance(value, tuple):
        return tuple(_real(v) for v in value)
    if isinstance(value, list):
        return [_real(v) for v in value]
    if isinstance(value, dict):
        return {k: _real(v) for k, v in value.items()}
    return value


def _local(value: Any) -> Any:
    """Data stays as it is; objects (modules, instances, bound methods) get wrapped."""
    import torch

    data = (type(None), bool, int, float, str, bytes, list, tuple, dict, set, frozenset, torch.Tensor, torch.dtype,
            torch.Size)
    return value if isinstance(value, data) else LocalObject(value)


def check(fn: Callable, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Check one exercise function from inside a notebook; raises ``AssertionError`` if it fails."""
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"check() expects the exercise function itself, got {type(fn).__name__}")
    _, check_fn = checks_registry.find_check(name)
    with silenced():
        passed, reason = run_check(check_fn, LocalObject(fn), name, timeout)
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
    parser.add_argument("--isolation", choices=["auto", "sandbox", "unsafe"], default="auto",
                        help="auto: bubblewrap sandbox where available, else an unsafe plain process "
                             "(with a warning); sandbox: refuse to grade without bubblewrap")
    from llama_from_scratch.course import batch_grade

    batch_grade.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch is not None:
        if args.notebooks:
            parser.error("give either notebooks or --batch SUBMISSIONS_DIR, not both")
        return batch_grade.run_batch_cli(args)
    if not args.notebooks:
        parser.error("give the notebooks to grade, or --batch SUBMISSIONS_DIR")
    try:
        if isolation_mode(args.isolation) == "unsafe":
            print(UNSAFE_WARNING, file=sys.stderr)
    except RuntimeError as exc:
        print(f"cannot grade: {exc}", file=sys.stderr)
        return 2
    all_results: list[ExerciseResult] = []
    status = 0
    for nb in args.notebooks:
        try:
            results = grade_notebook(nb, chapter=args.chapter, timeout=args.timeout, only=args.only,
                                     isolation=args.isolation)
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
