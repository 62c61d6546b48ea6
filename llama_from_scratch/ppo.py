"""RLHF with PPO (chapter 13): the pieces of the PPO update for a language model.

One PPO iteration, as Hugging Face TRL's PPO trainer runs it:

1. **Rollout.** The policy writes a response to each prompt; we keep the per-token log-probs of
   the policy (``logprobs``) and of the frozen reference model (``ref_logprobs``), the value head's
   estimates (``values``) and the reward model's score of the whole response (``score``).
2. **Rewards.** :func:`kl_penalized_rewards`: every token is charged ``kl_coef * (logp - ref_logp)``
   for drifting from the reference, and the score is paid at the last token.
3. **Advantages.** :func:`compute_gae` (generalized advantage estimation) turns per-token rewards
   and values into advantages and value targets (returns); :func:`whiten` normalises the advantages.
4. **Update.** Several epochs of minibatch steps on ``pg_loss + vf_coef * vf_loss``:
   :func:`ppo_policy_loss` (the clipped surrogate) and :func:`ppo_value_loss` (clipped value loss).
5. **KL control.** :class:`AdaptiveKLController` nudges ``kl_coef`` so the measured KL tracks a target.

Conventions used throughout:

* Per-token tensors are ``[B, T]`` (batch, response positions) with a ``mask`` of the same shape,
  1 (or True) for real response tokens and 0 for padding or prompt. Masks may be bool, integer or
  float but must hold only 0 and 1. A row may be entirely masked (it then contributes nothing).
* Masked entries are selected with ``torch.where``, never multiplied by 0, so garbage (even NaN) in
  padding positions cannot leak into a mean.
* Arithmetic runs in at least float32 (bfloat16 inputs are upcast: a 4-epoch PPO update is built
  on ratios ``exp(logp - logp_old)`` close to 1, which bfloat16's 8-bit mantissa cannot resolve);
  elementwise results come back in the input's dtype, log-probs in float32.

Formulas and constants follow TRL (see docs/REFERENCES.md); the tests check each against an
independent implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_from_scratch.loss import log_softmax, logsumexp, softmax

__all__ = [
    "masked_mean",
    "masked_var",
    "whiten",
    "compute_gae",
    "kl_penalized_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "value_clipfrac",
    "AdaptiveKLController",
    "FixedKLController",
    "logprobs_from_logits",
    "entropy_from_logits",
    "sequence_logprobs",
]

WHITEN_EPS = 1e-8  # TRL's epsilon in rsqrt(var + eps)


# --------------------------------------------------------------------------------------------
# Input checks and masked statistics
# --------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (bf16/fp16 -> float32; float32 and float64 unchanged)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Checks that ``mask`` has ``like``'s shape and holds only 0/1; returns it as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(like.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must hold only 0 and 1 (or be boolean)")
    return mask != 0


def _masked_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to at least float32, with masked entries set to 0."""
    x = _upcast(x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match: {listing}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``masked_mean`` on an already-checked bool mask, in ``x``'s dtype (no casting)."""
    total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim)
    count = mask.sum(dim=dim)
    if dim is None:
        if count == 0:
            raise ValueError("mask selects no entry: the mean over nothing is undefined")
        return total / count
    return total / count.clamp(min=1)  # an all-masked row: 0 / 1 = 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries of ``x`` where ``mask`` is 1.

    ``dim=None`` averages over every valid entry of the tensor (a batch-level "token mean", as TRL
    does) and raises ``ValueError`` if there is none. With ``dim``, each slice is averaged on its
    own and a slice without valid entries gives 0 (not NaN). Computed in at least float32,
    returned in ``x``'s dtype.
    """
    _check_float(x, "x")
    m = _bool_mask(mask, x)
    return _masked_mean(_upcast(x), m, dim).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of ``x`` (over the whole tensor).

    ``mean((x - mean)^2)`` over valid entries, times the Bessel correction ``n / (n - 1)`` when
    ``unbiased`` (TRL's ``masked_var``). Raises ``ValueError`` with fewer than 2 valid entries
    (fewer than 1 when not ``unbiased``): the unbiased variance of one number divides by zero.
    """
    _check_float(x, "x")
    m = _bool_mask(mask, x)
    xc = _upcast(x)
    n = int(m.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, the mask has {n}")
    mean = _masked_mean(xc, m)
    var = _masked_mean((xc - mean) ** 2, m)
    if unbiased:
        var = var * (n / (n - 1))
    return var.to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalises ``x`` to mean 0 and variance 1 over its valid entries: ``(x - mean) * rsqrt(var + 1e-8)``.

    ``mean`` and (unbiased) ``var`` come from the valid entries only; the affine map is then
    applied to every entry, as TRL's ``masked_whiten`` does (masked entries are transformed too and
    stay meaningless). ``shift_mean=False`` adds the mean back, rescaling without centring: TRL's
    option for whitening *rewards*, whose sign carries meaning; advantages use the default.
    Needs at least 2 valid entries.
    """
    _check_float(x, "x")
    m = _bool_mask(mask, x)
    xc = _upcast(x)
    mean = masked_mean(xc, m)
    var = masked_var(xc, m, unbiased=True)
    out = (xc - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out.to(x.dtype)


def _check_finite_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> None:
    bad = ~torch.isfinite(advantages) & mask
    if bad.any():
        rows = bad.any(dim=-1).nonzero().flatten().tolist() if bad.dim() > 1 else []
        raise ValueError(
            f"NaN in advantages (or inf): {int(bad.sum())} non-finite values at valid positions"
            f"{f' in rows {rows[:10]}' if rows else ''}; check the rewards, values and log-probs that produced them"
        )


# --------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a bool ``[B, T]`` mask, the last True position, or -1 for a row with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=-1)


def kl_penalized_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token PPO rewards ``[B, T]``: a KL penalty on every token, the score on the last one.

    ``r_t = -kl_coef * (logprobs_t - ref_logprobs_t)`` at valid positions (the "k1" estimate of
    ``KL(policy || reference)``, whose expectation over the policy's own samples is the KL), plus
    ``score[b]`` at the last valid position of row ``b``. Masked positions get 0; a row with no
    valid position gets no score at all (there is no token to pay it to).

    Args:
        score: ``[B]``, the reward model's score of each whole response.
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy and
            the reference model.
        mask: ``[B, T]``, 1 for response tokens.
        kl_coef: the penalty weight (TRL's default is 0.05; see :class:`AdaptiveKLController`).
    """
    for name, t in (("score", score), ("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        _check_float(t, name)
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq_len], got {tuple(logprobs.shape)}")
    if score.shape != logprobs.shape[:1]:
        raise ValueError(f"score must be [batch] = [{logprobs.shape[0]}], got {tuple(score.shape)}")
    m = _bool_mask(mask, logprobs, "logprobs")
    lp, ref = _upcast(logprobs), _upcast(ref_logprobs)
    rewards = torch.where(m, -kl_coef * (lp - ref), torch.zeros((), dtype=lp.dtype, device=lp.device))
    last = _last_valid_index(m)
    rows = (last >= 0).nonzero().flatten()
    rewards = rewards.index_put((rows, last[rows]), _upcast(score)[rows].to(rewards.dtype), accumulate=True)
    return rewards.to(logprobs.dtype)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation -> ``(advantages, returns)``, both ``[B, T]``.

    Walking backwards from the end of the response::

        delta_t = r_t + gamma * V_{t+1} - V_t        # one-step TD error
        A_t     = delta_t + gamma * lam * A_{t+1}    # exponentially weighted sum of TD errors

    with ``V = 0`` after the last valid token (the episode ends there) and ``A = 0`` beyond the end.
    ``returns = advantages + values`` are the value head's regression targets. ``lam = 1`` gives
    the Monte-Carlo return minus ``V``; ``lam = 0`` the one-step TD error.

    Rewards and values at masked positions are treated as 0 and masked positions get advantage 0
    (and return 0). For the usual mask (prompt or left padding masked, then the response, then right
    padding) this is exactly the recursion above on each row's response. On valid positions the
    result equals the loop in TRL's PPO trainer, which also zeroes masked values and rewards first.

    Raises ``ValueError`` if an advantage at a valid position is NaN or infinite.
    """
    _check_float(rewards, "rewards")
    _check_float(values, "values")
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [batch, seq_len], got {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    m = _bool_mask(mask, rewards, "rewards")
    zero = torch.zeros((), dtype=_upcast(rewards).dtype, device=rewards.device)
    r = torch.where(m, _upcast(rewards), zero)
    v = torch.where(m, _upcast(values).to(r.dtype), zero)

    seq_len = r.shape[1]
    advantages = torch.zeros_like(r)
    next_advantage = torch.zeros_like(r[:, 0])  # A_{t+1}; 0 past the end
    for t in reversed(range(seq_len)):
        next_value = v[:, t + 1] if t + 1 < seq_len else torch.zeros_like(v[:, t])  # V_{t+1}
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = torch.where(m, advantages, zero)
    _check_finite_advantages(advantages, m)
    returns = advantages + v
    return advantages.to(rewards.dtype), returns.to(rewards.dtype)


# --------------------------------------------------------------------------------------------
# The PPO losses
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss -> ``(loss, stats)``.

    ``ratio = exp(logprobs - old_logprobs)`` measures how much more (or less) likely the current
    policy makes each sampled token than the policy that sampled it. The loss is

        masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range)))

    Taking the max of the two (the *pessimistic* one) removes any incentive to push the ratio
    beyond ``1 ± clip_range`` in the direction the advantage favours: there the clipped term wins
    and its gradient is 0.

    ``stats`` (detached float tensors, TRL's definitions):

    * ``"clipfrac"``: fraction of valid tokens where the clipped term is the larger one;
    * ``"approx_kl"``: ``0.5 * masked_mean((logprobs - old_logprobs)^2)``, a KL estimate between
      the old and new policy (TRL's ``approxkl``);
    * ``"ratio_mean"``: masked mean of the ratio (1 on the first minibatch of an iteration).

    Raises ``ValueError`` for mismatched shapes and for NaN/inf advantages at valid positions.
    """
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        _check_float(t, name)
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _bool_mask(mask, logprobs, "logprobs")
    _check_finite_advantages(advantages, m)
    # Masked entries become 0 before any arithmetic, so garbage there gets no gradient either.
    lp, old, adv = (_masked_zero(t, m) for t in (logprobs, old_logprobs, advantages))

    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _masked_mean(torch.maximum(pg_losses, pg_losses_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": _masked_mean((pg_losses_clipped > pg_losses).to(lp.dtype), m),
            "approx_kl": 0.5 * _masked_mean(log_ratio**2, m),
            "ratio_mean": _masked_mean(ratio, m),
        }
    return loss.to(logprobs.dtype), stats


def _value_losses(values, old_values, returns, mask, clip_range_value):
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_float(t, name)
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range_value < 0:
        raise ValueError(f"clip_range_value must be >= 0, got {clip_range_value}")
    m = _bool_mask(mask, values, "values")
    v, v_old, ret = (_masked_zero(t, m) for t in (values, old_values, returns))
    v_clipped = torch.clamp(v, v_old - clip_range_value, v_old + clip_range_value)
    return (v - ret) ** 2, (v_clipped - ret) ** 2, m


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> torch.Tensor:
    """Clipped value loss ``0.5 * masked_mean(max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2))``.

    ``values`` are the value head's current predictions, ``old_values`` those from the rollout and
    ``returns`` the GAE targets. As with the policy, the max makes the loss pessimistic: the value
    head gets no gradient for moving more than ``c`` away from its rollout prediction towards the
    target. Returns the loss (use :func:`value_clipfrac` for the fraction clipped).
    """
    unclipped, clipped, m = _value_losses(values, old_values, returns, mask, clip_range_value)
    return (0.5 * _masked_mean(torch.maximum(unclipped, clipped), m)).to(values.dtype)


@torch.no_grad()
def value_clipfrac(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> torch.Tensor:
    """Fraction of valid tokens where the clipped value loss is the larger term (TRL's ``vf_clipfrac``)."""
    unclipped, clipped, m = _value_losses(values, old_values, returns, mask, clip_range_value)
    return _masked_mean((clipped > unclipped).to(unclipped.dtype), m)


# --------------------------------------------------------------------------------------------
# KL coefficient control
# --------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adapts ``kl_coef`` so that the measured KL to the reference tracks ``target``
    (Ziegler et al., 2019; older TRL's ``AdaptiveKLController``).

    After each PPO iteration, ``update(current_kl, n_steps)`` does::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so the coefficient grows when the policy drifts too far and shrinks when it stays too close,
    by at most 20% per ``horizon`` steps.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0 and horizon > 0, got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> float:
        """Updates and returns ``value`` given the measured KL over the last ``n_steps`` samples."""
        proportional_error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """A constant ``kl_coef`` with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> float:
        """Does nothing (the coefficient is fixed); returns ``value``."""
        return self.value

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


# --------------------------------------------------------------------------------------------
# Log-probabilities from a language model
# --------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., label]``: the log-probability of each label -> ``labels.shape``.

    ``logits`` is ``[..., V]`` and ``labels`` (integer) the matching ``[...]``. The result is
    float32 (float64 for float64 logits) whatever the logits' dtype: PPO takes differences of
    these numbers, and bfloat16 rounding (about 0.4% relative) would swamp them.
    """
    _check_float(logits, "logits")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be labels' shape {tuple(labels.shape)} plus a vocabulary dimension"
        )
    vocab = logits.shape[-1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}), got values in [{int(labels.min())}, {int(labels.max())}]")
    logp = log_softmax(_upcast(logits), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` along the last dimension -> ``logits.shape[:-1]``, float32.

    ``H = -sum p log p = logsumexp(z) - sum p z``. Entries at ``-inf`` (filtered tokens) have
    ``p = 0`` and contribute 0 (not ``0 * -inf = NaN``).
    """
    _check_float(logits, "logits")
    z = _upcast(logits)
    p = softmax(z, dim=-1)
    pz = torch.where(p > 0, p * z, torch.zeros((), dtype=z.dtype, device=z.device))
    return logsumexp(z, dim=-1) - pz.sum(dim=-1)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of the log-probabilities of the completion tokens of each sequence -> ``[B]`` (float32).

    ``input_ids`` ``[B, T]`` holds prompt + completion (+ padding); ``response_mask`` ``[B, T]`` is
    1 on the completion tokens. Token ``t`` is scored by the logits at ``t - 1``, so a completion
    token at position 0 (nothing before it) is an error, as is a completion token under padding.
    This is ``log pi(completion | prompt)``, the quantity DPO compares between policy and
    reference. ``model`` is a :class:`~llama_from_scratch.Llama` (or anything called as
    ``model(input_ids, attention_mask=...)`` returning logits or an object with ``.logits``, such
    as a Hugging Face causal LM). Gradients flow when called outside ``torch.no_grad()``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
    if response_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    resp = response_mask != 0
    if resp[:, 0].any():
        raise ValueError("response_mask is set at position 0: the first token has no context to be predicted from")
    if attention_mask is not None and (resp & (attention_mask == 0)).any():
        raise ValueError("response_mask marks padding positions (attention_mask 0) as completion tokens")
    out = model(input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out
    token_logps = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # [B, T-1]
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)
    return torch.where(resp[:, 1:], token_logps, zero).sum(dim=-1)
