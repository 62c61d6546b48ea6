"""Checks for the exercises of chapter 10 (LoRA).

Every check draws fresh random inputs (shapes with odd sizes, random ranks and alphas) and compares
the student's function with the package's ``llama_from_scratch.lora`` (``LoRALinear``,
``apply_lora``, ``count_parameters`` and PEFT's target-matching rule). Messages name the input,
the expected value and what came back.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
from torch import nn

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.lora import LoRALinear, _matches, apply_lora, count_parameters
from llama_from_scratch.model import Llama


def _rng() -> random.Random:
    return random.Random()


def _random_layer(rng: random.Random, bias: bool | None = None) -> tuple[LoRALinear, float, int]:
    """A LoRALinear with random sizes, rank and alpha, and a non-zero B."""
    d_in, d_out, r = rng.randrange(3, 70), rng.randrange(3, 70), rng.randrange(1, 9)
    alpha = rng.choice([1, 2, 8, 16, 32, rng.uniform(0.5, 40.0)])
    torch.manual_seed(rng.randrange(2**31))
    base = nn.Linear(d_in, d_out, bias=rng.random() < 0.5 if bias is None else bias, dtype=torch.float64)
    layer = LoRALinear(base, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer, alpha, r


def _as_tensor(got, name: str) -> torch.Tensor:
    assert isinstance(got, torch.Tensor), f"{name} must return a torch.Tensor, got {type(got).__name__}"
    return got


def check_lora_forward(fn: Callable) -> None:
    rng = _rng()
    for _ in range(12):
        layer, alpha, r = _random_layer(rng, bias=False)
        lead = rng.choice([(), (rng.randrange(1, 4),), (rng.randrange(1, 3), rng.randrange(1, 6))])
        x = torch.randn(*lead, layer.in_features, dtype=torch.float64)
        w, a, b = layer.base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        with torch.no_grad():
            expected = layer(x)
        got = _as_tensor(fn(x.clone(), w.clone(), a.clone(), b.clone(), alpha, r), "lora_forward")
        assert got.shape == expected.shape, (
            f"lora_forward with x {tuple(x.shape)}, W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}: "
            f"shape {tuple(got.shape)}, expected {tuple(expected.shape)} (y = x W^T + (x A^T B^T) * alpha / r)")
        diff = (got.double() - expected).abs().max().item()
        assert diff < 1e-9, (
            f"lora_forward with x {tuple(x.shape)}, W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}, "
            f"alpha={alpha}, r={r}: max abs difference {diff:.3g} from LoRALinear. Expected y = x @ W.T + "
            f"(x @ A.T @ B.T) * (alpha / r); scaling here is {alpha / r:.4g}")


def check_lora_merge_weight(fn: Callable) -> None:
    rng = _rng()
    for _ in range(12):
        layer, alpha, r = _random_layer(rng)
        w, a, b = layer.base.weight.detach(), layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        # float64 reference (LoRALinear.delta_weight computes the update in float32)
        expected = w + (b @ a) * layer.scaling
        package = layer.merged_linear().weight.detach()
        assert (package - expected).abs().max() < 1e-5, "internal: LoRALinear.merged_linear disagrees with W + BA s"
        w_argument = w.clone()
        got = _as_tensor(fn(w_argument, a.clone(), b.clone(), alpha, r), "lora_merge_weight")
        assert torch.equal(w_argument, w), "lora_merge_weight must not modify W in place: return W + ... instead"
        assert got.shape == expected.shape, (
            f"lora_merge_weight with W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}: shape "
            f"{tuple(got.shape)}, expected {tuple(expected.shape)} (W + (B @ A) * alpha / r, shaped like W)")
        diff = (got.double() - expected).abs().max().item()
        assert diff < 1e-9, (
            f"lora_merge_weight with W {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}, alpha={alpha}, "
            f"r={r}: max abs difference {diff:.3g} from the merged weight. Expected W + (B @ A) * alpha / r")


def check_lora_trainable_count(fn: Callable) -> None:
    rng = _rng()
    cases = [(576, 576, 8), (576, 192, 2), (1, 1, 1)]
    cases += [(rng.randrange(1, 5000), rng.randrange(1, 5000), rng.randrange(1, 129)) for _ in range(20)]
    for d_in, d_out, r in cases:
        if d_in * d_out < 200_000:
            expected = count_parameters(LoRALinear(nn.Linear(d_in, d_out, device="meta"), r=r), trainable_only=True)
        else:
            expected = r * (d_in + d_out)
        got = fn(d_in, d_out, r)
        assert got == expected, (
            f"lora_trainable_count({d_in}, {d_out}, {r}) = {got!r}, expected {expected}: A is r x d_in and B is "
            "d_out x r; the frozen base weight is not trained")


def _random_config(rng: random.Random) -> LlamaConfig:
    n_kv = rng.choice([1, 2, 3])
    n_heads = n_kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([4, 6, 8])
    return LlamaConfig(vocab_size=rng.randrange(50, 300), dim=n_heads * head_dim, n_layers=rng.randrange(1, 4),
                       n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=rng.randrange(10, 90),
                       tie_embeddings=rng.random() < 0.5, max_seq_len=64)


_ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_llama_lora_count(fn: Callable) -> None:
    rng = _rng()
    for _ in range(10):
        config = _random_config(rng)
        targets = rng.sample(_ALL_SEVEN, rng.randrange(1, 8))
        r = rng.randrange(1, 17)
        with torch.device("meta"):
            model = Llama(config)
        expected = count_parameters(apply_lora(model, targets, r=r), trainable_only=True)
        args = dict(dim=config.dim, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
                    hidden_dim=config.hidden_dim, n_layers=config.n_layers, targets=list(targets), r=r)
        got = fn(**args)
        assert got == expected, (
            f"llama_lora_count({', '.join(f'{k}={v!r}' for k, v in args.items())}) = {got!r}, expected {expected}. "
            f"Shapes (in -> out): q, o: dim -> dim; k, v: dim -> n_kv_heads * (dim // n_heads); gate, up: dim -> "
            "hidden_dim; down: hidden_dim -> dim; each adapted layer adds r * (in + out), in every one of n_layers")


def check_lora_init(fn: Callable) -> None:
    rng = _rng()
    cases = [(rng.randrange(3, 400), rng.randrange(3, 400), rng.randrange(1, 17)) for _ in range(8)] + [(1000, 7, 64)]
    for d_in, d_out, r in cases:
        got = fn(d_in, d_out, r)
        assert isinstance(got, tuple) and len(got) == 2, f"lora_init must return a tuple (A, B), got {type(got).__name__}"
        a, b = (_as_tensor(t, "lora_init") for t in got)
        assert tuple(a.shape) == (r, d_in) and tuple(b.shape) == (d_out, r), (
            f"lora_init({d_in}, {d_out}, {r}): A {tuple(a.shape)}, B {tuple(b.shape)}; expected A ({r}, {d_in}) "
            f"and B ({d_out}, {r})")
        assert a.dtype == torch.float32 and b.dtype == torch.float32, (
            f"lora_init should return float32 tensors, got A {a.dtype}, B {b.dtype}")
        assert torch.count_nonzero(b) == 0, f"lora_init({d_in}, {d_out}, {r}): B must be all zeros, so BA starts at 0"
        bound = 1 / math.sqrt(d_in)
        reference = LoRALinear(nn.Linear(d_in, d_out), r=r).lora_A.weight
        top = a.abs().max().item()
        assert top <= bound * (1 + 1e-6), (
            f"lora_init({d_in}, {d_out}, {r}): |A| reaches {top:.4g}, above the bound 1/sqrt(in_features) = "
            f"{bound:.4g} of kaiming_uniform_(a=sqrt(5)) (fan_in is in_features, not out_features or r)")
        n = a.numel()
        if n >= 200:
            std, ref_std = a.std().item(), bound / math.sqrt(3)
            assert abs(std / ref_std - 1) < 0.25 and abs(a.mean().item()) < 3 * ref_std / math.sqrt(n) + 1e-3, (
                f"lora_init({d_in}, {d_out}, {r}): A has mean {a.mean().item():.3g} and std {std:.4g}; a uniform "
                f"distribution on [-{bound:.4g}, {bound:.4g}] (LoRALinear's A: std {reference.std().item():.4g}) "
                f"has mean 0 and std {ref_std:.4g}")
            assert top > 0.8 * bound, (
                f"lora_init({d_in}, {d_out}, {r}): the largest |A| is {top:.4g}, far below the bound {bound:.4g}; "
                "draw uniformly on [-bound, bound] (not a normal distribution)")
        assert torch.unique(a).numel() > n // 2, f"lora_init({d_in}, {d_out}, {r}): A must be random, not constant"
    first, second = fn(50, 40, 4)[0], fn(50, 40, 4)[0]
    assert not torch.equal(first, second), "two calls of lora_init returned the same A: draw fresh random numbers"


def _random_name(rng: random.Random) -> str:
    layer = rng.choice(["0", "1", "3", "11", "21", "31"])
    leaf = rng.choice(_ALL_SEVEN + ["qq_proj", "lora_q_proj", "proj", "xv_proj"])
    block = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else rng.choice(["self_attn", "attn"])
    return rng.choice([f"model.layers.{layer}.{block}.{leaf}", f"layers.{layer}.{block}.{leaf}", leaf,
                       f"model.layers.{layer}.{block}", "lm_head", "model.embed_tokens", f"model.layers.{layer}"])


def _random_target(rng: random.Random) -> str:
    layer = rng.choice(["1", "3", "11", "21"])
    leaf = rng.choice(_ALL_SEVEN + ["proj", "_proj"])
    return rng.choice([leaf, f"self_attn.{leaf}", f"layers.{layer}.self_attn.{leaf}", f"{layer}.self_attn.{leaf}",
                       f"mlp.{leaf}", "lm_head", f"layers.{layer}", "mlp"])


def check_target_matches(fn: Callable) -> None:
    rng = _rng()
    cases = [("model.layers.3.self_attn.q_proj", ["q_proj"]), ("model.layers.3.self_attn.qq_proj", ["q_proj"]),
             ("model.layers.21.self_attn.o_proj", ["1.self_attn.o_proj"]), ("q_proj", ["q_proj"]),
             ("model.layers.3.self_attn.q_proj", ["proj"]), ("model.layers.3.self_attn.q_proj", []),
             ("model.layers.3.self_attn.q_proj", ["self_attn"]), ("model.layers.11.mlp.up_proj", ["layers.1.mlp.up_proj"])]
    for _ in range(300):
        cases.append((_random_name(rng), [_random_target(rng) for _ in range(rng.randrange(1, 4))]))
    for name, targets in cases:
        expected = _matches(name, targets)
        got = fn(name, list(targets))
        assert isinstance(got, bool), f"target_matches must return a bool, got {type(got).__name__}"
        assert got == expected, (
            f"target_matches({name!r}, {targets!r}) = {got}, expected {expected}: a module is targeted when its "
            "name equals a target or ends with '.' + target (a plain substring or endswith without the dot is "
            "not PEFT's rule)")


CHECKS = {
    "lora_forward": check_lora_forward,
    "lora_merge_weight": check_lora_merge_weight,
    "lora_trainable_count": check_lora_trainable_count,
    "llama_lora_count": check_llama_lora_count,
    "lora_init": check_lora_init,
    "target_matches": check_target_matches,
}
