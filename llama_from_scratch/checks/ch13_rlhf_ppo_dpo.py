"""Checks for the exercises of chapter 13 (RLHF with PPO, and DPO).

Every check draws fresh random inputs at grading time and compares the student's function with the
package (``llama_from_scratch.ppo``, ``llama_from_scratch.dpo``): values and, for the losses,
gradients. Per-token inputs are ``[B, T]`` with a mask in the layout PPO produces (each row valid on
one span: a masked prompt or left padding, the response, right padding), including an all-masked row
and rows with a single valid token; ``B = 1`` and ``T = 1`` shapes occur too. Masked positions hold
garbage (large finite numbers), so a function that forgets the mask gives a different answer.
Messages name the input, the expected value and what came back.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from llama_from_scratch.dpo import dpo_loss
from llama_from_scratch.ppo import compute_gae, ppo_policy_loss, ppo_value_loss, whiten


def _rng() -> tuple[random.Random, torch.Generator]:
    """Python and torch generators seeded fresh at every grading run."""
    rng = random.Random()
    return rng, torch.Generator().manual_seed(rng.randrange(2**31))


def _show(t: Any, n: int = 6) -> str:
    if isinstance(t, torch.Tensor):
        flat = t.detach().flatten()[:n].tolist()
        more = " ..." if t.numel() > n else ""
        vals = [round(v, 4) if isinstance(v, float) else v for v in flat]
        return f"tensor(shape {tuple(t.shape)}, {t.dtype}, starts {vals}{more})"
    text = repr(t)
    return text if len(text) <= 200 else text[:200] + "..."


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    assert isinstance(value, torch.Tensor), f"{what} must be a torch.Tensor, got {type(value).__name__}"
    return value


def _compare(got: torch.Tensor, expected: torch.Tensor, what: str, hint: str = "",
             where: torch.Tensor | None = None, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """``got`` equals ``expected`` (at the positions ``where`` is True, if given)."""
    got = _as_tensor(got, what)
    if where is None and got.numel() == 1 and expected.numel() == 1:
        got, expected = got.reshape(()), expected.reshape(())
    assert got.shape == expected.shape, (
        f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}")
    assert got.dtype.is_floating_point, f"{what}: expected a floating-point result, got {got.dtype}. {hint}"
    got, expected = got.detach().double(), expected.detach().double()
    if where is not None:
        got, expected = got[where], expected[where]
    assert torch.isfinite(got).all(), f"{what}: the result has inf/nan ({_show(got)}). {hint}"
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item()
        raise AssertionError(f"{what}: expected {_show(expected)}, got {_show(got)} (max abs diff {diff:.3g}). {hint}")


# --------------------------------------------------------------------------------------------
# Random masked per-token problems
# --------------------------------------------------------------------------------------------


def _span_mask(batch: int, seq_len: int, rng: random.Random, empty_row: bool) -> torch.Tensor:
    """Each row valid on one span [start, end); optionally one all-masked row; some rows of length 1."""
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    empty = rng.randrange(batch) if empty_row and batch > 1 else -1
    for b in range(batch):
        if b == empty:
            continue
        start = rng.randrange(seq_len)
        end = start + 1 if rng.random() < 0.25 else rng.randrange(start + 1, seq_len + 1)
        mask[b, start:end] = True
    if not mask.any():
        mask[0, rng.randrange(seq_len)] = True
    return mask


def _shapes(rng: random.Random) -> list[tuple[int, int]]:
    fixed = [(1, 1), (1, 7), (4, 1), (3, 2)]
    return fixed + [(rng.randrange(1, 9), rng.randrange(1, 33)) for _ in range(10)]


def _mask_of(rng: random.Random, shape: tuple[int, int], min_valid: int = 1) -> torch.Tensor:
    for _ in range(100):
        mask = _span_mask(*shape, rng, empty_row=rng.random() < 0.6)
        if int(mask.sum()) >= min_valid:
            return mask
    mask = torch.ones(shape, dtype=torch.bool)
    return mask


def _as_mask_dtype(mask: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, str]:
    dtype = rng.choice([torch.bool, torch.long, torch.float32, torch.int32])
    return mask.to(dtype), str(dtype).replace("torch.", "")


def _garbage(x: torch.Tensor, mask: torch.Tensor, g: torch.Generator, scale: float = 1e3) -> torch.Tensor:
    """``x`` with large finite junk at the masked positions."""
    junk = scale * (2 * torch.rand(x.shape, generator=g) - 1)
    return torch.where(mask, x, junk.to(x.dtype))


def _describe(shape, mask: torch.Tensor, mask_dtype: str) -> str:
    rows = mask.sum(dim=1).tolist()
    return f"a [{shape[0]}, {shape[1]}] batch ({mask_dtype} mask, valid tokens per row {rows})"


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check_compute_gae(fn: Callable) -> None:
    """``fn(rewards, values, mask, gamma=1.0, lam=0.95) -> (advantages, returns)``, compared at valid positions."""
    rng, g = _rng()
    hint = ("walk backwards: delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; "
            "V_{t+1} = 0 after the last valid token and A = 0 past it; returns = advantages + values. "
            "Ignore rewards and values at masked positions (they hold junk): use torch.where, and take "
            "V_{t+1} only where position t+1 is valid")
    # A hand-worked case first: one row, 3 tokens, reward only at the end.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = fn(rewards.clone(), values.clone(), mask.clone(), 1.0, 1.0)
    assert isinstance(out, tuple) and len(out) == 2, (
        f"compute_gae must return a tuple (advantages, returns), got {_show(out)}")
    _compare(out[0], torch.tensor([[0.5, 0.5, 0.5]]),
             "compute_gae(rewards=[[0, 0, 1]], values=[[0.5, 0.5, 0.5]], all valid, gamma=1, lam=1): advantages",
             "with gamma = lam = 1 the advantage is (sum of the rewards still to come) - V_t = 1 - 0.5")
    for trial, shape in enumerate(_shapes(rng)):
        mask = _mask_of(rng, shape)
        gamma = rng.choice([1.0, 1.0, 0.99, 0.9])
        lam = rng.choice([0.95, 0.95, 1.0, 0.0, 0.7])
        rewards = _garbage(torch.randn(shape, generator=g), mask, g)
        values = _garbage(torch.randn(shape, generator=g), mask, g)
        exp_adv, exp_ret = compute_gae(rewards, values, mask, gamma, lam)
        m, mdesc = _as_mask_dtype(mask, rng)
        desc = f"compute_gae on {_describe(shape, mask, mdesc)}, gamma={gamma}, lam={lam}"
        if gamma == 1.0 and lam == 0.95 and trial % 2 == 0:
            out = fn(rewards.clone(), values.clone(), m.clone())  # the defaults
            desc += " (default gamma and lam)"
        else:
            out = fn(rewards.clone(), values.clone(), m.clone(), gamma, lam)
        assert isinstance(out, tuple) and len(out) == 2, (
            f"compute_gae must return a tuple (advantages, returns), got {_show(out)}")
        _compare(out[0], exp_adv, desc + ": advantages", hint, where=mask)
        _compare(out[1], exp_ret, desc + ": returns", hint, where=mask)


def check_whiten(fn: Callable) -> None:
    """``fn(x, mask, shift_mean=True)``: ``(x - mean) * rsqrt(var + 1e-8)`` with the masked mean and
    unbiased variance over the whole tensor (compared at valid positions)."""
    rng, g = _rng()
    hint = ("mean and variance over ALL valid entries of the tensor (not per row); the variance is the "
            "unbiased one (divide by n - 1); out = (x - mean) * rsqrt(var + 1e-8), plus the mean again "
            "when shift_mean=False; junk at masked positions must not enter the statistics")
    for trial, shape in enumerate(_shapes(rng) + [(1, 2), (2, 1)]):
        if shape[0] * shape[1] < 2:
            shape = (shape[0], shape[1] + 1)
        mask = _mask_of(rng, shape, min_valid=2)
        scale, offset = rng.choice([0.3, 1.0, 30.0]), rng.choice([0.0, 3.0, -10.0])
        x = _garbage(offset + scale * torch.randn(shape, generator=g), mask, g)
        shift_mean = trial % 3 != 1
        expected = whiten(x, mask, shift_mean=shift_mean)
        m, mdesc = _as_mask_dtype(mask, rng)
        desc = f"whiten on {_describe(shape, mask, mdesc)} (values around {offset} ± {scale}), shift_mean={shift_mean}"
        got = fn(x.clone(), m.clone()) if shift_mean and rng.random() < 0.5 else fn(x.clone(), m.clone(), shift_mean)
        _compare(got, expected, desc, hint, where=mask, rtol=1e-4, atol=1e-4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    got = fn(x.clone(), torch.ones(1, 4, dtype=torch.bool))
    _compare(got, whiten(x, torch.ones(1, 4)), "whiten([[1, 2, 3, 4]], all valid)",
             "mean 2.5, unbiased variance 5/3 (torch.var's default), so the result is (x - 2.5) / sqrt(5/3)",
             rtol=1e-5, atol=1e-5)


def _policy_problem(rng: random.Random, g: torch.Generator, shape: tuple[int, int]):
    mask = _mask_of(rng, shape)
    old = -3 * torch.rand(shape, generator=g)
    spread = rng.choice([0.05, 0.3, 1.0])
    logprobs = old + spread * torch.randn(shape, generator=g)
    advantages = torch.randn(shape, generator=g)
    # junk at masked positions (moderate: exp of it must stay finite in float32)
    logprobs = torch.where(mask, logprobs, -20 * torch.rand(shape, generator=g))
    old = torch.where(mask, old, -20 * torch.rand(shape, generator=g))
    advantages = _garbage(advantages, mask, g)
    return mask, logprobs, old, advantages, spread


def check_ppo_policy_loss(fn: Callable) -> None:
    """``fn(logprobs, old_logprobs, advantages, mask, clip_range=0.2) -> (loss, stats)``: loss, its
    gradient, and ``stats["clipfrac"]`` / ``stats["approx_kl"]`` against the package."""
    rng, g = _rng()
    hint = ("ratio = exp(logprobs - old_logprobs); per token max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)); "
            "the loss is the mean over the VALID tokens of the whole batch (not per row, not over padding); "
            "select valid entries with torch.where so junk at masked positions stays out")
    for trial, shape in enumerate(_shapes(rng)):
        mask, logprobs, old, advantages, spread = _policy_problem(rng, g, shape)
        clip = rng.choice([0.2, 0.2, 0.1, 0.3])
        exp_loss, exp_stats = ppo_policy_loss(logprobs, old, advantages, mask, clip)
        lp = logprobs.clone().requires_grad_(True)
        ref_lp = logprobs.clone().requires_grad_(True)
        ppo_policy_loss(ref_lp, old, advantages, mask, clip)[0].backward()
        m, mdesc = _as_mask_dtype(mask, rng)
        desc = (f"ppo_policy_loss on {_describe(shape, mask, mdesc)}, |logprobs - old_logprobs| ~ {spread}, "
                f"clip_range={clip}")
        out = fn(lp, old.clone(), advantages.clone(), m.clone()) if clip == 0.2 and trial % 2 else \
            fn(lp, old.clone(), advantages.clone(), m.clone(), clip)
        assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict), (
            f"ppo_policy_loss must return (loss, stats) with stats a dict, got {_show(out)}")
        loss, stats = out
        loss = _as_tensor(loss, "the loss")
        assert loss.numel() == 1, f"{desc}: the loss must be a scalar, got {_show(loss)}"
        _compare(loss, exp_loss, desc + ": loss", hint)
        assert loss.requires_grad, f"{desc}: the loss carries no gradient (did you detach or use .item()?)"
        loss.reshape(()).backward()
        assert lp.grad is not None, f"{desc}: no gradient reached logprobs"
        _compare(lp.grad, ref_lp.grad, desc + ": gradient of the loss w.r.t. logprobs",
                 "where the clipped term is the larger one the gradient is 0 (clipping removes the incentive); "
                 "masked positions get no gradient", rtol=1e-4, atol=1e-6)
        for key, what in (("clipfrac", "fraction of valid tokens where the clipped term is strictly larger"),
                          ("approx_kl", "0.5 * masked mean of (logprobs - old_logprobs)^2")):
            assert key in stats, f"{desc}: stats has no {key!r} (keys: {sorted(stats)}); it should hold the {what}"
            value = stats[key]
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            _compare(value, exp_stats[key], f"{desc}: stats[{key!r}]", f"the {what}", rtol=1e-4, atol=1e-6)
    # At the start of an update the ratio is exactly 1: loss = -mean(A), nothing clipped.
    shape = (3, 5)
    mask = _mask_of(rng, shape)
    old = -torch.rand(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    loss, stats = fn(old.clone(), old.clone(), adv.clone(), mask.clone())
    _compare(loss, ppo_policy_loss(old, old, adv, mask)[0], "ppo_policy_loss with logprobs == old_logprobs",
             "ratio = 1 everywhere, so the loss is minus the masked mean of the advantages")
    _compare(torch.as_tensor(stats["clipfrac"], dtype=torch.float32), torch.tensor(0.0),
             "stats['clipfrac'] with logprobs == old_logprobs", "nothing is clipped when the ratio is 1")


def check_ppo_value_loss(fn: Callable) -> None:
    """``fn(values, old_values, returns, mask, clip_range_value=0.2)`` and its gradient against the package."""
    rng, g = _rng()
    hint = ("0.5 * masked mean over valid tokens of max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2); "
            "the clamp keeps the new value within c of the rollout's value")
    for trial, shape in enumerate(_shapes(rng)):
        mask = _mask_of(rng, shape)
        old = torch.randn(shape, generator=g)
        spread = rng.choice([0.05, 0.3, 1.0])
        values = old + spread * torch.randn(shape, generator=g)
        returns = old + torch.randn(shape, generator=g)
        values, old, returns = (_garbage(t, mask, g, 50.0) for t in (values, old, returns))
        clip = rng.choice([0.2, 0.2, 0.1, 0.5])
        expected = ppo_value_loss(values, old, returns, mask, clip)
        v = values.clone().requires_grad_(True)
        ref_v = values.clone().requires_grad_(True)
        ppo_value_loss(ref_v, old, returns, mask, clip).backward()
        m, mdesc = _as_mask_dtype(mask, rng)
        desc = f"ppo_value_loss on {_describe(shape, mask, mdesc)}, |values - old_values| ~ {spread}, clip={clip}"
        got = fn(v, old.clone(), returns.clone(), m.clone()) if clip == 0.2 and trial % 2 else \
            fn(v, old.clone(), returns.clone(), m.clone(), clip)
        got = _as_tensor(got, "ppo_value_loss")
        assert got.numel() == 1, f"{desc}: the loss must be a scalar, got {_show(got)}"
        _compare(got, expected, desc, hint)
        assert got.requires_grad, f"{desc}: the loss carries no gradient"
        got.reshape(()).backward()
        assert v.grad is not None, f"{desc}: no gradient reached values"
        _compare(v.grad, ref_v.grad, desc + ": gradient w.r.t. values",
                 "where the clipped term is the larger one and the value is outside the clip range, the "
                 "gradient is 0; masked positions get no gradient", atol=1e-6)


def check_dpo_loss(fn: Callable) -> None:
    """``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1) -> (loss, chosen_rewards,
    rejected_rewards)`` against the package, with gradients to the policy only."""
    rng, g = _rng()
    hint = ("h = (pi_c - pi_r) - (ref_c - ref_r); loss = mean(-logsigmoid(beta * h)); "
            "rewards = beta * (policy - ref), detached; the reference log-probs are constants")
    pc = torch.tensor([-10.0]); pr = torch.tensor([-12.0])
    loss, _, _ = fn(pc.clone(), pr.clone(), pc.clone(), pr.clone())
    _compare(loss, torch.log(torch.tensor(2.0)), "dpo_loss with policy == reference",
             "at the start the policy is the reference, h = 0 and the loss is log 2")
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-300.0, -5.0], [-10.0, -6.0], [-20.0, -5.0], [-30.0, -6.0]))
    _compare(fn(pc.clone(), pr.clone(), rc.clone(), rr.clone(), 1.0)[0], dpo_loss(pc, pr, rc, rr, 1.0)[0],
             "dpo_loss(policy_chosen=[-300, -5], policy_rejected=[-10, -6], ref_chosen=[-20, -5], "
             "ref_rejected=[-30, -6], beta=1)",
             "beta * h = -300 for the first pair: its loss is 300; log(sigmoid(-300)) underflows to -inf, "
             "use F.logsigmoid")
    for trial in range(14):
        n = rng.choice([1, 2, 5, 16, rng.randrange(3, 64)])
        scale = rng.choice([1.0, 20.0, 300.0])
        ref_c = -scale * torch.rand(n, generator=g) - 1
        ref_r = -scale * torch.rand(n, generator=g) - 1
        shift = rng.choice([0.1, 2.0, 50.0])
        pol_c = ref_c + shift * torch.randn(n, generator=g)
        pol_r = ref_r + shift * torch.randn(n, generator=g)
        beta = rng.choice([0.1, 0.1, 0.05, 0.5, 2.0])
        expected = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        c_ref, r_ref = pol_c.clone().requires_grad_(True), pol_r.clone().requires_grad_(True)
        dpo_loss(c_ref, r_ref, ref_c, ref_r, beta)[0].backward()
        c, r = pol_c.clone().requires_grad_(True), pol_r.clone().requires_grad_(True)
        rc, rr = ref_c.clone().requires_grad_(True), ref_r.clone().requires_grad_(True)
        desc = f"dpo_loss on {n} pairs (log-probs ~ -{scale}, policy - reference ~ {shift}), beta={beta}"
        out = fn(c, r, rc, rr) if beta == 0.1 and trial % 2 else fn(c, r, rc, rr, beta)
        assert isinstance(out, tuple) and len(out) == 3, (
            f"dpo_loss must return (loss, chosen_rewards, rejected_rewards), got {_show(out)}")
        loss, chosen_rewards, rejected_rewards = out
        loss = _as_tensor(loss, "the loss")
        assert loss.numel() == 1, f"{desc}: the loss must be a scalar (mean over pairs), got {_show(loss)}"
        _compare(loss, expected[0], desc + ": loss",
                 hint + " (for large |beta * h| use F.logsigmoid, never log(sigmoid(.)))")
        _compare(chosen_rewards, expected[1], desc + ": chosen_rewards", hint)
        _compare(rejected_rewards, expected[2], desc + ": rejected_rewards", hint)
        for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
            assert not t.requires_grad, f"{desc}: {name} must be detached (they are for monitoring only)"
        assert loss.requires_grad, f"{desc}: the loss carries no gradient"
        loss.reshape(()).backward()
        _compare(c.grad if c.grad is not None else torch.zeros(n), c_ref.grad,
                 desc + ": gradient w.r.t. policy_chosen_logps", hint, atol=1e-6)
        _compare(r.grad if r.grad is not None else torch.zeros(n), r_ref.grad,
                 desc + ": gradient w.r.t. policy_rejected_logps", hint, atol=1e-6)
        for name, t in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
            assert t.grad is None or not t.grad.abs().any(), (
                f"{desc}: a gradient reached {name}; the reference model is frozen: detach its log-probs")


CHECKS = {
    "compute_gae": check_compute_gae,
    "whiten": check_whiten,
    "ppo_policy_loss": check_ppo_policy_loss,
    "ppo_value_loss": check_ppo_value_loss,
    "dpo_loss": check_dpo_loss,
}
