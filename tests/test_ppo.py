"""Chapter 13: the PPO pieces, each against the formula of REFERENCES.md (TRL's PPO trainer)
written out independently here with Python loops in float64, plus hand-computed examples.

TRL 1.x no longer ships its PPO trainer's helpers (``masked_whiten``, ``compute_advantages``,
``AdaptiveKLController`` were removed), so their definitions are transcribed below from the older
``trl/core.py`` and ``trl/trainer/ppo_trainer.py``. ``logprobs_from_logits`` and
``entropy_from_logits`` are compared with torch (``log_softmax``, ``Categorical.entropy``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    value_clipfrac,
    whiten,
)

# ------------------------------------------------------------------ random masked problems


def span_mask(batch: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """Each row valid on one span [start, end): a masked prompt/left padding, the response, right
    padding. Row 0 is all-masked, row 1 has a single valid token (when batch allows)."""
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        if b == 0 and batch > 2:
            continue  # all-masked row
        start = int(torch.randint(0, seq_len, (1,), generator=g))
        end = start + 1 if b == 1 else int(torch.randint(start + 1, seq_len + 1, (1,), generator=g))
        mask[b, start:end] = 1
    return mask


SHAPES = [(1, 1), (1, 6), (5, 1), (6, 9), (3, 17)]


def problem(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = span_mask(*shape, g)
    if mask.sum() == 0:  # B = 1 rows get a real token
        mask[0, -1] = 1
    return x, mask


def ref_masked_mean(x, mask) -> float:
    vals = [v for v, m in zip(x.double().flatten().tolist(), mask.flatten().tolist()) if m]
    return sum(vals) / len(vals)


def ref_masked_var(x, mask, unbiased=True) -> float:
    vals = [v for v, m in zip(x.double().flatten().tolist(), mask.flatten().tolist()) if m]
    mean = sum(vals) / len(vals)
    return sum((v - mean) ** 2 for v in vals) / (len(vals) - 1 if unbiased else len(vals))


def ref_gae(rewards, values, mask, gamma, lam):
    """REFERENCES.md: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
    V = 0 after the last valid token, returns = A + V; row by row on its valid span."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.tolist()
    for b in range(B):
        valid = [t for t in range(T) if m[b][t]]
        if not valid:
            continue
        start, end = valid[0], valid[-1] + 1
        next_adv = 0.0
        for t in range(end - 1, start - 1, -1):
            next_value = v[b][t + 1] if t + 1 < end else 0.0
            delta = r[b][t] + gamma * next_value - v[b][t]
            next_adv = delta + gamma * lam * next_adv
            adv[b][t] = next_adv
            ret[b][t] = next_adv + v[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


# ------------------------------------------------------------------ masked statistics


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_and_var_match_formula(shape):
    (x, _, _), mask = problem(shape, seed=sum(shape))
    x = x.float()
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(ref_masked_mean(x, mask), dtype=torch.float32))
    n = int(mask.sum())
    if n >= 2:
        for unbiased in (True, False):
            torch.testing.assert_close(masked_var(x, mask, unbiased=unbiased),
                                       torch.tensor(ref_masked_var(x, mask, unbiased), dtype=torch.float32))
    else:
        with pytest.raises(ValueError, match="at least 2 valid entries, the mask has 1"):
            masked_var(x, mask)


def test_masked_mean_per_row_and_empty_cases():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0, 9.0]))  # empty row -> 0
    torch.testing.assert_close(masked_mean(x, mask.bool()), torch.tensor(4.0))
    x[1] = float("nan")  # garbage under the mask does not leak
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(4.0))
    with pytest.raises(ValueError, match="selects no entry"):
        masked_mean(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mean(x, torch.full((3, 3), 2))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but x has shape \(3, 3\)"):
        masked_mean(x, torch.ones(3, 2))


@pytest.mark.parametrize("shape", [(1, 6), (6, 9), (3, 17)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_and_normalises(shape, shift_mean):
    (x, _, _), mask = problem(shape, seed=7 + sum(shape))
    x = (x * 3 + 2).float()
    got = whiten(x, mask, shift_mean=shift_mean)
    # TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8), mean added back when not shift_mean
    mean, var = ref_masked_mean(x, mask), ref_masked_var(x, mask)
    shift = 0.0 if shift_mean else mean
    expected = [(v - mean) / math.sqrt(var + 1e-8) + shift for v in x.double().flatten().tolist()]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32).reshape(shape))
    valid = got[mask.bool()].double()
    assert abs(valid.mean().item() - (0.0 if shift_mean else mean)) < 1e-5
    assert abs(valid.var().item() - 1.0) < 1e-5  # unbiased variance 1 (up to the 1e-8)


def test_whiten_bfloat16():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 32, generator=g) * 5 + 1).bfloat16()
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[2, 20:] = False
    got = whiten(x, mask)
    assert got.dtype == torch.bfloat16
    mean, var = ref_masked_mean(x, mask), ref_masked_var(x, mask)
    expected = (x.double() - mean) / math.sqrt(var + 1e-8)
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=2**-8)


