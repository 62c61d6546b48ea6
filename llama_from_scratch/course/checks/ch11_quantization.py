"""Checks for the exercises of chapter 11 (NF4, FP4 and QLoRA), against bitsandbytes and PEFT, and
of its asymmetric (zero-point) quantization, against PyTorch's affine quantization (section 4 below).

What bitsandbytes 0.50 does on a CPU, measured for these checks:

* ``functional.quantize_4bit`` runs bitsandbytes' pure-PyTorch definition (``backends/default``):
  the exercise's recipe, bit for bit. It is the reference of ``quantize_4bit`` as it is.
* ``compress_statistics=True`` quantizes the block scales with ``quantize_blockwise``, which on CPU
  runs a native kernel whose search of the 256 codes is approximate: about 0.2% of the 8-bit codes
  (66 of 40,960 measured on 20 random 256 x 512 matrices) come out one code away from the nearest.
  The reference therefore takes the *exact* codes from bitsandbytes' own pure-PyTorch kernel
  (``torch.ops.bitsandbytes.quantize_blockwise`` redispatched to its CompositeExplicitAutograd
  kernel); its ``absmax2`` and ``offset`` equal the native ones exactly.
* The native CPU ``dequantize_4bit`` is wrong for rows that are not a whole number of blocks
  (chapter 11 shows it); ``Linear4bit`` uses it, so layers of such shapes are compared with
  bitsandbytes' pure-PyTorch dequantization (redispatched likewise) followed by ``F.linear``.
* ``Linear4bit`` in eval mode on a CPU with AVX512-BF16 repacks its weight and computes in
  bfloat16; the references run in training mode (as under QLoRA), which takes the definition.

With these, the solution reproduces bitsandbytes bit for bit: bytes, scales, dequantized weights,
outputs and input gradients of ``Linear4bit`` (float32 and bfloat16 compute), and, for the
capstone, the loss, every LoRA gradient and every AdamW-updated weight of PEFT + bitsandbytes on a
tiny Llama (all differences measured 0.0). The tolerances below only leave room for sums taken in
another order; every wrong answer in the tests is off by orders of magnitude more.

Inputs (shapes, dtypes, block sizes, weights, targets, ranks, adapters, tokens) are drawn afresh at
every run.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
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

# PyTorch's own affine quantization, the reference of exercise 4 (and torchao, built on it)
_TORCH_QUANTIZATION = [
    "torch.ao", "torch.quantization", "torch.nn.quantized", "torchao", "torch.quantize_per_channel",
    "torch.quantize_per_tensor", "torch.quantize_per_tensor_dynamic", "torch.fake_quantize_per_channel_affine",
    "torch.fake_quantize_per_tensor_affine", "torch._fake_quantize_learnable_per_channel_affine",
    "torch._fake_quantize_learnable_per_tensor_affine", "torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "torch.fused_moving_avg_obs_fake_quant", "torch._fused_moving_avg_obs_fq_helper",
    "torch._make_per_channel_quantized_tensor", "torch._make_per_tensor_quantized_tensor", "torch.dequantize",
    "torch.Tensor.dequantize", "torch.Tensor.int_repr", "torch.choose_qparams_optimized",
    "torch._choose_qparams_per_tensor",
]

FORBIDDEN = {
    "quantize_4bit": ["bitsandbytes"],
    "LinearNF4": ["bitsandbytes"],
    "qlora_step": ["bitsandbytes", "peft"],
    "quantize_asymmetric": _TORCH_QUANTIZATION,
    "dequantize_asymmetric": _TORCH_QUANTIZATION,
}

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@functools.lru_cache(maxsize=None)
def _bnb():
    """bitsandbytes (and its ``functional``), imported once, its CPU notices silenced."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401

    return bitsandbytes


def _default_backend() -> Any:
    """The dispatch key of bitsandbytes' pure-PyTorch kernels (its definition of each op)."""
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _exact_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' pure-PyTorch ``quantize_blockwise`` (exact nearest code), called through its own op."""
    _bnb()
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(_default_backend(), x, code, blocksize)


