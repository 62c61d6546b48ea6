"""Where the code runs: quick mode, device choice, whether bfloat16 autocast pays off."""

import os
from pathlib import Path

import pytest
import torch

import llama_from_scratch.environment as env


def test_quick_mode_reads_the_variable(monkeypatch):
    for value, expected in [("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("LFS_QUICK", value)
        assert env.quick_mode() is expected
    monkeypatch.delenv("LFS_QUICK")
    assert env.quick_mode() is False


def test_pick_device_refuses_a_missing_device():
    assert env.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA was requested"):
            env.pick_device("cuda")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_bf16_flag_decides_without_probe(monkeypatch):
    flags = Path("/proc/cpuinfo").read_text().split()
    env.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(env, "_BF16_CPU_FLAGS", ("fpu",))  # every x86 CPU lists it
    if "fpu" in flags:
        assert env.cpu_bf16_is_fast() is True
    env.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(env, "_BF16_CPU_FLAGS", ("no_such_flag",))
    assert isinstance(env.cpu_bf16_is_fast(), bool)   # the probe answers
    env.cpu_bf16_is_fast.cache_clear()


def test_supports_bf16_per_device():
    env.cpu_bf16_is_fast.cache_clear()
    assert env.supports_bf16("cpu") == env.cpu_bf16_is_fast()
    assert env.supports_bf16(torch.device("meta")) is False
    if os.path.exists("/proc/cpuinfo"):
        flags = Path("/proc/cpuinfo").read_text().split()
        if any(f in flags for f in ("avx512_bf16", "amx_bf16")):
            assert env.supports_bf16("cpu") is True
