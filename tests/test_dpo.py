"""Chapter 13: the DPO loss, against the sigmoid-loss formula of REFERENCES.md (TRL's DPOTrainer,
``loss_type="sigmoid"``) written out in float64 here, plus its fixed points and gradient flow.

TRL 1.x computes this loss inside ``DPOTrainer``, not in a standalone function, so the comparison
is with the formula, not with an import.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.dpo import dpo_loss
from llama_from_scratch.model import Llama
from llama_from_scratch.ppo import sequence_logprobs


def reference_dpo(pc, pr, rc, rr, beta):
    """h = (pc - pr) - (rc - rr); loss = mean(-log sigmoid(beta h)); rewards beta (policy - ref)."""
    losses, chosen, rejected = [], [], []
    for a, b, c, d in zip(pc.double().tolist(), pr.double().tolist(), rc.double().tolist(), rr.double().tolist()):
        z = beta * ((a - b) - (c - d))
        losses.append(math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z)))
        chosen.append(beta * (a - c))
        rejected.append(beta * (b - d))
    chosen, rejected = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    return sum(losses) / len(losses), chosen, rejected


def random_logps(batch: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # summed log-probs of ~20-token completions: tens of nats, negative
    return [(-30 + 5 * torch.randn(batch, generator=g)).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_formula(batch, beta):
    pc, pr, rc, rr = random_logps(batch, seed=batch)
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    ref_loss, ref_chosen, ref_rejected = reference_dpo(pc, pr, rc, rr, beta)
    torch.testing.assert_close(loss, torch.tensor(ref_loss, dtype=torch.float32))
    torch.testing.assert_close(chosen, ref_chosen.float())
    torch.testing.assert_close(rejected, ref_rejected.float())
    assert loss.shape == () and chosen.shape == rejected.shape == (batch,)


def test_dpo_loss_default_beta_is_0_1():
    pc, pr, rc, rr = random_logps(8, seed=0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr)[0], dpo_loss(pc, pr, rc, rr, beta=0.1)[0])


def test_dpo_loss_at_init_is_log2():
    """Policy = reference: every implicit reward is 0 and the loss is -log sigmoid(0) = log 2."""
    pc, pr, _, _ = random_logps(16, seed=1)
    loss, chosen, rejected = dpo_loss(pc, pr, pc.clone(), pr.clone())
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    assert (chosen == 0).all() and (rejected == 0).all()


def test_dpo_gradients_flow_only_through_policy():
    pc, pr, rc, rr = (t.double().requires_grad_(True) for t in random_logps(6, seed=2))
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert not chosen.requires_grad and not rejected.requires_grad
    loss.backward()
    assert rc.grad is None and rr.grad is None
    # d loss / d pc = -beta * sigmoid(-beta h) / B, and the opposite for pr
    h = (pc - pr) - (rc - rr)
    expected = (-beta * torch.sigmoid(-beta * h) / 6).detach()
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


def test_dpo_loss_bfloat16_and_extremes():
    pc, pr, rc, rr = random_logps(32, seed=3, dtype=torch.bfloat16)
    loss, chosen, _ = dpo_loss(pc, pr, rc, rr)
    assert loss.dtype == torch.bfloat16
    ref_loss, ref_chosen, _ = reference_dpo(pc, pr, rc, rr, 0.1)
    torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64), rtol=2**-8, atol=0)
    assert chosen.dtype == torch.float32  # monitoring values stay in the float32 they were computed in
    torch.testing.assert_close(chosen.double(), ref_chosen, rtol=1e-6, atol=1e-6)
    # a huge preference for rejected: loss beta * |h| = 0.1 * 4000, finite
    big = dpo_loss(torch.tensor([-5000.0]), torch.tensor([-1000.0]), torch.tensor([-1000.0]), torch.tensor([-1000.0]))
    torch.testing.assert_close(big[0], torch.tensor(400.0))


def test_dpo_loss_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match=r"ref_rejected_logps \(4,\)"):
        dpo_loss(a, a, a, torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(torch.zeros(0) for _ in range(4)))
    with pytest.raises(TypeError, match="floating"):
        dpo_loss(a.long(), a, a, a)


def test_dpo_on_a_tiny_model_prefers_chosen():
    """A few DPO steps with sequence_logprobs: the loss falls below log 2 and the implicit reward
    margin turns positive on the training pairs."""
    torch.manual_seed(0)
    policy = Llama(LlamaConfig.tiny())
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 200, (8, 4), generator=g)
    chosen = torch.cat([prompt, torch.full((8, 3), 7)], dim=1)  # prefer "7 7 7"
    rejected = torch.cat([prompt, torch.randint(10, 200, (8, 3), generator=g)], dim=1)
    attn = torch.ones_like(chosen)
    resp = torch.zeros_like(chosen)
    resp[:, 4:] = 1
    with torch.no_grad():
        ref_c = sequence_logprobs(reference, chosen, attn, resp)
        ref_r = sequence_logprobs(reference, rejected, attn, resp)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            sequence_logprobs(policy, chosen, attn, resp), sequence_logprobs(policy, rejected, attn, resp),
            ref_c, ref_r,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2.0), abs=1e-6)
    assert losses[-1] < 0.5, losses  # measured 0.447 after 8 steps
    assert (chosen_rewards > rejected_rewards).all()
