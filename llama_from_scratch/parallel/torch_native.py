"""The same parallel forms with PyTorch's own APIs, applied to the package's Llama.

What the other modules of this subpackage build by hand, PyTorch ships ready-made. Both are built on
``DTensor`` (a tensor that knows how it is split over a ``DeviceMesh`` of ranks):

* :func:`fsdp2_llama`: ``torch.distributed.fsdp.fully_shard`` (FSDP2), ZeRO stage 3. Applied to
  every transformer block and then to the whole model: each block is one all-gather unit, the root
  holds the embedding, final norm and output layer (the same units as
  :class:`~llama_from_scratch.parallel.zero.ZeroAdamW`'s stage 3). Each parameter becomes a
  ``DTensor`` split along its first dimension (``torch.chunk``), gradients are reduce-scattered
  and averaged over the ranks, and an ordinary optimizer built *after* sharding steps the shards.
* :func:`dtensor_tensor_parallel_llama`: ``torch.distributed.tensor.parallel.parallelize_module``
  with Megatron's plan: ``ColwiseParallel`` for ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``
  and ``up_proj``, ``RowwiseParallel`` for ``o_proj`` and ``down_proj`` (the split of
  :func:`~llama_from_scratch.parallel.tensor_parallel.tensor_parallel_llama`). The attention
  modules are told their local head counts, as PyTorch's own tensor-parallel Llama example does.

Both run on CPUs with gloo (a ``"cpu"`` mesh) and on GPUs with NCCL (a ``"cuda"`` mesh).

What the :class:`~llama_from_scratch.trainer.Trainer` needs to train with FSDP2 (``TrainConfig.fsdp``,
``pretrain --fsdp``) is here too, so that the training step itself stays the same for one process,
DDP and FSDP2:

* :func:`gradient_sync`: skip the reduce-scatter on all but the last micro-batch of a step (FSDP2's
  ``set_requires_gradient_sync``, what ``DistributedDataParallel.no_sync`` is for DDP);
* :func:`full_state_dicts` / :func:`load_full_state_dicts`: the whole model's and optimizer's state
  gathered from the shards (``torch.distributed.checkpoint.state_dict``), in the layout one process
  writes, so an FSDP2 checkpoint is the same folder a single-process run saves, and either run can
  resume the other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def default_mesh() -> DeviceMesh:
    """A one-dimensional mesh over all ranks of the current process group, on their device type
    (``cuda`` under NCCL, ``cpu`` under gloo)."""
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def fsdp2_llama(model: nn.Module, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shards ``model`` (a :class:`~llama_from_scratch.model.Llama`) in place with FSDP2: one
    ``fully_shard`` per transformer block, then one on the whole model. Returns ``model``.

    Build the optimizer afterwards, from ``model.parameters()`` (now ``DTensor`` shards). Every rank
    must start with the same weights: ``fully_shard`` keeps each rank's own chunk of what it finds.
    ``reshard_after_forward=False`` keeps each block's full weights from forward to backward
    (ZeRO-2-like memory, one all-gather fewer per block).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = mesh or default_mesh()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def dtensor_tensor_parallel_llama(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Splits ``model``'s blocks in place with ``torch.distributed.tensor.parallel`` (Megatron's
    column/row plan, see the module docstring) and returns it. ``n_heads`` and ``n_kv_heads`` must
    be divisible by the mesh size; embedding, norms and output layer stay whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = mesh or default_mesh()
    size = mesh.size()
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.n_heads % size or attn.n_kv_heads % size:
            raise ValueError(f"n_heads ({attn.n_heads}) and n_kv_heads ({attn.n_kv_heads}) must be divisible "
                             f"by the tensor-parallel size {size}")
        parallelize_module(layer, mesh, plan)
        attn.n_heads //= size  # the local projections now produce this rank's heads only
        attn.n_kv_heads //= size
        layer.mlp.hidden_dim //= size
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t``: ``t.to_local()`` for a ``DTensor``, ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``: ``t.full_tensor()`` for a ``DTensor`` (a collective: every rank must call
    it), ``t`` itself otherwise."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within this block, an FSDP2 ``model``'s backward reduce-scatters its gradients only if
    ``enabled``; otherwise each rank accumulates its own unsharded gradients until a backward with
    ``enabled=True`` (the last micro-batch of a step) reduce-scatters their sum. Fewer collectives,
    more memory, the same step up to float rounding: FSDP2's counterpart of DDP's ``no_sync``."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer holds, in the order of its param groups: the order
    in which ``optimizer.state_dict()`` numbers them (a tied weight under its first name)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The FSDP2 ``model``'s and ``optimizer``'s whole state, gathered from the ranks' shards onto
    rank 0's CPU memory: ``(model_state, optimizer_state)``; the other ranks get two empty dicts.
    A collective: every rank must call it.

    ``model_state`` is ``model.state_dict()`` of the unsharded model (plain tensors; a tied weight
    appears under both names as one tensor). ``optimizer_state`` has the layout of
    ``optimizer.state_dict()`` in one process, parameters numbered ``0, 1, ...`` in param-group
    order, instead of ``get_optimizer_state_dict``'s parameter names, so that the checkpoint is the
    one a single process writes.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if not named:  # ranks other than 0
        return model_state, {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and kept in model_state:
            model_state[name] = model_state[kept]  # a tied weight is one tensor, as in model.state_dict()
    index = {name: i for i, name in enumerate(_optimizer_param_names(model, optimizer))}
    optimizer_state = {
        "state": {index[name]: value for name, value in named["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in named["param_groups"]],
    }
    return model_state, optimizer_state


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, Any],
                          optimizer_state: dict[str, Any] | None) -> None:
    """Loads whole (unsharded) state dicts, as :func:`full_state_dicts` returns them or one process
    saves them, into an FSDP2 ``model`` and its ``optimizer``: every rank passes the whole state and
    keeps its own shard of it. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is None or optimizer_state is None:
        return
    names = _optimizer_param_names(model, optimizer)
    named = {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                         for group in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=options)
