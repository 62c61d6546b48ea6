"""The feed-forward block of LLaMA: SwiGLU, and the rule that sizes its hidden layer.

A plain Transformer MLP is ``W2 relu(W1 x)``. A gated linear unit (GLU, Dauphin et al. 2017;
Shazeer 2020 "GLU Variants Improve Transformer") multiplies two projections instead: one passed
through an activation (the *gate*), one left linear (the *up* projection). With SiLU as the
activation this is SwiGLU, used by PaLM and LLaMA:

    down_proj( silu(gate_proj(x)) * up_proj(x) )

SwiGLU has three matrices instead of two, so LLaMA shrinks the hidden size from ``4 * dim`` to
``2/3 * 4 * dim`` to keep the parameter count (and FLOPs) of the classic MLP, then rounds it up to
a hardware-friendly multiple. Meta's names: w1 = gate_proj, w3 = up_proj, w2 = down_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU hidden size LLaMA uses for model width ``dim``.

    Meta's rule (``FeedForward`` in the llama repository): start from ``4 * dim``, take 2/3 of it
    (``int`` truncates), multiply by ``ffn_dim_multiplier`` if given (Llama 2 70B, Llama 3), then
    round *up* to a multiple of ``multiple_of``.

    >>> llama_hidden_dim(4096)                    # Llama 2 7B
    11008
    >>> llama_hidden_dim(4096, 1024, 1.3)         # Llama 3 8B
    14336
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        if ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be positive, got {ffn_dim_multiplier}")
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """LLaMA's feed-forward block: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Equal to Hugging Face ``LlamaMLP`` (whose submodules have the same names, so weights copy
    across by name).

    Args:
        dim: model width (input and output size).
        hidden_dim: width of the gated hidden layer (see :func:`llama_hidden_dim`).
        bias: LLaMA uses no biases; ``True`` adds them to all three projections.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        if dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"SwiGLU sizes must be positive, got dim={dim}, hidden_dim={hidden_dim}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"SwiGLU expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