# ------------------------------------------------------------------ GAE


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # lam = 0.5: deltas 0.1, 0.1, 0.3 -> A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3, A_0 = 0.1 + 0.5 * 0.25
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # lam = 1, gamma = 1: A = (sum of future rewards) - V = 1 - V; returns are the Monte-Carlo return 1
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    torch.testing.assert_close(ret, torch.ones(1, 3))
    # lam = 0: one-step TD errors; gamma = 0.5 discounts V_{t+1}
    adv, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.3 - 0.5, 0.35 - 0.6, 0.3]]))


def test_gae_value_after_last_valid_token_is_zero():
    """Right padding: the padded V's (here huge) must not be bootstrapped from."""
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_formula(shape, gamma, lam):
    (r, v, _), mask = problem(shape, seed=31 * sum(shape))
    adv, ret = compute_gae(r.float(), v.float(), mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv.float())
    torch.testing.assert_close(ret, ref_ret.float())
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_equals_trl_loop_on_valid_positions_for_any_mask():
    """TRL's PPO trainer zeroes masked values and rewards, then runs the loop over all positions."""
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 10, generator=g) < 0.6).long()  # holes anywhere
    gamma, lam = 0.95, 0.9
    rv, vv = (r * mask).tolist(), (v * mask).tolist()
    trl_adv = torch.zeros(4, 10, dtype=torch.float64)
    for b in range(4):
        lastgaelam = 0.0
        for t in reversed(range(10)):
            nextvalues = vv[b][t + 1] if t < 9 else 0.0
            delta = rv[b][t] + gamma * nextvalues - vv[b][t]
            lastgaelam = delta + gamma * lam * lastgaelam
            trl_adv[b, t] = lastgaelam
    adv, ret = compute_gae(r, v, mask, gamma, lam)
    assert adv.dtype == torch.float64
    valid = mask.bool()
    torch.testing.assert_close(adv[valid], trl_adv[valid])
    torch.testing.assert_close(ret[valid], (trl_adv + v * mask)[valid])


def test_gae_bfloat16():
    (r, v, _), mask = problem((6, 9), seed=2)
    rb, vb = r.bfloat16(), v.bfloat16()
    adv, ret = compute_gae(rb, vb, mask)
    assert adv.dtype == ret.dtype == torch.bfloat16
    ref_adv, ref_ret = ref_gae(rb, vb, mask, 1.0, 0.95)  # from the same bf16 numbers, in float64
    # computed in float32; only the final rounding to bf16 remains (values here are below ~8)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=2**-8, atol=2**-8)


