"""Checks of chapter 4's exercises: exporting q/k weights to the interleaved (GGUF) layout, RoPE
frequencies for every rope_type of a model config (default, linear, dynamic NTK, Llama 3, YaRN), and
rotary embeddings at per-sequence positions with partial rotation and attention scaling.

References, all from transformers: ``ROPE_INIT_FUNCTIONS`` and
``LlamaRotaryEmbedding.compute_default_rope_parameters`` on a ``LlamaConfig`` built from the same
fresh config dict; ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` (Phi-3's, which handles a
partial rotary dimension); the GGUF loader's ``LlamaTensorProcessor`` (the reverse permutation) on
the q and k weights of the SmolLM2 GGUF file. Inputs are drawn fresh at every grading run.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterator

import torch

from llama_from_scratch.course.checks.ch03_rmsnorm_swiglu import smollm2_tensor
from llama_from_scratch.course.checks.common import (as_tensor, assert_close, assert_equal, call_answer, fresh_generator,
                                              fresh_rng)

FORBIDDEN = {
    "rotate_half_to_interleaved": ["transformers", "gguf"],
    "rope_init": ["transformers"],
    "yarn_init": ["transformers"],
    "apply_rotary": ["transformers", "torch.nn.functional.scaled_dot_product_attention"],
}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs warnings about unusual (but valid) rope configs; the grader's output stays clean."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


# ----- rotate_half_to_interleaved -----------------------------------------------------------------


def _hf_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' GGUF loader: interleaved (Meta/GGUF) rows -> rotate-half (Hugging Face) rows."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": n_heads, "num_key_value_heads": n_heads})
    return torch.from_numpy(processor.process(w.numpy(), "blk.0.attn_q.weight").weights.copy())


INTERLEAVE_HINT = ("Inside each head of head_dim rows, the Hugging Face row i (first half) and row i + head_dim/2 "
                   "(second half) form a pair; in the interleaved layout that pair sits at rows 2i and 2i + 1. "
                   "Heads keep their order. reshape(n_heads, 2, head_dim // 2, dim) and a transpose do it.")


def check_rotate_half_to_interleaved(fn: Callable) -> None:
    """``fn(w, n_heads)`` turns a rotate-half q or k projection back into the interleaved layout: it must
    give back SmolLM2's GGUF tensors from the Hugging Face weights transformers' GGUF loader makes of them,
    and invert that loader on random shapes."""
    rng, g = fresh_rng(), fresh_generator()
    layer = rng.randrange(30)
    for kind, n_heads in (("attn_q", 9), ("attn_k", 3)):
        gguf_w = smollm2_tensor(f"blk.{layer}.{kind}.weight")
        hf_w = _hf_from_gguf(gguf_w, n_heads)
        what = f"rotate_half_to_interleaved(SmolLM2 layer {layer}'s {kind} in Hugging Face layout, n_heads={n_heads})"
        got = call_answer(fn, what, hf_w.clone(), n_heads)
        assert_equal(as_tensor(got, what), gguf_w, what, hint=INTERLEAVE_HINT)
    for _ in range(6):
        n_heads, head_dim, dim = rng.randrange(1, 7), 2 * rng.randrange(1, 20), rng.randrange(1, 40)
        w = torch.randn(n_heads * head_dim, dim, generator=g)
        what = f"rotate_half_to_interleaved(w of shape {tuple(w.shape)}, n_heads={n_heads}) (head_dim {head_dim})"
        got = call_answer(fn, what, _hf_from_gguf(w, n_heads), n_heads)
        assert_equal(as_tensor(got, what), w, what, hint=INTERLEAVE_HINT)


# ----- rope_init and yarn_init: fresh configs, transformers' init functions ------------------------


def _head_fields(rng: random.Random, explicit: bool | None = None, partial: bool = False) -> tuple[dict[str, Any], int]:
    """hidden_size / num_attention_heads, with (``explicit``) or without an explicit head_dim (random when
    None); returns (fields, head_dim). ``partial`` picks a head_dim that every partial factor below divides."""
    n_heads = rng.choice([1, 4, 8, 9, 32])
    head_dim = rng.choice([32, 64, 80, 128] + ([] if partial else [2 * rng.randrange(4, 40)]))
    if explicit is None:
        explicit = rng.random() < 0.5
    if explicit:    # head_dim given, and different from hidden_size // num_attention_heads
        return {"hidden_size": n_heads * head_dim * 2, "num_attention_heads": n_heads, "head_dim": head_dim}, head_dim
    return {"hidden_size": n_heads * head_dim, "num_attention_heads": n_heads}, head_dim


def _theta(rng: random.Random) -> float:
    return rng.choice([10000.0, 500000.0, 1e6, float(round(10 ** rng.uniform(3, 6.5)))])


def _reference_rope(config: dict[str, Any], seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fields = {k: v for k, v in config.items() if k != "rope_parameters"}
    with _quiet_transformers():
        hf_config = transformers.LlamaConfig(**fields, rope_parameters=dict(config["rope_parameters"]))
        rope_type = config["rope_parameters"]["rope_type"]
        if rope_type == "default":
            inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, seq_len=seq_len)
    return inv_freq, float(scaling)


def _compare_rope(got: Any, config: dict[str, Any], seq_len: int | None, what: str, hint: str) -> None:
    inv_freq, scaling = _reference_rope(config, seq_len)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError(f"{what}: return a tuple (inv_freq, attention_scaling), got {type(got).__name__}")
    # float32 rounding of the smooth blend differs between correct orders of operations by ~4e-6
    assert_close(got[0], inv_freq, f"{what}: inv_freq", rtol=1e-5, atol=0.0, check_dtype=True, hint=hint)
    value = got[1]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AssertionError(f"{what}: attention_scaling must be a number, got {type(value).__name__}")
    if not math.isclose(float(value), scaling, rel_tol=1e-9, abs_tol=1e-12):
        raise AssertionError(f"{what}: attention_scaling is {float(value)!r}, which is not the expected value. {hint}")


def _rope_configs(rng: random.Random) -> list[tuple[dict[str, Any], int | None]]:
    """Fresh (config, seq_len) pairs: every rope_type, head_dim given and derived, partial rotation for
    every scaled type, and dynamic NTK with no seq_len, a shorter and a longer one."""
    specs = [("default", True, False, None), ("default", False, False, None),
             ("linear", None, True, None), ("linear", None, False, None),
             ("dynamic", None, False, "none"), ("dynamic", None, False, "shorter"), ("dynamic", True, True, "longer"),
             ("llama3", True, False, None), ("llama3", False, True, None), ("llama3", None, False, None)]
    cases = []
    for rope_type, explicit, partial, length in specs:
        fields, head_dim = _head_fields(rng, explicit, partial)
        params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": _theta(rng)}
        if partial:
            params["partial_rotary_factor"] = rng.choice([0.25, 0.5, 0.75])
        max_pos = rng.choice([2048, 4096, 8192, 131072])
        seq_len = {"none": None, "shorter": rng.randrange(1, max_pos),
                   "longer": rng.randrange(max_pos + 1, 4 * max_pos), None: None}[length]
        if rope_type == "linear":
            params["factor"] = rng.choice([2.0, 4.0, 8.0, round(rng.uniform(1.1, 16.0), 2)])
        elif rope_type == "dynamic":
            params["factor"] = rng.choice([2.0, 4.0, round(rng.uniform(1.1, 8.0), 2)])
        elif rope_type == "llama3":
            original = rng.choice([2048, 4096, 8192])
            params.update(factor=rng.choice([8.0, 16.0, 32.0, round(rng.uniform(2.0, 40.0), 1)]),
                          low_freq_factor=rng.choice([1.0, 2.0]), high_freq_factor=rng.choice([4.0, 8.0]),
                          original_max_position_embeddings=original)
            params["rope_theta"] = rng.choice([10000.0, 500000.0])
            max_pos = int(original * params["factor"])
        cases.append(({**fields, "max_position_embeddings": max_pos, "rope_parameters": params}, seq_len))
    return cases


ROPE_HINT = {
    "default": "inv_freq[i] = 1 / theta^(2i / dim) for i < dim / 2, in float32, where dim = head_dim (head_dim if the "
               "config gives it, else hidden_size // num_attention_heads).",
    "linear": "Position interpolation: the default frequencies (of the rotary dimension, head_dim * "
              "partial_rotary_factor) divided by factor.",
    "dynamic": "Dynamic NTK: seq_len = max(seq_len, max_position_embeddings) (max_position_embeddings when seq_len "
               "is None); theta' = theta * (factor * seq_len / max_position_embeddings - (factor - 1)) "
               "** (dim / (dim - 2)); "
               "then the default formula with theta'.",
    "llama3": "Llama 3: keep the pairs with wavelength 2*pi/inv_freq < original / high_freq_factor, divide those with "
              "wavelength > original / low_freq_factor by factor, blend the others with "
              "s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor).",
}


def check_rope_init(fn: Callable) -> None:
    """``fn(config, seq_len=None)`` returns ``(inv_freq, attention_scaling)`` equal to transformers'
    init function for the config's rope_type (default, linear, dynamic, llama3), on fresh config dicts."""
    rng = fresh_rng()
    for config, seq_len in _rope_configs(rng):
        params = config["rope_parameters"]
        what = f"rope_init({config!r}" + (f", seq_len={seq_len})" if seq_len is not None else ")")
        got = call_answer(fn, what, config, seq_len) if seq_len is not None else call_answer(fn, what, config)
        _compare_rope(got, config, seq_len, what, ROPE_HINT[params["rope_type"]])


