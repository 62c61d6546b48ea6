"""Checks for the exercises of chapter 10 (LoRA), against Hugging Face PEFT.

* ``LoRALinear`` and ``DoRALinear``: the learner's layer wraps an ``nn.Linear`` built on the
  learner's side; its ``state_dict`` gives the base weights, which go, with the same adapter
  weights, into PEFT's ``lora.Linear`` (``peft.get_peft_model`` on a one-layer model with
  ``LoraConfig(r, lora_alpha, lora_dropout, use_rslora, use_dora)``). Initialization, outputs,
  gradients (of the input and of every trainable parameter), merged and unmerged weights are
  compared; dropout is checked by its effect (only the adapter branch sees it).
* ``apply_lora``: a tiny transformers Llama (12 layers) with random weights drawn here is built
  twice, on the learner's side (``from_pretrained(None, config=..., state_dict=...)``) for the
  learner's function and here for ``peft.get_peft_model(LoraConfig(target_modules, r, lora_alpha,
  rank_pattern, alpha_pattern))``. The adapted modules, their ranks, which parameters train, and
  the logits once both get the same random adapters are compared; targets PEFT refuses must raise
  ``ValueError``.
* ``prefix_attention``: PEFT's ``PrefixTuningConfig`` on a tiny transformers Llama (eager
  attention, weights drawn here and scaled so that attention is far from uniform) runs a batch
  with left and right padding; a hook records one layer's attention input and output. The learner's
  function gets that input, the layer's projection weights and the layer's prefix (read from PEFT's
  flat prefix in PEFT's layout) and must return the recorded output on the real tokens.

Inputs (sizes, ranks, alphas, weights, targets, patterns) are drawn afresh at every run.
Measured on PEFT 0.21 / torch 2.13 (CPU): the solution gives PEFT's outputs, gradients and merged
weights bit for bit in float32, float64 and bfloat16 (LoRA; DoRA to 1-2 float32 ulps, because PEFT
forms ``B A`` through ``lora_B(lora_A(I))``), and the same logits on the tiny Llama. The tolerances
leave room for products taken in another order (a few float32 ulps; one bfloat16 rounding).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from llama_from_scratch.course.checks.common import (
    Construct,
    as_tensor,
    assert_close,
    assert_equal,
    call_answer,
    fresh_generator,
    fresh_rng,
    quiet_transformers,
    value_and_grad,
)

FORBIDDEN = {
    "LoRALinear": ["peft"],
    "DoRALinear": ["peft"],
    "apply_lora": ["peft"],
    "prefix_attention": ["peft", "transformers"],
}


@functools.lru_cache(maxsize=None)
def _peft():
    """PEFT, imported once, with bitsandbytes' CPU notices (PEFT imports it) silenced."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Aa]lready (un)?merged.*")
    import peft

    return peft


def _tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for outputs and gradients: a float32 product taken in another order differs by
    a few ulps; a bfloat16 result may round the other way (one bf16 ulp is 2**-8 relative)."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    if dtype in (torch.bfloat16, torch.float16):
        return {"rtol": 2 ** -7, "atol": 1e-3}
    return {"rtol": 2e-5, "atol": 2e-6}


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _state(layer: Any, expected: set[str], what: str) -> dict[str, torch.Tensor]:
    """The learner's state_dict, with exactly PEFT's names."""
    sd = layer.state_dict()
    if not isinstance(sd, dict):
        raise AssertionError(f"{what}: state_dict() returned a {type(sd).__name__}, not a dict")
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise AssertionError(
            f"{what}: state_dict() keys: missing {missing}, unexpected {extra}. Name the frozen layer "
            "`base_layer`, the adapters `lora_A` and `lora_B` (nn.Linear without bias), as PEFT does"
            + (", and the magnitude `lora_magnitude_vector`" if "lora_magnitude_vector" in expected else "")
            + "; keep nothing else in the state_dict (plain attributes are fine)")
    return {k: v.detach().clone() for k, v in sd.items()}


