"""Checks for the exercises of chapter 12 (reward modeling).

Every check draws fresh random inputs (shapes, magnitudes, padding), so memorised answers fail,
and compares the student's function with the package (``llama_from_scratch.reward``,
``llama_from_scratch.preferences``). Messages name the input, the expected value and what came back.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from llama_from_scratch.preferences import preference_margin
from llama_from_scratch.reward import last_token_index, pairwise_accuracy, reward_loss


def _rng() -> tuple[random.Random, torch.Generator]:
    """Python and torch generators seeded fresh at every grading run."""
    rng = random.Random()
    return rng, torch.Generator().manual_seed(rng.randrange(2**31))


def _show(t: Any, n: int = 6) -> str:
    if isinstance(t, torch.Tensor):
        flat = t.flatten()[:n].tolist()
        more = " ..." if t.numel() > n else ""
        return f"tensor(shape {tuple(t.shape)}, {t.dtype}, starts {[round(v, 4) if isinstance(v, float) else v for v in flat]}{more})"
    text = repr(t)
    return text if len(text) <= 200 else text[:200] + "..."


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    assert isinstance(value, torch.Tensor), f"{what} must return a torch.Tensor, got {type(value).__name__}"
    return value


def _compare(got: torch.Tensor, expected: torch.Tensor, what: str, hint: str = "",
             rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert got.shape == expected.shape, f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}"
    assert got.dtype.is_floating_point, f"{what}: expected a floating-point result, got {got.dtype}. {hint}"
    got = got.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(got).all(), f"{what}: the result has inf/nan ({_show(got)}). {hint}"
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item()
        raise AssertionError(f"{what}: expected {_show(expected)}, got {_show(got)} (max abs diff {diff:.3g}). {hint}")


def _rewards(rng: random.Random, g: torch.Generator) -> tuple[str, torch.Tensor, torch.Tensor]:
    n = rng.choice([1, 2, 3, 5, 8, rng.randrange(9, 200)])
    scale = rng.choice([0.01, 1.0, 5.0, 50.0])
    shape = (n,) if rng.random() < 0.8 else (rng.randrange(1, 5), n)
    c = scale * torch.randn(shape, generator=g)
    r = scale * torch.randn(shape, generator=g)
    return f"{n} pairs of rewards with scale {scale} (shape {shape})", c, r


def check_bradley_terry_prob(fn: Callable) -> None:
    """``fn(r_chosen, r_rejected)`` = sigmoid(r_chosen - r_rejected), elementwise."""
    rng, g = _rng()
    for _ in range(12):
        desc, c, r = _rewards(rng, g)
        expected = torch.sigmoid(c - r)
        got = _as_tensor(fn(c.clone(), r.clone()), "bradley_terry_prob")
        _compare(got, expected, f"bradley_terry_prob on {desc}",
                 "P(chosen preferred) = 1 / (1 + exp(-(r_chosen - r_rejected))), one probability per pair; "
                 "use torch.sigmoid so large differences do not overflow")
    c, r = torch.tensor([100.0, -100.0, 95.0, -120.0]), torch.tensor([99.0, -101.0, 0.0, 10.0])
    got = _as_tensor(fn(c.clone(), r.clone()), "bradley_terry_prob")
    _compare(got, torch.sigmoid(c - r), f"bradley_terry_prob(r_chosen={c.tolist()}, r_rejected={r.tolist()})",
             "large rewards: exp(100) overflows float32; compute sigmoid of the DIFFERENCE (torch.sigmoid)")
    got = fn(torch.tensor([3.0]), torch.tensor([3.0]))
    _compare(_as_tensor(got, "bradley_terry_prob"), torch.tensor([0.5]), "bradley_terry_prob(3, 3)",
             "equal rewards mean a coin flip: 0.5")


def check_pairwise_reward_loss(fn: Callable) -> None:
    """``fn(chosen, rejected, margin=None)`` equals the package's ``reward_loss`` (mean over pairs)."""
    rng, g = _rng()
    for trial in range(16):
        desc, c, r = _rewards(rng, g)
        kind = trial % 4
        if kind == 0:
            margin, mdesc = None, "no margin"
        elif kind == 1:
            margin = rng.choice([0.25, 1.0, 3.0])
            mdesc = f"margin={margin}"
        else:
            margin = preference_margin(torch.randint(1, 4, c.shape, generator=g), rng.choice(["small", "large"]))
            mdesc = "a per-pair margin tensor"
        expected = reward_loss(c, r, margin)
        got = fn(c.clone(), r.clone()) if margin is None and rng.random() < 0.5 else fn(c.clone(), r.clone(), margin)
        got = _as_tensor(got, "pairwise_reward_loss")
        _compare(got.reshape(()) if got.numel() == 1 else got, expected, f"pairwise_reward_loss on {desc}, {mdesc}",
                 "the loss is the MEAN over pairs of -log sigmoid(r_chosen - r_rejected - margin), a scalar; "
                 "subtract the margin (it makes the task harder), and use F.logsigmoid (log(sigmoid(z)) gives inf "
                 "for very negative z)", rtol=1e-5, atol=1e-5)
    c, r = torch.tensor([-100.0, 0.0]), torch.tensor([0.0, 0.0])
    got = _as_tensor(fn(c, r), "pairwise_reward_loss")
    _compare(got.reshape(()), reward_loss(c, r), "pairwise_reward_loss([-100, 0], [0, 0])",
             "for r_chosen - r_rejected = -100 the loss is 100: compute it stably (F.logsigmoid or softplus)",
             atol=1e-4)


