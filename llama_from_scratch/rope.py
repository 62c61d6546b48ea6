"""Rotary position embeddings (RoPE, Su et al. 2021), as LLaMA uses them.

RoPE encodes a token's position by *rotating* its query and key vectors: the head dimension is
split into ``head_dim / 2`` pairs, and pair ``i`` at position ``m`` is rotated by the angle
``m * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / head_dim)``. Because rotations compose,
the dot product of a query at position ``m`` with a key at position ``n`` depends only on
``m - n``: attention sees relative positions, although each token was given an absolute one.

Two layouts exist for "which dimensions form a pair":

* interleaved (Meta's original code, GGUF files): pairs are ``(x[2i], x[2i+1])``, handled as one
  complex number each (:func:`precompute_freqs_cis`, :func:`apply_rope_complex`);
* rotate-half (Hugging Face, this package): pairs are ``(x[i], x[i + head_dim/2])``
  (:func:`rotate_half`, :func:`apply_rope`), which needs no complex numbers.

They compute the same attention once the rows of the q and k projection weights are permuted
(:func:`permute_qk_for_rotate_half` and its inverse :func:`unpermute_qk`).

Llama 3.1 and later stretch the long wavelengths for long contexts ("llama3" scaling,
:func:`rope_inv_freq`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Keys of a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict that we understand.
_LLAMA3_REQUIRED_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_SUPPORTED_ROPE_TYPES = ("default", "llama3")


def _validate_scaling(scaling: dict[str, Any] | None, theta: float) -> str:
    """Checks a scaling dict and returns its rope type ("default" or "llama3")."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"rope scaling must be None or a dict, got {type(scaling).__name__}")
    # Older Hugging Face configs call the field "type" instead of "rope_type".
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; this package implements {list(_SUPPORTED_ROPE_TYPES)}"
        )
    if "rope_theta" in scaling and float(scaling["rope_theta"]) != float(theta):
        raise ValueError(
            f"the scaling dict says rope_theta={scaling['rope_theta']} but theta={theta} was passed"
        )
    allowed = {"rope_type", "type", "rope_theta"}
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_REQUIRED_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"llama3 rope scaling is missing keys {missing}; it needs {list(_LLAMA3_REQUIRED_KEYS)}")
        allowed |= set(_LLAMA3_REQUIRED_KEYS)
        if scaling["factor"] <= 0:
            raise ValueError(f"llama3 rope scaling factor must be positive, got {scaling['factor']}")
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ValueError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}"
            )
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {rope_type} rope scaling dict; allowed: {sorted(allowed)}")
    return rope_type


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The ``head_dim / 2`` rotation frequencies ``theta ** (-2i / head_dim)`` (float32).

    With ``scaling={"rope_type": "llama3", ...}`` the Llama 3.1 rule is applied: wavelengths
    ``2 pi / inv_freq`` longer than ``original_max_position_embeddings / low_freq_factor`` are
    slowed down by ``factor``; those shorter than ``original / high_freq_factor`` are kept; the
    ones between are interpolated smoothly.
    """
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"RoPE needs a positive, even head_dim, got {head_dim}")
    rope_type = _validate_scaling(scaling, theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq

    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original / low    # longer than this: divide the frequency by `factor`
    high_freq_wavelen = original / high  # shorter than this: leave the frequency alone
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def precompute_rope(
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables for positions ``0 .. max_seq_len - 1``, rotate-half layout.

    Returns ``(cos, sin)``, each float32 of shape ``[max_seq_len, head_dim]``: row ``m`` holds
    ``cos(m * inv_freq)`` twice (``cat(freqs, freqs)``), because in the rotate-half layout both
    halves of the head use the same frequencies. ``scaling`` is None or a Hugging Face
    ``rope_scaling`` dict (see :func:`rope_inv_freq`).
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # [max_seq_len, head_dim / 2]: angle m * inv_freq[i]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, head_dim]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` where ``x1, x2`` are the two halves of the last dimension.

    For a pair ``(a, b) = (x[i], x[i + d/2])`` this gives ``(-b, a)``, so that
    ``x * cos + rotate_half(x) * sin`` is ``(a cos - b sin, b cos + a sin)``: a 2-D rotation.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates ``x`` (``[B, H, T, head_dim]``) to its positions, rotate-half convention.

    By default token ``t`` gets position ``offset + t`` (``offset`` is the number of tokens
    already in the KV cache). ``position_ids`` (``[T]`` or ``[B, T]``, integer) gives explicit
    positions instead, e.g. positions that restart at 0 after left padding. ``cos`` and ``sin``
    are the tables of :func:`precompute_rope`; they are cast to ``x``'s dtype (as Hugging Face
    does), so a bfloat16 ``x`` stays bfloat16.

    Equal to Hugging Face ``apply_rotary_pos_emb`` for the same positions.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects x of shape [B, H, T, head_dim], got {tuple(x.shape)}")
    seq_len, head_dim = x.shape[2], x.shape[3]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(
            f"cos/sin must both be [max_seq_len, {head_dim}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    max_seq_len = cos.shape[0]
    if position_ids is None:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if offset + seq_len > max_seq_len:
            raise ValueError(
                f"positions up to {offset + seq_len - 1} (offset {offset} + {seq_len} tokens) exceed the "
                f"RoPE table of max_seq_len={max_seq_len}"
            )
        cos_t = cos[offset : offset + seq_len]  # [T, D], broadcasts over B and H
        sin_t = sin[offset : offset + seq_len]
    else:
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.shape[-1] != seq_len or position_ids.dim() not in (1, 2):
            raise ValueError(f"position_ids must be [T] or [B, T] with T={seq_len}, got {tuple(position_ids.shape)}")
        if position_ids.numel() and (position_ids.min() < 0 or position_ids.max() >= max_seq_len):
            raise ValueError(
                f"position_ids must lie in [0, {max_seq_len}) (max_seq_len={max_seq_len}), "
                f"got range [{int(position_ids.min())}, {int(position_ids.max())}]"
            )
        cos_t = cos[position_ids]  # [T, D] or [B, T, D]
        sin_t = sin[position_ids]
        if cos_t.dim() == 3:  # [B, T, D] -> [B, 1, T, D], broadcasts over heads
            cos_t, sin_t = cos_t.unsqueeze(1), sin_t.unsqueeze(1)
    cos_t = cos_t.to(device=x.device, dtype=x.dtype)
    sin_t = sin_t.to(device=x.device, dtype=x.dtype)
    return x * cos_t + rotate_half(x) * sin_t


# ----- The interleaved (complex) form of Meta's original code ------------------------------------


def precompute_freqs_cis(
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    scaling: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``exp(i * m * inv_freq)`` as a complex64 table ``[max_seq_len, head_dim / 2]`` (Meta's form)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope_complex(x: torch.Tensor, freqs_cis: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """RoPE in the interleaved layout: pairs ``(x[2i], x[2i+1])`` are complex numbers, rotated by
    multiplying with ``freqs_cis[position, i]``.

    ``x`` is ``[B, H, T, head_dim]``. The arithmetic is done in float32 and the result cast back to
    ``x``'s dtype, as in Meta's reference code.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rope_complex expects x of shape [B, H, T, head_dim], got {tuple(x.shape)}")
    seq_len = x.shape[2]
    if offset + seq_len > freqs_cis.shape[0]:
        raise ValueError(
            f"positions up to {offset + seq_len - 1} exceed the RoPE table of max_seq_len={freqs_cis.shape[0]}"
        )
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, H, T, D/2]
    rotated = x_complex * freqs_cis[offset : offset + seq_len].to(x.device)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


