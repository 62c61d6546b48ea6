"""Normalise committed notebooks: a standard kernelspec, no jupytext metadata, no machine paths.

    python tools/normalize_notebooks.py chapters/*.ipynb solutions/*.ipynb

Exits 1 if an output contains an error or a machine-specific path (those must be fixed by hand).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
MACHINE_PATH = re.compile(r"(/work/|/root/|/home/|/tmp/)")


def normalize(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb["metadata"].pop("jupytext", None)
    nb["metadata"]["kernelspec"] = KERNELSPEC
    problems = []
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{path}: cell {index} has an error output")
            data = {k: v for k, v in output.get("data", {}).items() if not k.startswith("image/")}
            text = json.dumps({"text": output.get("text", ""), "data": data})
            if MACHINE_PATH.search(text):
                problems.append(f"{path}: cell {index} output shows a machine path: {MACHINE_PATH.search(text).group(0)}")
    path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return problems


if __name__ == "__main__":
    problems = [p for arg in sys.argv[1:] for p in normalize(Path(arg))]
    print("\n".join(problems) or "ok")
    sys.exit(1 if problems else 0)
