"""The command lines explain themselves and behave on short runs: ``--help`` works for every
command, every flag has help text (pretrain's with the TrainConfig default and meaning), a short
pretraining run clamps the default warmup, and pretraining writes a run folder (checkpoints,
history, a loss-curve PNG) that ``--resume latest`` continues."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_from_scratch import chat, pretrain
from llama_from_scratch.course import release
from llama_from_scratch.trainer import TrainConfig

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["llama_from_scratch", "llama_from_scratch.pretrain", "llama_from_scratch.release",
            "llama_from_scratch.setup_check", "llama_from_scratch.grade"]
TINY_MODEL = json.dumps(dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32))
TINY_RUN = ["--synthetic", "--model", TINY_MODEL, "--block_size", "16", "--batch_size", "4", "--device", "cpu",
            "--progress", "false"]


@pytest.mark.parametrize("module", COMMANDS + ["llama_from_scratch chat", "llama_from_scratch generate"])
def test_help_everywhere(module: str) -> None:
    """``python -m <command> --help`` exits 0 with a usage line, and does nothing else (setup_check
    used to ignore it and run the whole check)."""
    name, *sub = module.split()
    result = subprocess.run([sys.executable, "-m", name, *sub, "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr
    assert ("usage:" in result.stdout) or (name == "llama_from_scratch" and not sub and "commands" in result.stdout)
    assert "component" not in result.stdout  # setup_check's report did not run


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = []
    for action in parser._actions:  # argparse has no public iterator over its arguments
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += _flag_actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            actions.append(action)
    return actions


@pytest.mark.parametrize("parser", [pretrain.build_parser(), chat.build_parser(), release.build_parser()],
                         ids=["pretrain", "chat", "release"])
def test_every_flag_has_help(parser: argparse.ArgumentParser) -> None:
    actions = _flag_actions(parser)
    assert len(actions) >= 6
    for action in actions:
        assert action.help and len(action.help) > 12, f"{action.option_strings or action.dest}: no help"


def test_pretrain_flags_show_the_trainconfig_default_and_meaning() -> None:
    """Each TrainConfig flag's help names its meaning (from TrainConfig's docstring, so the two do
    not drift) and the dataclass's default; measured before: 'TrainConfig.x' and nothing else."""
    meanings = pretrain.field_help()
    fields = dataclasses.fields(TrainConfig)
    assert {f.name for f in fields} <= set(meanings) | set(pretrain.FLAG_HELP), "a TrainConfig field has no doc line"
    helps = {a.dest: a.help for a in pretrain.build_parser()._actions}
    for f in fields:
        default = ",".join(map(str, f.default)) if f.name == "betas" else str(f.default)
        assert helps[f.name].endswith(f"(default: {default})"), helps[f.name]
        assert not helps[f.name].startswith("TrainConfig.") and ":func:" not in helps[f.name]
    assert "peak learning rate" in helps["max_lr"] and "validate every" in helps["eval_interval"]


def test_short_run_clamps_the_default_warmup(capsys: pytest.CaptureFixture) -> None:
    """--max_steps 60 with the default warmup (100) used to fail; now warmup is 10% of the steps,
    with a note. An explicit warmup longer than the run is still an error, which says what to do."""
    config, *_ = pretrain.resolve(["--max_steps", "60"])
    assert config.warmup_steps == 6 and config.max_steps == 60
    assert "warming up for 6 steps" in capsys.readouterr().err
    assert pretrain.resolve(["--max_steps", "500"])[0].warmup_steps == TrainConfig.warmup_steps
    assert pretrain.resolve(["--max_steps", "60", "--warmup_steps", "0"])[0].warmup_steps == 0
    with pytest.raises(SystemExit, match="lower --warmup_steps"):
        pretrain.resolve(["--max_steps", "60", "--warmup_steps", "100"])


@pytest.mark.slow
def test_pretrain_writes_a_run_folder_and_resumes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Default outputs: runs/pretrain_<time>/ with checkpoints/step_XXXXXX, history.json (the
    history the run printed the end of) and loss.png (a PNG matplotlib reads back); named at the
    start. ``--resume latest`` continues the newest run folder, with the same losses as the run
    that was not interrupted."""
    import matplotlib.image

    monkeypatch.chdir(tmp_path)
    run_args = TINY_RUN + ["--max_steps", "6", "--eval_interval", "2", "--warmup_steps", "1", "--checkpoint_interval", "4"]
    assert pretrain.main(run_args) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    assert f"run folder: {Path('runs') / run.name}" in out.splitlines()[0]
    assert run.name.startswith("pretrain_")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    history = json.loads((run / "history.json").read_text())
    final = json.loads(next(line for line in out.splitlines() if line.startswith('{"final_step"')))
    assert [r["step"] for r in history] == list(range(6)) and history[-1]["train_loss"] == final["train_loss"]
    image = matplotlib.image.imread(run / "loss.png")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas

    shutil.rmtree(run / "checkpoints" / "step_000006")  # as if stopped after step 4
    assert pretrain.main(run_args + ["--resume", "latest"]) == 0
    assert f"resumed from {Path('runs') / run.name / 'checkpoints' / 'step_000004'}" in capsys.readouterr().out
    assert list((tmp_path / "runs").iterdir()) == [run]  # the same run folder, continued
    resumed = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in resumed] == list(range(6))
    assert torch.equal(torch.tensor([r["train_loss"] for r in resumed]), torch.tensor([r["train_loss"] for r in history]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def test_no_run_folder_when_outputs_are_placed_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """``--run_dir none`` writes nothing and says that no checkpoint is kept; ``--history_out``
    alone (the caller chose where the output goes) makes no run folder either; ``--resume
    latest`` with no run folder to continue says so (and makes none)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no checkpoint in any runs/pretrain_"):
        pretrain.main(TINY_RUN + ["--max_steps", "2", "--resume", "latest"])
    assert pretrain.main(TINY_RUN + ["--max_steps", "2", "--eval_interval", "0", "--run_dir", "none"]) == 0
    assert "no checkpoints will be saved" in capsys.readouterr().out
    assert pretrain.main(TINY_RUN + ["--max_steps", "2", "--eval_interval", "0",
                                     "--history_out", str(tmp_path / "h.json")]) == 0
    assert not (tmp_path / "runs").exists() and (tmp_path / "h.json").is_file()
