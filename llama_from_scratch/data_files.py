"""Finding the data the project ships under ``data/`` (instructions, preferences, stories).

The data lives once, in the repository's ``data/`` folder. A source checkout or an editable install
finds it there, next to the package; a wheel carries a copy as package data,
``llama_from_scratch/_data/<name>`` (``pyproject.toml`` maps ``data/`` to the package
``llama_from_scratch._data``), so an installed package finds it without the repository. Other
layouts point at it with an environment variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def find_data_dir(name: str, env_var: str, description: str,
                  data_dir: str | os.PathLike | None = None, marker: str = "train.jsonl") -> Path:
    """The folder ``data/<name>`` holding ``marker`` (``train.jsonl`` by default).

    Looked up in order: ``data_dir``; ``$<env_var>``; ``_data/<name>`` inside the installed
    package (the wheel case); ``data/<name>`` in the repository root next to the package (the
    editable-install / source-checkout case); ``data/<name>`` under the current directory.
    Raises ``FileNotFoundError`` listing the places tried.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get(env_var):
        candidates.append(Path(os.environ[env_var]))
    else:
        package = Path(__file__).resolve().parent
        candidates.append(package / "_data" / name)
        candidates.append(package.parent / "data" / name)
        candidates.append(Path.cwd() / "data" / name)
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{description} not found (looked for {marker} in: {tried}); install the "
                            f"package from its wheel, run from a checkout of the repository, or set {env_var} to the folder holding {marker}")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of the JSON Lines file ``path``.

    A line that is not valid JSON raises ``ValueError`` naming the file and the line, so that a
    damaged data file says where it is damaged instead of failing somewhere downstream."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