def _expected_keys(bias: bool, dora: bool = False) -> set[str]:
    keys = {"base_layer.weight", "lora_A.weight", "lora_B.weight"}
    if bias:
        keys.add("base_layer.bias")
    if dora:
        keys.add("lora_magnitude_vector")
    return keys


def _peft_layer(base_state: dict[str, torch.Tensor], d_in: int, d_out: int, dtype: torch.dtype, r: int,
                alpha: float, dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False) -> nn.Module:
    """PEFT's ``lora.Linear`` around an ``nn.Linear`` holding ``base_state``."""
    peft = _peft()
    base = nn.Linear(d_in, d_out, bias="bias" in base_state, dtype=dtype)
    base.load_state_dict(base_state)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             use_dora=use_dora, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(nn.Sequential(OrderedDict(proj=base)), config)
    return model.base_model.model.proj


def _set_peft_adapters(ref: nn.Module, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(a)
        ref.lora_B["default"].weight.copy_(b)
        if magnitude is not None:
            ref.lora_magnitude_vector["default"].weight.copy_(magnitude)


def _check_init(cls: Callable, rng: random.Random, dora: bool = False) -> None:
    """Shapes, dtypes, B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_(a=sqrt(5))), fresh draws,
    and (DoRA) the magnitude = row norms of the base weight."""
    name = "DoRALinear" if dora else "LoRALinear"
    cases = [(rng.randrange(200, 400), rng.randrange(3, 30), rng.randrange(4, 9), torch.float32, True),
             (rng.randrange(5, 60), rng.randrange(3, 30), rng.randrange(1, 5), torch.bfloat16, False),
             (rng.randrange(5, 60), rng.randrange(3, 30), rng.randrange(1, 5), torch.float64, True)]
    first_a = None
    for d_in, d_out, r, dtype, bias in cases:
        what = f"{name}(nn.Linear({d_in}, {d_out}, bias={bias}, dtype={dtype}), r={r})"
        layer = cls(Construct("torch.nn.Linear", d_in, d_out, bias=bias, dtype=dtype), r=r, alpha=2 * r)
        sd = _state(layer, _expected_keys(bias, dora), what)
        a, b = sd["lora_A.weight"], sd["lora_B.weight"]
        want = _adapter_dtype(dtype)
        if tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise AssertionError(f"{what}: lora_A.weight has shape {tuple(a.shape)} and lora_B.weight "
                                 f"{tuple(b.shape)}; A maps in_features to r, B maps r to out_features")
        if a.dtype != want or b.dtype != want:
            raise AssertionError(f"{what}: the adapters are {a.dtype}; PEFT keeps them in the base weight's dtype, "
                                 "except for a 16-bit (or quantized) base, whose adapters are float32")
        if sd["base_layer.weight"].dtype != dtype:
            raise AssertionError(f"{what}: the base weight changed dtype to {sd['base_layer.weight'].dtype}")
        if torch.count_nonzero(b):
            raise AssertionError(f"{what}: lora_B.weight must start at zero, so that the adapted layer starts "
                                 "equal to the base layer")
        bound = 1 / math.sqrt(d_in)
        top = a.abs().max().item()
        if top > bound * (1 + 1e-6):
            raise AssertionError(f"{what}: |lora_A| reaches {top:.4g}, above the bound 1/sqrt(in_features) of "
                                 "kaiming_uniform_(a=sqrt(5)) (fan_in is in_features, not r or out_features)")
        if a.numel() >= 1000:
            std, ref_std = a.double().std().item(), bound / math.sqrt(3)
            if abs(std / ref_std - 1) > 0.15 or top < 0.9 * bound:
                raise AssertionError(f"{what}: lora_A has std {std:.4g} and max {top:.4g}; PEFT draws it uniformly "
                                     "in [-1/sqrt(in_features), 1/sqrt(in_features)] (kaiming_uniform_(a=sqrt(5)))")
        if torch.unique(a).numel() < a.numel() // 2:
            raise AssertionError(f"{what}: lora_A is not random")
        if first_a is None:
            first_a = a
        if dora:
            expected = torch.linalg.norm(sd["base_layer.weight"], dim=1).to(want)
            assert_close(sd["lora_magnitude_vector"], expected, f"{what}: the initial lora_magnitude_vector",
                         **_tol(dtype), hint="It starts as the norm of each row (output unit) of the base weight "
                         "W + scaling * B A, with B = 0: the norm of W's rows, taken in W's dtype")
    d_in, d_out, r = cases[0][:3]
    again = cls(Construct("torch.nn.Linear", d_in, d_out, bias=True), r=r, alpha=2 * r).state_dict()["lora_A.weight"]
    if torch.equal(first_a, again):
        raise AssertionError(f"{name}: two layers got the same lora_A: draw it at random in each __init__")


def _forward_and_merge(cls: Callable, rng: random.Random, gen: torch.Generator, dtype: torch.dtype, bias: bool,
                       use_rslora: bool, dora: bool) -> None:
    """Random adapters in the learner's layer and in PEFT's; outputs, gradients, merge, unmerge."""
    name = "DoRALinear" if dora else "LoRALinear"
    d_in, d_out, r = rng.randrange(5, 48), rng.randrange(3, 40), rng.randrange(2, 9)   # r > 1: sqrt(r) != r
    alpha = rng.choice([1, 8, 16, round(rng.uniform(0.5, 32.0), 3)])
    what = (f"{name}(nn.Linear({d_in}, {d_out}, bias={bias}, dtype={dtype}), r={r}, alpha={alpha}"
            f"{', use_rslora=True' if use_rslora else ''})")
    layer = cls(Construct("torch.nn.Linear", d_in, d_out, bias=bias, dtype=dtype), r=r, alpha=alpha,
                dropout=0.0, use_rslora=use_rslora)
    sd = _state(layer, _expected_keys(bias, dora), what)
    base_state = {k.removeprefix("base_layer."): v for k, v in sd.items() if k.startswith("base_layer.")}
    ref = _peft_layer(base_state, d_in, d_out, dtype, r, alpha, use_rslora=use_rslora, use_dora=dora)
    adapter = _adapter_dtype(dtype)
    a = (torch.randn(r, d_in, generator=gen, dtype=torch.float64) * 0.4).to(adapter)
    b = (torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.4).to(adapter)
    new = dict(sd, **{"lora_A.weight": a, "lora_B.weight": b})
    magnitude = None
    if dora:
        magnitude = sd["lora_magnitude_vector"] * (0.5 + torch.rand(d_out, generator=gen)).to(adapter)
        new["lora_magnitude_vector"] = magnitude
    layer.load_state_dict(new)
    _set_peft_adapters(ref, a, b, magnitude)

    lead = rng.choice([(rng.randrange(1, 5),), (rng.randrange(1, 3), rng.randrange(1, 6))])
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        expected = ref(x_ref)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(expected.dtype)
    expected.backward(g)
    out, input_grads, param_grads = value_and_grad(layer, x, grad_output=g)
    tol = _tol(dtype)
    expected = expected.detach()
    scale = {"rtol": tol["rtol"], "atol": tol["atol"] * max(1.0, float(expected.abs().max()))}
    assert_close(out, expected, f"{what}: output for x of shape {tuple(x.shape)}", **scale, check_dtype=True,
                 hint="y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, the adapter branch in the adapters' "
                 "dtype and the sum cast back to the base output's dtype" if not dora else
                 "DoRA: base(x) + (m / ||W + s B A||_row - 1) * (base(x) - bias) + m / ||W + s B A||_row * s * B A x, "
                 "the norm detached")
    trainable = sorted(k for k in param_grads)
    want = sorted(["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if dora else []))
    if trainable != want:
        raise AssertionError(f"{what}: the parameters that train are {trainable}; exactly {want} should "
                             "(freeze the base layer's weight and bias)")
    references = [("lora_A.weight", ref.lora_A["default"].weight), ("lora_B.weight", ref.lora_B["default"].weight)]
    if dora:
        references.append(("lora_magnitude_vector", ref.lora_magnitude_vector["default"].weight))
    for pname, theirs in references:
        grad_tol = {"rtol": tol["rtol"] if dtype == torch.float64 else 1e-4,
                    "atol": tol["atol"] * max(1.0, float(theirs.grad.abs().max()))}
        if dtype != torch.float64:
            grad_tol["atol"] = max(grad_tol["atol"], 1e-5 * float(theirs.grad.abs().max()))
        if param_grads[pname] is None:
            raise AssertionError(f"{what}: {pname} got no gradient")
        assert_close(param_grads[pname], theirs.grad, f"{what}: gradient of {pname}", **grad_tol,
                     hint="the gradient flows through the adapter branch only" +
                     ("; the row norm ||W + s B A|| is a constant for autograd (detach it)" if dora else ""))
    if input_grads[0] is None:
        raise AssertionError(f"{what}: x got no gradient")
    x_tol = dict(grad_tol)
    x_tol["atol"] = max(scale["atol"], tol["atol"] * max(1.0, float(x_ref.grad.abs().max())))
    assert_close(input_grads[0], x_ref.grad, f"{what}: gradient of x", **x_tol)

    # merge, merge again (a no-op), unmerge, unmerge again (a no-op)
    x2 = torch.randn(3, d_in, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.merge()
        merged_weight = ref.base_layer.weight.detach().clone()
        merged_out = ref(x2)
        ref.unmerge()
        unmerged_weight = ref.base_layer.weight.detach().clone()
        unmerged_out = ref(x2)
    w_tol = {"rtol": tol["rtol"], "atol": tol["atol"] * max(1.0, float(merged_weight.abs().max()))}
    layer.merge()
    got = layer.state_dict()["base_layer.weight"]
    assert_close(got, merged_weight, f"{what}: base_layer.weight after merge()", **w_tol, check_dtype=True,
                 hint="merge() adds the update scaling * B @ A to the base weight in place (computed in the "
                 "adapters' dtype)" if not dora else "merge() sets W to m / ||W + s B A||_row * (W + s B A)")
    assert_close(layer(x2), merged_out, f"{what}: output after merge()", **scale, check_dtype=True,
                 hint="once merged, forward is the base layer alone (the update is already in its weight)")
    layer.merge()
    assert_close(layer.state_dict()["base_layer.weight"], merged_weight, f"{what}: base_layer.weight after a "
                 "second merge()", **w_tol, hint="merge() on a merged layer must do nothing (PEFT only warns)")
    layer.unmerge()
    assert_close(layer.state_dict()["base_layer.weight"], unmerged_weight, f"{what}: base_layer.weight after "
                 "unmerge()", **w_tol, check_dtype=True, hint="unmerge() subtracts what merge() added")
    assert_close(layer(x2), unmerged_out, f"{what}: output after unmerge()", **scale,
                 hint="after unmerge() the adapter branch is added again in forward")
    layer.unmerge()
    assert_close(layer.state_dict()["base_layer.weight"], unmerged_weight, f"{what}: base_layer.weight after a "
                 "second unmerge()", **w_tol, hint="unmerge() on a layer that is not merged must do nothing")


def _check_lora_dropout(cls: Callable, gen: torch.Generator) -> None:
    """Dropout acts on the adapter branch only, in training mode only, with the 1/(1-p) rescaling:
    with A = B = I and scaling 1, y - base(x) is dropout(x)."""
    d, p = 12, 0.5
    what = f"LoRALinear(nn.Linear({d}, {d}, dtype=float64), r={d}, alpha={d}, dropout={p})"
    layer = cls(Construct("torch.nn.Linear", d, d, bias=True, dtype=torch.float64), r=d, alpha=d, dropout=p)
    sd = _state(layer, _expected_keys(True), what)
    eye = torch.eye(d, dtype=torch.float64)
    layer.load_state_dict(dict(sd, **{"lora_A.weight": eye, "lora_B.weight": eye}))
    x = torch.randn(200, d, generator=gen, dtype=torch.float64)
    x = x + torch.sign(x)  # no value near 0, so "dropped" and "kept" are told apart
    base = x @ sd["base_layer.weight"].T + sd["base_layer.bias"]
    layer.train()
    delta = layer(x) - base
    kept = torch.isclose(delta, x / (1 - p), rtol=1e-9, atol=1e-9)
    dropped = torch.isclose(delta, torch.zeros_like(delta), atol=1e-9)
    if not bool((kept | dropped).all()):
        raise AssertionError(f"{what}, training mode: output - base_layer(x) should be dropout(x) (each value 0 or "
                             "x / (1 - p)) when A = B = identity; the base layer must see x itself, only the adapter "
                             "branch sees dropout(x)")
    share = float(dropped.double().mean())
    if not 0.4 < share < 0.6:
        raise AssertionError(f"{what}, training mode: {share:.0%} of the adapter inputs were dropped, expected about "
                             f"{p:.0%} (nn.Dropout(p))")
    layer.eval()
    assert_close(layer(x) - base, x, f"{what}, eval mode: output - base_layer(x)", rtol=1e-9, atol=1e-9,
                 hint="in eval mode dropout does nothing")
    layer.train()


def check_lora_linear(cls: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    _check_init(cls, rng)
    cases = [(torch.float32, True, False), (torch.float32, False, True), (torch.float64, True, False),
             (torch.bfloat16, True, False), (rng.choice([torch.float32, torch.float64]), rng.random() < 0.5, True)]
    for dtype, bias, use_rslora in cases:
        _forward_and_merge(cls, rng, gen, dtype, bias, use_rslora, dora=False)
    _check_lora_dropout(cls, gen)


def _check_dora_dropout(cls: Callable, gen: torch.Generator) -> None:
    """With dropout in training mode, PEFT's DoRA feeds dropout(x) to both W x (no bias) and the adapters:
    with W = 2 I, B = 0 and m = 2 ||W||_row, y = 2 x + 2 dropout(x)."""
    d, p = 12, 0.5
    what = f"DoRALinear(nn.Linear({d}, {d}, bias=False, dtype=float64), r=2, dropout={p})"
    layer = cls(Construct("torch.nn.Linear", d, d, bias=False, dtype=torch.float64), r=2, alpha=4, dropout=p)
    sd = _state(layer, _expected_keys(False, dora=True), what)
    w = 2 * torch.eye(d, dtype=torch.float64)
    layer.load_state_dict(dict(sd, **{"base_layer.weight": w, "lora_B.weight": torch.zeros(d, 2, dtype=torch.float64),
                                      "lora_magnitude_vector": torch.full((d,), 4.0, dtype=torch.float64)}))
    x = torch.randn(200, d, generator=gen, dtype=torch.float64)
    x = x + torch.sign(x)
    layer.train()
    dropped_x = (layer(x) - 2 * x) / 2
    kept = torch.isclose(dropped_x, x / (1 - p), rtol=1e-9, atol=1e-9)
    dropped = torch.isclose(dropped_x, torch.zeros_like(x), atol=1e-9)
    share = float(dropped.double().mean())
    if not bool((kept | dropped).all()) or not 0.4 < share < 0.6:
        raise AssertionError(f"{what}, training mode: with dropout, PEFT's DoRA computes the (m / norm - 1) W x term "
                             "from dropout(x) (x @ W.T, without bias), not from base_layer(x)")
    layer.eval()
    assert_close(layer(x), 4 * x, f"{what}, eval mode: output", rtol=1e-9, atol=1e-9,
                 hint="in eval mode dropout does nothing and the base output (minus bias) is reused")
    layer.train()


def check_dora_linear(cls: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    _check_init(cls, rng, dora=True)
    cases = [(torch.float32, True, False), (torch.float32, False, False), (torch.float64, True, rng.random() < 0.5),
             (torch.bfloat16, True, False)]
    for dtype, bias, use_rslora in cases:
        _forward_and_merge(cls, rng, gen, dtype, bias, use_rslora, dora=True)
    _check_dora_dropout(cls, gen)


# ----- apply_lora on a tiny transformers Llama ---------------------------------------------------

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_config(rng: random.Random) -> dict[str, Any]:
    return dict(vocab_size=rng.randrange(40, 90), hidden_size=16, intermediate_size=rng.choice([20, 24, 32]),
                num_hidden_layers=12, num_attention_heads=2, num_key_value_heads=rng.choice([1, 2]),
                max_position_embeddings=32, tie_word_embeddings=rng.random() < 0.3)


def _random_patterns(rng: random.Random) -> tuple[dict[str, int], dict[str, float]]:
    layer = rng.randrange(12)
    rank_pattern = {rng.choice(["v_proj", "mlp.down_proj", "self_attn.v_proj"]): rng.randrange(1, 4),
                    rf"layers\.{layer}\.self_attn\.q_proj": rng.randrange(5, 8)}
    alpha_pattern = {rng.choice(["q_proj", "down_proj"]): rng.choice([3, 12, 24])}
    return rank_pattern, alpha_pattern


def _cases(rng: random.Random) -> list[dict[str, Any]]:
    k = rng.randrange(1, 4)
    # "1.self_attn.o_proj" names layer 1's projection only: a substring test or an endswith without the
    # dot also takes layer 11's
    return [
        {"target_modules": rng.sample(_PROJ, 2)},
        {"target_modules": ["1.self_attn.o_proj", rng.choice(["1.mlp.up_proj", "1.mlp.down_proj"]),
                            f"layers.{rng.randrange(2, 10)}.mlp.gate_proj", "self_attn.k_proj"]},
        {"target_modules": rf"(k|o)_proj|.*\.layers\.[0-{k}]\.self_attn\.(k|o)_proj"},
        {"target_modules": "all-linear"},
        dict(zip(("rank_pattern", "alpha_pattern"), _random_patterns(rng)),
             target_modules=["q_proj", "v_proj", "down_proj"]),
    ]


def _tiny_llama(cfg: dict[str, Any], gen: torch.Generator) -> tuple[nn.Module, dict[str, torch.Tensor], Construct]:
    """A tiny Llama here (random weights drawn from ``gen``), its weights, and the same model to be
    built on the learner's side."""
    transformers = quiet_transformers()
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    remote = Construct("transformers.LlamaForCausalLM", None, method="from_pretrained",
                       config=Construct("transformers.LlamaConfig", **cfg), state_dict=state)
    return model, state, remote


def _peft_model(model: nn.Module, kwargs: dict[str, Any], r: int,
                alpha: float) -> tuple[nn.Module | None, dict[str, int]]:
    """PEFT on ``model`` with the same arguments: (model or None if PEFT refuses, {adapted module: rank})."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=kwargs["target_modules"],
                             rank_pattern=kwargs.get("rank_pattern", {}), alpha_pattern=kwargs.get("alpha_pattern", {}))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft.get_peft_model(model, config)
    except ValueError:
        return None, {}
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
             if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    return peft_model, ranks


def check_apply_lora(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    for kwargs in _cases(rng):
        cfg = _tiny_config(rng)
        r, alpha = rng.randrange(1, 5), rng.choice([4, 8, 16])
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        what = f"apply_lora(tiny Llama with 12 layers, {shown}, r={r}, alpha={alpha})"
        reference, state, remote = _tiny_llama(cfg, gen)
        model = fn(remote, r=r, alpha=alpha, **kwargs)
        if model is None:
            raise AssertionError(f"{what} returned None; return the model (adapted in place)")
        sd = model.state_dict()
        if not isinstance(sd, dict):
            raise AssertionError(f"{what}: the returned object has no state_dict(); return the model")
        sd = {k: v.detach().clone() for k, v in sd.items()}
        ours = sorted(k[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight"))
        base_names = sorted(k.replace(".base_layer.", ".") for k in sd if ".lora_A." not in k and ".lora_B." not in k)
        if base_names != sorted(state):
            raise AssertionError(f"{what}: the model's state_dict does not map back to the base model's names: keep "
                                 "every other module where it was, and name the wrapped layer `base_layer` and the "
                                 "adapters `lora_A`, `lora_B` (as PEFT does)")
        peft_model, ranks = _peft_model(reference, kwargs, r, alpha)
        if peft_model is None:
            raise AssertionError(f"{what}: PEFT finds no linear layer to adapt here; expected a ValueError")
        assert_equal(ours, sorted(ranks), f"{what}: the names of the adapted modules (sorted)",
                     hint="a list entry t selects a module named t or ending with '.' + t; a string is a regular "
                     "expression that must match the whole name (re.fullmatch); 'all-linear' is every nn.Linear but "
                     "the output layer")
        got_ranks = {n: int(sd[n + ".lora_A.weight"].shape[0]) for n in ours}
        assert_equal(got_ranks, ranks, f"{what}: the rank of each adapted module",
                     hint="rank_pattern / alpha_pattern: the first key k (in dict order) for which "
                     "re.match(rf'(.*\\.)?({k})$', name) succeeds gives the value; otherwise r / alpha")
        # which parameters train: every adapter, and none of a sample of the others
        frozen = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]
        if not cfg["tie_word_embeddings"]:
            frozen.append("lm_head.weight")
        others = [k for k in sd if ".lora_" not in k and k != "lm_head.weight"]
        adapters = [n + s for n in ours for s in (".lora_A.weight", ".lora_B.weight")]
        sample = sorted(set(frozen + rng.sample(others, min(6, len(others)))))
        for key in sample + rng.sample(adapters, min(8, len(adapters))):
            p = model.get_parameter(key)
            if bool(p.requires_grad) != (".lora_" in key):
                raise AssertionError(f"{what}: parameter {key} has requires_grad={bool(p.requires_grad)}; only the "
                                     "adapters (lora_A, lora_B) train, every other parameter of the model is frozen")
        # the logits with random adapters, against PEFT's (checks every scaling alpha / r)
        new, theirs = {}, {}
        for n in ours:
            a = torch.randn(sd[n + ".lora_A.weight"].shape, generator=gen) * 0.3
            b = torch.randn(sd[n + ".lora_B.weight"].shape, generator=gen) * 0.3
            new[n + ".lora_A.weight"], new[n + ".lora_B.weight"] = a, b
            theirs[f"base_model.model.{n}.lora_A.default.weight"] = a
            theirs[f"base_model.model.{n}.lora_B.default.weight"] = b
        model.load_state_dict(new, strict=False)
        peft_model.load_state_dict(theirs, strict=False)
        ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=gen)
        with torch.no_grad():
            expected = peft_model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids, use_cache=False)
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", None)
        assert_close(logits, expected, f"{what}: logits with random adapters", rtol=1e-4, atol=1e-5,
                     hint="each adapted layer uses scaling = alpha / r with its own (pattern) alpha and r")
    # what PEFT refuses: a target that is not a linear layer, and targets that match nothing
    for targets, why in [(["mlp"], "matches LlamaMLP modules, which are not linear layers"),
                         ([f"no_such_proj_{rng.randrange(100)}"], "matches no module")]:
        _, _, remote = _tiny_llama(_tiny_config(rng), gen)
        try:
            fn(remote, target_modules=targets, r=2, alpha=4)
        except ValueError:
            continue
        raise AssertionError(f"apply_lora(tiny Llama, target_modules={targets!r}) should raise ValueError (the "
                             f"target {why}), as PEFT does")



# ----- prefix_attention: one attention layer of PEFT's prefix tuning -------------------------------

def _prefix_case(rng: random.Random, gen: torch.Generator, n_kv_heads: int, n_heads: int, length: int):
    """A tiny Llama under PEFT's prefix tuning; returns (arguments for the learner, expected output,
    mask of the real tokens, description)."""
    peft, transformers = _peft(), quiet_transformers()
    head_dim, n_layers = rng.choice([8, 16]), 3
    prefix_len, batch = rng.randrange(1, 7), rng.randrange(2, 4)
    theta = rng.choice([10000.0, 500000.0])
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=n_heads * head_dim, intermediate_size=24, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim, max_position_embeddings=64,
        rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
        model = transformers.LlamaForCausalLM(cfg).eval()
    dim = n_heads * head_dim
    with torch.no_grad():  # scores of order 1 and more: attention far from uniform, positions matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(dim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                        num_virtual_tokens=prefix_len))
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.randn(encoder.embedding.weight.shape, generator=gen))
    layer_idx = rng.randrange(n_layers)
    attention = peft_model.get_base_model().model.layers[layer_idx].self_attn
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        seen["x"] = kwargs["hidden_states"].detach().clone()
        seen["out"] = output[0].detach().clone()

    ids = torch.randint(0, 50, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if length > 1:
        mask[0, : rng.randrange(1, length)] = 0  # left padding: padded keys sit between the prefix and the tokens
        mask[-1, rng.randrange(1, length):] = 0  # right padding
    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    flat = encoder.embedding.weight.detach().view(prefix_len, 2 * n_layers, n_kv_heads, head_dim)
    prefix_key = flat[:, 2 * layer_idx].transpose(0, 1).contiguous()        # [n_kv_heads, P, head_dim]
    prefix_value = flat[:, 2 * layer_idx + 1].transpose(0, 1).contiguous()
    args = (seen["x"], attention.q_proj.weight.detach().clone(), attention.k_proj.weight.detach().clone(),
            attention.v_proj.weight.detach().clone(), attention.o_proj.weight.detach().clone(), prefix_key,
            prefix_value, mask.clone(), n_heads, theta)
    what = (f"prefix_attention(x [{batch}, {length}, {dim}], n_heads={n_heads}, {n_kv_heads} key/value heads of "
            f"{head_dim}, prefix of {prefix_len}, rope_theta={theta:g}, padding mask {mask.tolist()})")
    return args, seen["out"], mask.bool(), what


def check_prefix_attention(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    cases = [(2, 4, rng.randrange(4, 9)), (1, 2, rng.randrange(4, 9)), (4, 4, rng.randrange(4, 9)),
             (rng.choice([1, 2]), 4, 1)]
    for n_kv_heads, n_heads, length in cases:
        args, expected, real, what = _prefix_case(rng, gen, n_kv_heads, n_heads, length)
        got = as_tensor(call_answer(fn, what, *args), what)
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}; the output "
                                 "is o_proj of the heads merged back, [B, T, dim]")
        assert_close(got[real], expected[real], f"{what}: output at the real (unpadded) tokens", rtol=1e-4,
                     atol=1e-5 * max(1.0, float(expected.abs().max())),
                     hint="queries and the tokens' keys are rotated at positions P + t (the prefix occupies 0 .. P-1); "
                     "the prefix keys are used as they are, without RoPE; every query sees the whole prefix, the "
                     "tokens up to itself, and no padding; key/value head j serves query heads j * n_rep .. "
                     "(j + 1) * n_rep - 1")


CHECKS = {
    "LoRALinear": check_lora_linear,
    "apply_lora": check_apply_lora,
    "DoRALinear": check_dora_linear,
    "prefix_attention": check_prefix_attention,
}
