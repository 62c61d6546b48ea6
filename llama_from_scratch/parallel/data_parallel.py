"""Data parallelism: every rank holds the whole model and trains on its own slice of the batch.

Ranks start from the same weights (:func:`broadcast_parameters`), each computes the gradient of its
slice, and the gradients are averaged over the ranks before the optimizer step. If each slice has
the same number of tokens, the mean of the ranks' mean-loss gradients *is* the gradient of the mean
loss over the global batch, so ``N`` ranks with batch ``b`` take the same steps as one process with
batch ``N * b`` (up to float rounding: sums happen in another order).

Two versions:

* :func:`all_reduce_gradients`: after ``backward()``, one all-reduce per parameter. Simple, but
  the network sits idle during backward and the CPU/GPU sits idle during communication, and many
  small messages each pay the network's latency.
* :class:`BucketedDataParallel`: what ``torch.nn.parallel.DistributedDataParallel`` does (Li et
  al. 2020, "PyTorch Distributed"). Parameters are grouped into *buckets* of about
  ``bucket_cap_mb`` megabytes, in reverse order of ``model.parameters()`` (roughly the order in
  which backward produces their gradients: last layer first). A hook fires as each gradient is
  ready; when a bucket's last gradient arrives, the bucket is flattened into one tensor and an
  asynchronous all-reduce starts, while backward goes on computing earlier layers' gradients.
  Before the optimizer step, :meth:`BucketedDataParallel.finish_gradient_sync` waits for the
  all-reduces and copies the averages back into ``.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s parameters and buffers to every rank, so that all replicas start
    equal (different seeds would otherwise give different initial weights)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=src)


def all_reduce_gradients(model: nn.Module) -> None:
    """Replaces every ``.grad`` by its average over the ranks: one all-reduce (sum) per
    parameter, then a division by the number of ranks. Call it between ``backward()`` and the
    optimizer step."""
    world_size = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # sum over the ranks, in place, on every rank
            p.grad.div_(world_size)


@dataclass
class _Bucket:
    """Parameters whose gradients travel in one all-reduce."""

    params: list[nn.Parameter]
    ready: int = 0  # how many of them have their gradient for this backward pass
    flat: torch.Tensor | None = None  # the flattened gradients being all-reduced
    handle: dist.Work | None = None  # the asynchronous all-reduce in flight
    numels: list[int] = field(default_factory=list)


class BucketedDataParallel(nn.Module):
    """Wraps ``module`` for data-parallel training with bucketed gradient all-reduces that overlap
    backward (see the module docstring).

    Use as ``DistributedDataParallel``, plus one call: ``loss = ddp(x, ...); loss.backward();
    ddp.finish_gradient_sync(); optimizer.step()``. Inside ``with ddp.no_sync():`` backward passes
    only accumulate gradients locally (gradient accumulation: synchronize on the last micro-batch).

    Attributes:
        buckets: the buckets, in the order backward fills them (the last parameters first).
        launch_log: which bucket started its all-reduce, in order, during the last backward pass
            (``finish_gradient_sync`` clears it); shows the overlap: buckets start *during*
            backward, before ``finish_gradient_sync`` is called.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0) -> None:
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        broadcast_parameters(module)
        cap_bytes = bucket_cap_mb * 2**20
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(params):  # backward produces the last layers' gradients first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= cap_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of: dict[nn.Parameter, int] = {}
        for i, bucket in enumerate(self.buckets):
            bucket.numels = [p.numel() for p in bucket.params]
            for p in bucket.params:
                self._bucket_of[p] = i
                p.register_post_accumulate_grad_hook(self._on_gradient_ready)
        self._sync = True
        self.launch_log: list[int] = []

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without communicating."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_gradient_ready(self, p: nn.Parameter) -> None:
        """Called by autograd once ``p.grad`` holds this backward pass's gradient."""
        if not self._sync:
            return
        index = self._bucket_of[p]
        bucket = self.buckets[index]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(index)

    def _launch(self, index: int) -> None:
        """Flattens bucket ``index``'s gradients and starts their all-reduce without waiting."""
        bucket = self.buckets[index]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)  # sum of averages
        bucket.handle = dist.all_reduce(bucket.flat, async_op=True)
        self.launch_log.append(index)

    def finish_gradient_sync(self) -> None:
        """Waits for every bucket's all-reduce and writes the averaged gradients into ``.grad``.

        A bucket that never filled (a parameter got no gradient in this pass) is launched now,
        with zeros standing in for the missing gradients, so that every rank takes part in every
        all-reduce.
        """
        for index, bucket in enumerate(self.buckets):
            if bucket.handle is None:
                self._launch(index)
        for bucket in self.buckets:
            bucket.handle.wait()
            for p, piece in zip(bucket.params, bucket.flat.split(bucket.numels)):
                if p.grad is None:
                    p.grad = piece.view_as(p).clone()
                else:
                    p.grad.copy_(piece.view_as(p))
            bucket.ready, bucket.flat, bucket.handle = 0, None, None
        self.launch_log = []
