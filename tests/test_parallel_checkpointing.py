"""Activation checkpointing from scratch (chapter 15), one process.

Checkpointed blocks give exactly the gradients of the plain model and of
``torch.utils.checkpoint.checkpoint`` (bitwise on this CPU: the recomputation repeats the same
operations; compared with ``rtol=1e-6, atol=1e-7`` to allow other kernels), and the activation
memory they keep from forward to backward grows by exactly one ``[B, T, dim]`` float32 tensor per
block, against many such tensors per block without checkpointing.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.parallel import checkpoint_blocks, saved_activation_bytes

B, T, DIM = 2, 16, 32


def tiny_model(n_layers: int = 2) -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig.tiny(vocab_size=64, dim=DIM, hidden_dim=64, max_seq_len=32, n_layers=n_layers))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(1))
    return t[:, :-1], t[:, 1:]


def gradients(model: Llama) -> dict[str, torch.Tensor]:
    x, y = batch()
    model.zero_grad()
    model(x, targets=y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def torch_checkpointed(model: Llama) -> Llama:
    """The reference: every block's forward through ``torch.utils.checkpoint.checkpoint``."""
    for block in model.model.layers:
        plain = type(block).forward.__get__(block)
        block.forward = lambda *a, plain=plain, **k: torch.utils.checkpoint.checkpoint(plain, *a, use_reentrant=False, **k)
    return model


def test_checkpointed_gradients_equal_plain_and_torch_checkpoint():
    plain = gradients(tiny_model())
    ours = gradients(checkpoint_blocks(tiny_model()))
    theirs = gradients(torch_checkpointed(tiny_model()))
    assert ours.keys() == plain.keys() == theirs.keys()
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert max(g.abs().max().item() for g in plain.values()) > 0


def test_checkpointing_keeps_one_block_input_per_block():
    x, y = batch()
    measured = {}
    for n_layers in (2, 4):
        for enabled in (False, True):
            model = checkpoint_blocks(tiny_model(n_layers), enabled)
            measured[n_layers, enabled] = saved_activation_bytes(model, lambda m=model: m(x, targets=y))
    block_input = B * T * DIM * 4
    assert measured[4, True] - measured[2, True] == 2 * block_input  # two more blocks, two more inputs
    per_block_plain = (measured[4, False] - measured[2, False]) / 2
    assert per_block_plain > 10 * block_input  # without checkpointing a block keeps much more
    assert measured[2, True] < measured[2, False]


def test_checkpointing_can_be_turned_off_and_skips_inference():
    model = checkpoint_blocks(tiny_model())
    x, _ = batch()
    with torch.no_grad():
        logits = model(x)
    checkpoint_blocks(model, enabled=False)
    assert all("forward" not in block.__dict__ for block in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="KV cache"):
        checkpoint_blocks(model)
        h = torch.zeros(1, 1, DIM, requires_grad=True)
        cache = model.make_kv_cache(batch_size=1)
        model.model.layers[0](h, model.model.rope_for(0, 1, None, h.dtype), kv_cache=cache)
