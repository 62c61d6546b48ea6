"""Checks for the exercises of chapter 14 (rejection sampling and GRPO).

The references run in the grader's process, on the same inputs as the student's code:

- ``group_advantages``: TRL's ``GRPOTrainer._generate_and_score_completions`` itself, on a trainer
  built with ``object.__new__`` whose generation and reward functions return the drawn rewards
  (``scale_rewards`` ``"group"``, ``"batch"``, ``"none"``);
- ``grpo_loss``: TRL's ``GRPOTrainer._compute_loss`` itself, the model call replaced by the drawn
  log-probs (loss types ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``; ``beta`` 0 or not; asymmetric
  clipping), value and gradient with respect to the log-probs;
- ``best_of_n``: TRL 1.x ships no best-of-N sampler, so the reference is a plain loop of the rule
  (the highest reward per group, the first one on ties, groups below ``min_reward`` dropped).

Sizes, rewards, log-probs and hyper-parameters are drawn fresh at every grading run. Failure
messages say what differed, never the expected values.
"""

from __future__ import annotations

import random
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any, Callable

import torch

from llama_from_scratch.course.checks.common import (as_scalar_loss, assert_close, assert_equal, call_answer,
                                                      fresh_generator, fresh_rng, value_and_grad)

FORBIDDEN = {
    "group_advantages": ["trl"],
    "grpo_loss": ["trl"],
    "best_of_n": ["trl"],
}


class _OneProcess:
    """The parts of accelerate's ``Accelerator`` the GRPO methods call, for one process."""

    device = torch.device("cpu")
    process_index = 0
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return nullcontext()