def test_gae_errors():
    r, v, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"rewards \(2, 3\), values \(2, 4\), mask \(2, 3\)"):
        compute_gae(r, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        compute_gae(torch.zeros(6), torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="lam"):
        compute_gae(r, v, m, lam=1.5)
    bad = r.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in advantages.*rows \[1\]"):
        compute_gae(bad, v, m)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN in advantages"):
        compute_gae(r, bad, m)
    # a NaN under the mask is ignored
    m2 = m.clone()
    m2[1, 1:] = 0
    bad[1, 1] = float("nan")
    adv, _ = compute_gae(bad, v, m2)
    assert torch.isfinite(adv).all()


# ------------------------------------------------------------------ KL-penalized rewards


def ref_kl_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    B, T = logprobs.shape
    out = [[0.0] * T for _ in range(B)]
    lp, ref, m, s = logprobs.double().tolist(), ref_logprobs.double().tolist(), mask.tolist(), score.double().tolist()
    for b in range(B):
        valid = [t for t in range(T) if m[b][t]]
        for t in valid:
            out[b][t] = -kl_coef * (lp[b][t] - ref[b][t])
        if valid:
            out[b][valid[-1]] += s[b]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_penalized_rewards_match_formula(shape):
    (lp, ref, _), mask = problem(shape, seed=3 + sum(shape))
    score = torch.randn(shape[0], dtype=torch.float64) * 2
    got = kl_penalized_rewards(score.float(), lp.float(), ref.float(), mask, kl_coef=0.05)
    torch.testing.assert_close(got, ref_kl_rewards(score, lp, ref, mask, 0.05).float())


def test_kl_penalized_rewards_placement_and_errors():
    score = torch.tensor([10.0, 20.0, 30.0])
    zeros = torch.zeros(3, 4)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # row 1: no token, no score
    got = kl_penalized_rewards(score, zeros, zeros, mask, kl_coef=0.1)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0, 10, 0], [0, 0, 0, 0], [0, 0, 0, 30]]))
    bf = kl_penalized_rewards(score.bfloat16(), zeros.bfloat16() + 0.5, zeros.bfloat16(), mask, 0.1)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), torch.where(mask.bool(), -0.05, 0.0) + got, rtol=2**-8, atol=0)
    with pytest.raises(ValueError, match=r"score must be \[batch\] = \[3\], got \(3, 1\)"):
        kl_penalized_rewards(score[:, None], zeros, zeros, mask, 0.1)
    with pytest.raises(ValueError, match=r"logprobs \(3, 4\), ref_logprobs \(3, 5\)"):
        kl_penalized_rewards(score, zeros, torch.zeros(3, 5), mask, 0.1)


# ------------------------------------------------------------------ the PPO losses


def ref_policy_loss(logprobs, old_logprobs, advantages, mask, clip):
    """Per valid token: max(-A r, -A clamp(r, 1 - c, 1 + c)); then the TRL stats."""
    losses, clipped, sq, ratios = [], [], [], []
    for lp, old, a, m in zip(logprobs.double().flatten().tolist(), old_logprobs.double().flatten().tolist(),
                             advantages.double().flatten().tolist(), mask.flatten().tolist()):
        if not m:
            continue
        ratio = math.exp(lp - old)
        unclipped, clipped_term = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
        losses.append(max(unclipped, clipped_term))
        clipped.append(1.0 if clipped_term > unclipped else 0.0)
        sq.append((lp - old) ** 2)
        ratios.append(ratio)
    n = len(losses)
    return sum(losses) / n, {"clipfrac": sum(clipped) / n, "approx_kl": 0.5 * sum(sq) / n,
                             "ratio_mean": sum(ratios) / n}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_ppo_policy_loss_matches_formula(shape, clip):
    (lp, adv, _), mask = problem(shape, seed=11 * sum(shape))
    old = lp + 0.3 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, stats = ppo_policy_loss(lp.float(), old.float(), adv.float(), mask, clip_range=clip)
    ref_loss, ref_stats = ref_policy_loss(lp.float(), old.float(), adv.float(), mask, clip)
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=torch.float32))
    for key, value in ref_stats.items():
        torch.testing.assert_close(stats[key], torch.tensor(value, dtype=torch.float32), msg=key)
        assert not stats[key].requires_grad


