"""Process groups and the three collectives that parallel training is made of.

A *process group* is ``world_size`` processes (ranks ``0 .. world_size - 1``) that can talk to each
other. ``torch.distributed`` gives them collectives: operations every rank calls at the same time,
each with its own tensor.

* **all-reduce**: every rank ends with the sum of all ranks' tensors (data parallelism averages
  gradients with it).
* **all-gather**: every rank ends with all ranks' tensors concatenated (ZeRO-3 rebuilds a full
  weight from its shards with it).
* **reduce-scatter**: the sum of all ranks' tensors, cut into ``world_size`` pieces, rank ``r``
  keeping piece ``r`` (ZeRO-2 and -3 keep only their shard of a gradient with it). An all-reduce is
  a reduce-scatter followed by an all-gather, which is how NCCL's ring all-reduce works.

The backend carries the bytes: ``gloo`` between CPU processes, ``nccl`` between GPUs. Nothing in
this subpackage names a device: tensors go where :func:`device_for_rank` says, so the same code runs
on a laptop's cores with gloo and on GPUs with NCCL.

Two ways to start the processes:

* ``torchrun --nproc_per_node N script.py``: ``torchrun`` starts ``N`` copies of the script with
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
  environment; the script calls :func:`init_distributed`.
* :func:`run_on_processes` (``torch.multiprocessing`` under the hood): runs a function on ``N``
  fresh processes from Python and returns what each returned; the tests use it. The processes meet
  through a file in a private temporary folder (``file://`` rendezvous), so tests running side by
  side never fight over a port.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def default_backend() -> str:
    """``nccl`` where CUDA GPUs are available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def device_for_rank(backend: str, local_rank: int) -> torch.device:
    """The device a rank computes on: its own GPU (``cuda:<local_rank>``) under NCCL, the CPU
    under gloo."""
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Joins the process group described by ``torchrun``'s environment variables and returns
    ``(rank, world_size, device)``.

    Run without ``torchrun`` (no ``WORLD_SIZE`` in the environment) it returns ``(0, 1, device)``
    and starts nothing, so one script serves both cases.
    """
    backend = backend or default_backend()
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device_for_rank(backend, 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for_rank(backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def _worker(rank: int, fn: Callable[..., Any], world_size: int, backend: str, folder: str,
            threads: int, args: tuple) -> None:
    """What each process of :func:`run_on_processes` runs: join the group, call ``fn``, save its
    result to ``folder/result_<rank>.pt``, leave the group."""
    torch.set_num_threads(threads)  # N processes on a small CPU: do not oversubscribe its cores
    device = device_for_rank(backend, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder) / f"result_{rank}.pt")
        dist.barrier()  # no rank leaves while another still needs the group
    finally:
        dist.destroy_process_group()


def run_on_processes(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                     threads_per_process: int = 1) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` new processes joined in one process
    group and returns their results, ordered by rank.

    ``fn`` must be importable by the new processes (defined at the top level of a module, not in a
    notebook cell), and its result must be something ``torch.save`` can write (tensors, numbers,
    lists and dicts of them). An exception in any rank is raised here.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="lfs_dist_") as folder:
        mp.spawn(_worker, args=(fn, world_size, backend, folder, threads_per_process, args),
                 nprocs=world_size, join=True)
        return [torch.load(Path(folder) / f"result_{r}.pt", weights_only=False) for r in range(world_size)]


# ----- collectives on flat tensors ----------------------------------------------------------------

def all_gather_flat(shard: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The ranks' 1-D ``shard`` tensors (all the same size) concatenated in rank order, on every
    rank: ``[world_size * shard.numel()]``."""
    world_size = dist.get_world_size(group)
    full = torch.empty(world_size * shard.numel(), dtype=shard.dtype, device=shard.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(full, shard.contiguous(), group=group)
    return full


def reduce_scatter_flat(full: torch.Tensor, group: dist.ProcessGroup | None = None,
                        use_all_reduce: bool = False) -> torch.Tensor:
    """Rank ``r``'s piece of the sum over ranks of the 1-D ``full`` (whose size ``world_size``
    divides): ``sum_ranks(full)[r * s : (r + 1) * s]`` with ``s = full.numel() // world_size``.

    ``use_all_reduce=True`` computes the same thing the long way round: all-reduce the whole tensor,
    keep one piece. That moves twice the bytes; it is the fallback for a backend without
    reduce-scatter (gloo had none before torch 2.x; torch 2.13's gloo has ``reduce_scatter_tensor``,
    checked by the tests, which also check the two paths agree).
    """
    world_size = dist.get_world_size(group)
    if full.numel() % world_size:
        raise ValueError(f"reduce_scatter_flat needs a size divisible by {world_size}, got {full.numel()}")
    size = full.numel() // world_size
    if use_all_reduce:
        summed = full.clone()
        dist.all_reduce(summed, group=group)
        rank = dist.get_rank(group)
        return summed[rank * size:(rank + 1) * size].clone()
    shard = torch.empty(size, dtype=full.dtype, device=full.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    scatter(shard, full.contiguous(), group=group)
    return shard
