"""RMSNorm and LayerNorm against Hugging Face LlamaRMSNorm and torch.nn.LayerNorm."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llama_from_scratch.normalization import LayerNorm, RMSNorm


def _pair(dim: int, eps: float) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours, ref = RMSNorm(dim, eps=eps), LlamaRMSNorm(dim, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(dim))
        ref.weight.copy_(ours.weight)
    return ours, ref


@pytest.mark.parametrize("shape", [(2, 5, 64), (1, 1, 7), (3, 33)])
def test_rmsnorm_equals_hf_float32_bit_exact(shape):
    torch.manual_seed(0)
    ours, ref = _pair(shape[-1], 1e-5)
    x = torch.randn(shape) * 3
    # Same operations in the same order: the results are identical, not just close.
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_rmsnorm_equals_hf_bfloat16_including_upcast():
    torch.manual_seed(1)
    ours, ref = _pair(96, 1e-6)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = (torch.randn(4, 9, 96) * 10).to(torch.bfloat16)
    out = ours(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    # The float32 upcast matters: normalizing in bfloat16 throughout gives different numbers.
    naive = ours.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert not torch.equal(naive, out)


def test_rmsnorm_definition_and_default_eps():
    norm = RMSNorm(8)
    assert norm.eps == 1e-6 and norm.weight.shape == (8,)
    x = torch.randn(3, 8)
    y = norm(x)
    # With weight 1 the output has unit root mean square.
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3), rtol=1e-4, atol=1e-4)
    # Scale invariance: RMSNorm(c * x) == RMSNorm(x) for c > 0 (up to eps).
    torch.testing.assert_close(norm(5 * x), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(norm(torch.zeros(2, 8)), torch.zeros(2, 8))  # eps avoids 0/0


def test_rmsnorm_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dimension 8"):
        RMSNorm(8)(torch.randn(2, 9))
    with pytest.raises(ValueError):
        RMSNorm(0)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch(bias):
    torch.manual_seed(2)
    ours, ref = LayerNorm(48, eps=1e-5, bias=bias), torch.nn.LayerNorm(48, eps=1e-5, bias=bias)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        ref.weight.copy_(ours.weight)
        if bias:
            ours.bias.copy_(torch.randn(48))
            ref.bias.copy_(ours.bias)
    x = torch.randn(2, 7, 48) * 4 + 3
    torch.testing.assert_close(ours(x), ref(x))
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(ours.to(torch.bfloat16)(xb), ref.to(torch.bfloat16)(xb))


def test_layernorm_centres_but_rmsnorm_does_not():
    x = torch.randn(4, 32) + 5.0
    assert LayerNorm(32)(x).mean(-1).abs().max() < 1e-5
    assert RMSNorm(32)(x).mean(-1).abs().min() > 0.5
