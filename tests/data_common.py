"""What the tests of the generated datasets under ``data/`` share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


def load_build_script(name: str) -> ModuleType:
    """``data/<name>/build.py`` imported as the module ``<name>_build`` (it is a script, not a
    package module), so that a test can rebuild the data and compare with the committed files."""
    spec = importlib.util.spec_from_file_location(f"{name}_build", DATA_ROOT / name / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the script look their module up here
    spec.loader.exec_module(module)
    return module