def test_ppo_policy_loss_clip_fraction_and_gradient_on_constructed_ratios():
    ratio = torch.tensor([[0.5, 1.5, 0.5, 1.5, 1.1, 0.9, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])  # the last one would be clipped but is masked
    old = torch.zeros_like(ratio)
    logprobs = ratio.log().requires_grad_(True)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # clipped: ratio 1.5 with A > 0 (pushed too far up) and ratio 0.5 with A < 0 (too far down)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    # the other two outside [0.8, 1.2] are not clipped: the unclipped term is the pessimistic one
    expected_terms = [-0.5, -1.2, 0.8, 1.5, -1.1, 0.9]
    assert loss.item() == pytest.approx(sum(expected_terms) / 6, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * ratio = -A * ratio / 6; zero where the clipped (constant) term was taken
    expected_grad = torch.tensor([[-0.5, 0.0, 0.0, 1.5, -1.1, 0.9, 0.0]]) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad)
    assert stats["ratio_mean"].item() == pytest.approx((0.5 + 1.5 + 0.5 + 1.5 + 1.1 + 0.9) / 6)


def test_ppo_policy_loss_first_minibatch():
    """With logprobs == old_logprobs (the first minibatch of an iteration): ratio 1, no clipping,
    loss = -mean(A), approx_kl = 0."""
    g = torch.Generator().manual_seed(0)
    lp, adv = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    loss, stats = ppo_policy_loss(lp, lp.clone(), adv, mask)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0 and stats["ratio_mean"].item() == 1


def test_ppo_policy_loss_nan_and_shape_errors():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    adv = torch.zeros(2, 3)
    adv[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in advantages.*rows \[0\]"):
        ppo_policy_loss(lp, lp, adv, mask)
    mask[0, 2] = 0  # masked garbage: no error, and no NaN gradient
    lp.requires_grad_(True)
    loss, _ = ppo_policy_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    message = r"logprobs \(2, 3\), old_logprobs \(2, 3\), advantages \(2, 4\), mask \(2, 3\)"
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(lp, lp, torch.zeros(2, 4), mask)


def test_ppo_policy_loss_bfloat16():
    (lp, adv, _), mask = problem((6, 9), seed=4)
    old = (lp + 0.1).bfloat16()
    lp, adv = lp.bfloat16(), adv.bfloat16()
    loss, stats = ppo_policy_loss(lp, old, adv, mask)
    assert loss.dtype == torch.bfloat16
    ref_loss, ref_stats = ref_policy_loss(lp, old, adv, mask, 0.2)
    torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"].double(), torch.tensor(ref_stats["approx_kl"], dtype=torch.float64))


def ref_value_loss(values, old_values, returns, mask, clip):
    losses, clipped = [], []
    for v, vo, R, m in zip(values.double().flatten().tolist(), old_values.double().flatten().tolist(),
                           returns.double().flatten().tolist(), mask.flatten().tolist()):
        if m:
            vc = min(max(v, vo - clip), vo + clip)
            losses.append(max((v - R) ** 2, (vc - R) ** 2))
            clipped.append(1.0 if (vc - R) ** 2 > (v - R) ** 2 else 0.0)
    return 0.5 * sum(losses) / len(losses), sum(clipped) / len(clipped)


@pytest.mark.parametrize("shape", SHAPES)
def test_ppo_value_loss_matches_formula(shape):
    (v, ret, _), mask = problem(shape, seed=13 * sum(shape))
    old = v + 0.4 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_loss, ref_frac = ref_value_loss(v.float(), old.float(), ret.float(), mask, 0.2)
    torch.testing.assert_close(ppo_value_loss(v.float(), old.float(), ret.float(), mask),
                               torch.tensor(ref_loss, dtype=torch.float32))
    torch.testing.assert_close(value_clipfrac(v.float(), old.float(), ret.float(), mask),
                               torch.tensor(ref_frac, dtype=torch.float32))
    vb, ob, rb = v.bfloat16(), old.bfloat16(), ret.bfloat16()
    bf = ppo_value_loss(vb, ob, rb, mask)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), torch.tensor(ref_value_loss(vb, ob, rb, mask, 0.2)[0],
                                                         dtype=torch.float64), rtol=2**-8, atol=1e-6)


def test_ppo_value_loss_constructed():
    old = torch.tensor([0.0, 0.0, 0.0])
    values = torch.tensor([0.5, 0.5, 0.1], requires_grad=True)
    returns = torch.tensor([1.0, -1.0, 1.0])
    mask = torch.ones(3)
    # v=0.5 -> R=1: clamp to 0.2 gives (0.8)^2 > (0.5)^2: clipped term wins (no gradient)
    # v=0.5 -> R=-1: unclipped (1.5)^2 > clipped (1.2)^2;  v=0.1 inside the range: both equal
    loss = ppo_value_loss(values, old, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25 + 0.81) / 3)
    assert value_clipfrac(values, old, returns, mask).item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 1.5, -0.9]) / 3)
    with pytest.raises(ValueError, match=r"values \(3,\), old_values \(3,\), returns \(2,\)"):
        ppo_value_loss(values, old, returns[:2], mask)


