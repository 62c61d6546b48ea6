"""Chapter 14: GRPO's advantages, per-token log-probs and loss against TRL's own ``GRPOTrainer`` code.

TRL 1.x computes these inside ``GRPOTrainer`` methods, not standalone functions, so the tests call
the methods themselves (``_generate_and_score_completions`` for the group-normalised advantages,
``_get_per_token_logps_and_entropies`` for the log-probs, ``_compute_loss`` for the loss) on a
trainer built with ``object.__new__`` and only the attributes those methods read. Generation and
the reward functions are replaced by fixed tensors, so both sides see the same numbers.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is a dev dependency of these checks")
transformers = pytest.importorskip("transformers")
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from llama_from_scratch.config import LlamaConfig  # noqa: E402
from llama_from_scratch.grpo import (  # noqa: E402
    ADVANTAGE_EPS,
    GRPOConfig,
    completion_mask_from_eos,
    group_advantages,
    grpo_loss,
    grpo_step,
    kl_k3,
    per_token_logprobs,
    sample_groups,
)
from llama_from_scratch.model import Llama  # noqa: E402

GRPOTrainer = trl_grpo.GRPOTrainer

# TRL's GRPOTrainer methods are called on a trainer built with object.__new__ and only the attributes
# they read; the grader of chapter 14's exercises does the same, and both use its adapter.
from llama_from_scratch.course.checks.ch14_rejection_sampling_grpo import _trainer, trl_advantages  # noqa: E402


def random_rewards(n: int, seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":  # verifiable rewards: 0 or 1
        return torch.randint(0, 2, (n,), generator=g).float()
    return torch.randn(n, generator=g) * 3 + 1


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size,num_prompts", [(2, 1), (4, 3), (8, 5), (3, 7)])
@pytest.mark.parametrize("kind", ["binary", "gaussian"])
def test_group_advantages_equal_trl(scale, group_size, num_prompts, kind):
    rewards = random_rewards(group_size * num_prompts, seed=group_size * 100 + num_prompts, kind=kind)
    ours = group_advantages(rewards, group_size, scale=scale)
    theirs = trl_advantages(rewards, group_size, scale)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_group_advantages_formula_and_sample_std():
    """Sample std (n - 1) and epsilon 1e-4, as torch.std would give it (to float rounding; the TRL test above
    is the bit-for-bit one): [0, 1] -> -/+ 0.5 / (sqrt(0.5) + 1e-4)."""
    adv = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0, 3.0, 5.0]), 3)
    first = torch.tensor([0.0, 1.0, 3.0])
    expected = (first - first.mean()) / (first.std(unbiased=True) + ADVANTAGE_EPS)
    torch.testing.assert_close(adv[:3], expected, rtol=2e-7, atol=0)
    assert abs(float(first.std()) - float(first.std(unbiased=False))) > 0.1  # the choice matters
    two = group_advantages(torch.tensor([0.0, 1.0]), 2)
    torch.testing.assert_close(two, torch.tensor([-0.5, 0.5]) / (0.5 ** 0.5 + ADVANTAGE_EPS))


def test_equal_rewards_give_zero_advantage_and_groups_are_independent():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert (adv[:4] == 0).all() and (adv[8:] == 0).all()  # all right, all wrong: no signal
    assert adv[5] > 0 and adv[4] < 0
    # normalising over the whole batch instead is a different thing
    assert not torch.allclose(group_advantages(rewards, 4, scale="batch"), adv)
    # each group sums to zero
    torch.testing.assert_close(adv.view(-1, 4).sum(1), torch.zeros(3), atol=1e-6, rtol=0)


def test_group_advantages_dtypes():
    rewards = random_rewards(8, seed=1, kind="gaussian")
    torch.testing.assert_close(group_advantages(rewards.double(), 4), group_advantages(rewards, 4).double(),
                               rtol=1e-6, atol=1e-6)
    bf = group_advantages(rewards.bfloat16(), 4)
    assert bf.dtype == torch.float32  # computed and returned in float32


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(TypeError, match="floating"):
        group_advantages(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="int"):
        group_advantages(torch.zeros(4), 2.0)


# --------------------------------------------------------------------------------------------
# Per-token log-probs
# --------------------------------------------------------------------------------------------


def _tiny_pair(seed: int = 0):
    """Our tiny Llama and a Hugging Face LlamaForCausalLM with the same weights (TRL's fused head added)."""
    torch.manual_seed(seed)
    config = LlamaConfig.tiny()
    ours = Llama(config).eval()
    hf_config = transformers.LlamaConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(ours.state_dict())
    return ours, hf


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_equal_trl(temperature):
    ours, hf = _tiny_pair()
    add_fused_lm_head(hf, temperature=temperature)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 256, (4, 6), generator=g)
    completion = torch.randint(3, 256, (4, 5), generator=g)
    prompt_mask = torch.ones_like(prompt)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 3:] = 0  # a short completion, right-padded
    completion_mask[2, 1:] = 0
    input_ids = torch.cat([prompt, completion], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    trainer = _trainer(args=SimpleNamespace(report_to=[]))
    with torch.no_grad():
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, hf, input_ids, attention_mask, 5)
        mine = per_token_logprobs(ours, input_ids, attention_mask, 5, temperature=temperature)
    valid = completion_mask.bool()
    torch.testing.assert_close(mine[valid], theirs[valid], rtol=0, atol=2e-6)
    assert mine.dtype == torch.float32 and mine.shape == (4, 5)


