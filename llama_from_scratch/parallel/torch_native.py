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
"""

from __future__ import annotations

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
