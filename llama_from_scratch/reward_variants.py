"""Reward-model variants (chapter 12): a ranking of K answers, a regressed score, and Llama 2's two
reward models combined into one.

Chapter 12's reward model learns from *pairs* with the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)`` (:func:`llama_from_scratch.reward.reward_loss`). Three
variants of what it learns from, and of how its scores are used:

* **A ranking of K answers** (InstructGPT, Ouyang et al. 2022, section 3.5 and equation 1): labelers
  ranked K = 4 to 9 answers to one prompt, which holds ``C(K, 2) = K (K - 1) / 2`` comparisons. The
  loss of one prompt is the pairwise loss averaged over all of them,
  ``-1 / C(K, 2) * sum_{i better than j} log sigmoid(r_i - r_j)``, and the C(K, 2) comparisons of a
  prompt stay together in one batch element (shuffled into the dataset as separate pairs, they made
  the reward model over-fit). :func:`ranking_loss`. ColossalChat trains on such comparisons with the
  same pairwise ``-log sigmoid`` loss (its ``LogSigLoss``).
* **A regressed score** (ChatLLaMA, nebuly-ai 2023): each (prompt, answer) carries a score, given by
  a person or by a language model acting as the judge, and the reward model regresses it with
  ``torch.nn.MSELoss()``. :func:`score_regression_loss`. It needs scores on one scale; pairs only
  need an order.
* **Two reward models, one reward** (Llama 2, Touvron et al. 2023): a helpfulness and a safety
  reward model (section 3.2.2), combined for PPO (section 3.2.3) by a switch: the safety score
  where the prompt is tagged as possibly unsafe or where the safety score is low, the helpfulness
  score elsewhere. :func:`llama2_combined_reward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_from_scratch.ppo import whiten as _whiten

__all__ = ["ranking_loss", "score_regression_loss", "llama2_combined_reward", "LLAMA2_SAFETY_THRESHOLD"]

# Llama 2, section 3.2.3: the safety score below which a response counts as unsafe (precision 0.89
# and recall 0.55 on Meta's safety test set, the paper says).
LLAMA2_SAFETY_THRESHOLD = 0.15


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def ranking_loss(rewards: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss over rankings: ``rewards [B, K]``, each row the rewards of one prompt's K
    answers **sorted best first** (answer ``i`` was ranked above every answer ``j > i``).

    For each row, the mean over its ``K (K - 1) / 2`` pairs ``i < j`` of ``-logsigmoid(r_i - r_j)``;
    then the mean over the ``B`` rows. InstructGPT normalises by the number of pairs,
    ``1 / C(K, 2)``, so a prompt weighs the same whatever its K, and the loss is the mean of the
    pairwise (Bradley-Terry) losses of all its pairs: with K = 2 it is chapter 12's
    ``reward_loss(rewards[:, 0], rewards[:, 1])``. Every row has the same K here, so the mean over
    rows of the per-row means equals the mean over all ``B * C(K, 2)`` pairs.

    Only the order of a row matters, not how far apart its ranks are. The arithmetic runs in at
    least float32; the loss comes back in the rewards' dtype. Raises ``ValueError`` unless
    ``rewards`` is ``[B, K]`` with ``B >= 1`` and ``K >= 2``.
    """
    _check_float(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [batch, K] (one row of K ranked answers per prompt), got "
                         f"{tuple(rewards.shape)}")
    batch, k = rewards.shape
    if batch == 0:
        raise ValueError("ranking_loss of an empty batch (0 prompts) is undefined")
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 answers (K >= 2), got K = {k}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    better, worse = torch.triu_indices(k, k, offset=1, device=r.device)   # all pairs i < j, C(K, 2) of them
    return (-F.logsigmoid(r[:, better] - r[:, worse]).mean()).to(rewards.dtype)