def test_per_token_logprobs_errors():
    ours, _ = _tiny_pair()
    ids = torch.randint(0, 256, (2, 4))
    with pytest.raises(ValueError, match="logits_to_keep"):
        per_token_logprobs(ours, ids, None, 4)
    with pytest.raises(ValueError, match="temperature"):
        per_token_logprobs(ours, ids, None, 2, temperature=0.0)


def test_completion_mask_from_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    mask = completion_mask_from_eos(ids, 2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def trl_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, *, beta, epsilon, epsilon_high, loss_type,
             max_completion_length):
    """GRPOTrainer._compute_loss on given log-probs (the model call returns them) -> (loss, metrics)."""
    b, t = logprobs.shape
    trainer = _trainer(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high,
        use_vllm=False, current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, report_to=[], steps_per_generation=1),
    )
    inputs = {"prompt_ids": torch.ones(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logprobs,
              "num_items_in_batch": mask.sum()}
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logprobs
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, trainer._metrics["train"]


def random_batch(b: int, t: int, seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -2 + torch.randn(b, t, generator=g)
    logprobs = old + spread * torch.randn(b, t, generator=g)  # ratios around 1, some beyond the clip range
    ref = old + 0.5 * torch.randn(b, t, generator=g)
    advantages = torch.randn(b, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    return logprobs, old, ref, advantages, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_and_gradient_equal_trl(loss_type, beta, epsilon_high):
    logprobs, old, ref, advantages, mask = random_batch(6, 9, seed=["dapo", "grpo", "bnpo", "dr_grpo"].index(loss_type) + int(beta * 100))
    eh = 0.2 if epsilon_high is None else epsilon_high
    mine_lp = logprobs.clone().requires_grad_(True)
    theirs_lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo_loss(mine_lp, old, advantages, mask, ref_logprobs=ref, beta=beta, epsilon=0.2,
                            epsilon_high=epsilon_high, loss_type=loss_type, max_completion_length=9)
    ref_loss, metrics = trl_loss(theirs_lp, old, ref, advantages, mask, beta=beta, epsilon=0.2, epsilon_high=eh,
                                 loss_type=loss_type, max_completion_length=9)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(mine_lp.grad, theirs_lp.grad, rtol=0, atol=0)
    assert float(stats["clip_ratio"]) == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-7)
    assert 0 < float(stats["clip_ratio"]) < 1  # the batch does exercise the clipping
    if beta:
        assert float(stats["kl"]) == pytest.approx(metrics["kl"][0], abs=1e-7)


def test_grpo_loss_first_step_ratio_one_and_padding_garbage():
    """With old = logprobs.detach() (one update per batch) the loss value is -mean(A) per token; NaN in
    padded positions cannot leak (TRL multiplies by the mask, which would turn NaN into NaN)."""
    logprobs, _, ref, advantages, mask = random_batch(4, 7, seed=5)
    loss, stats = grpo_loss(logprobs, logprobs.clone(), advantages, mask, loss_type="bnpo")
    expected = -(advantages[:, None].expand(-1, 7)[mask.bool()]).mean()
    torch.testing.assert_close(loss, expected)
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_ratio"]) == 0.0
    dirty = logprobs.clone()
    dirty[~mask.bool()] = float("nan")
    loss2, _ = grpo_loss(dirty, dirty.clone(), advantages, mask, ref_logprobs=ref, beta=0.1, loss_type="grpo")
    assert torch.isfinite(loss2)
    # an all-masked completion contributes 0 (TRL clamps its token count at 1)
    mask[0] = 0
    trl_value, _ = trl_loss(logprobs, logprobs.clone(), ref, advantages, mask, beta=0.0, epsilon=0.2,
                            epsilon_high=0.2, loss_type="grpo", max_completion_length=7)
    torch.testing.assert_close(grpo_loss(logprobs, logprobs.clone(), advantages, mask, loss_type="grpo")[0],
                               trl_value, rtol=0, atol=0)


def test_clipping_stops_the_gradient_where_it_should():
    """A > 0 and ratio > 1 + eps: clipped, no gradient; A < 0 and ratio > 1 + eps: not clipped."""
    old = torch.zeros(2, 1)
    logprobs = torch.full((2, 1), 0.5, requires_grad=True)  # ratio e^0.5 = 1.65
    loss, stats = grpo_loss(logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), loss_type="bnpo")
    loss.backward()
    assert logprobs.grad[0, 0] == 0.0
    assert logprobs.grad[1, 0] == pytest.approx(0.5 * torch.exp(torch.tensor(0.5)).item())
    assert float(stats["clip_ratio"]) == 0.5


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(50, generator=g), torch.randn(50, generator=g)
    kl = kl_k3(lp, ref)
    assert (kl >= 0).all()
    assert (kl_k3(lp, lp) == 0).all()
    d = ref - lp
    torch.testing.assert_close(kl, torch.exp(d) - d - 1)
    # its mean over samples from p estimates KL(p || q): a categorical check
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = kl_k3(p.log()[samples], q.log()[samples]).mean()
    exact = (p * (p / q).log()).sum()
    assert abs(float(estimate - exact)) < 0.01


def test_grpo_loss_errors():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, lp, torch.zeros(2), m, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, lp, torch.zeros(3), m)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, lp, torch.zeros(2), m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(lp, lp, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="0 and 1"):
        grpo_loss(lp, lp, torch.zeros(2), torch.full((2, 3), 2.0))


