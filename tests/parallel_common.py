"""What the 2-process tests of chapter 15 share: the tiny Llama they train, its batches, the world
size and the float32 tolerance.

Every comparison trains ``STEPS`` AdamW steps on ``GLOBAL_BATCH`` sequences split over ``WORLD``
ranks and compares with one process on the whole batch. Tolerance: float32, ``rtol=1e-5,
atol=1e-6`` (the ranks sum gradients in another order than one process does). The workers that
``run_on_processes`` spawns import this module too (spawned processes get the parent's
``sys.path``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
STEPS = 3
GLOBAL_BATCH, SEQ = 4, 16
TOL = dict(rtol=1e-5, atol=1e-6)
ADAMW = dict(lr=1e-3, weight_decay=0.1)


def tiny_config() -> LlamaConfig:
    return LlamaConfig.tiny(vocab_size=64, dim=32, hidden_dim=64, max_seq_len=32)


def fresh_model() -> Llama:
    """The same initial weights in every process (seed 0)."""
    torch.manual_seed(0)
    return Llama(tiny_config())


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` global batches of (input ids, next-token targets)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, tiny_config().vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def rank_rows(rank: int, world_size: int) -> slice:
    """The rows of the global batch that ``rank`` trains on."""
    return slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
