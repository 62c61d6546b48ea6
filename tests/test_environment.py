"""Where the code runs: quick mode, device choice, whether bfloat16 autocast pays off."""

import os
import subprocess
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


FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""


def test_cpu_name_reads_the_model_name_line(monkeypatch):
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: FAKE_CPUINFO)
    assert env.cpu_name() == "Intel(R) Xeon(R) Platinum 8480+"


def test_cpu_name_falls_back_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: None)
    monkeypatch.setattr(env.sys, "platform", "linux")
    monkeypatch.setattr(env.platform, "processor", lambda: "x86_64")
    assert env.cpu_name() == "x86_64"
    monkeypatch.setattr(env.platform, "processor", lambda: "")
    monkeypatch.setattr(env.platform, "machine", lambda: "")
    assert env.cpu_name() == "unknown CPU"
    # a cpuinfo without a "model name" line (some ARM boards) also falls back
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: "processor\t: 0\nBogoMIPS\t: 108.00\n")
    assert env.cpu_name() == "unknown CPU"


def test_cpu_name_on_macos_asks_sysctl_and_survives_its_failure(monkeypatch):
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: None)
    monkeypatch.setattr(env.sys, "platform", "darwin")
    monkeypatch.setattr(env.platform, "processor", lambda: "arm")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="Apple M2 Pro\n", stderr="")

    monkeypatch.setattr(env.subprocess, "run", fake_run)
    assert env.cpu_name() == "Apple M2 Pro"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]

    def missing_sysctl(cmd, **kwargs):
        raise FileNotFoundError("sysctl")

    monkeypatch.setattr(env.subprocess, "run", missing_sysctl)
    assert env.cpu_name() == "arm"


def test_cpu_bf16_flag_read_through_the_shared_reader(monkeypatch):
    env.cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: FAKE_CPUINFO)
    assert env.cpu_bf16_is_fast() is True   # amx_bf16 in the fake flags: no probe needed
    env.cpu_bf16_is_fast.cache_clear()


def test_cpu_name_on_this_machine():
    name = env.cpu_name()
    assert isinstance(name, str) and name.strip() == name and name