def _exact_dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: list[int],
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch ``dequantize_4bit`` (right for every shape), without the
    ``torch.compile`` wrapper bitsandbytes puts around it (compiling for every shape takes seconds)."""
    bnb = _bnb()
    from bitsandbytes.backends.default import ops

    compute = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    return compute(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


# ----- 1. quantize_4bit ---------------------------------------------------------------------------


def _midpoints(quant_type: str) -> torch.Tensor:
    code = _bnb().functional.get_4bit_type(quant_type, device="cpu")
    values = code.sort().values
    return (values[:-1] + values[1:]) / 2


def _quantize_cases(rng: random.Random, gen: torch.Generator) -> list[tuple[torch.Tensor, int, str, str]]:
    """(w, blocksize, quant_type, description) for random and hand-made inputs."""
    cases = []
    for quant_type in ("nf4", "fp4"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            blocksize = rng.choice(_BLOCKSIZES[:4])
            ndim = rng.choice([1, 2, 3])
            shape = {1: (rng.randrange(1, 3000),), 2: (rng.randrange(1, 40), rng.randrange(1, 90)),
                     3: (rng.randrange(1, 5), rng.randrange(1, 9), rng.randrange(1, 40))}[ndim]
            w = (torch.randn(shape, generator=gen) * rng.choice([0.02, 1.0, 50.0])).to(dtype)
            cases.append((w, blocksize, quant_type, f"random {dtype} of shape {tuple(shape)}"))
        w = torch.randn(rng.randrange(20, 70), rng.randrange(20, 90), generator=gen).T   # a transposed view
        cases.append((w, rng.choice(_BLOCKSIZES[:3]), quant_type, f"a transposed view of shape {tuple(w.shape)}"))
        big = rng.choice(_BLOCKSIZES[4:])
        w = torch.randn((big * 2 + rng.randrange(1, big)) | 1, generator=gen) * 0.05   # an odd count
        cases.append((w, big, quant_type, f"{w.numel()} values in blocks of {big}"))
        # a whole block of zeros and a partial last block of zeros
        bs = rng.choice([32, 64])
        w = torch.randn(3 * bs + rng.randrange(1, bs), generator=gen)
        w[bs:2 * bs] = 0
        w[3 * bs:] = 0
        cases.append((w, bs, quant_type, f"{w.numel()} values, block 1 and the partial last block all zero"))
        # values exactly on the midpoints (absmax 1 in every block, so the scaled values are exact)
        mids = _midpoints(quant_type)
        n = rng.randrange(200, 600)
        w = mids[torch.randint(0, 15, (n,), generator=gen)].clone()
        w[::64] = torch.where(torch.arange(len(w[::64])) % 2 == 0, 1.0, -1.0)   # absmax 1 in every block
        cases.append((w, 64, quant_type, f"{n} values lying exactly on midpoints between code values"))
    rng.shuffle(cases)
    return cases


def _nibbles(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The codes of a packed tensor, high nibble first; FP4's -0 (code 8) read as +0 (code 0)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
    if quant_type == "fp4":
        codes = torch.where(codes == 8, torch.zeros_like(codes), codes)
    return codes


def check_quantize_4bit(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    BF = _bnb().functional
    for w, blocksize, quant_type, desc in _quantize_cases(rng, gen):
        what = f"quantize_4bit({desc}, blocksize={blocksize}, quant_type={quant_type!r})"
        original = w.clone()
        expected_packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        got = fn(w, blocksize=blocksize, quant_type=quant_type)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"{what}: return a tuple (packed, absmax), got {type(got).__name__}")
        packed, absmax = as_tensor(got[0], f"{what}: packed"), as_tensor(got[1], f"{what}: absmax")
        if not torch.equal(w, original):
            raise AssertionError(f"{what}: the input was modified")
        if packed.dtype != torch.uint8:
            raise AssertionError(f"{what}: packed must be uint8, got {packed.dtype}")
        if tuple(packed.shape) != tuple(expected_packed.shape):
            raise AssertionError(f"{what}: packed has shape {tuple(packed.shape)}, expected "
                                 f"{tuple(expected_packed.shape)}: (n + 1) // 2 bytes as a column, like bitsandbytes")
        if absmax.dtype != torch.float32:
            raise AssertionError(f"{what}: absmax must be float32, got {absmax.dtype}")
        assert_equal(absmax, state.absmax, f"{what}: absmax",
                     hint="the largest |value| of each block of the flattened tensor; a partial last block's absmax "
                     "is clamped to at least 1e-38 (an all-zero whole block keeps 0)")
        n = w.numel()
        got_codes = _nibbles(packed, quant_type)[:n]
        expected_codes = _nibbles(expected_packed, quant_type)[:n]
        swapped = _nibbles(((packed & 15) << 4) | (packed >> 4), quant_type)[:n]
        hint = ("the codes differ from bitsandbytes'. Nearest value by the midpoints (a value exactly on a midpoint "
                "goes to the LOWER value); whole blocks scaled by the float32 reciprocal 1 / absmax, the partial last "
                "block divided by its absmax" + ("; FP4: quantize against the sorted table and map the sorted index "
                                                 "back to its code" if quant_type == "fp4" else ""))
        if torch.equal(swapped, expected_codes) and not torch.equal(got_codes, expected_codes):
            hint = "the two codes of each byte are swapped: the FIRST code goes in the HIGH nibble"
        assert_equal(got_codes, expected_codes, f"{what}: the 4-bit codes (unpacked, high nibble first)", hint=hint)
        if n % 2:
            assert_equal(_nibbles(packed, quant_type)[n:], _nibbles(expected_packed, quant_type)[n:],
                         f"{what}: the padding nibble of the last byte", hint="an odd count is padded with the code "
                         "of 0.0: 7 in NF4, 0 in FP4")


# ----- 2. LinearNF4 -------------------------------------------------------------------------------


def _bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int, double_quant: bool,
                compute_dtype: torch.dtype) -> nn.Module:
    """``Linear4bit`` (NF4) holding ``weight``, in training mode, with the exact 8-bit scale codes."""
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=blocksize)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer = layer.to("cpu").train()
    if double_quant:
        state = layer.weight.quant_state
        _, plain = bnb.functional.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
        q, absmax2 = _exact_blockwise(plain.absmax - state.offset, state.state2.code, 256)
        assert torch.equal(absmax2, state.state2.absmax), "internal: the exact 8-bit scales disagree with bitsandbytes'"
        state.absmax = q
    return layer


def _reference_scales(layer: nn.Module) -> torch.Tensor:
    state = layer.weight.quant_state
    if not state.nested:
        return state.absmax
    return _bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset


def check_linear_nf4(cls: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    cases = [  # (out, in, blocksize, double_quant, compute_dtype, bias, x dtype)
        (rng.randrange(8, 80), 64 * rng.randrange(1, 4), 64, False, torch.float32, True, torch.float32),
        (rng.randrange(8, 80), 64 * rng.randrange(2, 5), 64, True, torch.float32, False, torch.float32),
        (rng.randrange(300, 400), 128, rng.choice([32, 64]), True, torch.float32, True, torch.float32),  # > 256 blocks
        (rng.randrange(8, 60), 32 * rng.randrange(1, 6), 32, True, torch.bfloat16, True, torch.float32),
        (rng.randrange(8, 60), 128, 128, rng.random() < 0.5, torch.bfloat16, True, torch.bfloat16),
        (rng.randrange(8, 40), rng.randrange(20, 200) | 1, 64, True, torch.float32, True, torch.float32),  # odd rows
    ]
    for out_f, in_f, blocksize, double_quant, compute_dtype, bias, x_dtype in cases:
        what = (f"LinearNF4(weight [{out_f}, {in_f}], bias={bias}, blocksize={blocksize}, double_quant={double_quant}, "
                f"compute_dtype={compute_dtype})")
        w = torch.randn(out_f, in_f, generator=gen) * rng.choice([0.02, 0.1])
        if compute_dtype == torch.bfloat16 and rng.random() < 0.5:
            # a bfloat16 weight (Linear4bit's backward dequantizes in the weight's dtype, so only with bf16 compute)
            w = w.to(torch.bfloat16)
        b = torch.randn(out_f, generator=gen) * 0.1 if bias else None
        ref = _bnb_linear(w, b, blocksize, double_quant, compute_dtype)
        layer = cls(w.clone(), None if b is None else b.clone(), blocksize=blocksize, double_quant=double_quant,
                    compute_dtype=compute_dtype)
        sd = layer.state_dict()
        keys = {"weight"} | ({"bias"} if bias else set())
        keys |= {"absmax_q", "absmax2", "absmax_offset"} if double_quant else {"absmax"}
        if not isinstance(sd, dict) or set(sd) != keys:
            raise AssertionError(f"{what}: state_dict() keys are {sorted(sd) if isinstance(sd, dict) else sd!r}, "
                                 f"expected {sorted(keys)} (buffers for the codes and scales, the bias as a parameter)")
        assert_equal(sd["weight"], ref.weight.data, f"{what}: the packed codes (buffer `weight`)",
                     hint="your quantize_4bit(weight, blocksize, 'nf4')[0], uint8 [(n + 1) // 2, 1]")
        state = ref.weight.quant_state
        if double_quant:
            assert_equal(sd["absmax_offset"], state.offset, f"{what}: absmax_offset",
                         hint="the mean of the float32 block absmax values, a 0-d tensor")
            assert_equal(sd["absmax2"], state.state2.absmax, f"{what}: absmax2",
                         hint="the absmax of each block of 256 values of (absmax - absmax_offset)")
            assert_equal(sd["absmax_q"], state.absmax, f"{what}: absmax_q",
                         hint="the nearest DYNAMIC_MAP code of each scaled (absmax - absmax_offset), blocks of 256")
        else:
            assert_equal(sd["absmax"], state.absmax, f"{what}: absmax", hint="one float32 absmax per block")
        if bias:
            assert_equal(sd["bias"], b, f"{what}: bias", hint="keep the bias as given")
        expected_w = _exact_dequantize_4bit(ref.weight.data, _reference_scales(ref), blocksize, [out_f, in_f])
        got_w = layer.dequantize()
        assert_close(got_w, expected_w, f"{what}: dequantize()", rtol=0, atol=0, check_dtype=True,
                     hint="float32 NF4_CODE[code] * absmax of the code's block (double quantization: "
                     "DYNAMIC_MAP[absmax_q] * absmax2[block // 256] + absmax_offset), high nibble first")
        # forward and the gradient of x, against Linear4bit (or, for rows that are not whole blocks, against
        # bitsandbytes' definition: its native CPU dequantization is wrong there)
        x = torch.randn(rng.randrange(1, 4), rng.randrange(1, 6), in_f, generator=gen).to(x_dtype)
        x_ref = x.clone().requires_grad_()
        with torch.enable_grad():
            if in_f % blocksize == 0:
                expected = ref(x_ref)
            else:
                wc = expected_w.to(compute_dtype)
                expected = F.linear(x_ref.to(compute_dtype), wc, None if b is None else b.to(compute_dtype)).to(x_dtype)
        g = torch.randn(expected.shape, generator=gen).to(expected.dtype)
        expected.backward(g)
        out, input_grads, param_grads = value_and_grad(layer, x.clone().requires_grad_(), grad_output=g)
        exact = compute_dtype == torch.float32 and x_dtype == torch.float32
        tol = {"rtol": 1e-5, "atol": 1e-6} if exact else {"rtol": 2 ** -7, "atol": 1e-3}
        assert_close(out, expected.detach(), f"{what}: output for x {x_dtype} of shape {tuple(x.shape)}", **tol,
                     check_dtype=True, hint="F.linear in compute_dtype (x, the dequantized weight and the bias cast to "
                     "it), the result cast back to x's dtype")
        if compute_dtype == torch.bfloat16 and not torch.equal(out, out.to(torch.bfloat16).to(out.dtype)):
            raise AssertionError(f"{what}: the output carries more precision than bfloat16: compute in compute_dtype "
                                 "(cast x, the weight and the bias to it), then cast the result to x's dtype")
        if param_grads:
            raise AssertionError(f"{what}: parameters {sorted(param_grads)} require gradients; nothing in a quantized "
                                 "layer trains (keep the bias with requires_grad=False)")
        assert_close(input_grads[0], x_ref.grad, f"{what}: gradient of x", **tol,
                     hint="the gradient flows to x through the dequantized weight")


# ----- 3. the capstone: one QLoRA step ------------------------------------------------------------

_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@functools.lru_cache(maxsize=None)
def _peft():
    _bnb()
    import peft

    return peft


def _reference_step(cfg: dict[str, Any], state: dict[str, torch.Tensor], targets: list[str],
                    adapters: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor, r: int, alpha: float,
                    lr: float, blocksize: int, double_quant: bool) -> dict[str, Any]:
    """The same step with transformers + bitsandbytes' Linear4bit + PEFT."""
    transformers, peft = quiet_transformers(), _peft()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.load_state_dict(state)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    _bnb_linear(module.weight.data, module.bias, blocksize, double_quant, torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    theirs = {"base_model.model." + k.replace(".lora_A.weight", ".lora_A.default.weight")
              .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in adapters.items()}
    result = peft_model.load_state_dict(theirs, strict=False)
    assert not result.unexpected_keys, f"internal: adapters PEFT does not have: {result.unexpected_keys[:3]}"
    peft_model.train()
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr)
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()

    def short(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".default.", ".")

    grads = {short(n): p.grad.detach().clone() for n, p in params.items()}
    optimizer.step()
    return {"loss": loss.detach(), "grads": grads, "weights": {short(n): p.detach().clone() for n, p in params.items()}}


