"""Normalization layers: LayerNorm (the Transformer's original) and RMSNorm (LLaMA's choice).

LayerNorm re-centres each vector (subtracts its mean) and re-scales it (divides by its standard
deviation), then applies a learned gain and bias. RMSNorm (Zhang & Sennrich, 2019) drops the
re-centring and the bias: it only divides by the root mean square. That is cheaper, and LLaMA
showed it trains just as well, so every Llama block uses it ("pre-norm": normalize the input of
each sub-layer, not its output).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalization: ``weight * x / sqrt(mean(x**2) + eps)``.

    Equal to Hugging Face ``LlamaRMSNorm``, including its detail of computing the statistics in
    float32: a bfloat16 input is upcast, normalized, cast back to bfloat16, and only then
    multiplied by ``weight``. Upcasting matters because squaring and averaging hundreds of
    bfloat16 numbers (8 bits of mantissa) loses a lot of precision.

    Args:
        dim: size of the last dimension (the model width).
        eps: added to the mean square so that an all-zero vector does not divide by zero.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm dim must be positive, got {dim}")
        self.dim = dim
        self.eps = eps
        # The gain starts at 1, so a fresh RMSNorm is a pure normalization.
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.Module):
    """Layer normalization written out: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    Here for comparison with RMSNorm; equal to ``torch.nn.LayerNorm(dim, eps)``. The variance is
    the biased one (divide by ``dim``, not ``dim - 1``), as in the original paper and in PyTorch.
    Statistics are computed in float32 for the same reason as in RMSNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"LayerNorm dim must be positive, got {dim}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"LayerNorm expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        input_dtype = x.dtype
        h = x.float()
        mean = h.mean(dim=-1, keepdim=True)
        var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + self.eps)
        out = h * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"
