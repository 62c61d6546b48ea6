"""SwiGLU against Hugging Face LlamaMLP, and LLaMA's hidden-size rule."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llama.modeling_llama import LlamaMLP

from llama_from_scratch.feed_forward import SwiGLU, llama_hidden_dim


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, expected",
    [
        (4096, 256, None, 11008),   # Llama 2 7B
        (5120, 256, None, 13824),   # Llama 2 13B
        (8192, 4096, 1.3, 28672),   # Llama 2 70B
        (4096, 1024, 1.3, 14336),   # Llama 3 8B
        (2048, 256, 1.5, 8192),     # Llama 3.2 1B
    ],
)
def test_llama_hidden_dim_matches_released_models(dim, multiple_of, multiplier, expected):
    assert llama_hidden_dim(dim, multiple_of, multiplier) == expected


def test_llama_hidden_dim_rounds_up_to_multiple():
    assert llama_hidden_dim(64, multiple_of=32) == 192  # int(2 * 256 / 3) = 170 -> 192
    assert llama_hidden_dim(64, multiple_of=1) == 170
    with pytest.raises(ValueError):
        llama_hidden_dim(0)
    with pytest.raises(ValueError):
        llama_hidden_dim(64, multiple_of=0)


def _hf_mlp(dim: int, hidden: int) -> LlamaMLP:
    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=hidden, num_attention_heads=1, head_dim=2)
    return LlamaMLP(cfg)


@pytest.mark.parametrize("dim, hidden", [(64, 160), (7, 13)])
def test_swiglu_equals_hf_llama_mlp(dim, hidden):
    torch.manual_seed(0)
    ours, ref = SwiGLU(dim, hidden), _hf_mlp(dim, hidden)
    ref.load_state_dict(ours.state_dict())  # same submodule names: gate_proj, up_proj, down_proj
    x = torch.randn(3, 5, dim)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(ours.to(torch.bfloat16)(xb), ref.to(torch.bfloat16)(xb), rtol=0, atol=0)


def test_swiglu_formula_and_bias():
    torch.manual_seed(1)
    mlp = SwiGLU(16, 40, bias=True)
    assert mlp.gate_proj.bias is not None and mlp.down_proj.bias is not None
    assert SwiGLU(16, 40).gate_proj.bias is None
    x = torch.randn(2, 16)
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    manual = d(g(x) * torch.sigmoid(g(x)) * u(x))
    torch.testing.assert_close(mlp(x), manual)
    torch.testing.assert_close(mlp(x), d(F.silu(g(x)) * u(x)))


def test_swiglu_errors():
    with pytest.raises(ValueError, match="last dimension 16"):
        SwiGLU(16, 32)(torch.randn(2, 17))
    with pytest.raises(ValueError):
        SwiGLU(16, 0)
