"""Checks of chapter 4's exercises: RoPE frequencies, rotate_half, rotate-half and interleaved RoPE at
given positions, the q/k weight permutation, and Llama 3 frequency scaling.

Each check draws fresh random inputs (odd-sized head dimensions such as 6 or 18, odd input widths,
several heads, positions that do not start at 0) and compares the student's function with the
package's ``llama_from_scratch.rope``, which is itself tested bit-exact against transformers. A
failure says which input was used, what was expected, what came back and the largest difference.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from llama_from_scratch.rope import (
    apply_rope,
    apply_rope_complex,
    permute_qk_for_rotate_half,
    precompute_freqs_cis,
    precompute_rope,
    rope_inv_freq,
    rotate_half,
)


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _torch_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def _show(t: torch.Tensor, n: int = 4) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in t.flatten()[:n].tolist()) + (", ...]" if t.numel() > n else "]")


def _compare(got, expected: torch.Tensor, what: str, hint: str = "", rtol: float = 0.0, atol: float = 0.0,
             check_dtype: bool = True) -> None:
    """Raise an AssertionError a student can act on unless ``got`` matches ``expected``."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}".rstrip())
    if check_dtype and got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    got = got.detach().to(expected.dtype)
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: your result contains inf or nan ({_show(got)}). {hint}".rstrip())
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs()
        where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: expected {_show(expected)}, got {_show(got)}; max abs difference {diff.max().item():.3g} "
            f"at index {where} (expected {expected[where].item():.6g}, got {got[where].item():.6g}). {hint}".rstrip())


def _head_dim(rng: random.Random, low: int = 2, high: int = 130) -> int:
    """An even head dimension, often not a power of two (6, 18, 70, ...)."""
    return rng.choice([rng.randrange(low, high, 2), rng.choice([6, 10, 18, 64, 128])])


def _positions(rng: random.Random, T: int, limit: int) -> tuple[str, torch.Tensor]:
    """Positions of T tokens: a block after a KV-cache offset, or arbitrary (e.g. after left padding)."""
    kind = rng.choice(["offset", "offset", "random", "start"])
    if kind == "start":
        return "positions 0..T-1", torch.arange(T)
    if kind == "offset":
        offset = rng.randrange(1, limit - T)
        return f"positions {offset}..{offset + T - 1}", torch.arange(offset, offset + T)
    pos = torch.tensor([rng.randrange(limit) for _ in range(T)])
    return f"positions {pos.tolist()}", pos


# ----- exercise 1: the frequencies ----------------------------------------------------------------


def check_rope_frequencies(fn: Callable) -> None:
    """``fn(head_dim, theta)`` = ``theta ** (-2i / head_dim)`` for i < head_dim / 2, float32."""
    rng = _rng()
    cases = [(2, 10000.0), (64, 10000.0), (128, 500000.0), (6, 100000.0)]
    cases += [(_head_dim(rng), rng.choice([10000.0, 100000.0, 500000.0, float(rng.randrange(100, 10**6))]))
              for _ in range(12)]
    hint = ("inv_freq[i] = 1 / theta ** (2i / head_dim) for i = 0 .. head_dim/2 - 1, i.e. "
            "1 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim); the first one is 1.")
    for head_dim, theta in cases:
        expected = rope_inv_freq(head_dim, theta)
        _compare(fn(head_dim, theta), expected, f"rope_frequencies({head_dim}, theta={theta:g})", hint, rtol=1e-5)


# ----- exercise 2: rotate_half ----------------------------------------------------------------------


def check_rotate_half_x(fn: Callable) -> None:
    """``fn(x)`` = ``cat(-x2, x1)`` on the halves of the last dimension, any leading shape."""
    rng = _rng()
    g = _torch_gen(rng)
    shapes = [(4,), (2, 6), (1, 3, 5, 8)]
    for _ in range(10):
        lead = tuple(rng.randrange(1, 5) for _ in range(rng.randrange(0, 4)))
        shapes.append(lead + (rng.randrange(4, 40, 2),))
    hint = ("split the last dimension into x1 = x[..., :d/2] and x2 = x[..., d/2:] and return "
            "torch.cat((-x2, x1), dim=-1): the pairs are (x[i], x[i + d/2]), not neighbours")
    for shape in shapes:
        x = torch.randn(shape, generator=g)
        before = x.clone()
        got = fn(x)
        if not torch.equal(x, before):
            raise AssertionError(f"rotate_half_x changed its input in place (x of shape {shape}); return a new tensor")
        _compare(got, rotate_half(x), f"rotate_half_x(x of shape {shape}, x = {_show(x, 6)})", hint)


# ----- exercise 3: rotate-half RoPE at given positions ---------------------------------------------


def check_apply_rotary(fn: Callable) -> None:
    """``fn(x [B, H, T, D], positions [T], theta)`` = Hugging Face's rotate-half RoPE at those positions."""
    rng = _rng()
    g = _torch_gen(rng)
    hint = ("angles = positions[:, None] * inv_freq[None] ([T, D/2]); cos and sin of cat(angles, angles) "
            "([T, D]); result x * cos + rotate_half(x) * sin, with the halves (x[..., :D/2], x[..., D/2:]) as pairs")
    for trial in range(10):
        B, H, T = rng.randrange(1, 3), rng.randrange(1, 4), rng.randrange(1, 12)
        D = _head_dim(rng, 2, 70)
        theta = rng.choice([10000.0, 100000.0, 500000.0])
        described, positions = _positions(rng, T, 2048)
        if trial == 0:
            D, described, positions = 8, f"positions 5..{4 + T}", torch.arange(5, 5 + T)
        x = torch.randn(B, H, T, D, generator=g)
        before = x.clone()
        cos, sin = precompute_rope(D, int(positions.max()) + 1, theta)
        expected = apply_rope(x, cos, sin, position_ids=positions)
        got = fn(x, positions.clone(), theta)
        if not torch.equal(x, before):
            raise AssertionError("apply_rotary changed x in place; return a new tensor")
        _compare(got, expected, f"apply_rotary(x of shape {(B, H, T, D)}, {described}, theta={theta:g})",
                 hint, rtol=1e-4, atol=1e-3)


