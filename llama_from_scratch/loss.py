"""Cross-entropy for next-token prediction, written from scratch (chapter 2).

A language model outputs one score ("logit") per vocabulary entry at every position. Training
minimises the negative log-likelihood of the token that actually came next:

    loss = -log softmax(z)[t] = logsumexp(z) - z[t]

This module builds that loss from the ground up:

* :func:`logsumexp`, :func:`log_softmax` and :func:`softmax` with the max-subtraction trick,
  so that logits of magnitude 1e4 do not overflow ``exp``;
* :func:`cross_entropy`, equal to :func:`torch.nn.functional.cross_entropy` (mean / sum / none,
  ``ignore_index``, ``label_smoothing`` with torch's exact semantics);
* :func:`chunked_cross_entropy`, the loss of ``hidden @ weight.T`` computed a slice of rows at a
  time so that the full ``[N, V]`` logits never exist, in forward *or* backward;
* :func:`perplexity`, ``exp(loss)``.

Layout convention: the vocabulary is the **last** dimension (``[N, V]`` or ``[B, T, V]``), the
layout a language model produces. ``torch.nn.functional.cross_entropy`` wants the classes in
dimension 1 instead, so ``cross_entropy(logits, targets)`` for ``[B, T, V]`` logits equals
``F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))`` (reshaped back for
``reduction="none"``).

Precision: all arithmetic runs in (at least) float32, whatever the input dtype (bfloat16 has only 8 bits of
mantissa; summing 49152 exponentials in it loses most of them). The loss is returned in the dtype
of the logits, as torch does.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "logsumexp",
    "log_softmax",
    "softmax",
    "cross_entropy",
    "chunked_cross_entropy",
    "perplexity",
]

_REDUCTIONS = ("mean", "sum", "none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: bf16/fp16 go up to float32, float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --------------------------------------------------------------------------------------------
# The stable building blocks
# --------------------------------------------------------------------------------------------


def logsumexp(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(x)))`` along ``dim`` without overflow.

    ``exp(1e4)`` is ``inf`` in float32 (the largest float32 is about ``3.4e38 = exp(88.7)``).
    Subtracting the row maximum ``m`` first changes nothing mathematically,
    ``log sum exp(x) = m + log sum exp(x - m)``, but now every exponent is ``<= 0``, so every
    ``exp`` lies in ``(0, 1]`` and the largest one is exactly 1: no overflow, and the sum is at
    least 1, so its ``log`` never sees 0.

    The maximum is detached: its gradient contributions cancel exactly, and leaving it out of the
    graph keeps the backward pass the clean ``softmax(x)``.
    """
    m = x.amax(dim=dim, keepdim=True).detach()
    # A row that is entirely -inf has no finite maximum; shift it by 0 instead (its result is -inf).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log(softmax(x))`` computed as ``x - logsumexp(x)``: stable, and exact for tiny probabilities.

    Taking ``log`` of a computed softmax would turn probabilities below ~1e-45 into ``log(0) = -inf``;
    subtracting the log-sum-exp keeps them finite.
    """
    return x - logsumexp(x, dim=dim, keepdim=True)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(x) / sum(exp(x))``, with the row maximum subtracted first so ``exp`` cannot overflow."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True).detach())
    return e / e.sum(dim=dim, keepdim=True)


# --------------------------------------------------------------------------------------------
# Input validation (clear messages instead of an index error deep inside ``gather``)
# --------------------------------------------------------------------------------------------


def _validate(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
              label_smoothing: float, num_classes: int, name: str = "logits") -> None:
    """Raise ``ValueError`` naming the problem when the inputs cannot be a cross-entropy."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must hold integer class indices (torch.long), got dtype {targets.dtype}; "
            "probability targets are not supported")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} of shape {tuple(logits.shape)} needs targets of shape {tuple(logits.shape[:-1])}, "
            f"got targets of shape {tuple(targets.shape)}")
    if torch.compiler.is_compiling():
        return  # a check on the values would split a compiled graph in two; eager calls make it
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"target {int(targets[position])} at position {position} is outside [0, {num_classes}) "
            f"and is not ignore_index ({ignore_index})")


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy between ``logits`` (``[N, V]`` or ``[B, T, V]``) and class indices ``targets``.

    Per row, with ``lse = logsumexp(z)``:

        nll    = lse - z[t]                      (negative log-likelihood of the target)
        smooth = sum_j (lse - z[j]) = V * lse - sum_j z[j]
        loss   = (1 - eps) * nll + (eps / V) * smooth

    ``eps = label_smoothing`` mixes the one-hot target with the uniform distribution. Rows whose
    target equals ``ignore_index`` (padding, or prompt tokens in instruction tuning) contribute
    nothing; ``"mean"`` divides by the number of rows that are *not* ignored, so a batch with all
    targets ignored gives ``nan`` (0 / 0), exactly as torch does, with zero gradients.

    Returns a scalar for ``"mean"`` / ``"sum"`` and ``targets.shape`` for ``"none"`` (ignored rows
    are 0), in the dtype of ``logits``; the arithmetic itself is float32 (float64 for float64
    logits; see the module docstring).
    Raises ``ValueError`` on mismatched shapes, unknown reductions, non-integer targets, and targets
    outside ``[0, V)`` that are not ``ignore_index``.
    """
    num_classes = logits.shape[-1] if logits.dim() > 0 else 0
    _validate(logits, targets, ignore_index, reduction, label_smoothing, num_classes)

    z = _upcast(logits)                                  # bf16/fp16 sums are too coarse
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()

    lse = logsumexp(z, dim=-1)                           # [...], stable
    target_logit = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    per_row = lse - target_logit                         # -log p(target)
    if label_smoothing > 0.0:
        smooth = num_classes * lse - z.sum(dim=-1)       # -sum_j log p(j)
        per_row = (1.0 - label_smoothing) * per_row + (label_smoothing / num_classes) * smooth
    # torch.where (not a multiplication by the mask) so ignored rows get exactly zero gradient
    # even when the mean below divides by zero.
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))

    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / valid.sum()
    return loss.to(logits.dtype)


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """``exp(loss)``: the effective number of equally likely tokens the model hesitates between.

    A float gives a float, a tensor gives a tensor. A model that guesses uniformly over ``V``
    tokens has loss ``ln V`` and perplexity ``V``.
    """
    if isinstance(loss, torch.Tensor):
        return torch.exp(loss)
    return math.exp(loss)


# --------------------------------------------------------------------------------------------
# Chunked cross-entropy: never materialise the [N, V] logits
# --------------------------------------------------------------------------------------------


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and gradients of ``cross_entropy(hidden @ weight.T, targets)``, ``chunk_size`` rows at a time.

    Autograd would keep every chunk's logits alive for the backward pass, which is exactly the
    ``[N, V]`` tensor we want to avoid. So the gradients are computed by hand, in the forward
    pass, while each chunk's logits exist anyway (the approach of Liger-Kernel's fused linear
    cross-entropy). For one row with probabilities ``p = softmax(z)`` the gradient of the loss
    with respect to the logits is

        dL/dz = (1 - eps) * (p - onehot(t)) + eps * (p - 1/V) = p - (1 - eps) * onehot(t) - eps / V

    (zero for ignored rows, divided by the number of valid rows for ``"mean"``), and the chain rule
    through ``z = h @ W.T`` gives ``dL/dh = dL/dz @ W`` and ``dL/dW = dL/dz.T @ h``. Only
    ``grad_hidden`` (``[N, D]``) and ``grad_weight`` (``[V, D]``), the size of the inputs, are
    stored; the backward pass only scales them by the incoming gradient. Peak extra memory is
    one ``[chunk_size, V]`` float32 buffer.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, ignore_index: int, reduction: str, label_smoothing: float,
                compute_grads: bool) -> torch.Tensor:
        n_rows = hidden.shape[0]
        vocab = weight.shape[0]
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        # The gradient scale of "mean"; max(., 1) keeps the gradients 0 (not nan) when every
        # target is ignored, as torch's are, while the loss itself is 0 / 0 = nan.
        grad_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        eps = label_smoothing

        w32 = _upcast(weight)                            # a no-op for float32 weights
        dtype = torch.promote_types(w32.dtype, _upcast(hidden[:0]).dtype)
        w32 = w32.to(dtype)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if compute_grads else None
        grad_weight = torch.zeros(w32.shape, dtype=dtype, device=hidden.device) if compute_grads else None

        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            h = hidden[start:stop].to(dtype)             # [c, D]
            v = valid[start:stop]                        # [c]
            t = torch.where(v, targets[start:stop], torch.zeros_like(targets[start:stop])).long()

            z = h @ w32.T                                # [c, V]: the only big buffer
            m = z.amax(dim=-1, keepdim=True)
            z.sub_(m)                                    # shifted logits, in place
            row_loss = -z.gather(-1, t.unsqueeze(-1)).squeeze(-1)      # -(z_t - m)
            if eps > 0.0:
                row_loss = (1.0 - eps) * row_loss - (eps / vocab) * z.sum(dim=-1)
            z.exp_()                                     # exp(z - m), in (0, 1]
            sumexp = z.sum(dim=-1)
            row_loss = row_loss + torch.log(sumexp)      # lse - z_t (smoothed), m cancels
            total += torch.where(v, row_loss, torch.zeros_like(row_loss)).sum()

            if compute_grads:
                z.div_(sumexp.unsqueeze(-1))             # probabilities p
                rows = torch.arange(stop - start, device=z.device)
                z[rows, t] -= (1.0 - eps)                # p - (1 - eps) * onehot
                if eps > 0.0:
                    z.sub_(eps / vocab)
                z.mul_((v.to(dtype) * grad_scale).unsqueeze(-1))    # zero ignored rows, scale
                grad_hidden[start:stop] = z @ w32
                grad_weight.addmm_(z.T, h)
            del z

        # Kept as attributes, not save_for_backward: they are our own buffers (not inputs or
        # outputs), returned as they are when the incoming gradient is 1 (no second [V, D]).
        ctx.grads = (grad_hidden, grad_weight) if compute_grads else None
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        loss = total / n_valid if reduction == "mean" else total
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy was called with gradients disabled; "
                               "it cannot be backpropagated")
        grad_hidden, grad_weight = ctx.grads
        g = grad_output.to(grad_hidden.dtype)
        if not bool(g == 1):            # loss.backward() passes exactly 1: skip two [.., D] copies
            grad_hidden, grad_weight = grad_hidden * g, grad_weight * g   # not in place: reusable
        hidden_dtype, weight_dtype = ctx.input_dtypes
        return (grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype),
                None, None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` without ever building the ``[N, V]`` logits.

    ``hidden`` is the last hidden state ``[N, D]`` or ``[B, T, D]``, ``weight`` the output
    projection (``lm_head.weight``) ``[V, D]``, ``targets`` ``[N]`` / ``[B, T]``. Rows are processed
    ``chunk_size`` at a time; gradients with respect to ``hidden`` and ``weight`` are computed
    chunk by chunk during the forward pass (see :class:`_ChunkedCrossEntropy`), so peak memory grows
    like ``chunk_size * V`` instead of ``N * V``. At SmolLM2's vocabulary of 49152, 4096 tokens of
    float32 logits are 805 MB; a 1024-row chunk is 201 MB.

    Same value and gradients as the unchunked loss (up to float32 rounding). ``reduction`` is
    ``"mean"`` or ``"sum"`` (a per-row loss would need per-row incoming gradients); bfloat16
    inputs are computed in float32 and the loss and gradients returned in the input dtypes.
    Under ``torch.no_grad()`` (evaluation) the gradient work is skipped.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_cross_entropy supports reduction 'mean' or 'sum', got {reduction!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, D] or [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got weight of shape {tuple(weight.shape)} for hidden of shape {tuple(hidden.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"hidden of shape {tuple(hidden.shape)} needs targets of shape {tuple(hidden.shape[:-1])}, "
            f"got targets of shape {tuple(targets.shape)}")
    _validate(hidden, targets, ignore_index, reduction, label_smoothing, weight.shape[0], name="hidden")

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk_size, ignore_index,
                                      reduction, float(label_smoothing), compute_grads)