# ----- yarn_init --------------------------------------------------------------------------------


YARN_HINT = ("YaRN: pair i keeps its frequency where 1 - ramp(i) = 1 (fast pairs) and is divided by factor where it is "
             "0 (slow pairs); ramp(i) = clamp((i - low) / (high - low), 0, 1) with low/high the correction dimensions "
             "of beta_fast/beta_slow (floored/ceiled when truncate, then clipped to [0, dim - 1]). attention_scaling = "
             "attention_factor if given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are "
             "given, else 0.1 * ln(factor) + 1 (1 when factor <= 1).")


def _yarn_configs(rng: random.Random) -> list[dict[str, Any]]:
    cases = []
    for variant in ["plain", "plain", "betas", "mscale", "attention_factor", "no_truncate", "no_factor", "partial"]:
        fields, head_dim = _head_fields(rng, partial=variant == "partial")
        original = rng.choice([2048, 4096, 8192])
        factor = rng.choice([2.0, 4.0, 8.0, 16.0, 40.0, round(rng.uniform(1.5, 32.0), 2)])
        params: dict[str, Any] = {"rope_type": "yarn", "rope_theta": _theta(rng), "factor": factor,
                                  "original_max_position_embeddings": original}
        if variant == "betas":
            params.update(beta_fast=rng.choice([8.0, 16.0, 64.0]), beta_slow=rng.choice([0.5, 2.0, 4.0]))
        elif variant == "mscale":
            params.update(mscale=rng.choice([0.707, 1.0]), mscale_all_dim=rng.choice([0.707, 1.0, 0.5]))
        elif variant == "attention_factor":
            params["attention_factor"] = round(rng.uniform(0.8, 1.6), 3)
        elif variant == "no_truncate":
            params["truncate"] = False
        elif variant == "no_factor":
            params["factor"] = None
            factor = rng.choice([2, 4, 8])
        elif variant == "partial":
            params["partial_rotary_factor"] = rng.choice([0.25, 0.5, 0.75])
        cases.append({**fields, "max_position_embeddings": int(original * factor), "rope_parameters": params})
    return cases


