"""Pipeline parallelism, a two-stage sketch (GPipe, Huang et al. 2019).

Tensor parallelism splits every layer across ranks; pipeline parallelism gives each rank whole
layers: rank 0 the embedding and the first half of the blocks, rank 1 the second half, the final
norm and the output layer. Activations travel forward from stage to stage (``send``/``recv``),
their gradients travel back. A rank holds only its stage's weights.

One batch through two stages would keep one rank idle while the other works. GPipe cuts the batch
into ``m`` *micro-batches*: stage 0 runs micro-batch 1, hands it on and starts micro-batch 2 while
stage 1 runs micro-batch 1, and so on; then all backward passes, in the other direction. Each
rank still idles at the start and end of the step (the *bubble*): with ``S`` stages of equal cost
the idle fraction is ``(S - 1) / (m + S - 1)`` (:func:`gpipe_bubble_fraction`), so more
micro-batches shrink it. :func:`gpipe_step` records when each rank computes, so the bubble can be
measured.

The micro-batches' losses are each divided by ``m`` and their gradients accumulate, so a step
equals one process on the whole batch (for micro-batches of equal size). Tied embeddings would put
one weight on both stages; this sketch refuses them.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn


def gpipe_bubble_fraction(n_stages: int, n_micro: int) -> float:
    """The fraction of a GPipe step a stage idles when all stages cost the same:
    ``(S - 1) / (m + S - 1)``."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


class PipelineStage(nn.Module):
    """Rank ``stage``'s part of a :class:`~llama_from_scratch.model.Llama` split in two: stage 0
    the embedding and the first ``n_layers // 2`` blocks, stage 1 the other blocks, the final norm
    and the output layer (the modules are shared with ``model``, not copied).
    """

    def __init__(self, model: nn.Module, stage: int) -> None:
        super().__init__()
        if stage not in (0, 1):
            raise ValueError(f"this sketch has two stages (0 and 1), got {stage}")
        if model.config.tie_embeddings:
            raise ValueError("tied embeddings would put one weight on both stages; use tie_embeddings=False")
        self.stage = stage
        backbone = model.model
        half = len(backbone.layers) // 2
        self.rope_for = backbone.rope_for
        self.next_token_loss = model.next_token_loss
        self.layers = nn.ModuleList(backbone.layers[:half] if stage == 0 else backbone.layers[half:])
        if stage == 0:
            self.embed_tokens = backbone.embed_tokens
        else:
            self.norm, self.lm_head = backbone.norm, model.lm_head

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 0: token ids ``[B, T]`` -> hidden states. Stage 1: hidden states and targets ->
        the mean loss."""
        h = self.embed_tokens(inputs) if self.stage == 0 else inputs
        rope = self.rope_for(0, h.shape[1], None, h.dtype)
        for layer in self.layers:
            h = layer(h, rope)
        if self.stage == 0:
            return h
        return self.next_token_loss(self.norm(h), targets)


def gpipe_step(stage: PipelineStage, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int,
               dim: int) -> dict[str, object]:
    """Forward and backward of one batch through the two stages (ranks 0 and 1), GPipe schedule:
    all micro-batches forward, then all backward. Gradients accumulate in ``stage``'s parameters.

    Returns the batch's mean loss (on both ranks) and ``busy``: the ``(start, end)`` seconds, since
    a common start, of each forward and backward this rank computed (communication waits excluded).
    """
    rank = dist.get_rank()
    param = next(stage.parameters())  # where and in which dtype this stage computes
    xs, ys = inputs.chunk(n_micro), targets.chunk(n_micro)
    busy: list[tuple[float, float]] = []
    kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    dist.barrier()
    t0 = time.perf_counter()

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        busy.append((start - t0, time.perf_counter() - t0))
        return out

    for x, y in zip(xs, ys):  # forward, micro-batch after micro-batch
        if rank == 0:
            h = timed(lambda x=x: stage(x))
            dist.send(h.detach().contiguous(), dst=1)
            kept.append((h, None))
        else:
            h_in = torch.empty(x.shape[0], x.shape[1], dim, dtype=param.dtype, device=param.device)
            dist.recv(h_in, src=0)
            h_in.requires_grad_(True)
            loss = timed(lambda h_in=h_in, y=y: stage(h_in, y) / n_micro)
            kept.append((loss, h_in))
    total = torch.zeros((), device=param.device)
    for out, h_in in kept:  # backward, in the same order
        if rank == 1:
            timed(out.backward)
            dist.send(h_in.grad.contiguous(), dst=0)
            total += out.detach()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, src=1)
            timed(lambda out=out, grad=grad: out.backward(grad))
    dist.broadcast(total, src=1)
    return {"loss": total.item(), "busy": busy, "elapsed": time.perf_counter() - t0}
