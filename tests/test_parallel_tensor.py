"""Tensor parallelism (Megatron) from scratch (chapter 15), on 2 gloo processes.

A column-parallel/row-parallel pair equals the two whole linear layers; the package's tiny Llama
(GQA: 4 query heads, 2 key/value heads) split across 2 ranks gives the unsplit model's logits and,
for every weight, this rank's block of the unsplit model's gradient; 2 AdamW steps leave each rank
with its block of the unsplit model's weights. The reference is the unsplit model run in the same
process with torch's own layers. Tolerance: float32, ``rtol=1e-5, atol=1e-6`` (the split sums
products in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    run_on_processes,
    tensor_parallel_llama,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-6)
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split along the output features (dim 0)
ROW = ("o_proj", "down_proj")  # split along the input features (dim 1)


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny(vocab_size=64, dim=32, hidden_dim=64, max_seq_len=32))


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    return t[:, :-1], t[:, 1:]


def block_of(name: str, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """What rank ``rank`` should hold of the unsplit tensor ``full`` named ``name``."""
    if any(f".{n}." in name for n in COLUMN):
        return full.chunk(world_size, dim=0)[rank]
    if any(f".{n}." in name for n in ROW):
        return full.chunk(world_size, dim=1)[rank]
    return full


def tensor_parallel_worker(rank: int, world_size: int) -> dict[str, object]:
    out: dict[str, object] = {}

    # A column-parallel / row-parallel pair, with biases, against the two whole layers.
    torch.manual_seed(2)
    first, second = nn.Linear(8, 6), nn.Linear(6, 4)
    x = torch.randn(3, 8, requires_grad=True)
    col, row = ColumnParallelLinear.from_linear(first), RowParallelLinear.from_linear(second)
    y_tp = row(torch.relu(col(x)))
    y_tp.square().sum().backward()
    grad_x_tp = x.grad.clone()
    x.grad = None
    y = second(torch.relu(first(x)))
    y.square().sum().backward()
    out["pair"] = dict(y_tp=y_tp.detach(), y=y.detach(), grad_x_tp=grad_x_tp, grad_x=x.grad,
                       col_grad=col.weight.grad, col_grad_expected=first.weight.grad.chunk(world_size)[rank],
                       row_grad=row.weight.grad, row_grad_expected=second.weight.grad.chunk(world_size, dim=1)[rank],
                       row_bias_grad=row.bias.grad, row_bias_grad_expected=second.bias.grad)

    # The package's Llama, split by heads (GQA) and by SwiGLU hidden features.
    model = tiny_model()
    tp = tensor_parallel_llama(model)
    inputs, targets = tokens()
    out["logits_tp"], out["logits"] = tp(inputs).detach(), model(inputs).detach()
    tp(inputs, targets=targets).backward()
    model(inputs, targets=targets).backward()
    full_grads = {n: p.grad for n, p in model.named_parameters()}
    out["grads"] = {n: (p.grad, block_of(n, full_grads[n], rank, world_size)) for n, p in tp.named_parameters()}
    out["local_shapes"] = {n: tuple(p.shape) for n, p in tp.named_parameters()}

    # Two AdamW steps: each rank keeps its block of the unsplit model's weights.
    model, tp = tiny_model(), tensor_parallel_llama(tiny_model())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in (model, tp)]
    for _ in range(2):
        for m, opt in zip((model, tp), opts):
            m(inputs, targets=targets).backward()
            opt.step()
            opt.zero_grad()
    full = dict(model.named_parameters())
    out["weights"] = {n: (p.detach(), block_of(n, full[n].detach(), rank, world_size)) for n, p in tp.named_parameters()}
    return out


@pytest.fixture(scope="module")
def ranks_results() -> list[dict[str, object]]:
    """One start of 2 processes for the whole file."""
    return run_on_processes(tensor_parallel_worker, WORLD)


def test_column_then_row_parallel_equals_the_two_linear_layers(ranks_results):
    for res in ranks_results:
        pair = res["pair"]
        torch.testing.assert_close(pair["y_tp"], pair["y"], **TOL)
        torch.testing.assert_close(pair["grad_x_tp"], pair["grad_x"], **TOL)
        for key in ("col_grad", "row_grad", "row_bias_grad"):
            torch.testing.assert_close(pair[key], pair[f"{key}_expected"], **TOL)


def test_tensor_parallel_llama_logits_and_gradients_equal_the_unsplit_model(ranks_results):
    for rank, res in enumerate(ranks_results):
        torch.testing.assert_close(res["logits_tp"], res["logits"], **TOL)
        assert len(res["grads"]) == len(list(tiny_model().parameters()))
        for name, (grad, expected) in res["grads"].items():
            torch.testing.assert_close(grad, expected, **TOL, msg=f"rank {rank} {name}")
        shapes = res["local_shapes"]
        # each rank: 2 of the 4 query heads, 1 of the 2 key/value heads (head_dim 8), 32 of 64 hidden features
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8, 32)
        assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 16)
        assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 32)
    # the two ranks hold different blocks
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ranks_results[0]["grads"][q][0], ranks_results[1]["grads"][q][0])


def test_tensor_parallel_training_keeps_each_rank_block_of_the_unsplit_weights(ranks_results):
    start = dict(tiny_model().named_parameters())
    for rank, res in enumerate(ranks_results):
        for name, (weight, expected) in res["weights"].items():
            torch.testing.assert_close(weight, expected, **TOL, msg=f"rank {rank} {name}")
        moved = max((w - block_of(n, start[n].detach(), rank, WORLD)).abs().max().item()
                    for n, (w, _) in res["weights"].items())
        assert moved > 1e-3


def test_heads_must_divide_the_tensor_parallel_size():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tensor_parallel_llama(tiny_model(), rank=0, world_size=4)  # 2 key/value heads on 4 ranks
