"""GPU checks: the same components on CUDA, in float32 and bfloat16, against the references.

Skipped where ``torch.cuda.is_available()`` is False (see ``tests/conftest.py``); run them on a
GPU machine with ``python -m pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama_from_scratch as lfs

pytestmark = pytest.mark.cuda


def test_pick_device_prefers_cuda() -> None:
    assert lfs.pick_device().type == "cuda"
    assert lfs.supports_bf16("cuda") == torch.cuda.is_bf16_supported()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_cuda(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 7, 1001, device="cuda", generator=g).to(dtype)
    targets = torch.randint(0, 1001, (4, 7), device="cuda", generator=g)
    targets[0, :3] = -100
    ours = lfs.cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    assert ours.device.type == "cuda"
    torch.testing.assert_close(ours.float(), ref, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_on_cuda_matches_plain() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(5000, 64, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 5000, (300,), device="cuda", generator=g)
    chunked = lfs.chunked_cross_entropy(hidden, weight, targets, chunk_size=128)
    plain = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(chunked, plain)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b)
