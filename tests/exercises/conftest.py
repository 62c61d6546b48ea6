"""Parametrise the exercise tests over (notebook, exercise) of the chosen notebooks folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_from_scratch.course import checks

REPO = Path(__file__).resolve().parents[2]


def notebooks_dir(config: pytest.Config) -> Path:
    folder = Path(config.getoption("notebooks"))
    return folder if folder.is_absolute() else REPO / folder


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "exercise_case" not in metafunc.fixturenames:
        return
    folder = notebooks_dir(metafunc.config)
    cases = []
    for nb in sorted(folder.glob("ch*.ipynb")):
        if nb.stem in checks.chapters():
            cases += [(nb, name) for name in checks.chapter_checks(nb.stem)]
    if not cases:
        raise pytest.UsageError(f"no graded notebooks (ch*.ipynb with checks) in {folder}")
    metafunc.parametrize("exercise_case", cases, ids=[f"{nb.stem}::{name}" for nb, name in cases])
