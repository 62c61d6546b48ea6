"""Where the code runs: quick mode, device choice, the CPU's name, reproducible seeds.

Every chapter notebook reads the same switch, ``LFS_QUICK``. CI sets ``LFS_QUICK=1`` so that
training runs shrink to a minute; a reader who leaves it unset gets the full-size runs.
"""

from __future__ import annotations

import functools
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

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
    """Whether bfloat16 autocast is *worth using* on ``device``.

    On CUDA: when the GPU has bfloat16 arithmetic (Ampere and newer). On the CPU it depends on the
    processor. With bfloat16 instructions (AVX512-BF16, AMX) a bfloat16 matmul runs about twice as
    fast as a float32 one; without them (AVX2-only CPUs) torch emulates it, about 50 times slower
    (measured side by side on a 2-core AVX2 AMD EPYC). So the answer for a
    CPU is :func:`cpu_bf16_is_fast`. bfloat16 autocast *works* everywhere; this only says whether
    it saves time.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_is_fast()
    return False


_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _read_cpuinfo() -> str | None:
    """The text of Linux's ``/proc/cpuinfo``; None where there is no such file (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return None


def cpu_name() -> str:
    """The CPU's model name, to say which processor a timing was measured on. Never raises.

    Linux: the ``model name`` line of ``/proc/cpuinfo``. macOS: ``sysctl -n
    machdep.cpu.brand_string``. Elsewhere (or when those say nothing): ``platform.processor()``,
    then ``platform.machine()``, then ``"unknown CPU"``.
    """
    text = _read_cpuinfo()
    if text:
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5, check=False)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return platform.processor() or platform.machine() or "unknown CPU"
    except Exception:  # platform.processor() shells out on some systems
        return "unknown CPU"


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """True when this CPU multiplies bfloat16 matrices faster than float32 ones.

    Linux lists bfloat16 instructions in ``/proc/cpuinfo`` (``avx512_bf16``, ``amx_bf16``): if one
    is there, yes. Elsewhere (or without them) a small probe decides: the best of five 256 x 256
    matmuls in each precision. Measured once per process.
    """
    flags = (_read_cpuinfo() or "").split()
    if any(flag in flags for flag in _BF16_CPU_FLAGS):
        return True
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(256, 256).to(dtype)
        b = torch.randn(256, 256).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    return timings[torch.bfloat16] < timings[torch.float32]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices) for a reproducible run."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