def _trainer(**attributes: Any):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    defaults = dict(accelerator=_OneProcess(), state=SimpleNamespace(global_step=0),
                    _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                    model=SimpleNamespace(training=True, is_gradient_checkpointing=False))
    defaults.update(attributes)
    for name, value in defaults.items():
        setattr(trainer, name, value)
    return trainer


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """``GRPOTrainer._generate_and_score_completions`` on fixed completions and these rewards -> advantages."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    n = rewards.numel()
    generated = ([[5, 6]] * n, [[7, 8, 2]] * n, None, ["c"] * n, None, {}, None, None)
    trainer = _trainer(
        environment_factories=None, tools=None, environments=None, _generate=lambda prompts: generated,
        _calculate_rewards=lambda inputs, prompts, completions, ids: rewards.view(-1, 1).clone(),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=n, steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None, report_to=[]),
        num_iterations=1, use_vllm=False, beta=0.0, num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards,
        reward_weights=torch.ones(1), reward_func_names=["check"],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list), "images": []},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False)
    inputs = [{"prompt": f"p{i // num_generations}"} for i in range(n)]
    return GRPOTrainer._generate_and_score_completions(trainer, inputs)["advantages"]


def trl_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             advantages: torch.Tensor, mask: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float,
             loss_type: str, max_completion_length: int) -> torch.Tensor:
    """``GRPOTrainer._compute_loss`` with the model call returning ``logprobs`` -> the loss."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logprobs.shape
    trainer = _trainer(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, report_to=[], steps_per_generation=1))
    inputs = {"prompt_ids": torch.ones(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old_logprobs, "num_items_in_batch": mask.sum(),
              "ref_per_token_logps": ref_logprobs}
    return GRPOTrainer._compute_loss(trainer, None, inputs)


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


def _rewards(rng: random.Random, g: torch.Generator, n: int) -> torch.Tensor:
    kind = rng.choice(["binary", "binary", "gaussian", "ties"])
    if kind == "binary":  # verifiable rewards: many groups all right or all wrong
        return torch.randint(0, 2, (n,), generator=g).float()
    if kind == "ties":
        return torch.randint(0, 3, (n,), generator=g).float() * 0.5
    return torch.randn(n, generator=g) * rng.choice([0.1, 1.0, 5.0]) + rng.uniform(-2, 2)


def _advantage_atol(rewards: torch.Tensor, group_size: int, scale: str) -> float:
    """How far a correct answer may be from TRL's float32 advantages: float32 rounds ``r - mean`` by
    about 1e-7 of the rewards' size, and the division by ``std + 1e-4`` magnifies that when a group's
    rewards are nearly equal (a float64 answer then differs from TRL by more than 1e-6). A group of
    exactly equal rewards has advantage exactly 0 and does not loosen anything."""
    r = rewards.double()
    size = float(r.abs().max()) + 1.0
    if scale == "none":
        return 1e-6 * size
    spread = r.view(-1, group_size).std(dim=1) if scale == "group" else r.std().reshape(1)
    spread = spread[spread > 0]
    if spread.numel() == 0:
        return 1e-6
    return max(1e-6, 1e-6 * size / float(spread.min() + 1e-4))


def check_group_advantages(fn: Callable) -> None:
    """``fn(rewards [N], group_size, scale="group") -> [N]`` equals TRL's advantages on the same rewards."""
    rng, g = fresh_rng(), fresh_generator()
    hint = ("A_i = (r_i - mean of i's group) / (std + 1e-4); groups are consecutive runs of group_size rewards; "
            "std: the sample standard deviation (n - 1) of i's group for scale='group', of the whole batch for "
            "'batch'; no division for 'none'")
    cases = [("group", 2, 3), ("group", 4, 5), ("batch", 4, 3), ("none", 3, 4)]
    cases += [(rng.choice(["group", "group", "batch", "none"]), rng.randrange(2, 9), rng.randrange(1, 7))
              for _ in range(6)]
    for trial, (scale, group_size, prompts) in enumerate(cases):
        rewards = _rewards(rng, g, group_size * prompts)
        if trial == 0:  # a group where every completion is right, one where all are wrong
            rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
        expected = trl_advantages(rewards.clone(), group_size, scale)
        desc = f"group_advantages on {prompts} groups of {group_size} rewards, scale={scale!r}"
        got = (call_answer(fn, desc, rewards.clone(), group_size) if scale == "group" and trial % 2 == 0
               else call_answer(fn, desc, rewards.clone(), group_size, scale))
        assert_close(got, expected, desc, rtol=1e-6, atol=_advantage_atol(rewards, group_size, scale), hint=hint)


# --------------------------------------------------------------------------------------------
# grpo_loss
# --------------------------------------------------------------------------------------------


def _loss_batch(rng: random.Random, g: torch.Generator):
    b, t = rng.randrange(2, 7), rng.randrange(2, 9)
    old = -2 + torch.randn(b, t, generator=g)
    logprobs = old + rng.choice([0.2, 0.4]) * torch.randn(b, t, generator=g)
    ref = old + 0.5 * torch.randn(b, t, generator=g)
    advantages = torch.randn(b, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    # Two different lengths in every batch: with equal lengths the per-completion mean ('grpo') and
    # the mean over all tokens agree, and a loss that confuses them would pass.
    lengths[0], lengths[-1] = t, int(torch.randint(1, t, (), generator=g))
    mask = (torch.arange(t) < lengths[:, None]).long()
    junk = 10 * torch.randn(b, t, generator=g)  # what a padded position holds is meaningless (finite)
    logprobs, old, ref = (torch.where(mask.bool(), x, junk) for x in (logprobs, old, ref))
    return logprobs, old, ref, advantages, mask


def check_grpo_loss(fn: Callable) -> None:
    """``fn(logprobs, old_logprobs, ref_logprobs, advantages, completion_mask, beta=0.0, epsilon_low=0.2,
    epsilon_high=0.2, loss_type="dapo", max_completion_length=None) -> scalar`` equals TRL's
    ``GRPOTrainer._compute_loss``, value and gradient with respect to ``logprobs``."""
    rng, g = fresh_rng(), fresh_generator()
    hint = ("ratio = exp(logprobs - old_logprobs); per token -min(ratio * A, clamp(ratio, 1 - epsilon_low, "
            "1 + epsilon_high) * A) + beta * (exp(ref - logprobs) - (ref - logprobs) - 1); then 'grpo': mean over "
            "each completion's tokens, then over completions; 'bnpo'/'dapo': sum over all valid tokens / their "
            "number; 'dr_grpo': sum / (B * max_completion_length); padding positions hold junk")
    cases = [("dapo", 0.0, 0.2), ("grpo", 0.04, 0.2), ("bnpo", 0.1, 0.28), ("dr_grpo", 0.04, 0.2)]
    cases += [(rng.choice(["grpo", "bnpo", "dr_grpo", "dapo"]), rng.choice([0.0, 0.04, 0.5]), rng.choice([0.2, 0.28]))
              for _ in range(4)]
    for trial, (loss_type, beta, epsilon_high) in enumerate(cases):
        logprobs, old, ref, advantages, mask = _loss_batch(rng, g)
        max_len = logprobs.shape[1] + rng.randrange(0, 4)
        leaf = logprobs.clone().requires_grad_(True)
        expected = trl_loss(leaf, old, ref, advantages, mask, beta, 0.2, epsilon_high, loss_type, max_len)
        (expected_grad,) = torch.autograd.grad(expected, leaf)
        desc = (f"grpo_loss(loss_type={loss_type!r}, beta={beta}, epsilon_high={epsilon_high}) on {mask.shape[0]} "
                f"completions of lengths {mask.sum(1).tolist()} (padded to {mask.shape[1]})")
        mask_arg = mask.to(rng.choice([torch.long, torch.bool, torch.int32]))
        args = (logprobs.clone().requires_grad_(True), old.clone(), ref.clone(), advantages.clone(), mask_arg)
        kwargs = dict(beta=beta, epsilon_low=0.2, epsilon_high=epsilon_high, loss_type=loss_type,
                      max_completion_length=max_len)
        if trial == 0:
            kwargs = {}  # the defaults: dapo, no KL, epsilon 0.2 both sides
        value, grads, _ = value_and_grad(fn, *args, **kwargs)
        value = as_scalar_loss(value, desc)
        assert_close(value, expected.detach(), desc, rtol=1e-5, atol=1e-6, hint=hint)
        grad = grads[0] if grads and grads[0] is not None else torch.zeros_like(logprobs)
        assert_close(grad, expected_grad, desc + ": gradient with respect to logprobs", rtol=1e-5, atol=1e-7,
                     hint=hint + "; old_logprobs and ref_logprobs are constants")


# --------------------------------------------------------------------------------------------
# best_of_n
# --------------------------------------------------------------------------------------------


def _best_reference(rewards: list[float], completions: list, n: int, min_reward) -> list:
    kept = []
    for p, start in enumerate(range(0, len(rewards), n)):
        best = start
        for j in range(start, start + n):
            if rewards[j] > rewards[best]:
                best = j
        if min_reward is None or rewards[best] >= min_reward:
            kept.append((p, completions[best]))
    return kept


def check_best_of_n(fn: Callable) -> None:
    """``fn(rewards [P * N] list of floats, completions (list of P * N strings), group_size, min_reward=None)
    -> [(prompt_index, best_completion), ...]``: the best of each group, first on ties, groups whose
    best reward is below ``min_reward`` dropped."""
    rng = fresh_rng()
    hint = ("for prompt p the candidates are completions p*N .. p*N + N - 1; keep the one with the highest reward "
            "(the first of them on a tie); with min_reward, drop prompts whose best reward is below it; return a "
            "list of (p, completion) tuples in prompt order")
    for trial in range(8):
        n, p = rng.randrange(1, 7), rng.randrange(1, 6)
        if trial == 0:
            n, p = 4, 3
        min_reward = [None, 1.0, None, 0.5][trial % 4]
        if min_reward is not None:
            p = max(p, 2)
        if trial < 4 or rng.random() < 0.5:  # verifiable rewards: ties everywhere
            rewards = [float(rng.random() < 0.3) for _ in range(n * p)]
        else:
            rewards = [round(rng.gauss(0, 1), 3) for _ in range(n * p)]
        if min_reward is not None:  # always one prompt to drop and one whose best is exactly 1.0 to keep
            rewards[:n] = [0.0] * n
            rewards[n] = 1.0
        completions = [f"answer {i} {rng.randrange(1000)}" for i in range(n * p)]
        desc = f"best_of_n on {p} prompts x {n} samples, min_reward={min_reward}"
        expected = _best_reference(rewards, completions, n, min_reward)
        if min_reward is None and trial % 2 == 0:
            got = call_answer(fn, desc, list(rewards), list(completions), n)
        else:
            got = call_answer(fn, desc, list(rewards), list(completions), n, min_reward)
        if isinstance(got, list):
            got = [tuple(x) if isinstance(x, (list, tuple)) else x for x in got]
        assert_equal(got, expected, desc, hint=hint)


CHECKS = {
    "group_advantages": check_group_advantages,
    "grpo_loss": check_grpo_loss,
    "best_of_n": check_best_of_n,
}
