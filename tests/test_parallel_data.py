"""Data parallelism from scratch (chapter 15), on 2 gloo processes.

The collectives behave as documented, and three data-parallel versions (gradients all-reduced by
hand, bucketed all-reduce overlapped with backward, torch's DistributedDataParallel) reach the
same weights after 3 AdamW steps as one process with the global batch. Tolerance: float32,
``rtol=1e-5, atol=1e-6`` (the ranks sum gradients in another order than one process does).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llama_from_scratch.parallel import (
    BucketedDataParallel,
    all_gather_flat,
    all_reduce_gradients,
    reduce_scatter_flat,
    run_on_processes,
)
from parallel_common import ADAMW, TOL, WORLD, batches, fresh_model, needs_gloo, rank_rows

pytestmark = needs_gloo


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), **ADAMW)


def train_one_process() -> dict[str, torch.Tensor]:
    model = fresh_model()
    opt = optimizer_for(model)
    for x, y in batches():
        model(x, targets=y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


# ----- what the ranks run -------------------------------------------------------------------------

def collectives_worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    shard = torch.arange(3.0) + 10 * rank
    full = torch.arange(4.0 * world_size) * (rank + 1)
    summed = torch.tensor([1.0 + rank])
    dist.all_reduce(summed)
    return {"gathered": all_gather_flat(shard), "scattered": reduce_scatter_flat(full),
            "scattered_by_all_reduce": reduce_scatter_flat(full, use_all_reduce=True), "summed": summed}


def data_parallel_worker(rank: int, world_size: int) -> dict[str, object]:
    results: dict[str, object] = {"collectives": collectives_worker(rank, world_size)}
    rows = rank_rows(rank, world_size)

    # 1. By hand: backward, then one all-reduce per gradient.
    model = fresh_model()
    opt = optimizer_for(model)
    for x, y in batches():
        model(x[rows], targets=y[rows]).backward()
        all_reduce_gradients(model)
        opt.step()
        opt.zero_grad()
    results["by_hand"] = model.state_dict()

    # 2. Buckets of about 8 KB, all-reduced asynchronously while backward runs.
    model = fresh_model()
    ddp = BucketedDataParallel(model, bucket_cap_mb=8 / 1024)
    opt = optimizer_for(model)
    launched_during_backward = []
    for x, y in batches():
        ddp(x[rows], targets=y[rows]).backward()
        launched_during_backward.append(list(ddp.launch_log))
        ddp.finish_gradient_sync()
        opt.step()
        opt.zero_grad()
    results["bucketed"] = model.state_dict()
    results["n_buckets"] = len(ddp.buckets)
    results["launched_during_backward"] = launched_during_backward

    # 3. torch's DistributedDataParallel, the reference.
    model = fresh_model()
    ddp_torch = torch.nn.parallel.DistributedDataParallel(model)
    opt = optimizer_for(model)
    for x, y in batches():
        ddp_torch(x[rows], targets=y[rows]).backward()
        opt.step()
        opt.zero_grad()
    results["torch_ddp"] = model.state_dict()
    return results


# ----- the tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranks_results() -> list[dict[str, object]]:
    """One start of 2 processes for the whole file (starting processes is the slow part)."""
    return run_on_processes(data_parallel_worker, WORLD)


def test_collectives_on_two_processes(ranks_results):
    out = [r["collectives"] for r in ranks_results]
    full_sum = sum(torch.arange(4.0 * WORLD) * (r + 1) for r in range(WORLD))
    for rank, res in enumerate(out):
        torch.testing.assert_close(res["gathered"], torch.cat([torch.arange(3.0) + 10 * r for r in range(WORLD)]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(res["scattered"], full_sum.chunk(WORLD)[rank], rtol=0, atol=0)
        torch.testing.assert_close(res["scattered_by_all_reduce"], res["scattered"], rtol=0, atol=0)
        torch.testing.assert_close(res["summed"], torch.tensor([3.0]), rtol=0, atol=0)


def test_data_parallel_equals_ddp_and_one_process_with_the_global_batch(ranks_results):
    reference = train_one_process()
    start = fresh_model().state_dict()
    out = ranks_results
    for name in ("by_hand", "bucketed", "torch_ddp"):
        for rank in range(WORLD):
            weights = out[rank][name]
            assert weights.keys() == reference.keys()
            for key in reference:
                torch.testing.assert_close(weights[key], reference[key], **TOL, msg=f"{name} rank {rank} {key}")
                torch.testing.assert_close(weights[key], out[rank]["torch_ddp"][key], **TOL)
    # the weights did move (a test of nothing would pass too if training were skipped)
    moved = max((reference[k] - start[k]).abs().max().item() for k in reference)
    assert moved > 1e-3
    # several buckets, every one of them launched inside backward, before finish_gradient_sync
    n_buckets = out[0]["n_buckets"]
    assert n_buckets > 3
    for launched in out[0]["launched_during_backward"]:
        assert sorted(launched) == list(range(n_buckets))
