"""``pretrain --fsdp`` (chapter 15): the command line trains with FSDP2 under ``torchrun`` on 2 gloo
processes, writes checkpoints (rank 0 only), and a run resumed from its middle checkpoint prints the
same history as the run that went straight through, bit for bit. Run without ``torchrun`` it exits
with a message saying how to launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

MODEL = json.dumps(dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32))
RUN = ["-m", "llama_from_scratch.pretrain", "--synthetic", "--fsdp", "--model", MODEL, "--block_size", "16",
       "--batch_size", "2", "--max_steps", "4", "--warmup_steps", "1", "--max_lr", "1e-2", "--min_lr", "1e-3",
       "--eval_interval", "2", "--eval_steps", "1", "--device", "cpu", "--progress", "false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd, cwd, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if ok:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_pretrain_fsdp_under_torchrun_checkpoints_and_resumes_exactly(tmp_path):
    out = _run([*TORCHRUN, *RUN, "--checkpoint_dir", "ckpt", "--checkpoint_interval", "2",
                "--history_out", "straight.json"], tmp_path).stdout
    assert "world size 2 (FSDP2, sharded)" in out and out.count("final_step") == 1  # only rank 0 prints
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000002", "step_000004"]
    out = _run([*TORCHRUN, *RUN, "--resume", "ckpt/step_000002", "--checkpoint_dir", "ckpt2",
                "--history_out", "resumed.json"], tmp_path).stdout
    assert "resumed from ckpt/step_000002 at step 2" in out
    straight = json.loads((tmp_path / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert len(straight) == 4 and [r["step"] for r in resumed] == [0, 1, 2, 3]
    for key in ("train_loss", "grad_norm", "val_loss", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key  # exact
    assert straight[-1]["train_loss"] < straight[0]["train_loss"]


def test_pretrain_fsdp_without_torchrun_says_how_to_launch(tmp_path):
    result = _run([sys.executable, *RUN, "--run_dir", "none"], tmp_path, ok=False)
    assert result.returncode != 0
    assert "--fsdp shards the model over the processes torchrun starts" in result.stderr
