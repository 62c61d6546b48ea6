"""Checks of chapter 3's exercises: RMSNorm, SiLU and its derivative, SwiGLU, the hidden-size rule,
and the pre-norm residual block.

Every check draws fresh random inputs (odd sizes, several dtypes and scales), compares the
student's function with the package's ``RMSNorm``, ``SwiGLU`` and ``llama_hidden_dim`` (themselves
tested against Hugging Face's ``LlamaRMSNorm`` and ``LlamaMLP``) or with torch, and raises
``AssertionError`` saying which input was used, what was expected and what came back.
"""

from __future__ import annotations

import numbers
import random
from typing import Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.feed_forward import SwiGLU, llama_hidden_dim
from llama_from_scratch.normalization import LayerNorm, RMSNorm

# One unit in the last place, relative, for the 16-bit formats (8 and 11 bits of precision).
_ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _generator() -> tuple[random.Random, torch.Generator]:
    """Python and torch generators seeded fresh at every grading run (memorised answers fail)."""
    seed = random.SystemRandom().randrange(2 ** 31)
    return random.Random(seed), torch.Generator().manual_seed(seed)


def _shape(rng: random.Random, last: int) -> tuple[int, ...]:
    """A random leading shape (none, [n] or [b, t]) ending in ``last``."""
    return rng.choice([(), (rng.randrange(1, 6),), (rng.randrange(1, 4), rng.randrange(1, 8))]) + (last,)


def _odd_size(rng: random.Random, low: int = 2, high: int = 300) -> int:
    """A feature size: small, a power of two, or random (often odd); 1 only when ``low`` is 1."""
    choices = [7, 64, rng.randrange(max(low, 2), high), rng.randrange(max(low, 2), high) | 1]
    return rng.choice(choices + ([1] if low <= 1 else []))


def _as_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _head(t: torch.Tensor, n: int = 4) -> list[float]:
    return [round(v, 5) for v in t.detach().flatten()[:n].double().tolist()]


def _compare(got, expected: torch.Tensor, what: str, hint: str = "", rtol: float = 1e-5,
             atol: float = 1e-5) -> None:
    """``assert_close`` with shape, dtype and finiteness checked first, and a message a student can use."""
    got = _as_tensor(got, what)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}".rstrip())
    if got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}. {hint}".rstrip())
    got = got.detach()
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        raise AssertionError(f"{what}: your result contains inf or nan ({_head(got)}...), expected finite values "
                             f"({_head(expected)}...). {hint}".rstrip())
    diff = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    if not torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: expected {_head(expected)}..., got {_head(got)}... (max abs diff {diff:.3g}). "
                             f"{hint}".rstrip())


# --------------------------------------------------------------------------------------------------
# rms_norm

def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


RMS_HINT = ("rms_norm(x, weight, eps) = weight * (x / sqrt(mean(x**2 over the last dim) + eps)), with the "
            "statistics computed in float32 (x.float()), the result cast back to x.dtype, and only then "
            "multiplied by weight.")