# ----- Converting q/k projection weights between the two layouts ---------------------------------


def _check_qk_weight(w: torch.Tensor, n_heads: int) -> None:
    if w.dim() not in (1, 2):
        raise ValueError(f"expected a 2-D weight (or 1-D bias), got shape {tuple(w.shape)}")
    if n_heads <= 0 or w.shape[0] % (2 * n_heads) != 0:
        raise ValueError(
            f"the weight's first dimension ({w.shape[0]}) must be a multiple of 2 * n_heads (n_heads={n_heads})"
        )


def permute_qk_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the rows of an interleaved (Meta / GGUF) q or k projection into rotate-half layout.

    Within each head, output row ``c * head_dim/2 + i`` becomes the old row ``2i + c``: all the
    "real" parts of the pairs first, then all the "imaginary" parts. This is the permutation of
    Hugging Face's ``convert_llama_weights_to_hf.py``. ``n_heads`` is the number of heads of *this*
    projection (``n_kv_heads`` for k). Works on a 1-D bias too.
    """
    _check_qk_weight(w, n_heads)
    dim1 = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, *rest).transpose(1, 2).reshape(dim1, *rest)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk_for_rotate_half`: rotate-half layout back to interleaved."""
    _check_qk_weight(w, n_heads)
    dim1 = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, *rest).transpose(1, 2).reshape(dim1, *rest)