# --------------------------------------------------------------------------------------------
# Sampling and a training step on a tiny model
# --------------------------------------------------------------------------------------------


def test_sample_groups_layout():
    ours, _ = _tiny_pair()
    g = torch.Generator().manual_seed(0)
    batch = sample_groups(ours, [[5, 6, 7], [8, 9]], group_size=3, max_new_tokens=4, eos_token_id=2, generator=g)
    assert batch["prompt_ids"].shape == (6, 3) and batch["completion_ids"].shape[0] == 6
    assert batch["prompt_ids"][3].tolist() == [2, 8, 9] and batch["prompt_mask"][3].tolist() == [0, 1, 1]
    assert (batch["prompt_ids"][:3] == torch.tensor([5, 6, 7])).all()


def test_grpo_step_learns_a_verifiable_reward_on_a_tiny_model():
    """Reward 1 when the first completion token is even: after a few steps, more even tokens."""
    torch.manual_seed(0)
    policy = Llama(LlamaConfig.tiny())
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    config = GRPOConfig(group_size=8, max_new_tokens=2, beta=0.04)
    g = torch.Generator().manual_seed(0)
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]
    reward = lambda p, tokens: float(bool(tokens) and tokens[0] % 2 == 0)  # noqa: E731
    history = [grpo_step(policy, reference, optimizer, prompts, reward, config, eos_token_id=2, generator=g)
               for _ in range(30)]
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.2, (first, last)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and history[-1]["kl"] > 0
    assert all(len(h["rewards"]) == 32 for h in history)
    with pytest.raises(ValueError, match="reference"):
        grpo_step(policy, None, optimizer, prompts, reward, config, eos_token_id=2)
