"""Chapter 14's checks pass the solutions and fail the stubs and plausible wrong answers.

Each check is called as a notebook's ``check(fn)`` calls it (through ``LocalObject``), on the
solution notebook's definitions, the released stubs, or a variant written here.
"""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.course.checks import ch14_rejection_sampling_grpo as ch14
from llama_from_scratch.course.checks.ch14_rejection_sampling_grpo import CHECKS, FORBIDDEN
from llama_from_scratch.course.grade import LocalObject

from answers import fails_on, forbidden_rules_test, passes_on, solution, solution_and_stub_tests, stub

NS = solution("ch14_rejection_sampling_grpo")
STUBS = stub("ch14_rejection_sampling_grpo")
passes = passes_on(CHECKS, LocalObject)
fails = fails_on(CHECKS, LocalObject)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, NS, STUBS, wrap=LocalObject)
test_every_exercise_has_forbidden_rules_and_a_solution = forbidden_rules_test(CHECKS, FORBIDDEN, NS)


def test_references_agree_with_the_package():
    """The checks' TRL calls agree with the package's group_advantages and grpo_loss (tested against TRL
    in tests/test_grpo.py), so the grader's reference is what the chapter teaches."""
    from llama_from_scratch.grpo import group_advantages, grpo_loss

    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (12,), generator=g).float()
    for scale in ("group", "batch", "none"):
        assert torch.equal(ch14.trl_advantages(rewards, 4, scale), group_advantages(rewards, 4, scale=scale))
    lp, old, ref = (-2 + torch.randn(3, 5, generator=g) for _ in range(3))
    adv, mask = torch.randn(3, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        ours, _ = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
                            max_completion_length=6)
        theirs = ch14.trl_loss(lp, old, ref, adv, mask, 0.04, 0.2, 0.2, loss_type, 6)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- group_advantages

def advantages_variant(unbiased=True, per_group_mean=True, eps=1e-4, eps_in_sqrt=False, batch_std_for_group=False):
    def group_advantages(rewards, group_size, scale="group"):
        grouped = rewards.float().view(-1, group_size)
        mean = grouped.mean(1, keepdim=True) if per_group_mean else rewards.float().mean()
        centred = (grouped - mean).reshape(-1)
        if scale == "none":
            return centred
        if scale == "group" and not batch_std_for_group:
            var = grouped.var(1, unbiased=unbiased, keepdim=True).expand_as(grouped).reshape(-1)
        else:
            var = rewards.float().var(unbiased=unbiased)
        std = (var + eps).sqrt() if eps_in_sqrt else var.sqrt() + eps
        return centred / std
    return group_advantages


@pytest.mark.parametrize("wrong", [
    advantages_variant(unbiased=False),             # population std (n) instead of TRL's sample std (n - 1)
    advantages_variant(per_group_mean=False),       # the batch mean as the baseline
    advantages_variant(batch_std_for_group=True),   # normalising over the whole batch instead of per group
    advantages_variant(eps=0.0),                    # no epsilon: all-equal groups give NaN
    advantages_variant(eps=1e-8, eps_in_sqrt=True), # PPO's whitening epsilon, inside the square root
])
def test_group_advantages_wrong(wrong):
    assert fails("group_advantages", wrong)


def test_group_advantages_interleaved_layout_fails():
    """Groups read as every P-th reward (a [G, P] layout) instead of consecutive runs."""
    def group_advantages(rewards, group_size, scale="group"):
        grouped = rewards.float().view(group_size, -1)
        centred = grouped - grouped.mean(0, keepdim=True)
        if scale == "none":
            return centred.reshape(-1)
        std = grouped.std(0, keepdim=True) if scale == "group" else rewards.float().std()
        return (centred / (std + 1e-4)).reshape(-1)
    assert fails("group_advantages", group_advantages)


def test_group_advantages_unusual_correct_answer_passes():
    """A loop over groups in float64 with statistics written out by hand."""
    def group_advantages(rewards, group_size, scale="group"):
        r = rewards.double().tolist()
        n = len(r)
        out = []
        batch_mean = sum(r) / n
        batch_std = (sum((x - batch_mean) ** 2 for x in r) / (n - 1)) ** 0.5
        for start in range(0, n, group_size):
            group = r[start:start + group_size]
            m = sum(group) / group_size
            s = (sum((x - m) ** 2 for x in group) / (group_size - 1)) ** 0.5
            for x in group:
                out.append(x - m if scale == "none" else (x - m) / ((s if scale == "group" else batch_std) + 1e-4))
        return torch.tensor(out, dtype=torch.float32)
    assert passes("group_advantages", group_advantages) is None


# ---------------------------------------------------------------------------------------------- grpo_loss

