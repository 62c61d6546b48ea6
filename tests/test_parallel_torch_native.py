"""PyTorch's own distributed APIs on the package's Llama (chapter 15), on 2 gloo processes.

FSDP2 (``fully_shard``) reaches the same weights after 3 AdamW steps as one process with the global
batch, and holds per rank the bytes of ZeRO stage 3's formula, as our ``ZeroAdamW(stage=3)`` does.
``torch.distributed.tensor.parallel`` gives the unsplit model's logits and each rank the same weight
and gradient blocks as our ``tensor_parallel_llama``. Tolerance: float32, ``rtol=1e-5, atol=1e-6``.
The package's ``AdamW`` steps FSDP2's ``DTensor`` shards bit for bit as ``torch.optim.AdamW`` does
(the same elementwise operations in the same order on each rank's shard), keeping its moments sharded.
"""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.parallel import run_on_processes, state_bytes_per_rank, tensor_parallel_llama, zero_bytes_formula
from llama_from_scratch.parallel.torch_native import dtensor_tensor_parallel_llama, fsdp2_llama, local_tensor
from llama_from_scratch.optim import AdamW, weight_decay_groups
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

    shards = {}  # the same training with the package's AdamW and torch's, on weight-decay groups
    for name, make in (("ours", AdamW), ("torch", torch.optim.AdamW)):
        model = fsdp2_llama(tiny_model())
        opt = make(weight_decay_groups(model, ADAMW["weight_decay"]), **ADAMW)
        for x, y in batches():
            model(x[rows], targets=y[rows]).backward()
            opt.step()
            opt.zero_grad()
        moments = [opt.state[p]["exp_avg"] for p in model.parameters()]
        shards[name] = {"weights": {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()},
                        "moments_sharded": all(type(m) is type(p) for m, p in zip(moments, model.parameters())),
                        "moment_shapes": [tuple(local_tensor(m).shape) for m in moments]}
    out["adamw_on_shards"] = shards

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


def test_package_adamw_steps_fsdp2_shards_as_torch_adamw(ranks_results):
    for rank, res in enumerate(ranks_results):
        ours, theirs = res["adamw_on_shards"]["ours"], res["adamw_on_shards"]["torch"]
        assert ours["weights"].keys() == theirs["weights"].keys()
        for name, value in theirs["weights"].items():
            torch.testing.assert_close(ours["weights"][name], value, rtol=0, atol=0, msg=f"rank {rank} {name}")
        assert ours["moments_sharded"] and theirs["moments_sharded"]
        assert ours["moment_shapes"] == theirs["moment_shapes"]
        # the shards really are pieces: this rank holds half the rows of the embedding
        assert ours["weights"]["model.embed_tokens.weight"].shape[0] == tiny_model().config.vocab_size // WORLD
        half = tiny_model().config.vocab_size // WORLD
        start = tiny_model().model.embed_tokens.weight.detach()[rank * half:(rank + 1) * half]
        assert (ours["weights"]["model.embed_tokens.weight"] - start).abs().max() > 1e-4  # training moved them


def test_dtensor_tensor_parallel_equals_ours_and_the_unsplit_model(ranks_results):
    for rank, res in enumerate(ranks_results):
        logits = res["tp_logits"]
        torch.testing.assert_close(logits["dtensor"], logits["unsplit"], **TOL)
        torch.testing.assert_close(logits["ours"], logits["unsplit"], **TOL)
        assert len(res["tp_blocks"]) == len(list(tiny_model().parameters()))
        for name, (ours, ours_grad, theirs, theirs_grad) in res["tp_blocks"].items():
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"rank {rank} {name}")  # same split
            torch.testing.assert_close(ours_grad, theirs_grad, **TOL, msg=f"rank {rank} {name}")