def _mask(rng: random.Random) -> tuple[str, torch.Tensor]:
    b, t = rng.randrange(1, 7), rng.randrange(1, 40)
    side = rng.choice(["left", "right", "none"])
    rows = []
    for _ in range(b):
        n = t if side == "none" else rng.randrange(1, t + 1)
        pad = t - n
        rows.append([0] * pad + [1] * n if side == "left" else [1] * n + [0] * pad)
    dtype = rng.choice([torch.long, torch.int64, torch.bool, torch.float32, torch.int32])
    return f"a [{b}, {t}] mask with {side} padding ({dtype})", torch.tensor(rows).to(dtype)


def check_last_nonpad_index(fn: Callable) -> None:
    """``fn(attention_mask [B, T])`` = index of the last 1 of each row, for left, right or no padding."""
    rng, _ = _rng()
    fixed = [("right padding [1 1 1 0 0]", torch.tensor([[1, 1, 1, 0, 0]])),
             ("left padding [0 0 1 1 1]", torch.tensor([[0, 0, 1, 1, 1]])),
             ("mixed rows", torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]))]
    for desc, mask in fixed + [_mask(rng) for _ in range(30)]:
        expected = last_token_index(mask)
        got = _as_tensor(fn(mask.clone()), "last_nonpad_index")
        assert got.shape == expected.shape, (
            f"last_nonpad_index on {desc}: expected shape {tuple(expected.shape)} (one index per row), got {tuple(got.shape)}")
        assert not got.dtype.is_floating_point and got.dtype != torch.bool, (
            f"last_nonpad_index must return integer indices (usable to index a tensor), got {got.dtype}")
        assert torch.equal(got.long(), expected), (
            f"last_nonpad_index on {desc}:\nmask {mask.long().tolist()}\nexpected {expected.tolist()}, got {got.tolist()} "
            "(the position of the LAST 1 in each row; mask.sum(1) - 1 is right only for right padding, "
            "and T - 1 only for left padding)")


def check_preference_accuracy(fn: Callable) -> None:
    """``fn(chosen, rejected)`` = fraction of pairs with chosen > rejected (a tie is wrong), a float."""
    rng, g = _rng()
    for trial in range(16):
        desc, c, r = _rewards(rng, g)
        if trial % 3 == 0:  # ties
            ties = torch.rand(c.shape, generator=g) < 0.4
            r = torch.where(ties, c, r)
            desc += ", some ties"
        expected = pairwise_accuracy(c, r)
        got = fn(c.clone(), r.clone())
        if isinstance(got, torch.Tensor):
            assert got.numel() == 1, f"preference_accuracy must return one number, got {_show(got)}"
            got = got.item()
        assert isinstance(got, (float, int)), f"preference_accuracy must return a float, got {type(got).__name__}"
        assert abs(got - expected) < 1e-6, (
            f"preference_accuracy on {desc}: expected {expected:.6f}, got {got:.6f} "
            "(the fraction of pairs with r_chosen > r_rejected; a tie counts as wrong)")


def check_margin_from_strength(fn: Callable) -> None:
    """``fn(strengths [B] int tensor, scale)`` = Llama 2's margins (Table 28) as a float32 tensor."""
    rng, g = _rng()
    for scale in ("small", "large"):
        for s in (1, 2, 3):
            got = _as_tensor(fn(torch.tensor([s]), scale), "margin_from_strength")
            _compare(got.float(), preference_margin(torch.tensor([s]), scale), f"margin_from_strength([{s}], {scale!r})",
                     "small scale: 1 -> 1/3, 2 -> 2/3, 3 -> 1; large scale: 1 -> 1, 2 -> 2, 3 -> 3")
    for _ in range(10):
        scale = rng.choice(["small", "large"])
        shape = (rng.randrange(1, 60),) if rng.random() < 0.7 else (rng.randrange(1, 5), rng.randrange(1, 9))
        strengths = torch.randint(1, 4, shape, generator=g)
        got = _as_tensor(fn(strengths.clone(), scale), "margin_from_strength")
        assert got.dtype.is_floating_point, f"margin_from_strength must return floats, got {got.dtype}"
        _compare(got.float(), preference_margin(strengths, scale), f"margin_from_strength on strengths {_show(strengths)}, {scale!r}",
                 "one margin per pair, same shape as the strengths")


CHECKS = {
    "bradley_terry_prob": check_bradley_terry_prob,
    "pairwise_reward_loss": check_pairwise_reward_loss,
    "last_nonpad_index": check_last_nonpad_index,
    "preference_accuracy": check_preference_accuracy,
    "margin_from_strength": check_margin_from_strength,
}