def score_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ChatLLaMA's reward loss: the mean squared error ``mean((predicted - target)^2)`` between the
    reward model's outputs and target scores (``torch.nn.MSELoss()`` with its default mean).

    Unlike the pairwise loss, the scale and the offset of the target matter: the model must learn
    the scores themselves, not only their order, so every score must come on one scale (ChatLLaMA
    had a language model grade each answer). Both tensors have the same shape, any shape; the
    arithmetic runs in at least float32 and the loss comes back in ``predicted``'s dtype.
    """
    _check_float(predicted, "predicted")
    _check_float(target, "target")
    if predicted.shape != target.shape:
        raise ValueError(f"predicted and target must have the same shape (one target score per reward), got "
                         f"{tuple(predicted.shape)} and {tuple(target.shape)}")
    if predicted.numel() == 0:
        raise ValueError("score_regression_loss of an empty batch is undefined")
    dtype = torch.promote_types(predicted.dtype, torch.float32)
    return ((predicted.to(dtype) - target.to(dtype)) ** 2).mean().to(predicted.dtype)


def llama2_combined_reward(
    helpfulness: torch.Tensor,
    safety: torch.Tensor,
    is_unsafe_prompt: torch.Tensor,
    threshold: float = LLAMA2_SAFETY_THRESHOLD,
    whiten: bool = False,
) -> torch.Tensor:
    """Llama 2's reward for PPO from its two reward models (Touvron et al. 2023, section 3.2.3).

    The paper writes, for a generation ``g`` to a prompt ``p``, with ``R_s`` and ``R_h`` the safety
    and the helpfulness reward models' scores as probabilities (the sigmoid of their linear output):

        R_c(g | p) = R_s(g | p)   if is_safety(p) or R_s(g | p) < 0.15
                     R_h(g | p)   otherwise
        R~_c(g | p) = whiten(logit(R_c(g | p)))

    ``is_safety(p)``: the prompt was tagged as one that might elicit an unsafe response. The
    threshold 0.15 catches unsafe responses to prompts *not* so tagged. ``logit`` undoes the sigmoid:
    PPO gets the linear score of whichever model was picked, whitened.

    Args:
        helpfulness, safety: ``[B]`` float tensors, the two reward models' **linear** outputs (what
            :class:`~llama_from_scratch.reward.RewardModel` returns), for the same ``B`` responses.
        is_unsafe_prompt: ``[B]`` bool tensor, ``is_safety(p)`` of each response's prompt.
        threshold: in (0, 1), compared with ``sigmoid(safety)``; strictly below it selects the safety
            score (a tie selects helpfulness, as ``<`` does in the paper).
        whiten: if True, whiten over the batch, ``(x - mean) * rsqrt(var + 1e-8)`` with the unbiased
            variance (:func:`llama_from_scratch.ppo.whiten`, TRL's formula): the paper does not say
            how it whitens, so this is our choice; it needs ``B >= 2``. False (the default) returns
            ``logit(R_c)`` itself.

    Returns ``[B]`` in the scores' (promoted) dtype. ``logit(sigmoid(x)) = x``, so ``logit(R_c)`` is
    computed as the selected linear score itself rather than through a probability: in float32,
    ``sigmoid(20.0)`` rounds to 1.0 and its logit would be ``inf``. That is the one place where this
    differs from the paper's notation, in rounding only.
    """
    _check_float(helpfulness, "helpfulness")
    _check_float(safety, "safety")
    if helpfulness.dim() != 1 or helpfulness.shape != safety.shape:
        raise ValueError(f"helpfulness and safety must be [B] scores of the same responses, got "
                         f"{tuple(helpfulness.shape)} and {tuple(safety.shape)}")
    if not isinstance(is_unsafe_prompt, torch.Tensor) or is_unsafe_prompt.dtype != torch.bool:
        raise TypeError("is_unsafe_prompt must be a bool tensor (is_safety(p) of each response's prompt)")
    if is_unsafe_prompt.shape != helpfulness.shape:
        raise ValueError(f"is_unsafe_prompt must be [B] = {tuple(helpfulness.shape)}, got "
                         f"{tuple(is_unsafe_prompt.shape)}")
    if helpfulness.numel() == 0:
        raise ValueError("llama2_combined_reward of an empty batch is undefined")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold is compared with a probability, sigmoid(safety): it must lie in (0, 1), "
                         f"got {threshold}")
    dtype = torch.promote_types(helpfulness.dtype, safety.dtype)
    compute = torch.promote_types(dtype, torch.float32)
    s, h = safety.to(compute), helpfulness.to(compute)
    use_safety = is_unsafe_prompt | (torch.sigmoid(s) < threshold)
    combined = torch.where(use_safety, s, h)                # = logit(R_c), exactly
    if whiten:
        if combined.numel() < 2:
            raise ValueError("whitening needs at least 2 responses (a variance)")
        combined = _whiten(combined, torch.ones_like(use_safety))
    return combined.to(dtype)
