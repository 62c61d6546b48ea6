"""GRPO, Group Relative Policy Optimization (chapter 14): PPO without a value network.

GRPO (Shao et al., 2024, DeepSeekMath) samples a *group* of ``G`` completions for every prompt and
uses the group itself as the baseline: a completion's advantage is how much better its reward is
than its siblings', in units of the group's standard deviation. No value head, no GAE.

One GRPO step, as Hugging Face TRL's ``GRPOTrainer`` runs it (``num_iterations=1``):

1. **Sample** ``G`` completions per prompt (:func:`sample_groups`), score each one with a reward
   function; here a verifiable one (:func:`~llama_from_scratch.arithmetic.arithmetic_reward`).
2. **Advantages** (:func:`group_advantages`): ``A_i = (r_i - mean(group)) / (std(group) + 1e-4)``,
   the same number for every token of completion ``i``.
3. **Loss** (:func:`grpo_loss`): PPO's clipped surrogate on the per-token ratio
   ``pi / pi_old`` plus ``beta`` times the "k3" estimate of ``KL(pi || pi_ref)`` (:func:`kl_k3`),
   averaged over tokens in one of TRL's ways (``loss_type``).

Conventions (as in :mod:`llama_from_scratch.ppo`): per-token tensors are ``[B, T]`` (completions,
completion positions) with a 0/1 ``mask``; the ``B = P * G`` completions are laid out group by
group (prompt 0's ``G`` completions, then prompt 1's, ...: TRL's ``repeat_interleave`` layout);
arithmetic runs in at least float32. The tests compare every formula with TRL's own
``GRPOTrainer`` methods on the same tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llama_from_scratch.generation import generate
from llama_from_scratch.ppo import _bool_mask, _check_float, _upcast, logprobs_from_logits

__all__ = [
    "ADVANTAGE_EPS",
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "group_advantages",
    "kl_k3",
    "grpo_loss",
    "per_token_logprobs",
    "completion_mask_from_eos",
    "sample_groups",
    "GRPOConfig",
    "grpo_step",
]

ADVANTAGE_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + 1e-4)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _sample_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample standard deviation along ``dim``: ``sqrt(mean((x - mean)^2) * n / (n - 1))``, in TRL's
    order of operations (``trl.trainer.utils.nanstd``), so the advantages agree bit for bit."""
    n = x.shape[dim]
    variance = ((x - x.mean(dim=dim, keepdim=True)) ** 2).mean(dim=dim)
    return torch.sqrt(variance * (n / (n - 1)))


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Group-normalised advantages ``[N]`` for rewards ``[N]`` laid out in groups of ``group_size``.

    ``A_i = (r_i - mean_g) / (std + 1e-4)`` where ``mean_g`` is the mean reward of ``i``'s group and
    ``std`` is, as TRL's ``scale_rewards`` option:

    * ``"group"`` (TRL's default, the GRPO paper): the standard deviation of ``i``'s group;
    * ``"batch"``: the standard deviation of all ``N`` rewards (more robust when groups are small);
    * ``"none"``: no division at all (Dr. GRPO: dividing by a small std over-weights easy or
      hopeless prompts, whose groups nearly agree).

    The standard deviation is the *sample* one (Bessel's ``n - 1``, ``torch.std``'s default, as
    TRL's ``nanstd``). A group whose rewards are all equal has advantage 0 for every member: it
    carries no signal about which completion is better. ``group_size`` must be at least 2 (the
    sample std of one number is undefined) and divide ``N``.
    """
    _check_float(rewards, "rewards")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline to compare with), got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"the number of rewards ({rewards.numel()}) must be a positive multiple of group_size "
                         f"({group_size})")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (no NaN or inf)")
    r = _upcast(rewards)
    grouped = r.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    advantages = r - mean
    if scale == "group":
        std = _sample_std(grouped, dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = _sample_std(r, dim=0).expand_as(r)
    else:
        return advantages
    return advantages / (std + ADVANTAGE_EPS)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)``: ``exp(ref - logp) - (ref - logp) - 1`` ("k3").

    Schulman's k3 estimator, evaluated on tokens sampled from ``pi``: with ``x = pi_ref / pi``,
    ``x - log x - 1`` is never negative (unlike the plain ``logp - ref``, "k1", used by PPO in
    chapter 13) and its expectation under ``pi`` is the KL. GRPO adds it to the loss rather than to
    the reward. Computed in at least float32.
    """
    _check_float(logprobs, "logprobs")
    _check_float(ref_logprobs, "ref_logprobs")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match")
    d = _upcast(ref_logprobs) - _upcast(logprobs)
    return torch.exp(d) - d - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss -> ``(loss, stats)``; TRL's ``GRPOTrainer._compute_loss`` for token-level ratios.

    Per completion token::

        ratio = exp(logprobs - old_logprobs)
        loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3_t

    then averaged over the valid tokens according to ``loss_type``:

    * ``"grpo"``: mean over each completion's tokens, then mean over completions (the paper; long
      completions get less weight per token, a length bias);
    * ``"bnpo"``: mean over all valid tokens of the batch;
    * ``"dr_grpo"``: sum over valid tokens divided by ``B * max_completion_length`` (a constant);
    * ``"dapo"`` (TRL's default): sum divided by ``num_items_in_batch``, the number of valid tokens
      in the whole generation batch (default: this batch's, which makes it equal to ``"bnpo"``).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``[B, T]`` the same under the policy that sampled them (detached). With one
            update per batch (TRL's ``num_iterations=1``) this is ``logprobs.detach()``: the ratio
            is then 1 and only its gradient matters.
        advantages: ``[B]`` (one per completion, from :func:`group_advantages`) or ``[B, T]``.
        mask: ``[B, T]``, 1 for completion tokens (up to and including EOS), 0 for padding.
        ref_logprobs: ``[B, T]`` under the frozen reference; needed when ``beta != 0``.
        beta: weight of the KL term (TRL's default 0.0; the DeepSeekMath paper used 0.04).
        epsilon, epsilon_high: the clipping range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``; DAPO raises it, "clip-higher").

    ``stats`` (detached): ``"kl"`` (token mean of k3, if ``beta != 0``), ``"clip_ratio"`` (fraction
    of valid tokens whose ratio was clipped where it matters: below ``1 - epsilon`` with ``A < 0``
    or above ``1 + epsilon_high`` with ``A > 0``), ``"ratio_mean"``.
    """
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        _check_float(t, name)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, completion_len], got {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}")
    m = _bool_mask(mask, logprobs, "logprobs")
    if advantages.shape == logprobs.shape[:1]:
        adv = _upcast(advantages).unsqueeze(1)
    elif advantages.shape == logprobs.shape:
        adv = _upcast(advantages)
    else:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}] or [B, T] = {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon}, {epsilon_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs (the reference model's log-probs)")
        _check_float(ref_logprobs, "ref_logprobs")
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs {tuple(ref_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1 (its constant normaliser)")
    eps_high = epsilon if epsilon_high is None else epsilon_high

    lp = _upcast(logprobs)
    ratio = torch.exp(lp - _upcast(old_logprobs).to(lp.dtype))
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if beta != 0.0:
        per_token_kl = kl_k3(lp, ref_logprobs.detach())
        per_token = per_token + beta * per_token_kl

    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    masked = torch.where(m, per_token, zero)  # masked entries never reach a sum, even if NaN
    counts = m.sum(-1).to(per_token.dtype)
    if loss_type == "grpo":
        loss = (masked.sum(-1) / counts.clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / counts.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.shape[0] * max_completion_length)
    else:  # dapo
        normaliser = counts.sum() if num_items_in_batch is None else torch.as_tensor(
            num_items_in_batch, dtype=per_token.dtype, device=per_token.device)
        loss = masked.sum() / normaliser.clamp(min=1.0)

    with torch.no_grad():
        n_valid = m.sum().clamp(min=1)
        region = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {
            "clip_ratio": (region & m).sum() / n_valid,
            "ratio_mean": torch.where(m, ratio, zero).sum() / n_valid,
        }
        if beta != 0.0:
            stats["kl"] = torch.where(m, per_token_kl, zero).sum() / n_valid
    return loss, stats


# --------------------------------------------------------------------------------------------
# Log-probabilities and sampling
# --------------------------------------------------------------------------------------------


def per_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    logits_to_keep: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs ``[B, logits_to_keep]`` (float32) of the last ``logits_to_keep`` tokens of each row.

    ``input_ids`` is prompt + completion (``[B, P + C]``) and ``logits_to_keep = C``; token ``t`` is
    scored by the logits at ``t - 1``, divided by ``temperature`` (the temperature the completions
    were sampled at, as TRL does, so the ratio compares the distributions that were sampled from).
    Padding positions get a meaningless value: mask them. Gradients flow unless called under
    ``torch.no_grad()``. ``model`` is a :class:`~llama_from_scratch.Llama` or a Hugging Face causal
    LM (anything accepting ``logits_to_keep`` and returning logits or an object with ``.logits``).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
    if not 1 <= logits_to_keep < input_ids.shape[1]:
        raise ValueError(f"logits_to_keep must lie in [1, {input_ids.shape[1] - 1}] (the prompt needs at least one "
                         f"token), got {logits_to_keep}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1)
    logits = out.logits if hasattr(out, "logits") else out
    logits = _upcast(logits[:, -(logits_to_keep + 1):-1]) / temperature
    return logprobs_from_logits(logits, input_ids[:, -logits_to_keep:])


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``[B, C]`` long mask: 1 up to and including each row's first EOS, 0 after it (TRL's convention)."""
    is_eos = (completion_ids == eos_token_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


@torch.no_grad()
def sample_groups(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> dict[str, torch.Tensor]:
    """``group_size`` sampled completions for each prompt (token-id lists), laid out group by group.

    Prompts are left-padded with EOS (masked) and each repeated ``group_size`` times, as TRL's
    ``RepeatSampler`` does. Returns ``prompt_ids``/``prompt_mask`` ``[B, P]`` and
    ``completion_ids``/``completion_mask`` ``[B, C]`` (``B = len(prompts) * group_size``;
    completions right-padded with EOS after their first EOS, masked).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, each with at least one token")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    rows, masks = [], []
    for p in prompts:
        pad = width - len(p)
        for _ in range(group_size):
            rows.append([eos_token_id] * pad + list(p))
            masks.append([0] * pad + [1] * len(p))
    prompt_ids = torch.tensor(rows, device=device)
    prompt_mask = torch.tensor(masks, device=device)
    sequences = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_token_id=eos_token_id, generator=generator, attention_mask=prompt_mask)
    completion_ids = sequences[:, width:]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask_from_eos(completion_ids, eos_token_id)}


# --------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """Settings of :func:`grpo_step` (TRL's names; defaults sized for SmolLM2-135M on a CPU).

    TRL's defaults differ where noted: ``beta`` 0.0 (we keep the paper's KL term, 0.04),
    ``group_size`` (TRL's ``num_generations``) 8, ``max_new_tokens`` (``max_completion_length``) 512,
    ``temperature`` 1.0, ``loss_type`` ``"dapo"``, ``scale_rewards`` ``"group"``.
    """

    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    max_grad_norm: float = 1.0


def grpo_step(
    policy: nn.Module,
    reference: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[Sequence[int]],
    reward_fn: Callable[[int, list[int]], float],
    config: GRPOConfig,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    scoring_context: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Any]:
    """One GRPO step on a batch of prompts: sample groups, score, normalise, one clipped update.

    Args:
        policy: the model being trained (its trainable parameters are in ``optimizer``).
        reference: the frozen reference model for the KL term (``None`` when ``config.beta == 0``).
            A LoRA policy can pass a view of itself with the adapters switched off.
        prompts: token-id lists, one per prompt.
        reward_fn: ``reward_fn(prompt_index, completion_token_ids) -> float`` (EOS and padding
            removed), e.g. decode and check the arithmetic answer.
        eos_token_id: ends a completion (and pads).
        scoring_context: optional context for the two log-prob forward passes (not generation),
            e.g. ``lambda: torch.autocast("cpu", dtype=torch.bfloat16)``; the loss stays float32.

    Returns a dict of floats: ``loss``, ``reward`` (mean over all completions), ``reward_std``,
    ``frac_zero_std`` (fraction of groups with no signal), ``kl``, ``clip_ratio``,
    ``completion_length`` (mean tokens), ``grad_norm``, ``seconds``, and ``rewards`` (the list).
    As TRL with ``num_iterations=1``, the batch is used for one gradient step, so
    ``old_logprobs = logprobs.detach()``.
    """
    if config.beta != 0.0 and reference is None:
        raise ValueError("config.beta != 0 needs a reference model")
    start = time.perf_counter()
    g = config.group_size
    batch = sample_groups(policy, prompts, g, config.max_new_tokens, eos_token_id,
                          temperature=config.temperature, generator=generator)
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    rewards = []
    for i in range(completion_ids.shape[0]):
        tokens = completion_ids[i][completion_mask[i].bool()].tolist()
        if tokens and tokens[-1] == eos_token_id:
            tokens = tokens[:-1]
        rewards.append(float(reward_fn(i // g, tokens)))
    rewards_t = torch.tensor(rewards)
    advantages = group_advantages(rewards_t, g, scale=config.scale_rewards).to(completion_ids.device)

    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    n = completion_ids.shape[1]
    context = scoring_context or nullcontext
    ref_logprobs = None
    if config.beta != 0.0:
        with torch.no_grad(), context():
            ref_logprobs = per_token_logprobs(reference, input_ids, attention_mask, n, config.temperature)
    policy.train()
    with context():
        logprobs = per_token_logprobs(policy, input_ids, attention_mask, n, config.temperature)
    loss, stats = grpo_loss(logprobs, logprobs.detach(), advantages, completion_mask, ref_logprobs=ref_logprobs,
                            beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                            loss_type=config.loss_type, max_completion_length=config.max_new_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if params else torch.tensor(0.0)
    optimizer.step()
    policy.eval()
    grouped = rewards_t.view(-1, g)
    return {
        "loss": float(loss.detach()),
        "reward": float(rewards_t.mean()),
        "reward_std": float(rewards_t.std()) if rewards_t.numel() > 1 else 0.0,
        "frac_zero_std": float((grouped.std(dim=1) == 0).float().mean()),
        "kl": float(stats.get("kl", torch.tensor(math.nan))),
        "clip_ratio": float(stats["clip_ratio"]),
        "completion_length": float(completion_mask.sum(1).float().mean()),
        "grad_norm": float(grad_norm),
        "seconds": time.perf_counter() - start,
        "rewards": rewards,
    }
