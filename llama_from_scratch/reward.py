"""Reward modeling (chapter 12): a Llama that outputs one number per sequence, trained on
human preferences.

Preference data comes in pairs: for one prompt, a *chosen* and a *rejected* response. The
Bradley-Terry model says the probability that a person prefers ``chosen`` is
``sigmoid(r(chosen) - r(rejected))`` for some scalar score ``r``; maximising the likelihood of the
observed preferences gives the reward loss

    loss = -log sigmoid(r_chosen - r_rejected - margin)

(InstructGPT; the Llama 2 paper adds a ``margin`` that grows with how strongly the annotator
preferred ``chosen``; Hugging Face TRL's ``RewardTrainer`` computes exactly this).

The reward model itself is the language model's transformer trunk (``Llama.model``, which outputs
hidden states ``[B, T, dim]``) with the vocabulary head replaced by a ``dim -> 1`` linear layer,
read at the **last real token** of each sequence: with causal attention only that position has seen
the whole text. Layer and key names follow Hugging Face ``LlamaForSequenceClassification``
(``model.*`` and ``score.weight``, no bias), so a state dict moves between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_from_scratch.model import Llama, LlamaBackbone

__all__ = ["reward_loss", "pairwise_accuracy", "last_token_index", "RewardModel"]


def _check_pair(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
    for name, t in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must have the same shape (one pair per entry), got "
            f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    if chosen_rewards.numel() == 0:
        raise ValueError("reward_loss of an empty batch (0 pairs) is undefined")


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The Bradley-Terry pairwise loss ``-logsigmoid(chosen - rejected - margin).mean()``.

    Args:
        chosen_rewards: rewards of the preferred responses, any shape (usually ``[B]``).
        rejected_rewards: rewards of the other responses, the same shape.
        margin: ``None`` (0), a number, or a tensor broadcastable to the rewards' shape: the
            chosen reward must beat the rejected one by at least this much before the loss stops
            pushing (Llama 2 uses a larger margin for "significantly better" pairs).

    ``logsigmoid`` is used rather than ``log(sigmoid(.))``: for a large negative difference the
    sigmoid underflows to 0 and its log would be ``-inf``; ``logsigmoid`` stays exact. The
    arithmetic runs in at least float32; the loss comes back in the rewards' dtype.
    """
    _check_pair(chosen_rewards, rejected_rewards)
    compute_dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)  # bf16 -> float32
    diff = chosen_rewards.to(compute_dtype) - rejected_rewards.to(compute_dtype)
    if margin is not None:
        margin_t = torch.as_tensor(margin, device=diff.device)
        try:
            broadcast = torch.broadcast_shapes(margin_t.shape, diff.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != diff.shape:  # also refuses a margin that would enlarge the batch
            raise ValueError(
                f"margin of shape {tuple(margin_t.shape)} does not broadcast to the rewards' shape "
                f"{tuple(diff.shape)}"
            )
        diff = diff - margin_t.to(diff.dtype)
    return (-F.logsigmoid(diff).mean()).to(chosen_rewards.dtype)


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs the reward model ranks correctly (``chosen > rejected``; a tie counts as wrong)."""
    _check_pair(chosen_rewards, rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean().item()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) position of each row of a ``[B, T]`` mask -> ``[B]`` (long).

    Works for left padding (``0 0 1 1 1`` -> 4), right padding (``1 1 1 0 0`` -> 2) and no
    padding. Raises ``ValueError`` for a row without any real token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len], got {tuple(attention_mask.shape)}")
    valid = attention_mask != 0
    empty = ~valid.any(dim=1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} of attention_mask have no real token")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # The largest position among the valid ones (padding gets -1 so it never wins).
    return torch.where(valid, positions, -1).amax(dim=1)


class RewardModel(nn.Module):
    """A Llama trunk plus a scalar head: ``forward(input_ids, attention_mask) -> rewards [B]``.

    Args:
        backbone: a :class:`Llama` (its language-model head is dropped; its embedding is kept,
            also when it was tied to that head) or a :class:`LlamaBackbone` (``Llama.model``).
            The module is used as is, not copied: build the reward model from a copy if the
            language model must stay untouched.
        trainable_layers: ``None`` trains everything. An integer ``k`` freezes the embedding and
            all but the last ``k`` transformer blocks; the head stays trainable, and so does the
            final RMSNorm when ``k > 0`` (it sits on top of the last block). ``k = 0`` is a linear
            probe: only the head learns.

    The head is ``score = nn.Linear(dim, 1, bias=False)``, as in Hugging Face
    ``LlamaForSequenceClassification``: a bias would add the same constant to the chosen and the
    rejected reward and cancel in the loss, so it could never learn anything. It starts as
    ``normal(0, 0.02)``, Hugging Face's initialization.
    """

    def __init__(self, backbone: Llama | LlamaBackbone, trainable_layers: int | None = None) -> None:
        super().__init__()
        if isinstance(backbone, Llama):
            backbone = backbone.model
        if not isinstance(backbone, LlamaBackbone):
            raise TypeError(
                f"backbone must be a Llama or a LlamaBackbone (Llama.model), got {type(backbone).__name__}"
            )
        self.config = backbone.config
        self.model = backbone
        weight = backbone.embed_tokens.weight
        self.score = nn.Linear(self.config.dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        if trainable_layers is not None:
            self.freeze(trainable_layers)

    def freeze(self, trainable_layers: int) -> None:
        """Freezes all but the last ``trainable_layers`` blocks (see the class docstring)."""
        n_layers = len(self.model.layers)
        if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= n_layers:
            raise ValueError(f"trainable_layers must be an int in [0, {n_layers}], got {trainable_layers!r}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self.model.layers[n_layers - trainable_layers:]:
            layer.requires_grad_(True)
        if trainable_layers > 0:
            self.model.norm.requires_grad_(True)
        self.score.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per sequence, ``[B]``, read at each row's last real token.

        ``attention_mask`` is ``[B, T]`` with 1 for tokens and 0 for padding, on either side
        (``None``: no padding). The trunk counts RoPE positions over real tokens only, so a padded
        row gets the reward it would get alone.
        """
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        hidden = self.model(input_ids, attention_mask=attention_mask)  # [B, T, dim]
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            last = last_token_index(attention_mask)
        batch = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[batch, last]).squeeze(-1)