def check_rms_norm(fn: Callable) -> None:
    """``fn(x, weight, eps=1e-6)`` equals ``LlamaRMSNorm`` (float32 upcast included) in float32, bf16, fp16."""
    rng, g = _generator()
    # float32, every scale: ordinary, tiny (eps matters), large
    for _ in range(12):
        dim = _odd_size(rng, low=1)
        shape = _shape(rng, dim)
        scale = rng.choice([1.0, 1e-3, 50.0])
        eps = rng.choice([1e-6, 1e-5, 10 ** rng.uniform(-6, -3)])
        x = torch.randn(shape, generator=g) * scale
        weight = torch.randn(dim, generator=g)
        x_before = x.clone()
        what = f"rms_norm on float32 x of shape {tuple(shape)} and scale ~{scale:g}, eps={eps:.3g}"
        got = fn(x, weight, eps)
        if not torch.equal(x, x_before):
            raise AssertionError(f"{what}: your function modified x in place; compute on a copy")
        hint = RMS_HINT
        if scale < 1:
            hint = "With tiny inputs eps matters: it goes INSIDE the square root, added to the mean square. " + hint
        _compare(got, _reference_rms_norm(x, weight, eps), what, hint, rtol=1e-5, atol=1e-6)
    # the default eps is 1e-6, as in LlamaRMSNorm
    x = torch.randn(3, 5, generator=g) * 1e-3
    weight = torch.randn(5, generator=g)
    _compare(fn(x, weight), _reference_rms_norm(x, weight, 1e-6),
             "rms_norm(x, weight) with the default eps on inputs of scale 1e-3", "The default eps must be 1e-6.",
             rtol=1e-5, atol=1e-6)
    # an all-zero vector must give zeros, not nan
    x = torch.zeros(2, 9)
    x[1] = torch.randn(9, generator=g)
    got = _as_tensor(fn(x, torch.ones(9), 1e-6), "rms_norm on a batch whose first row is all zeros")
    if not torch.isfinite(got).all():
        raise AssertionError("rms_norm on an all-zero row returned nan or inf; eps inside the square root "
                             "keeps 0 / sqrt(0 + eps) = 0")
    # 16-bit inputs (weight in the same dtype): compare bit for bit, allowing rare one-ulp differences
    for dtype in (torch.bfloat16, torch.float16):
        for _ in range(3):
            dim = rng.choice([64, 576, rng.randrange(100, 1000) | 1])
            shape = (rng.randrange(8, 33), dim)
            x = (torch.randn(shape, generator=g) * 3).to(dtype)
            weight = torch.randn(dim, generator=g).to(dtype)
            eps = rng.choice([1e-6, 1e-5])
            what = f"rms_norm on {dtype} x of shape {shape}, weight in {dtype}, eps={eps:g}"
            got = _as_tensor(fn(x, weight, eps), what)
            expected = _reference_rms_norm(x, weight, eps)
            _compare(got, expected, what, RMS_HINT, rtol=2 * _ULP[dtype], atol=1e-6)
            differ = (got != expected).float().mean().item()
            if differ > 0.01:
                raise AssertionError(
                    f"{what}: {differ:.0%} of the elements differ from LlamaRMSNorm (by one unit in the last "
                    f"place); an implementation with the float32 upcast differs in well under 1%. Compute the "
                    f"statistics AND the normalisation in float32 (h = x.float()), cast the normalised h back to "
                    f"x.dtype, and multiply by weight last: weight * h.to(x.dtype).")
    # float16 with a large feature: x**2 overflows float16 (max 65504) unless upcast
    x = (torch.randn(4, 96, generator=g)).to(torch.float16)
    x[:, rng.randrange(96)] = 300.0
    weight = torch.ones(96, dtype=torch.float16)
    _compare(fn(x, weight, 1e-6), _reference_rms_norm(x, weight, 1e-6),
             "rms_norm on float16 x with one feature equal to 300", "300**2 = 90000 overflows float16 (max "
             "65504): compute the mean square in float32 (x.float()) and cast back at the end.",
             rtol=2 * _ULP[torch.float16], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# silu and its derivative

def _silu_inputs(rng: random.Random, g: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    cases = [("x = linspace(-8, 8, 161)", torch.linspace(-8, 8, 161))]
    for _ in range(4):
        shape = _shape(rng, _odd_size(rng, low=1))
        scale = rng.choice([1.0, 4.0, 30.0])
        cases.append((f"random x of shape {tuple(shape)} and scale ~{scale:g}", torch.randn(shape, generator=g) * scale))
    cases.append(("x with values of magnitude 1e4 (exp overflows here if computed naively)",
                  torch.tensor([-1e4, -200.0, -90.0, 0.0, 90.0, 200.0, 1e4])))
    return cases


def check_silu(fn: Callable) -> None:
    """``fn(x)`` = x * sigmoid(x), elementwise, like ``F.silu``."""
    rng, g = _generator()
    for what, x in _silu_inputs(rng, g):
        x_before = x.clone()
        got = fn(x)
        if not torch.equal(x, x_before):
            raise AssertionError(f"silu on {what}: your function modified x in place; return a new tensor")
        _compare(got, F.silu(x), f"silu on {what}",
                 "silu(x) = x * sigmoid(x) = x / (1 + exp(-x)); torch.sigmoid is safe for large |x|.",
                 rtol=1e-5, atol=1e-6)


def check_silu_grad(fn: Callable) -> None:
    """``fn(x)`` = d silu / dx, elementwise, written out (no autograd)."""
    rng, g = _generator()
    for what, x in _silu_inputs(rng, g):
        leaf = x.double().clone().requires_grad_()
        (expected,) = torch.autograd.grad(F.silu(leaf).sum(), leaf)
        with torch.no_grad():
            got = fn(x.clone())
        _compare(got, expected.to(x.dtype), f"silu_grad on {what}",
                 "Product rule: d/dx [x * s(x)] = s(x) + x * s(x) * (1 - s(x)) with s = sigmoid "
                 "(s' = s * (1 - s)). Compute it directly; autograd is switched off during this check.",
                 rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# swiglu

def check_swiglu(fn: Callable) -> None:
    """``fn(x, w_gate, w_up, w_down)`` = down(silu(gate(x)) * up(x)) with nn.Linear-shaped weights."""
    rng, g = _generator()
    for trial in range(8):
        dim = _odd_size(rng, low=2, high=200)
        hidden = rng.choice([dim * 8 // 3, rng.randrange(2, 400) | 1])
        if trial == 0:
            hidden = dim  # square matrices: a missing transpose does not raise, it gives wrong numbers
        shape = _shape(rng, dim)
        mlp = SwiGLU(dim, hidden)
        with torch.no_grad():
            for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) / linear.weight.shape[1] ** 0.5)
            x = torch.randn(shape, generator=g) * rng.choice([1.0, 3.0])
            expected = mlp(x)
            w_gate, w_up, w_down = (mlp.gate_proj.weight.clone(), mlp.up_proj.weight.clone(),
                                    mlp.down_proj.weight.clone())
            got = fn(x, w_gate, w_up, w_down)
        what = (f"swiglu on x of shape {tuple(shape)} with w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, "
                f"w_down {tuple(w_down.shape)}")
        _compare(got, expected, what,
                 "swiglu = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T: the weights are stored like "
                 "nn.Linear's, [out_features, in_features]; silu goes on the GATE projection only, and the "
                 "product is taken before down.", rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# llama_ffn_dim

def check_llama_ffn_dim(fn: Callable) -> None:
    """``fn(dim, multiple_of=256, ffn_dim_multiplier=None)`` equals ``llama_hidden_dim``."""
    rng, _ = _generator()
    known = [((4096,), 11008, "LLaMA 7B"), ((5120,), 13824, "LLaMA 13B"), ((576,), 1536, "SmolLM2-135M"),
             ((4096, 1024, 1.3), 14336, "Llama 3 8B"), ((8192, 4096, 1.3), 28672, "Llama 2 70B"),
             ((2048, 256, 1.5), 8192, "Llama 3.2 1B")]
    cases = [(args, expected, f" ({name})") for args, expected, name in known]
    for _ in range(300):
        dim = rng.choice([rng.randrange(1, 64), rng.randrange(64, 20000)])
        multiple_of = rng.choice([1, 2, 3, 8, 32, 64, 100, 256, 1024, 4096])
        multiplier = rng.choice([None, None, 1.3, 1.5, round(rng.uniform(0.5, 2.5), 2)])
        args = (dim, multiple_of, multiplier)
        cases.append((args, llama_hidden_dim(*args), ""))
    for args, expected, note in cases:
        call = f"llama_ffn_dim({', '.join(map(repr, args))})"
        got = fn(*args)
        if not isinstance(got, numbers.Integral) or isinstance(got, bool):
            raise AssertionError(f"{call} returned {got!r} ({type(got).__name__}); a hidden size is an int")
        if got != expected:
            raise AssertionError(
                f"{call}{note} returned {got}; expected {expected}. The rule: hidden = int(2 * (4 * dim) / 3) "
                "(int truncates); if ffn_dim_multiplier is given, hidden = int(ffn_dim_multiplier * hidden); "
                "then round UP to a multiple of multiple_of.")


# --------------------------------------------------------------------------------------------------
# pre_norm_block

def check_pre_norm_block(fn: Callable) -> None:
    """``fn(x, norm, sublayer)`` = x + sublayer(norm(x))."""
    rng, g = _generator()
    for trial in range(6):
        dim = _odd_size(rng, low=2, high=160)
        shape = _shape(rng, dim)
        if trial % 2 == 0:
            norm = RMSNorm(dim, eps=1e-5)
        else:
            norm = LayerNorm(dim)
        sublayer = SwiGLU(dim, rng.randrange(2, 300))
        with torch.no_grad():
            norm.weight.copy_(torch.rand(dim, generator=g) * 2 + 0.5)
            for p in sublayer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            scale = rng.choice([1.0, 5.0, 20.0])
            x = torch.randn(shape, generator=g) * scale + rng.choice([0.0, 1.0])
            x_before = x.clone()
            expected = x + sublayer(norm(x))
            names = f"{type(norm).__name__}({dim}) and SwiGLU"
            if trial >= 4:  # plain functions instead of modules
                w = torch.randn(dim, dim, generator=g) / dim ** 0.5
                norm_fn, sub_fn = (lambda t: F.normalize(t, dim=-1) * dim ** 0.5), (lambda t, w=w: torch.tanh(t @ w))
                expected, names = x + sub_fn(norm_fn(x)), "functions norm(t) = t / |t| * sqrt(d) and tanh(t @ W)"
                got = fn(x, norm_fn, sub_fn)
            else:
                got = fn(x, norm, sublayer)
        what = f"pre_norm_block on x of shape {tuple(shape)} and scale ~{scale:g}, with {names}"
        if not torch.equal(x, x_before):
            raise AssertionError(f"{what}: your function modified x in place (x += ...); return x + ... instead")
        _compare(got, expected, what,
                 "Pre-norm: normalise the INPUT of the sub-layer and add the result to the UNNORMALISED x: "
                 "x + sublayer(norm(x)). (norm(x + sublayer(x)) is post-norm.)", rtol=1e-5, atol=1e-5)


CHECKS = {
    "rms_norm": check_rms_norm,
    "silu": check_silu,
    "silu_grad": check_silu_grad,
    "swiglu": check_swiglu,
    "llama_ffn_dim": check_llama_ffn_dim,
    "pre_norm_block": check_pre_norm_block,
}