def check_yarn_init(fn: Callable) -> None:
    """``fn(config)`` returns ``(inv_freq, attention_scaling)`` equal to transformers'
    ``ROPE_INIT_FUNCTIONS["yarn"]``, on fresh configs (optional betas, mscale, attention_factor, truncate,
    partial rotary, factor None)."""
    rng = fresh_rng()
    for config in _yarn_configs(rng):
        what = f"yarn_init({config!r})"
        _compare_rope(call_answer(fn, what, config), config, None, what, YARN_HINT)


# ----- apply_rotary -----------------------------------------------------------------------------


def _reference_rotary(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    rotary_dim = 2 * inv_freq.shape[0]
    with _quiet_transformers():
        rotary = LlamaRotaryEmbedding(transformers.LlamaConfig(hidden_size=rotary_dim, num_attention_heads=1,
                                                               head_dim=rotary_dim))
    rotary.inv_freq = inv_freq.clone()
    rotary.attention_scaling = scaling
    cos, sin = rotary(q, position_ids)
    return apply_rotary_pos_emb(q, k, cos, sin)


ROTARY_HINT = ("angles = position_ids[..., None].float() * inv_freq (float32, [B, T, R/2]); emb = cat(angles, angles); "
               "cos = (emb.cos() * attention_scaling).to(q.dtype), the same for sin; rotate-half on the first R = "
               "2 * len(inv_freq) dimensions (pairs (i, i + R/2)), the other D - R dimensions unchanged; "
               "cos/sin broadcast over the heads.")


def check_apply_rotary(fn: Callable) -> None:
    """``fn(q, k, position_ids, inv_freq, attention_scaling=1.0)`` returns the rotated ``(q, k)``, equal to
    transformers' ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` (bit for bit when written the same
    way): per-sequence positions, GQA head counts, partial rotation, YaRN-like scaling, float32 and bfloat16."""
    rng, g = fresh_rng(), fresh_generator()
    # (batch, dtype, partial rotation, attention scaling != 1, smallest start position, frequencies rescaled)
    specs = [(3, torch.float32, True, False, 0, False), (2, torch.float32, False, True, 0, True),
             (2, torch.bfloat16, False, False, 1000, False), (3, torch.bfloat16, True, True, 0, True),
             (1, torch.float32, False, False, 30000, False), (3, torch.float32, False, False, None, False)]
    cases = []
    for batch, dtype, partial, scaled, lowest, rescaled in specs:
        n_heads, n_kv = rng.choice([1, 4, 9]), rng.choice([1, 2, 3])
        head_dim = rng.choice([8, 16, 64, 2 * rng.randrange(2, 40)])
        rotary_dim = 2 * rng.randrange(1, head_dim // 2) if partial else head_dim
        theta = _theta(rng)
        inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
        if rescaled:
            inv_freq = inv_freq / torch.linspace(1.0, rng.uniform(2.0, 32.0), rotary_dim // 2)
        scaling = round(rng.uniform(1.05, 1.5), 4) if scaled else 1.0
        seq = rng.randrange(1, 9) if batch > 1 or lowest is None else 1          # batch 1: one decoding step
        if lowest is None:                                                         # any positions at all
            position_ids = torch.randint(0, 70000, (batch, seq), generator=g)
        else:                                                                      # every row its own offset
            starts = [lowest] + rng.sample(range(lowest + 1, lowest + 6000), batch - 1)
            position_ids = torch.tensor(starts)[:, None] + torch.arange(seq)[None]
        q = torch.randn(batch, n_heads, seq, head_dim, generator=g).to(dtype)
        k = torch.randn(batch, n_kv, seq, head_dim, generator=g).to(dtype)
        cases.append((q, k, position_ids, inv_freq, scaling))
    for q, k, position_ids, inv_freq, scaling in cases:
        ref_q, ref_k = _reference_rotary(q, k, position_ids, inv_freq, scaling)
        what = (f"apply_rotary(q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, position_ids of shape "
                f"{tuple(position_ids.shape)} (up to {int(position_ids.max())}), inv_freq of {inv_freq.shape[0]} "
                f"frequencies, attention_scaling={scaling})")
        q_before, k_before = q.clone(), k.clone()
        got = call_answer(fn, what, q, k, position_ids, inv_freq, scaling)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"{what}: return a tuple (q_rotated, k_rotated)")
        assert_equal(q, q_before, f"{what} changed q in place", hint="Return new tensors.")
        assert_equal(k, k_before, f"{what} changed k in place", hint="Return new tensors.")
        rtol, rel = (2 ** -6, 2 ** -7) if q.dtype == torch.bfloat16 else (1e-5, 1e-6)
        for name, value, expected in (("q", got[0], ref_q), ("k", got[1], ref_k)):
            assert_close(value, expected, f"{what}: rotated {name}", rtol=rtol,
                         atol=rel * float(expected.abs().max()), check_dtype=True, hint=ROTARY_HINT)
    # the default attention_scaling is 1
    q, k, position_ids, inv_freq, _ = cases[0]
    ref_q, _ = _reference_rotary(q, k, position_ids, inv_freq, 1.0)
    got = call_answer(fn, "apply_rotary(q, k, position_ids, inv_freq)", q, k, position_ids, inv_freq)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError("apply_rotary(q, k, position_ids, inv_freq): return a tuple (q_rotated, k_rotated)")
    assert_close(got[0], ref_q, "apply_rotary(q, k, position_ids, inv_freq) with the default attention_scaling",
                 rtol=1e-5, atol=1e-6 * float(ref_q.abs().max()), hint="The default attention_scaling is 1.0.")


CHECKS = {
    "rotate_half_to_interleaved": check_rotate_half_to_interleaved,
    "rope_init": check_rope_init,
    "yarn_init": check_yarn_init,
    "apply_rotary": check_apply_rotary,
}