# ------------------------------------------------------------------ KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 12 = 2x target: error 1 clipped to 0.2 -> value *= 1 + 0.2 * 256 / 10000
    assert ctl.update(12.0, n_steps=256) == pytest.approx(0.2 * 1.00512)
    # KL 6.6: error 0.1 (not clipped)
    assert ctl.update(6.6, n_steps=256) == pytest.approx(0.2 * 1.00512 * 1.00256)
    # KL 0: error -1 clipped to -0.2
    before = ctl.value
    ctl.update(0.0, n_steps=1000)
    assert ctl.value == pytest.approx(before * (1 - 0.02))
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=1)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


# ------------------------------------------------------------------ log-probs and entropy


@pytest.mark.parametrize("shape", [(1, 1, 5), (3, 7, 50), (4, 11)])
def test_logprobs_from_logits_equals_torch(shape):
    g = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(shape, generator=g) * 4
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    expected = torch.gather(F.log_softmax(logits, -1), -1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), expected)
    got_bf = logprobs_from_logits(logits.bfloat16(), labels)
    assert got_bf.dtype == torch.float32  # upcast, not rounded back to bf16
    expected_bf = torch.gather(F.log_softmax(logits.bfloat16().float(), -1), -1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got_bf, expected_bf)


def test_logprobs_from_logits_large_and_errors():
    logits = torch.tensor([[1e4, 0.0, -1e4]])
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([0, 1])[:1]), torch.tensor([0.0]))
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([1])), torch.tensor([-1e4]))
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\).*\(2, 4\)"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        logprobs_from_logits(torch.zeros(2, 5), torch.tensor([0, 5]))


def test_entropy_from_logits_equals_categorical():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 30, generator=g) * 3
    logits[0, 0, :25] = float("-inf")  # filtered tokens
    expected = torch.distributions.Categorical(logits=logits).entropy()
    got = entropy_from_logits(logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(entropy_from_logits(torch.zeros(1, 8)), torch.tensor([math.log(8)]))
    got_bf = entropy_from_logits(logits.bfloat16())
    assert got_bf.dtype == torch.float32
    torch.testing.assert_close(got_bf, torch.distributions.Categorical(logits=logits.bfloat16().float()).entropy())


# ------------------------------------------------------------------ sequence log-probs


def test_sequence_logprobs_matches_per_row_sum():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    prompts = [[3, 14, 15], [92, 65], [35, 89, 79, 32]]
    completions = [[38, 46, 26, 4], [33], [83, 27]]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.zeros(3, width, dtype=torch.long)
    attn = torch.zeros(3, width, dtype=torch.long)
    resp = torch.zeros(3, width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):  # right padded
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        resp[i, len(p): len(p) + len(c)] = 1
    got = sequence_logprobs(model, ids, attn, resp)
    assert got.shape == (3,) and got.requires_grad
    expected = []
    for p, c in zip(prompts, completions):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + c])).double(), -1)[0]
        expected.append(sum(logp[len(p) + j - 1, tok].item() for j, tok in enumerate(c)))
    torch.testing.assert_close(got.detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(model, ids, attn, torch.ones_like(resp))
    bad = resp.clone()
    bad[1, -1] = 1  # a padding position
    with pytest.raises(ValueError, match="padding"):
        sequence_logprobs(model, ids, attn, bad)


# ------------------------------------------------------------------ TRL, where it is installed


def _trl_utils():
    """TRL is not a dependency: TRL 1.x's trainer utilities pull in datasets, pandas and pyarrow,
    and its PPO helpers and DPO loss are no longer standalone functions. Where it is installed,
    compare with the two standalone functions it still has."""
    return pytest.importorskip(
        "trl.trainer.utils", exc_type=ImportError,
        reason="trl (with datasets, pandas, pyarrow) not installed; it is an optional cross-check",
    )


def test_logprobs_and_entropy_equal_trl():
    trl_utils = _trl_utils()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 7), generator=g)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), trl_utils.selective_log_softmax(logits, labels))
    torch.testing.assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits))
