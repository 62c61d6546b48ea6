"""Chapter 15's parallel forms on 4 gloo processes, and FSDP2 on one.

The 2-process tests cannot catch a mistake that only shows with more ranks (a shard offset that is
right for rank 1 of 2 but not for rank 2 of 4, a reduce-scatter piece taken from the wrong rank).
Here the same workers run on 4 processes, each rank training on one row of the global batch:
every form reaches one process's weights after 3 AdamW steps (float32, ``rtol=1e-5, atol=1e-6``),
the collectives give every rank its piece, and each ZeRO stage holds exactly the bytes of
``zero_bytes_formula`` for 4 ranks (every parameter of the tiny model has a multiple of 4
elements, so the shards are exact quarters). FSDP2 on a world of one process is the degenerate
case: nothing to shard, and it must still train exactly as the plain model does.
"""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.parallel import run_on_processes, zero_bytes_formula
from llama_from_scratch.parallel.torch_native import fsdp2_llama
from parallel_common import ADAMW, GLOBAL_BATCH, TOL, batches, fresh_model, needs_gloo, rank_rows
from test_parallel_data import data_parallel_worker
from test_parallel_data import train_one_process as train_one_process_state
from test_parallel_zero import train_one_process as train_one_process_model
from test_parallel_zero import zero_worker

pytestmark = needs_gloo

FOUR = 4


def fsdp2_worker(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """FSDP2 (``fully_shard`` per block, then the model) on this rank's rows; the full weights."""
    rows = rank_rows(rank, world_size)
    model = fsdp2_llama(fresh_model())
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    for x, y in batches():
        model(x[rows], targets=y[rows]).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.full_tensor().detach() for n, p in model.named_parameters()}


def four_rank_worker(rank: int, world_size: int) -> dict[str, object]:
    return {"data": data_parallel_worker(rank, world_size), "zero": zero_worker(rank, world_size),
            "fsdp2": fsdp2_worker(rank, world_size)}


@pytest.fixture(scope="module")
def ranks_results() -> list[dict[str, object]]:
    """One start of 4 processes for the whole file."""
    assert GLOBAL_BATCH % FOUR == 0, "each of the 4 ranks needs its own rows"
    return run_on_processes(four_rank_worker, FOUR)


def test_every_parameter_splits_into_exact_quarters():
    assert all(p.numel() % FOUR == 0 for p in fresh_model().parameters())


def test_collectives_on_four_processes(ranks_results):
    full_sum = sum(torch.arange(4.0 * FOUR) * (r + 1) for r in range(FOUR))  # 1 + 2 + 3 + 4 = 10 times arange
    for rank, res in enumerate(r["data"]["collectives"] for r in ranks_results):
        gathered = torch.cat([torch.arange(3.0) + 10 * r for r in range(FOUR)])
        torch.testing.assert_close(res["gathered"], gathered, rtol=0, atol=0)
        torch.testing.assert_close(res["scattered"], full_sum.chunk(FOUR)[rank], rtol=0, atol=0)
        torch.testing.assert_close(res["scattered_by_all_reduce"], res["scattered"], rtol=0, atol=0)
        torch.testing.assert_close(res["summed"], torch.tensor([1.0 + 2 + 3 + 4]), rtol=0, atol=0)


def test_data_parallel_ddp_and_zero_on_four_ranks_equal_one_process(ranks_results):
    reference = train_one_process_state()
    start = fresh_model().state_dict()
    parameters = {name: reference[name] for name, _ in fresh_model().named_parameters()}
    assert max((reference[k] - start[k]).abs().max().item() for k in reference) > 1e-3  # training moved them
    for rank, res in enumerate(ranks_results):
        forms = {name: res["data"][name] for name in ("by_hand", "bucketed", "torch_ddp")}
        forms |= {f"zero{stage}": res["zero"][f"weights_{stage}"] for stage in (1, 2, 3)}
        forms["fsdp2"] = res["fsdp2"]
        for name, weights in forms.items():
            # state dicts also list the tied lm_head.weight; the parameters list it once, as the embedding
            assert set(weights) - {"lm_head.weight"} == set(parameters), name
            for key, value in parameters.items():
                torch.testing.assert_close(weights[key], value, **TOL, msg=f"{name} rank {rank} {key}")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_bytes_per_rank_equal_the_formula_for_four_ranks(ranks_results, stage):
    n_params = fresh_model().num_parameters()
    expected = {k: int(v) for k, v in zero_bytes_formula(n_params, FOUR, stage).items()}
    for rank, res in enumerate(ranks_results):
        assert res["zero"][f"memory_{stage}"] == expected, f"stage {stage} rank {rank}"


def test_fsdp2_on_one_process_trains_as_the_plain_model():
    (weights,) = run_on_processes(fsdp2_worker, 1)
    for name, value in train_one_process_model().named_parameters():
        torch.testing.assert_close(weights[name], value.detach(), **TOL, msg=name)