# ----- exercise 4: the interleaved (complex) form -------------------------------------------------


def check_apply_rotary_interleaved(fn: Callable) -> None:
    """``fn(x [B, H, T, D], positions [T], theta)`` = Meta's complex RoPE on pairs (x[2i], x[2i+1])."""
    rng = _rng()
    g = _torch_gen(rng)
    hint = ("view consecutive pairs as complex numbers: torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)); "
            "multiply by torch.polar(ones, positions[:, None] * inv_freq[None]); then "
            "torch.view_as_real(...).flatten(-2). Rotation is counter-clockwise: (a, b) -> "
            "(a cos - b sin, a sin + b cos)")
    for trial in range(10):
        B, H, T = rng.randrange(1, 3), rng.randrange(1, 4), rng.randrange(1, 12)
        D = _head_dim(rng, 4, 70)
        theta = rng.choice([10000.0, 100000.0, 500000.0])
        described, positions = _positions(rng, T, 2048)
        if trial == 0:
            D, described, positions = 8, f"positions 5..{4 + T}", torch.arange(5, 5 + T)
        x = torch.randn(B, H, T, D, generator=g)
        before = x.clone()
        freqs_cis = precompute_freqs_cis(D, int(positions.max()) + 1, theta)[positions]  # [T, D/2]
        expected = apply_rope_complex(x, freqs_cis)
        got = fn(x, positions.clone(), theta)
        if not torch.equal(x, before):
            raise AssertionError("apply_rotary_interleaved changed x in place; return a new tensor")
        _compare(got, expected, f"apply_rotary_interleaved(x of shape {(B, H, T, D)}, {described}, theta={theta:g})",
                 hint, rtol=1e-4, atol=1e-3)


# ----- exercise 5: the q/k weight permutation -----------------------------------------------------


def check_permute_qk(fn: Callable) -> None:
    """``fn(w [n_heads * head_dim, dim], n_heads)`` = the interleaved -> rotate-half row permutation."""
    rng = _rng()
    g = _torch_gen(rng)
    cases = [(1, 8, 3), (2, 6, 5), (3, 4, 1)]
    for _ in range(10):
        cases.append((rng.randrange(1, 7), _head_dim(rng, 2, 40), rng.randrange(1, 50)))
    hint = ("within each head of head_dim rows, the new row c * head_dim/2 + i is the old row 2i + c: first the "
            "even rows (0, 2, 4, ...) of the head, then the odd ones (1, 3, 5, ...); heads stay in place. "
            "w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(...) does it")
    for n_heads, head_dim, dim in cases:
        w = torch.randn(n_heads * head_dim, dim, generator=g)
        before = w.clone()
        got = fn(w, n_heads)
        if not torch.equal(w, before):
            raise AssertionError("permute_qk changed w in place; return a new tensor")
        _compare(got, permute_qk_for_rotate_half(w, n_heads),
                 f"permute_qk(w of shape {tuple(w.shape)}, n_heads={n_heads}) (head_dim {head_dim})", hint)


# ----- exercise 6: Llama 3 frequency scaling ------------------------------------------------------


def check_llama3_scale_frequencies(fn: Callable) -> None:
    """``fn(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)``."""
    rng = _rng()
    cases = [(128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 500000.0, 32.0, 1.0, 4.0, 8192)]  # Llama 3.1, 3.2
    for _ in range(10):
        low = rng.choice([0.5, 1.0, 2.0])
        cases.append((rng.choice([16, 32, 64, 80, 96, 128]), rng.choice([10000.0, 100000.0, 500000.0]),
                      rng.choice([2.0, 4.0, 8.0, 16.0, 32.0, round(rng.uniform(1.5, 40.0), 3)]), low,
                      low + rng.choice([1.0, 2.0, 3.0, 4.0]), rng.choice([256, 1024, 2048, 4096, 8192])))
    hint = ("with wavelen = 2*pi / inv_freq: wavelen < original / high_freq_factor -> unchanged; "
            "wavelen > original / low_freq_factor -> inv_freq / factor; in between, with "
            "s = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor), "
            "(1 - s) * inv_freq / factor + s * inv_freq")
    for head_dim, theta, factor, low, high, original in cases:
        inv_freq = rope_inv_freq(head_dim, theta)
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": original}
        expected = rope_inv_freq(head_dim, theta, scaling)
        before = inv_freq.clone()
        got = fn(inv_freq, factor, low, high, original)
        if not torch.equal(inv_freq, before):
            raise AssertionError("llama3_scale_frequencies changed inv_freq in place; return a new tensor")
        _compare(got, expected,
                 f"llama3_scale_frequencies(inv_freq of head_dim {head_dim}, theta {theta:g}; factor={factor:g}, "
                 f"low_freq_factor={low:g}, high_freq_factor={high:g}, original_max_position_embeddings={original})",
                 hint, rtol=1e-5, atol=0.0)


CHECKS = {
    "rope_frequencies": check_rope_frequencies,
    "rotate_half_x": check_rotate_half_x,
    "apply_rotary": check_apply_rotary,
    "apply_rotary_interleaved": check_apply_rotary_interleaved,
    "permute_qk": check_permute_qk,
    "llama3_scale_frequencies": check_llama3_scale_frequencies,
}
