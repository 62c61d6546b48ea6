"""Where the code runs: quick mode, device choice, reproducible seeds.

Every chapter notebook reads the same switch, ``LFS_QUICK``. CI sets ``LFS_QUICK=1`` so that
training runs shrink to a minute; a reader who leaves it unset gets the full-size runs.
"""

from __future__ import annotations

import os
import random

import torch

QUICK_ENV_VAR = "LFS_QUICK"


def quick_mode() -> bool:
    """True when ``LFS_QUICK`` is set to a truthy value ("1", "true", "yes", "on")."""
    return os.environ.get(QUICK_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def pick_device(preferred: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU.

    ``preferred`` (e.g. ``"cpu"``) overrides the choice; asking for a device that is not there
    raises ``RuntimeError`` with the reason instead of failing later inside a kernel.
    """
    if preferred is not None:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested but torch.cuda.is_available() is False "
                               "(a CPU-only torch build, or no GPU/driver).")
        if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RuntimeError("MPS was requested but torch.backends.mps.is_available() is False.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def supports_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast is worth using on ``device`` (CUDA with bf16 support, or the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) for a reproducible run."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
