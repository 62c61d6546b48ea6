"""What the ``test_chNN_wrong_answers.py`` files share: the chapters' solution and stub namespaces
(loaded once, as the grader loads them), the exceptions a failing check raises, and the helpers
that call a check on an answer expecting it to fail.

pytest's default import mode puts this folder on ``sys.path`` for the test files here, so they
import it as ``from answers import ...``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from llama_from_scratch.course.grade import load_definitions

REPO = Path(__file__).resolve().parents[2]
FAILS = (AssertionError, NotImplementedError)


@cache
def solution(chapter: str) -> dict:
    """The definitions of ``solutions/<chapter>.ipynb``."""
    return load_definitions(REPO / "solutions" / f"{chapter}.ipynb").namespace


@cache
def stub(chapter: str) -> dict:
    """The definitions of ``exercises/<chapter>.ipynb`` (the released stubs)."""
    return load_definitions(REPO / "exercises" / f"{chapter}.ipynb").namespace


def unanswered(*args, **kwargs):
    """An exercise left as the stub leaves it."""
    raise NotImplementedError("Exercise: write your code here")


def fails(check, fn) -> str:
    """``check(fn)`` rejects ``fn`` as the grader would (any exception from the answer is a failure,
    e.g. a KeyError reading torch's state under other names); returns the grader's reason."""
    from llama_from_scratch.course.grade import run_check

    passed, reason = run_check(check, fn, getattr(fn, "__name__", "answer"), timeout=None)
    assert not passed, "the check accepted a wrong answer"
    return reason


def fails_on(checks: dict, wrap=None):
    """``fails(name, fn)`` for a chapter's ``CHECKS``; ``wrap`` turns ``fn`` into what the check gets."""
    def fails_check(name: str, fn) -> str:
        return fails(checks[name], fn if wrap is None else wrap(fn))
    return fails_check


def solution_and_stub_tests(checks: dict, solutions: dict, stubs: dict, names=None, wrap=None):
    """``test_solution_passes`` and ``test_stub_fails``, parametrised over ``names`` (all the checks)."""
    names = list(checks) if names is None else names
    fails_check = fails_on(checks, wrap)

    @pytest.mark.parametrize("name", names)
    def test_solution_passes(name):
        checks[name](solutions[name] if wrap is None else wrap(solutions[name]))

    @pytest.mark.parametrize("name", names)
    def test_stub_fails(name):
        fails_check(name, stubs[name])

    return test_solution_passes, test_stub_fails


def stub_and_solution_test(checks: dict, solutions: dict):
    """``test_stub_fails_and_solution_passes``, parametrised over the sorted checks: each fails on
    ``unanswered`` and passes on the solution."""
    fails_check = fails_on(checks)

    @pytest.mark.parametrize("name", sorted(checks))
    def test_stub_fails_and_solution_passes(name):
        fails_check(name, unanswered)
        checks[name](solutions[name])

    return test_stub_fails_and_solution_passes


def passes_on(checks: dict, wrap=None):
    """``passes(name, fn)`` for a chapter's ``CHECKS``; ``wrap`` turns ``fn`` into what the check gets."""
    def passes_check(name: str, fn) -> None:
        checks[name](fn if wrap is None else wrap(fn))
    return passes_check


def forbidden_rules_test(checks: dict, forbidden: dict, solutions: dict):
    """``test_every_exercise_has_forbidden_rules_and_a_solution``."""
    def test_every_exercise_has_forbidden_rules_and_a_solution():
        assert set(forbidden) == set(checks)
        assert all(callable(solutions[name]) for name in checks)

    return test_every_exercise_has_forbidden_rules_and_a_solution


def edited_solution_tests(checks: dict, namespace, wrap):
    """For chapters whose wrong answers are the solution with one line changed. ``namespace(name, old,
    new, stub)`` gives the notebook's definitions with exercise ``name``'s source changed (``old`` ->
    ``new``) or stubbed, ``namespace()`` the solution's. Returns ``run(name, ns)`` (the check on
    ``wrap(ns[name])``), ``fails(name, old, new)``, ``test_solution_passes`` and ``test_stub_fails``."""
    def run(name: str, ns: dict) -> None:
        return checks[name](wrap(ns[name]))          # a check returns None when the answer passes

    def fails_edited(name: str, old: str, new: str) -> str:
        with pytest.raises(FAILS) as failure:
            run(name, namespace(name, old, new))
        return str(failure.value) or type(failure.value).__name__   # the check's reason

    @pytest.mark.parametrize("name", list(checks))
    def test_solution_passes(name):
        run(name, namespace())

    @pytest.mark.parametrize("name", list(checks))
    def test_stub_fails(name):
        with pytest.raises(FAILS):
            run(name, namespace(name, stub=True))

    return run, fails_edited, test_solution_passes, test_stub_fails