def check_qlora_step(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    transformers = quiet_transformers()
    sizes = [32, 64]
    rng.shuffle(sizes)
    for double_quant, blocksize in zip(rng.sample([True, False], 2), sizes):
        cfg = dict(vocab_size=rng.randrange(60, 130), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=rng.choice([1, 2, 4]), max_position_embeddings=64,
                   tie_word_embeddings=False, initializer_range=0.1)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
            base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        targets = rng.sample(_PROJ, rng.randrange(2, 5))
        r, alpha, lr = rng.randrange(2, 7), rng.choice([8, 16, 32]), rng.choice([1e-2, 5e-3])
        adapters = {}
        for name, module in base.named_modules():
            if any(name.endswith("." + t) for t in targets):
                bound = 1 / math.sqrt(module.in_features)
                adapters[f"{name}.lora_A.weight"] = (torch.rand(r, module.in_features, generator=gen) * 2 - 1) * bound
                adapters[f"{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.05
        ids = torch.randint(0, cfg["vocab_size"], (2, rng.randrange(8, 14)), generator=gen)
        labels = ids.clone()
        labels[0, : rng.randrange(1, 4)] = -100
        what = (f"qlora_step(tiny Llama, target_modules={targets}, r={r}, alpha={alpha}, lr={lr}, "
                f"blocksize={blocksize}, double_quant={double_quant})")
        expected = _reference_step(cfg, state, targets, adapters, ids, labels, r, alpha, lr, blocksize, double_quant)
        model = Construct("transformers.LlamaForCausalLM", None, method="from_pretrained",
                          config=Construct("transformers.LlamaConfig", **cfg), state_dict=state)
        got = fn(model, target_modules=list(targets), adapters=dict(adapters), input_ids=ids.clone(),
                    labels=labels.clone(), r=r, alpha=alpha, lr=lr, blocksize=blocksize, double_quant=double_quant)
        if not isinstance(got, dict) or not {"loss", "grads", "weights"} <= set(got):
            raise AssertionError(f"{what}: return a dict with keys 'loss', 'grads' and 'weights'")
        assert_close(torch.as_tensor(got["loss"]).reshape(()), expected["loss"], f"{what}: loss", rtol=1e-6, atol=1e-7,
                     hint="a 4-bit base equal to Linear4bit's (every nn.Linear but the output layer, NF4, your "
                     "blocksize and double quantization), adapters loaded, transformers' loss with labels")
        for part, hint in [("grads", "the gradients of the adapters after loss.backward(), before the step"),
                           ("weights", "the adapters after one torch.optim.AdamW step (default betas, eps, weight "
                            "decay 0.01)")]:
            mine = got[part]
            if not isinstance(mine, dict):
                raise AssertionError(f"{what}: got[{part!r}] must be a dict {{parameter name: tensor}}")
            assert_equal(sorted(mine), sorted(expected[part]), f"{what}: the names in got[{part!r}] (sorted)",
                         hint="every trainable parameter (each adapted layer's lora_A.weight and lora_B.weight), "
                         "named as in model.named_parameters()")
            for name in sorted(expected[part]):
                ref = expected[part][name]
                scale = float(ref.abs().max())
                if part == "grads":
                    tol = {"rtol": 1e-4, "atol": 1e-6 * max(scale, 1e-3)}
                else:
                    tol = {"rtol": 1e-6, "atol": 1e-6}
                assert_close(mine[name], ref, f"{what}: {part}[{name!r}]", **tol, hint=hint)


# ----- 4. asymmetric (zero-point) quantization, against PyTorch -----------------------------------
#
# PyTorch's affine quantization is the reference: ``PerChannelMinMaxObserver`` (quant_min 0,
# quant_max 2**bits - 1) for the scales and zero points, ``fake_quantize_per_channel_affine`` for the
# codes (it rounds x * (1 / scale) first and then adds the zero point; ``quantize_per_channel``'s
# quint8 tensors round after adding it, which moves exact ties by one code: the exercise follows
# the fake quantization, as chapter 11 does) and the ``dequantize()`` of a per-channel quantized
# tensor for the way back. Each group of ``group_size`` values along the last dimension (the last
# group of a row possibly shorter) is one of PyTorch's channels: the grader cuts the groups, PyTorch
# quantizes them.


def _torch_minmax(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 scales, int32 zero points, uint8 codes) of the rows of ``groups`` ``[n, size]`` (float32),
    by PyTorch's min-max observer and ``fake_quantize_per_channel_affine``."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    top = 2 ** bits - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit notices from the observer's class
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine,
                                            quant_min=0, quant_max=top)
    observer(groups)
    scale, zero_point = observer.calculate_qparams()
    zero_point = zero_point.to(torch.int32)
    x_hat = torch.fake_quantize_per_channel_affine(groups, scale, zero_point, 0, 0, top)
    # x_hat = (q - z) * scale with |q - z| <= 255: dividing back lands within 3e-5 of the integer q - z
    codes = torch.round(x_hat / scale[:, None]) + zero_point[:, None]
    assert bool(((codes >= 0) & (codes <= top)).all()), "internal: codes outside [0, 2**bits - 1]"
    assert torch.equal((codes - zero_point[:, None]) * scale[:, None], x_hat), "internal: codes do not give x_hat"
    return scale, zero_point, codes.to(torch.uint8)


def _group_layout(shape: tuple[int, ...], group_size: int | None) -> tuple[int, int, int, int]:
    """(rows, width, size, full): the tensor as rows of its last dimension, groups of ``size``, ``full``
    columns in whole groups."""
    width = shape[-1]
    rows = math.prod(shape[:-1])
    size = width if group_size is None else min(group_size, width)
    return rows, width, size, width // size * size


def _reference_asymmetric(x: torch.Tensor, bits: int,
                          group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's codes (x's shape), scales and zero points (``[*x.shape[:-1], n_groups]``) of ``x``."""
    rows, width, size, full = _group_layout(tuple(x.shape), group_size)
    flat = x.detach().float().reshape(rows, width)
    parts = []
    if full:
        scale, zero_point, codes = _torch_minmax(flat[:, :full].reshape(-1, size), bits)
        parts.append((scale.view(rows, -1), zero_point.view(rows, -1), codes.view(rows, full)))
    if full < width:   # each row's last, shorter group: one more channel per row
        parts.append(tuple(t.view(rows, -1) for t in _torch_minmax(flat[:, full:].contiguous(), bits)))
    scale, zero_point, codes = (torch.cat(ts, dim=1) for ts in zip(*parts))
    lead = tuple(x.shape[:-1])
    return codes.reshape(x.shape), scale.reshape(*lead, -1), zero_point.reshape(*lead, -1)


def _half_step_rows(rng: random.Random, bits: int, n_rows: int, width: int) -> torch.Tensor:
    """Rows whose values sit exactly halfway between two levels (scale a power of two, so x / scale is
    exact): half the rows have an odd zero point (rounding before or after adding it then differs
    on every value), half a range of -(k + 1/2) to 2**bits - 3/2 - k steps with k odd (the top value's
    code is 2**bits unless clamped)."""
    top = 2 ** bits - 1
    out = []
    for i in range(n_rows):
        step = 2.0 ** -rng.randrange(3, 10)
        if i % 2 == 0:
            z = rng.randrange(1, top, 2)                       # odd, so lo = -z steps exactly
            lo, hi = -z * step, (top - z) * step
        else:
            k = rng.randrange(1, top - 1, 2)                   # odd: the zero point round(k + 1/2) = k + 1
            lo, hi = -(k + 0.5) * step, (top - k - 0.5) * step
        halves = [(j + 0.5) * step for j in range(math.ceil(lo / step), math.floor(hi / step))]
        values = [lo, hi] + [rng.choice(halves) for _ in range(width - 2)]
        rng.shuffle(values)
        out.append(values)
    return torch.tensor(out, dtype=torch.float32)


def _reciprocal_rows(rng: random.Random, gen: torch.Generator, bits: int, n_rows: int, width: int) -> torch.Tensor:
    """Rows holding values where multiplying by the float32 reciprocal 1 / scale (as PyTorch does) and
    dividing by the scale round to different codes (found here, among float32 neighbours of the
    half-steps)."""
    top = 2 ** bits - 1
    out = []
    while len(out) < n_rows:
        lo, hi = torch.tensor(-rng.uniform(0.05, 2.0)), torch.tensor(rng.uniform(0.05, 2.0))
        scale = (hi - lo) / top
        centres = (torch.arange(-top, top + 1, dtype=torch.float32) + 0.5) * scale
        candidates = (centres[:, None] + centres[:, None].abs() * torch.arange(-4, 5) * 2.0 ** -24).reshape(-1)
        candidates = candidates[(candidates > lo) & (candidates < hi)]
        apart = candidates[torch.round(candidates * (1 / scale)) != torch.round(candidates / scale)]
        if apart.numel() < 2:
            continue
        picked = apart[torch.randint(0, apart.numel(), (width // 2,), generator=gen)]
        filler = torch.empty(width - 2 - picked.numel()).uniform_(float(lo), float(hi), generator=gen)
        row = torch.cat([torch.stack([lo, hi]), picked, filler])
        out.append(row[torch.randperm(width, generator=gen)])
    return torch.stack(out)


def _asymmetric_cases(rng: random.Random, gen: torch.Generator) -> list[tuple[torch.Tensor, int, int | None, str]]:
    """(x, bits, group_size, description): random weights and activations, odd sizes, every float dtype,
    lopsided and one-signed rows, all-zero and constant groups, and values on exact ties."""
    cases = []
    for bits in (4, 8, rng.choice([2, 3, 5, 6, 7])):
        rows, width = rng.randrange(2, 12), rng.randrange(20, 300) | 1
        group_size = rng.choice([16, 32, 48, 64, 128])
        x = torch.randn(rows, width, generator=gen) * rng.choice([0.02, 1.0, 30.0])
        x[0] = x[0].abs() + rng.uniform(0.0, 0.5)                 # all positive: the range must reach down to 0
        x[1] = -x[1].abs() - rng.uniform(0.0, 0.5)                # all negative
        x[2:] += torch.randn(rows - 2, 1, generator=gen) * x.std()  # rows shifted off 0
        cases.append((x, bits, group_size, f"{bits}-bit, weights [{rows}, {width}] with one-signed and shifted rows"))
    for dtype in (torch.bfloat16, torch.float16):
        x = F.silu(torch.randn(rng.randrange(1, 5), rng.randrange(1, 6), rng.randrange(10, 140), generator=gen) * 3)
        cases.append((x.to(dtype), rng.choice([4, 8]), rng.choice([32, 64]),
                      f"SiLU activations {dtype} of shape {tuple(x.shape)}"))
    x = torch.randn(rng.randrange(20, 60), rng.randrange(20, 90) | 1, generator=gen).T + 0.7
    cases.append((x, rng.choice([4, 8]), None, f"per channel (group_size=None), a transposed view of shape "
                  f"{tuple(x.shape)}"))
    n = rng.randrange(100, 1000) | 1
    cases.append((torch.randn(n, generator=gen) * 0.1 + 0.05, rng.choice([4, 8]), 64, f"a 1-D tensor of {n} values"))
    x = torch.randn(rng.randrange(2, 6), rng.randrange(3, 40), generator=gen)
    cases.append((x, rng.choice([3, 4, 8]), x.shape[1] + rng.randrange(0, 50),
                  f"group_size >= the row length {x.shape[1]}"))
    x = torch.randn(6, 3 * 32 + rng.randrange(1, 32), generator=gen)
    x[:, 32:64] = 0.0                                             # whole groups of zeros: scale floored at eps
    x[0, 64:96] = rng.uniform(0.1, 3.0)                           # a constant positive group
    x[1, 64:96] = -rng.uniform(0.1, 3.0)                          # a constant negative group
    x[2, 96:] = 0.0                                               # a short last group of zeros
    cases.append((x, rng.choice([4, 8]), 32, f"shape {tuple(x.shape)} with all-zero and constant groups"))
    for bits in (4, 8):
        width = rng.randrange(20, 70)
        cases.append((_half_step_rows(rng, bits, 8, width), bits, None,
                      f"{bits}-bit, 8 rows of {width} values exactly halfway between two levels"))
        cases.append((_reciprocal_rows(rng, gen, bits, 4, width), bits, None,
                      f"{bits}-bit, 4 rows of {width} values where x * (1 / scale) and x / scale round apart"))
    rng.shuffle(cases)
    return cases


_CODES_HINT = ("the codes differ from PyTorch's fake_quantize_per_channel_affine: per group, "
               "q = clamp(round(x * (1 / scale)) + zero_point, 0, 2**bits - 1) with the float32 reciprocal, rounding "
               "half to even BEFORE adding the zero point, each group along the last dimension of its own row")
_SCALE_HINT = ("scale = (hi - lo) / (2**bits - 1) in float32, where lo = min(min(group), 0) and hi = max(max(group), 0) "
               "(the range stretched to contain 0), floored at torch.finfo(torch.float32).eps; groups of group_size "
               "values along the last dimension, the last group of a row possibly shorter")


def check_quantize_asymmetric(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    for x, bits, group_size, desc in _asymmetric_cases(rng, gen):
        what = f"quantize_asymmetric({desc}, bits={bits}, group_size={group_size})"
        original = x.clone()
        expected_codes, expected_scale, expected_zero = _reference_asymmetric(x, bits, group_size)
        got = call_answer(fn, what, x, bits=bits, group_size=group_size)
        if not (isinstance(got, tuple) and len(got) == 3):
            raise AssertionError(f"{what}: return a tuple (codes, scale, zero_point), got {type(got).__name__}")
        codes, scale, zero_point = (as_tensor(t, f"{what}: {n}") for t, n in zip(got, ("codes", "scale", "zero_point")))
        if not torch.equal(x, original):
            raise AssertionError(f"{what}: the input was modified")
        for value, name, dtype in ((codes, "codes", torch.uint8), (scale, "scale", torch.float32),
                                   (zero_point, "zero_point", torch.int32)):
            if value.dtype != dtype:
                raise AssertionError(f"{what}: {name} must be {dtype}, got {value.dtype}")
        assert_equal(scale, expected_scale, f"{what}: scale", hint=_SCALE_HINT + "; one per group: shape "
                     "[*x.shape[:-1], ceil(x.shape[-1] / group_size)]")
        assert_equal(zero_point, expected_zero, f"{what}: zero_point",
                     hint="zero_point = round(-lo / scale) (a division, rounded half to even) clamped to "
                     "[0, 2**bits - 1]: the integer code that stands for 0")
        assert_equal(codes, expected_codes, f"{what}: codes", hint=_CODES_HINT)


def check_dequantize_asymmetric(fn: Callable) -> None:
    rng, gen = fresh_rng(), fresh_generator()
    cases = [(rng.randrange(1, 9), rng.randrange(10, 300) | 1, rng.choice([16, 32, 64, 128]), 4),
             (rng.randrange(1, 9), rng.randrange(10, 300), rng.choice([32, 64]), 8),
             (rng.randrange(1, 9), rng.randrange(10, 300), None, rng.choice([2, 3, 5, 6, 7, 8])),
             (1, rng.randrange(10, 300) | 1, 64, rng.choice([4, 8])),
             (rng.randrange(1, 9), rng.randrange(3, 40), 64, 4)]      # group_size larger than the rows
    for rows, width, group_size, bits in cases:
        top = 2 ** bits - 1
        lead = (2, rows // 2) if rows % 2 == 0 and rng.random() < 0.5 else () if rows == 1 else (rows,)
        _, _, size, full = _group_layout((rows, width), group_size)
        n_groups = -(-width // size)
        codes = torch.randint(0, top + 1, (*lead, width), generator=gen).to(torch.uint8)
        scale = torch.exp(torch.randn(*lead, n_groups, generator=gen)) * rng.choice([1e-3, 0.05, 2.0])
        zero_point = torch.randint(0, top + 1, (*lead, n_groups), generator=gen).to(torch.int32)
        what = (f"dequantize_asymmetric(codes of shape {tuple(codes.shape)}, {bits}-bit, group_size={group_size}, "
                f"scale and zero_point of shape {tuple(scale.shape)})")
        flat_codes, flat_scale, flat_zero = codes.reshape(rows, width), scale.reshape(rows, -1), zero_point.reshape(rows, -1)
        parts = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # PyTorch's quantized tensors are deprecated; their arithmetic is not
            if full:
                q = torch._make_per_channel_quantized_tensor(flat_codes[:, :full].reshape(-1, size),
                                                             flat_scale[:, :full // size].reshape(-1).double(),
                                                             flat_zero[:, :full // size].reshape(-1).long(), 0)
                parts.append(q.dequantize().reshape(rows, full))
            if full < width:
                q = torch._make_per_channel_quantized_tensor(flat_codes[:, full:].contiguous(),
                                                             flat_scale[:, -1].double(), flat_zero[:, -1].long(), 0)
                parts.append(q.dequantize())
        expected = torch.cat(parts, dim=1).reshape(codes.shape)
        got = call_answer(fn, what, codes.clone(), scale.clone(), zero_point.clone(), group_size=group_size)
        assert_close(got, expected, f"{what}: values", rtol=0, atol=0, check_dtype=True,
                     hint="float32 (codes - zero_point) * scale, subtracting first (codes * scale - zero_point * scale "
                     "rounds twice), each value with the scale and zero point of its own group of its own row")


CHECKS = {
    "quantize_4bit": check_quantize_4bit,
    "LinearNF4": check_linear_nf4,
    "qlora_step": check_qlora_step,
    "quantize_asymmetric": check_quantize_asymmetric,
    "dequantize_asymmetric": check_dequantize_asymmetric,
}
