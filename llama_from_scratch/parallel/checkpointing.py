"""Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
trade compute for memory.

Backward needs tensors computed in forward: the input of every matrix product, of every RMSNorm,
of every SiLU, the attention probabilities or what the fused kernel keeps instead. Autograd keeps
them all from the forward pass to the backward pass, so a model's *activation memory* grows with
batch size x sequence length x layers, and at long contexts it dwarfs the weights. Sharding
(ZeRO, FSDP) does not touch it: every rank keeps the activations of its own micro-batch.

Checkpointing a transformer block keeps only its *input*. Forward runs the block without recording
anything for backward (``torch.no_grad``); backward runs the block's forward a second time, now
recording, and backpropagates through that. Activation memory then holds one ``[B, T, dim]``
tensor per block plus whatever the block being recomputed needs, at the price of one more forward
pass per block: about a third more compute (forward ~ 1/3 of forward + backward).

* :func:`checkpoint` is the mechanism written out, an ``autograd.Function`` (what
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` does).
* :func:`checkpoint_blocks` turns it on (or off) for every block of a
  :class:`~llama_from_scratch.model.Llama`.
* :func:`saved_activation_bytes` measures activation memory: the bytes of the distinct tensors
  autograd saves for backward during a forward pass (the model's weights and buffers left out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Checkpoint(torch.autograd.Function):
    """Runs ``run(x, *extra)`` without recording; in backward runs it again with recording and
    backpropagates through it. Only ``x`` (and the ``extra`` tensors) are saved."""

    @staticmethod
    def forward(ctx, run: Callable[..., torch.Tensor], x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.save_for_backward(x, *extra)
        with torch.no_grad():
            return run(x, *extra)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, *extra = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            output = ctx.run(x, *extra)  # the forward pass again, recorded this time
        torch.autograd.backward(output, grad_output)  # weights' gradients accumulate as usual
        return (None, x.grad, *([None] * len(extra)))


def checkpoint(run: Callable[..., torch.Tensor], x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
    """``run(x, *extra)``, keeping only ``x`` and ``extra`` for backward and recomputing the rest
    then. ``run`` must be deterministic (no dropout here) and must not change state (no KV cache
    update): it runs twice. Gradients flow to ``x`` and to the parameters ``run`` uses, not to
    ``extra``."""
    return _Checkpoint.apply(run, x, *extra)


def _checkpointed_forward(block: nn.Module) -> Callable[..., torch.Tensor]:
    """A forward for ``block`` (a :class:`~llama_from_scratch.model.TransformerBlock`) that
    checkpoints it while autograd is recording, and runs it plainly otherwise."""
    plain = type(block).forward.__get__(block)

    def forward(x, rope, start_pos=0, kv_cache=None, attention_mask=None):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return plain(x, rope, start_pos, kv_cache, attention_mask)
        if kv_cache is not None:
            raise ValueError("activation checkpointing is for training: a KV cache would be written twice")
        cos, sin = rope
        return checkpoint(lambda h, c, s: plain(h, (c, s), start_pos, None, attention_mask), x, cos, sin)

    return forward


def checkpoint_blocks(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns activation checkpointing on (or off) for every transformer block of ``model`` (a
    :class:`~llama_from_scratch.model.Llama`), in place; returns ``model``. Weights, state dict
    and results are unchanged."""
    for block in model.model.layers:
        if enabled:
            block.forward = _checkpointed_forward(block)
        else:
            block.__dict__.pop("forward", None)  # back to the class's forward
    return model


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``run()`` (a forward pass
    of ``model``) executes, leaving out ``model``'s parameters and buffers (kept anyway). A view
    and its base count once. Returns after backpropagating ``run()``'s output, so the measured
    pass is a complete training step's forward and backward."""
    kept = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept and storage.nbytes() > 0:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = run()
    output.backward()
    return sum(saved.values())
