"""ZeRO, the Zero Redundancy Optimizer (Rajbhandari et al. 2020), stages 1, 2 and 3, from scratch.

Data parallelism repeats everything on every rank: the parameters, their gradients and the
optimizer state. With Adam in mixed precision the paper counts ``2 + 2 + K`` bytes per parameter
(half-precision parameters and gradients; ``K = 12``: a float32 master copy and Adam's two
float32 moments), all of it held by each of the ``N`` ranks. ZeRO keeps the data-parallel
computation but stops the repetition: rank ``r`` *owns* a ``1/N`` shard of every tensor.

* **stage 1** (P_os) shards the optimizer state. Each rank runs AdamW on its shard only, then the
  ranks all-gather the updated shards so everyone has the whole model again.
* **stage 2** (P_os+g) also shards the gradients: as backward produces a parameter's gradient, a
  reduce-scatter leaves each rank the sum of its own shard only, and the full gradient is freed.
* **stage 3** (P_os+g+p) also shards the parameters: a layer's weights exist in full only while
  that layer runs. They are all-gathered before its forward (and again before its backward) and
  freed after. PyTorch's FSDP is this stage.

Bytes held per rank for ``P`` parameters on ``N`` ranks (:func:`zero_bytes_formula`):

=========  ===================  ==========================  ===============================
stage      paper (mixed prec.)  this module (float32)       what is sharded
=========  ===================  ==========================  ===============================
DDP        (2 + 2 + 12) P       (4 + 4 + 8) P               nothing
1          (2 + 2) P + 12 P/N   (4 + 4) P + 8 P/N           optimizer state
2          2 P + (2 + 12) P/N   4 P + (4 + 8) P/N           + gradients
3          (2 + 2 + 12) P/N     (4 + 4 + 8) P/N             + parameters
=========  ===================  ==========================  ===============================

This module trains in float32 throughout, so no master copy is needed (the parameters *are* the
float32 weights): ``K = 8`` for AdamW's two moments. The sum per parameter is the same 16 bytes as
the paper's; only the split differs. (AdamW's step counter, one number per tensor, is left out of
both.) :func:`state_bytes_per_rank` measures what a rank actually holds.

Sharding is per tensor: every parameter is flattened and cut into ``N`` consecutive pieces of
``ceil(numel / N)`` elements (:func:`shard_range`; the last pieces may be shorter or empty), as
FSDP2 does with its per-parameter sharding. Collectives need equal pieces, so a short piece is
padded with zeros while it travels. Everything is equal, up to float rounding, to one process
training on the global batch (tested).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from llama_from_scratch.parallel.distributed import all_gather_flat, reduce_scatter_flat


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s piece ``[start, end)`` of a flattened tensor of ``numel`` elements: pieces
    of ``ceil(numel / world_size)`` consecutive elements, the last ones shorter or empty."""
    size = math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def _padded(piece: torch.Tensor, size: int) -> torch.Tensor:
    """``piece`` (1-D) followed by zeros up to ``size`` elements: collectives need equal pieces."""
    if piece.numel() == size:
        return piece
    out = piece.new_zeros(size)
    out[: piece.numel()] = piece
    return out


def zero_bytes_formula(num_params: int, world_size: int, stage: int,
                       mixed_precision: bool = False) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state each rank holds (the table of the module
    docstring): ``stage`` 0 is plain data parallelism (nothing sharded), 1 to 3 the ZeRO stages.

    ``mixed_precision=False``: this module's float32 AdamW (4 + 4 + 8 bytes per parameter).
    ``mixed_precision=True``: the paper's count (2 + 2 + 12, Rajbhandari et al. 2020, section 3).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0 (DDP), 1, 2 or 3, got {stage}")
    p_bytes, g_bytes, k_bytes = (2, 2, 12) if mixed_precision else (4, 4, 8)
    psi, n = num_params, world_size
    return {
        "params": p_bytes * psi / (n if stage >= 3 else 1),
        "grads": g_bytes * psi / (n if stage >= 2 else 1),
        "optimizer": k_bytes * psi / (n if stage >= 1 else 1),
    }


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view and its base count once; a freed
    storage counts 0; a ``DTensor``, as FSDP2 makes them, counts this rank's local piece)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if callable(getattr(t, "to_local", None)):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def state_bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer,
                         zero: ZeroAdamW | None = None) -> dict[str, int]:
    """What this rank holds, measured: bytes of the distinct storages of the model's parameters
    (and of ``zero``'s parameter shards), of their gradients, and of the optimizer's moment
    tensors (its step counters left out). Works for a plain model with any torch optimizer (the
    data-parallel baseline), for a :class:`ZeroAdamW` (pass it as ``optimizer`` and ``zero``) and
    for an FSDP2 model (its ``DTensor`` parameters count their local shards).

    Call it between ``backward()`` and ``zero_grad()``, when the gradients exist.
    """
    params = list(model.parameters())
    shards = list(zero.shards) if zero is not None else []
    moments = [v for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "params": _storage_bytes(params + shards),
        "grads": _storage_bytes([p.grad for p in params + shards]),
        "optimizer": _storage_bytes(moments),
    }


