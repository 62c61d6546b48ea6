"""DistributedDataParallel through the command-line entry point: 2 processes with batch b compute
the same run as 1 process with batch 2b (chapter 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

MODEL = json.dumps(dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32))


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"max_steps": 6, "warmup_steps": 2, "max_lr": 1e-2, "min_lr": 1e-3,
                               "grad_accum_steps": 2, "eval_interval": 3, "eval_steps": 2, "device": "cpu",
                               "dtype": "fp32", "progress": False, "seed": 3,
                               "model": json.loads(MODEL), "data": {"synthetic": True, "block_size": 16}}))
    common = ["-m", "llama_from_scratch.pretrain", "--config", str(cfg)]
    _run([sys.executable, *common, "--batch_size", "4", "--history_out", str(tmp_path / "one.json")], tmp_path)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                "--batch_size", "2", "--history_out", str(tmp_path / "two.json"),
                "--checkpoint_dir", str(tmp_path / "ckpt")], tmp_path)
    assert "world size 2" in out and out.count("final_step") == 1  # only rank 0 prints
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(one) == len(two) == 6
    for key in ("train_loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                   rtol=1e-5, atol=1e-6)
    val_one = [r["val_loss"] for r in one if r["val_loss"] is not None]
    val_two = [r["val_loss"] for r in two if r["val_loss"] is not None]
    assert len(val_one) == 2
    torch.testing.assert_close(torch.tensor(val_two), torch.tensor(val_one), rtol=1e-5, atol=1e-6)
    assert one[-1]["train_loss"] < one[0]["train_loss"]
    # rank 0 alone wrote the final checkpoint
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000006"]
