"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): each weight matrix split across ranks.

Data parallelism and ZeRO split the *batch*; every rank still runs the whole model. Tensor
parallelism splits the *layers*: each of the ``N`` ranks holds ``1/N`` of every large matrix and
computes ``1/N`` of each matrix product, on the same tokens.

A linear layer ``Y = X W^T`` (``W`` is ``[out, in]``) splits two ways:

* **column-parallel** (:class:`ColumnParallelLinear`): ``W``'s rows (the output features) are
  cut into ``N`` blocks; rank ``r`` holds block ``W_r`` and computes its block of output features
  ``Y_r = X W_r^T`` from the whole input. No communication forward; in backward, the input's
  gradient is the *sum* of the ranks' contributions ``dY_r W_r``, so it is all-reduced.
* **row-parallel** (:class:`RowParallelLinear`): rank ``r`` holds a block of ``W``'s *input*
  columns and receives only the matching block of input features ``X_r``; ``X_r W_r^T`` is a
  partial sum of ``Y``, all-reduced forward. The output's gradient is already on every rank, so
  backward needs no communication.

A column-parallel layer followed by a row-parallel one needs one all-reduce forward and one
backward, whatever happens element-wise in between, because each rank's block of features stays
on that rank. Megatron names the two communication points ``f`` (identity forward, all-reduce
backward: :func:`copy_to_tensor_parallel_region`) and ``g`` (all-reduce forward, identity backward:
:func:`reduce_from_tensor_parallel_region`). In a Llama block:

* SwiGLU: ``gate_proj`` and ``up_proj`` column-parallel (each rank a block of the hidden
  features; SiLU and the product are element-wise), ``down_proj`` row-parallel.
* attention: ``q_proj``, ``k_proj``, ``v_proj`` column-parallel *by heads* (each rank
  ``n_heads / N`` query heads and ``n_kv_heads / N`` key/value heads: with GQA, query head ``h``
  uses key/value head ``h // n_rep``, so consecutive blocks of query heads keep their key/value
  heads on the same rank), attention itself per head with no communication, ``o_proj``
  row-parallel.

Embedding, RMSNorms and the output layer stay whole on every rank here (Megatron also splits the
vocabulary; not done here). Their gradients come out equal on every rank with no extra
communication, since the activations they see are.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Megatron's ``g``: all-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def copy_to_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; in backward, the gradient summed over the ranks (Megatron's ``f``)."""
    return _CopyToTensorParallelRegion.apply(x)


def reduce_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks; in backward, the gradient unchanged (Megatron's ``g``)."""
    return _ReduceFromTensorParallelRegion.apply(x)


def _block(size: int, rank: int, world_size: int, what: str) -> slice:
    """Rank ``rank``'s block of ``size`` features split ``world_size`` ways (must divide evenly)."""
    if size % world_size:
        raise ValueError(f"{what} ({size}) must be divisible by the tensor-parallel size {world_size}")
    step = size // world_size
    return slice(rank * step, (rank + 1) * step)


class ColumnParallelLinear(nn.Module):
    """This rank's block of ``out_features // world_size`` output features of a linear layer.

    Input: the whole ``[..., in_features]``, the same on every rank. Output: this rank's block of
    features, ``[..., out_features // world_size]`` (not gathered: a :class:`RowParallelLinear`
    takes it as it is). Build it from a whole ``nn.Linear`` with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        rows = _block(out_features, self.rank, self.world_size, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self.local_out_features = rows.stop - rows.start
        self.weight = nn.Parameter(torch.empty(self.local_out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(self.local_out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None,
                    world_size: int | None = None) -> ColumnParallelLinear:
        """This rank's rows of ``linear``'s weight (and bias): a copy, so ``linear`` can be freed."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, world_size)
        rows = _block(linear.out_features, layer.rank, layer.world_size, "out_features")
        with torch.no_grad():
            layer.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[rows])
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel_region(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.local_out_features}), rank={self.rank}/{self.world_size}")


class RowParallelLinear(nn.Module):
    """A linear layer whose ``in_features`` are split: this rank multiplies its block of input
    features by its block of weight columns, and the partial sums are all-reduced.

    Input: this rank's block ``[..., in_features // world_size]`` (a
    :class:`ColumnParallelLinear`'s output). Output: the whole ``[..., out_features]``, the same on
    every rank. The bias (if any) is added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        cols = _block(in_features, self.rank, self.world_size, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.local_in_features = cols.stop - cols.start
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None,
                    world_size: int | None = None) -> RowParallelLinear:
        """This rank's columns of ``linear``'s weight (the bias whole): a copy."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, world_size)
        cols = _block(linear.in_features, layer.rank, layer.world_size, "in_features")
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, cols])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tensor_parallel_region(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.local_in_features}), "
                f"out_features={self.out_features}, rank={self.rank}/{self.world_size}")


def tensor_parallel_llama(model: nn.Module, rank: int | None = None, world_size: int | None = None) -> nn.Module:
    """A copy of a :class:`~llama_from_scratch.model.Llama` whose blocks are split Megatron-style
    across the ranks of the current process group (see the module docstring); ``model`` is left
    as it is.

    The copy keeps the package's own modules and forward code: in every block, ``q_proj``,
    ``k_proj``, ``v_proj``, ``gate_proj`` and ``up_proj`` become :class:`ColumnParallelLinear`,
    ``o_proj`` and ``down_proj`` :class:`RowParallelLinear`, and the attention module counts only
    this rank's heads. ``n_heads`` and ``n_kv_heads`` must be divisible by ``world_size`` (GQA's
    key/value heads are split too), and so must ``hidden_dim``. Logits and the gradients of the
    unsplit model's weights (this rank's blocks of them) come out equal up to float rounding.
    The KV cache is not supported (``make_kv_cache`` sizes it for all heads).
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    tp = copy.deepcopy(model)
    for layer in tp.model.layers:
        attn = layer.self_attn
        for what, count in (("n_heads", attn.n_heads), ("n_kv_heads", attn.n_kv_heads)):
            if count % world_size:
                raise ValueError(f"{what} ({count}) must be divisible by the tensor-parallel size {world_size}")
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), rank, world_size))
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, rank, world_size)
        attn.n_heads //= world_size  # n_rep (query heads per key/value head) is unchanged
        attn.n_kv_heads //= world_size
        mlp = layer.mlp
        mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, rank, world_size)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, rank, world_size)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, rank, world_size)
        mlp.hidden_dim //= world_size
    return tp
