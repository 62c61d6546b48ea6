"""PyTorch's own distributed APIs on the package's Llama (chapter 15), on 2 gloo processes.

FSDP2 (``fully_shard``) reaches the same weights after 3 AdamW steps as one process with the global
batch, and holds per rank the bytes of ZeRO stage 3's formula, as our ``ZeroAdamW(stage=3)`` does.
``torch.distributed.tensor.parallel`` gives the unsplit model's logits and each rank the same weight
and gradient blocks as our ``tensor_parallel_llama``. Tolerance: float32, ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.parallel import run_on_processes, state_bytes_per_rank, tensor_parallel_llama, zero_bytes_formula
from llama_from_scratch.parallel.torch_native import dtensor_tensor_parallel_llama, fsdp2_llama, local_tensor
from parallel_common import ADAMW, TOL, WORLD, batches, needs_gloo, rank_rows
from parallel_common import fresh_model as tiny_model

pytestmark = needs_gloo


def torch_native_worker(rank: int, world_size: int) -> dict[str, object]:
    out: dict[str, object] = {}
    rows = rank_rows(rank, world_size)

    model = fsdp2_llama(tiny_model())
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    for x, y in batches():
        model(x[rows], targets=y[rows]).backward()
        opt.step()
        out["fsdp2_memory"] = state_bytes_per_rank(model, opt)  # before zero_grad
        opt.zero_grad()
    out["fsdp2_weights"] = {n: p.full_tensor() for n, p in model.named_parameters()}

    inputs, targets = batches()[0][0][:2], batches()[0][1][:2]
    ours, theirs = tensor_parallel_llama(tiny_model()), dtensor_tensor_parallel_llama(tiny_model())
    unsplit = tiny_model()
    out["tp_logits"] = {name: m(inputs).detach() for name, m in
                        (("ours", ours), ("dtensor", theirs), ("unsplit", unsplit))}
    for m in (ours, theirs):
        m(inputs, targets=targets).backward()
    theirs_params = dict(theirs.named_parameters())
    out["tp_blocks"] = {n: (p.detach(), p.grad, local_tensor(theirs_params[n]).detach(),
                            local_tensor(theirs_params[n].grad)) for n, p in ours.named_parameters()}
    return out


@pytest.fixture(scope="module")
def ranks_results() -> list[dict[str, object]]:
    """One start of 2 processes for the whole file."""
    return run_on_processes(torch_native_worker, WORLD)


def test_fsdp2_equals_one_process_and_holds_zero3_bytes(ranks_results):
    reference = tiny_model()
    opt = torch.optim.AdamW(reference.parameters(), **ADAMW)
    for x, y in batches():
        reference(x, targets=y).backward()
        opt.step()
        opt.zero_grad()
    n_params = reference.num_parameters()
    for rank, res in enumerate(ranks_results):
        weights = res["fsdp2_weights"]
        assert weights.keys() == dict(reference.named_parameters()).keys()
        for name, value in reference.named_parameters():
            torch.testing.assert_close(weights[name], value.detach(), **TOL, msg=f"rank {rank} {name}")
        expected = {k: int(v) for k, v in zero_bytes_formula(n_params, WORLD, stage=3).items()}
        assert res["fsdp2_memory"] == expected


def test_dtensor_tensor_parallel_equals_ours_and_the_unsplit_model(ranks_results):
    for rank, res in enumerate(ranks_results):
        logits = res["tp_logits"]
        torch.testing.assert_close(logits["dtensor"], logits["unsplit"], **TOL)
        torch.testing.assert_close(logits["ours"], logits["unsplit"], **TOL)
        assert len(res["tp_blocks"]) == len(list(tiny_model().parameters()))
        for name, (ours, ours_grad, theirs, theirs_grad) in res["tp_blocks"].items():
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"rank {rank} {name}")  # same split
            torch.testing.assert_close(ours_grad, theirs_grad, **TOL, msg=f"rank {rank} {name}")
