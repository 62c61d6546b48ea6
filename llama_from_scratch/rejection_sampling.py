"""Rejection-sampling fine-tuning (chapter 14): best-of-N samples, then supervised fine-tuning on the best.

Llama 2-Chat (Touvron et al., 2023, section 3.2.3) alternated PPO with *rejection sampling*: for
each prompt, sample ``N`` answers from the current model, score them with the reward model, keep
the best one, and fine-tune on the kept answers with the ordinary SFT loss (chapter 9). It is the
simplest way to turn a reward into training signal, and the baseline that PPO, DPO and GRPO are
measured against: it uses the same samples and the same reward, but only the best of each group,
and no negative signal from the others.

With a *verifiable* reward (1 if correct, 0 if not) "the best" is any correct answer, and a prompt
whose ``N`` samples are all wrong contributes nothing (``min_reward`` drops it): this is also
STaR's / RFT's "keep the correct rationales" recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llama_from_scratch.ppo import _check_float
from llama_from_scratch.grpo import per_token_logprobs

__all__ = ["best_of_n", "select_best_completions", "completion_nll", "sft_batch"]


def best_of_n(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and reward of the best sample in each group -> ``(indices [P], best_rewards [P])``.

    ``rewards`` is ``[P * group_size]`` (groups laid out one after the other, as
    :func:`~llama_from_scratch.grpo.sample_groups` returns them) or ``[P, group_size]``. Indices are
    into the flat ``[P * group_size]`` layout. Ties go to the *first* sample with the highest
    reward (``torch.argmax``'s rule), so the choice is deterministic. ``group_size = 1`` is allowed
    (best of one: plain SFT on the model's own samples).
    """
    _check_float(rewards, "rewards")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards [P, N] has N = {rewards.shape[1]} but group_size = {group_size}")
        grouped = rewards
    elif rewards.dim() == 1:
        if rewards.numel() == 0 or rewards.numel() % group_size:
            raise ValueError(f"the number of rewards ({rewards.numel()}) must be a positive multiple of "
                             f"group_size ({group_size})")
        grouped = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [P * N] or [P, N], got shape {tuple(rewards.shape)}")
    if torch.isnan(grouped).any():
        raise ValueError("rewards contain NaN: the best of a group would be undefined")
    best = grouped.argmax(dim=1)
    offsets = torch.arange(grouped.shape[0], device=grouped.device) * group_size
    return offsets + best, grouped.gather(1, best.unsqueeze(1)).squeeze(1)


def select_best_completions(
    completions: Sequence[Sequence[int]],
    rewards: torch.Tensor,
    group_size: int,
    min_reward: float | None = None,
) -> list[tuple[int, list[int]]]:
    """The rejection-sampling dataset: ``(prompt_index, best_completion)`` for every kept prompt.

    ``completions[i]`` is the token list of sample ``i`` (same flat layout as ``rewards``). With
    ``min_reward``, a prompt is kept only if its best reward is ``>= min_reward`` (with a 0/1
    verifiable reward, ``min_reward=1`` keeps only prompts that got at least one correct answer).
    """
    if len(completions) != rewards.numel():
        raise ValueError(f"{len(completions)} completions but {rewards.numel()} rewards")
    indices, best = best_of_n(rewards, group_size)
    kept = []
    for p, (i, r) in enumerate(zip(indices.tolist(), best.tolist())):
        if min_reward is None or r >= min_reward:
            kept.append((p, list(completions[i])))
    return kept


def sft_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Prompt/completion token lists -> a right-padded batch ``input_ids``, ``attention_mask``,
    ``completion_mask`` (``[B, T]``, 1 on the completion tokens the loss is taken on)."""
    if not pairs:
        raise ValueError("need at least one (prompt, completion) pair")
    if any(len(p) == 0 or len(c) == 0 for p, c in pairs):
        raise ValueError("every prompt and every completion needs at least one token")
    width = max(len(p) + len(c) for p, c in pairs)
    ids, attn, comp = [], [], []
    for p, c in pairs:
        pad = width - len(p) - len(c)
        ids.append(list(p) + list(c) + [pad_token_id] * pad)
        attn.append([1] * (len(p) + len(c)) + [0] * pad)
        comp.append([0] * len(p) + [1] * len(c) + [0] * pad)
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "attention_mask": as_tensor(attn), "completion_mask": as_tensor(comp)}


def completion_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The SFT loss on the kept completions: mean negative log-likelihood over completion tokens.

    Prompt tokens and padding carry no loss (chapter 9's masking). ``batch`` is :func:`sft_batch`'s.
    """
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    logps = per_token_logprobs(model, input_ids, attention_mask, input_ids.shape[1] - 1)  # tokens 1..T-1
    mask = completion_mask[:, 1:].bool()
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask is set at position 0: the first token has no context")
    if not mask.any():
        raise ValueError("completion_mask selects no token")
    return -logps[mask].mean()