class ZeroAdamW:
    """AdamW with ZeRO stage ``stage`` (1, 2 or 3) over the current process group.

    Build it after the model (same initial weights on every rank: they are broadcast from rank 0),
    feed each rank its own slice of the batch, and use it like an optimizer::

        zero = ZeroAdamW(model, stage=3, lr=1e-3)
        loss = model(x_rank, targets=y_rank); loss.backward()
        zero.step(); zero.zero_grad()

    Gradients are averaged over the ranks (as in data parallelism) before AdamW uses them.

    Args:
        model: the model; its parameters are sharded across the ranks in place.
        stage: 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters).
        units: stage 3 only: the submodules whose weights are gathered and freed together (FSDP's
            "units"). Default: every transformer block in ``model.model.layers`` if there is such
            a list; the parameters in no unit (embedding, final norm, output layer) form the root
            unit, gathered for the model's whole forward pass.
        lr, betas, eps, weight_decay: AdamW's hyper-parameters (``torch.optim.AdamW`` does the
            arithmetic, on each rank's flat shards).

    Attributes:
        shards: rank's shard of every parameter (1-D, in ``model.parameters()`` order); in stages 1
            and 2 views into the full parameters, in stage 3 the only copy of the weights.
        optimizer: the ``torch.optim.AdamW`` that steps the shards (its state is the sharded state).
    """

    def __init__(self, model: nn.Module, stage: int, units: list[nn.Module] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        self.model = model
        self.stage = stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0)  # every rank starts from rank 0's weights
        self.ranges = [shard_range(p.numel(), self.rank, self.world_size) for p in self.params]
        self.piece = [math.ceil(p.numel() / self.world_size) for p in self.params]  # padded piece size
        self.shards: list[nn.Parameter] = []
        for p, (start, end) in zip(self.params, self.ranges):
            flat = p.data.view(-1)[start:end]
            # stages 1, 2: a view, so AdamW updates this rank's piece of the weight in place.
            # stage 3: a copy, and the full weight is freed.
            self.shards.append(nn.Parameter(flat.clone() if stage == 3 else flat))
        self.optimizer = torch.optim.AdamW(self.shards, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._index = {p: i for i, p in enumerate(self.params)}
        if stage >= 2:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._reduce_scatter_gradient)
        if stage == 3:
            self._set_up_units(units)

    # ----- gradients -------------------------------------------------------------------------------

    def _my_piece_of_gradient(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Reduce-scatter of parameter ``i``'s local gradient: this rank's piece of the average over
        the ranks."""
        start, end = self.ranges[i]
        full = _padded(grad.reshape(-1), self.piece[i] * self.world_size)
        return reduce_scatter_flat(full)[: end - start].div_(self.world_size)

    def _reduce_scatter_gradient(self, p: nn.Parameter) -> None:
        """Stages 2 and 3, called by autograd as soon as ``p.grad`` is complete: keep this rank's
        averaged piece (adding to it when gradients are accumulated over micro-batches), free the
        full gradient, and in stage 3 free the unit's weights once all its gradients are done."""
        i = self._index[p]
        piece = self._my_piece_of_gradient(i, p.grad)
        shard = self.shards[i]
        shard.grad = piece.clone() if shard.grad is None else shard.grad.add_(piece)
        p.grad = None
        if self.stage == 3:
            unit = self._unit_of[i]
            self._grads_pending[unit] -= 1
            if self._grads_pending[unit] == 0:
                self._free(unit)

    # ----- the step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Stage 1 first reduce-scatters the full gradients; then AdamW on this rank's shards;
        stages 1 and 2 then all-gather the updated shards into the full parameters (stage 3
        gathers them when the next forward pass needs them)."""
        if self.stage == 1:
            for i, (p, shard) in enumerate(zip(self.params, self.shards)):
                if p.grad is not None:  # the averaged piece goes into the full gradient's own storage
                    start, end = self.ranges[i]
                    mine = p.grad.view(-1)[start:end]
                    mine.copy_(self._my_piece_of_gradient(i, p.grad))
                    shard.grad = mine
        self.optimizer.step()
        if self.stage in (1, 2):
            for i, (p, shard) in enumerate(zip(self.params, self.shards)):
                full = all_gather_flat(_padded(shard.data, self.piece[i]))
                p.data.view(-1).copy_(full[: p.numel()])

    def zero_grad(self) -> None:
        """Drops the gradients (full ones in stage 1, the shards' in every stage)."""
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by name, all-gathered from the shards (every rank must
        call it; stage 3 needs it since no rank holds the full weights between passes)."""
        names = {p: name for name, p in self.model.named_parameters()}
        out = {}
        for i, (p, shard) in enumerate(zip(self.params, self.shards)):
            full = all_gather_flat(_padded(shard.data, self.piece[i]))
            out[names[p]] = full[: p.numel()].view(p.shape).clone()
        return out

    # ----- stage 3: gather before use, free after -------------------------------------------------------

    def _set_up_units(self, units: list[nn.Module] | None) -> None:
        """Assigns every parameter to a unit, frees the full weights, and hooks each unit so that
        its weights are all-gathered just before its forward and its backward."""
        if units is None:
            layers = getattr(getattr(self.model, "model", None), "layers", None)
            units = list(layers) if layers is not None else []
        self.units: list[nn.Module] = [self.model, *units]  # unit 0 is the root
        self._unit_of: dict[int, int] = {}
        for u, unit in enumerate(self.units):  # later (inner) units take their parameters from the root
            for p in unit.parameters():
                if p in self._index:
                    self._unit_of[self._index[p]] = u
        self._members = [[i for i, u in self._unit_of.items() if u == k] for k in range(len(self.units))]
        self._grads_pending = [0] * len(self.units)
        self._gathered = [True] * len(self.units)
        for u in range(len(self.units)):
            self._free(u)
        for u, unit in enumerate(self.units):
            unit.register_forward_pre_hook(lambda module, args, u=u: self._gather(u))
            unit.register_forward_hook(lambda module, args, output, u=u: self._after_forward(u, output))

    @torch.no_grad()
    def _gather(self, u: int) -> None:
        """All-gathers unit ``u``'s weights into their (re-allocated) storage."""
        self._grads_pending[u] = len(self._members[u])
        if self._gathered[u]:
            return
        for i in self._members[u]:
            p = self.params[i]
            full = all_gather_flat(_padded(self.shards[i].data, self.piece[i]))
            p.untyped_storage().resize_(p.numel() * p.element_size())
            p.data.copy_(full[: p.numel()].view(p.shape))  # through .data: autograd sees no in-place edit
        self._gathered[u] = True

    def _free(self, u: int) -> None:
        """Releases unit ``u``'s full weights; the tensors keep their shape, their storage is 0 bytes."""
        for i in self._members[u]:
            self.params[i].untyped_storage().resize_(0)
        self._gathered[u] = False

    def _after_forward(self, u: int, output: torch.Tensor) -> None:
        """After unit ``u``'s forward: free its weights; if a backward pass will come, gather them
        again when the gradient reaches the unit's output (before the unit's own backward). The
        root (``u == 0``), whose backward starts right away, stays gathered until its gradients
        are done; after a pass without autograd it is freed too."""
        will_backward = isinstance(output, torch.Tensor) and output.requires_grad
        if u == 0 and will_backward:
            return
        self._free(u)
        if will_backward:
            output.register_hook(lambda grad, u=u: self._gather(u))
