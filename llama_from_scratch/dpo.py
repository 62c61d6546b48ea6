"""Direct Preference Optimization (chapter 13): learning from preferences without a reward model
or reinforcement learning.

DPO (Rafailov et al., 2023) notices that the KL-regularised RLHF objective has a closed-form optimal
policy, ``pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)``. Turned around, any policy defines an
*implicit reward* ``r(x, y) = beta * log(pi(y|x) / pi_ref(y|x))`` (up to a term that depends on
the prompt only, and cancels between two responses to the same prompt). Putting that reward into
the Bradley-Terry loss of chapter 12 gives a loss on the policy directly:

    h    = (log pi(y_c) - log pi(y_r)) - (log pi_ref(y_c) - log pi_ref(y_r))
    loss = -log sigmoid(beta * h)

The sequence log-probabilities are sums over completion tokens
(:func:`~llama_from_scratch.ppo.sequence_logprobs`). At the start, policy = reference, so
``h = 0`` and the loss is ``log 2``. This is the "sigmoid" loss of Hugging Face TRL's
``DPOTrainer`` with ``beta = 0.1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_from_scratch.ppo import sequence_logprobs

__all__ = ["dpo_loss"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO sigmoid loss -> ``(loss, chosen_rewards, rejected_rewards)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs under the
            policy being trained (gradients flow through these).
        ref_chosen_logps, ref_rejected_logps: ``[B]``, the same under the frozen reference model
            (treated as constants: detached).
        beta: strength of the implicit KL constraint; smaller lets the policy move further.

    Returns:
        ``loss``: ``mean(-logsigmoid(beta * h))`` over the batch (a scalar);
        ``chosen_rewards``, ``rejected_rewards``: ``[B]`` implicit rewards
        ``beta * (policy_logps - ref_logps)``, detached, for monitoring (their difference's sign
        gives the preference accuracy, their gap the "reward margin").

    Computed in at least float32; the loss comes back in the policy log-probs' dtype, the
    rewards in the float32 (float64) they were computed in.
    """
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("the four log-prob tensors must have the same shape, got " +
                         ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    if policy_chosen_logps.numel() == 0:
        raise ValueError("dpo_loss of an empty batch (0 pairs) is undefined")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)  # bf16 -> float32
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)

    h = (pc - pr) - (rc - rr)  # how much more the policy prefers chosen than the reference does
    loss = -F.logsigmoid(beta * h).mean()
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return loss.to(policy_chosen_logps.dtype), chosen_rewards, rejected_rewards