def loss_variant(clip=True, use_min=True, kl="k3", kl_sign=1, mask_padding=True, grpo_token_mean=False,
                 detach_old=True, dr_grpo_count=False):
    def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, beta=0.0, epsilon_low=0.2,
                  epsilon_high=0.2, loss_type="dapo", max_completion_length=None):
        mask = completion_mask != 0
        old = old_logprobs.detach() if detach_old else old_logprobs
        adv = advantages.unsqueeze(1)
        ratio = torch.exp(torch.where(mask, logprobs - old, 0.0))
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) if clip else ratio
        a, b = ratio * adv, clipped * adv
        per_token = -(torch.min(a, b) if use_min else torch.max(a, b))
        if beta:
            d = torch.where(mask, ref_logprobs - logprobs, 0.0)
            if kl_sign < 0:
                d = -d
            per_token = per_token + beta * ((torch.exp(d) - d - 1) if kl == "k3" else -d)
        if mask_padding:
            per_token = torch.where(mask, per_token, 0.0)
        counts = mask.sum(1)
        if loss_type == "grpo" and not grpo_token_mean:
            return (per_token.sum(1) / counts.clamp(min=1)).mean()
        if loss_type == "dr_grpo" and not dr_grpo_count:
            return per_token.sum() / (logprobs.shape[0] * max_completion_length)
        return per_token.sum() / counts.sum()
    return grpo_loss


@pytest.mark.parametrize("wrong", [
    loss_variant(clip=False),            # no clipping
    loss_variant(use_min=False),         # the optimistic max instead of the pessimistic min
    loss_variant(kl="k1"),               # PPO's k1 estimator (logp - ref) instead of k3
    loss_variant(kl_sign=-1),            # k3 with the log-ratio the wrong way round: KL(ref || policy)'s estimator
    loss_variant(mask_padding=False),    # padding tokens (junk) in the sum
    loss_variant(grpo_token_mean=True),  # 'grpo' averaged over all tokens (no per-sequence mean)
    loss_variant(dr_grpo_count=True),    # 'dr_grpo' divided by the token count, not B * max_completion_length
])
def test_grpo_loss_wrong(wrong):
    assert fails("grpo_loss", wrong)


def test_grpo_loss_without_kl_term_fails():
    def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, beta=0.0, **kwargs):
        return loss_variant()(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, 0.0, **kwargs)
    assert fails("grpo_loss", grpo_loss)


def test_grpo_loss_unusual_correct_answer_passes():
    """Boolean indexing instead of torch.where, the clipped ratio written with min/max, float64 inside."""
    def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, beta=0.0, epsilon_low=0.2,
                  epsilon_high=0.2, loss_type="dapo", max_completion_length=None):
        rows = []
        for i in range(logprobs.shape[0]):
            m = completion_mask[i].bool()
            lp = logprobs[i][m].double()
            ratio = torch.exp(lp - old_logprobs[i][m].double())
            a = advantages[i].double()
            clipped = torch.minimum(torch.maximum(ratio, torch.tensor(1 - epsilon_low, dtype=torch.float64)),
                                    torch.tensor(1 + epsilon_high, dtype=torch.float64))
            loss = -torch.minimum(ratio * a, clipped * a)
            if beta:
                x = torch.exp(ref_logprobs[i][m].double() - lp)
                loss = loss + beta * (x - torch.log(x) - 1)
            rows.append(loss)
        if loss_type == "grpo":
            return torch.stack([r.mean() for r in rows]).mean().float()
        total = torch.cat(rows).sum()
        if loss_type == "dr_grpo":
            return (total / (len(rows) * max_completion_length)).float()
        return (total / sum(len(r) for r in rows)).float()
    assert passes("grpo_loss", grpo_loss) is None


# ---------------------------------------------------------------------------------------------- best_of_n

def best_variant(last_on_tie=False, no_filter=False, global_best=False, strict=False):
    def best_of_n(rewards, completions, group_size, min_reward=None):
        kept = []
        for p in range(len(rewards) // group_size):
            start = p * group_size
            group = list(range(start, start + group_size))
            if global_best:
                group = list(range(len(rewards)))
            key = (lambda j: (rewards[j], j)) if last_on_tie else (lambda j: (rewards[j], -j))
            best = max(group, key=key)
            if no_filter or min_reward is None or (rewards[best] > min_reward if strict else rewards[best] >= min_reward):
                kept.append((p, completions[best]))
        return kept
    return best_of_n


@pytest.mark.parametrize("wrong", [
    best_variant(last_on_tie=True),   # the last of the tied best
    best_variant(no_filter=True),     # min_reward ignored: all-wrong groups trained on
    best_variant(global_best=True),   # the best of the whole batch for every prompt
    best_variant(strict=True),        # best > min_reward: drops prompts whose best is exactly min_reward
])
def test_best_of_n_wrong(wrong):
    assert fails("best_of_n", wrong)


def test_best_of_n_unusual_correct_answer_passes():
    """Sorting each group by (-reward, index), returning lists instead of tuples."""
    def best_of_n(rewards, completions, group_size, min_reward=None):
        out = []
        for p in range(0, len(rewards), group_size):
            order = sorted(range(p, p + group_size), key=lambda j: (-rewards[j], j))
            if min_reward is None or not rewards[order[0]] < min_reward:
                out.append([p // group_size, completions[order[0]]])
        return out
    assert passes("best_of_n", best_of_n) is None
