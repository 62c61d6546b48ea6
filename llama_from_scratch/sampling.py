"""Turning next-token logits into a choice: temperature, top-k, top-p, min-p, repetition penalty (chapter 7).

A language model gives, at every step, one score per vocabulary entry. Decoding picks the next
token from those scores. Greedy decoding takes the largest; *sampling* draws from
``softmax(logits)``. Sampling from the raw distribution works badly in practice: the long tail of
individually unlikely but collectively likely tokens gets picked often enough to derail the text.
The functions here reshape the distribution before drawing from it:

* :func:`apply_temperature` divides the logits by ``T``. ``T < 1`` sharpens the distribution,
  ``T > 1`` flattens it, ``T -> 0`` approaches greedy decoding.
* :func:`top_k_filter` keeps the ``k`` highest-scoring tokens (Fan et al., 2018).
* :func:`top_p_filter` ("nucleus sampling", Holtzman et al., 2019) keeps the smallest set of most
  likely tokens whose probabilities add up to at least ``p``: the set adapts to how confident the
  model is.
* :func:`min_p_filter` (Nguyen et al., 2024) keeps tokens whose probability is at least ``p``
  times that of the most likely token.
* :func:`apply_repetition_penalty` (Keskar et al., 2019, CTRL) makes tokens that already occur in
  the context less likely.
* :func:`sample_next_token` chains them in the order Hugging Face ``generate`` uses and draws.

Every filter returns the logits with the removed entries set to ``-inf`` (so that ``softmax``
gives them probability exactly 0) and the kept entries **unchanged**, in the input's dtype and on
its device. The kept sets are identical to those of the Hugging Face ``transformers`` warpers
``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper``, including their handling of
ties and of the top-p boundary; each docstring says what that means. (``transformers`` casts the
logits to float32 inside ``generate`` before any warper runs; probabilities here are likewise
computed in at least float32, so a bfloat16 input gives the kept set ``transformers`` gives for
the same values in float32.)

Shapes: logits are ``[B, V]`` (a batch of rows, vocabulary last) or ``[V]`` (one row).
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "apply_temperature",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "filter_logits",
    "sample_next_token",
]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """``logits`` must be a floating tensor of shape ``[V]`` or ``[B, V]`` with ``V >= 1``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (1, 2):
        raise ValueError(
            f"{name} must have shape [V] or [B, V] (vocabulary last), got {tuple(logits.shape)}; "
            "for [B, T, V] model outputs pass the last position, logits[:, -1, :]"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")


def _is_int(x) -> bool:
    """A true integer (Python or NumPy), not a bool and not a float such as 3.0."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_min_tokens_to_keep(min_tokens_to_keep) -> None:
    if not _is_int(min_tokens_to_keep) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")


def _check_top_k(k) -> None:
    if not _is_int(k) or k < 1:
        raise ValueError(f"top-k: k must be an integer >= 1 (use None to disable top-k), got {k!r}")


def _check_top_p(p) -> None:
    if not _is_real(p) or not (0.0 < p <= 1.0):
        raise ValueError(f"top-p: p must be a number in (0, 1] (use None to disable top-p), got {p!r}")


def _check_min_p(p) -> None:
    if not _is_real(p) or not (0.0 <= p <= 1.0):
        raise ValueError(f"min-p: p must be a number in [0, 1] (use None to disable min-p), got {p!r}")


def _check_temperature(temperature, allow_zero: bool) -> None:
    if not _is_real(temperature) or temperature != temperature:  # the second test catches NaN
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy decoding), got {temperature}")
    if temperature == 0 and not allow_zero:
        raise ValueError(
            "temperature must be > 0 to rescale logits (dividing by 0 is undefined); temperature 0 "
            "means greedy decoding: use sample_next_token(logits, temperature=0) or logits.argmax(-1)"
        )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (bf16 / fp16 go up to float32; float32 and float64 stay)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --------------------------------------------------------------------------------------------
# Temperature and repetition penalty: rescale logits
# --------------------------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (Hugging Face ``TemperatureLogitsWarper``).

    ``softmax(z / T)``: for ``T < 1`` the gaps between logits grow, so the distribution gets
    sharper; for ``T > 1`` it gets flatter; as ``T -> 0`` all mass moves to the argmax. ``T``
    must be strictly positive here; temperature 0 (greedy decoding) is handled by
    :func:`sample_next_token` and ``generate`` as an argmax. Returns the input's dtype.
    """
    _check_logits(logits)
    _check_temperature(temperature, allow_zero=False)
    return logits / temperature


def apply_repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token that already occurs in ``input_ids`` (Hugging Face semantics).

    For each token ``v`` present in row ``b`` of ``input_ids`` (the prompt and what has been
    generated so far), its score ``s = logits[b, v]`` becomes::

        s * penalty   if s < 0
        s / penalty   otherwise

    With ``penalty > 1`` both cases move the score down (a positive score shrinks towards 0, a
    negative one grows more negative), so repeated tokens get less likely; ``0 < penalty < 1``
    encourages repetition; ``penalty == 1`` changes nothing. A token is penalised once no matter
    how many times it occurs (this is ``RepetitionPenaltyLogitsProcessor``: it gathers the
    original scores and scatters the penalised ones back). Token ids ``>= V`` (an embedding table
    larger than the output layer) are ignored, as in ``transformers``.

    ``logits``: ``[B, V]`` with ``input_ids`` ``[B, T]``, or ``[V]`` with ``input_ids`` ``[T]``.
    Computed in the dtype of ``logits`` (like ``transformers``), returned as a new tensor.
    """
    _check_logits(logits)
    if not _is_real(penalty) or not penalty > 0:
        raise ValueError(f"repetition penalty must be a number > 0 (1.0 means no penalty), got {penalty!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError("input_ids must be an integer torch.Tensor of token ids")
    if input_ids.dim() != logits.dim():
        raise ValueError(
            f"input_ids must be [B, T] for [B, V] logits, or [T] for [V] logits; got input_ids "
            f"{tuple(input_ids.shape)} with logits {tuple(logits.shape)}"
        )
    if logits.dim() == 2 and input_ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"batch sizes differ: input_ids {tuple(input_ids.shape)} vs logits {tuple(logits.shape)}"
        )
    if input_ids.numel() and input_ids.min() < 0:
        raise ValueError("input_ids contains negative token ids (padding such as -100 must be removed first)")

    vocab_size = logits.shape[-1]
    ids = input_ids.to(device=logits.device, dtype=torch.long).clamp(max=vocab_size)
    # seen[b, v] is True when token v occurs in row b. One spare column absorbs the ids >= V.
    seen = torch.zeros(*logits.shape[:-1], vocab_size + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(-1, ids, True)
    seen = seen[..., :vocab_size]

    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


# --------------------------------------------------------------------------------------------
# Filters: set the tokens we refuse to sample to -inf
# --------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``k`` highest logits of each row; set the rest to ``-inf``.

    Hugging Face semantics (``TopKLogitsWarper``): the threshold is the k-th largest value and
    every token scoring **at least** that much is kept, so **ties at the k-th value are all kept**
    and more than ``k`` tokens may survive (logits ``[3, 2, 2, 1]`` with ``k = 2`` keep three).
    ``k`` larger than the vocabulary keeps everything; ``k`` is raised to ``min_tokens_to_keep``
    (1 by default, as in the warper).

    Only comparisons are involved, so no upcast is needed: the result has the input's dtype and
    the kept entries are bit-for-bit the input's.
    """
    _check_logits(logits)
    _check_top_k(k)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]: the k-th largest per row
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens with total probability >= ``p``.

    Hugging Face semantics (``TopPLogitsWarper``), step by step:

    1. sort each row **ascending** and take ``cumsum(softmax(sorted))``: entry ``i`` is the total
       probability of the ``i + 1`` least likely tokens;
    2. remove the tokens where that tail mass is ``<= 1 - p``. The removed tail holds at most
       ``1 - p``, so what is left holds at least ``p``, and it is the smallest such top set;
    3. always keep the ``min_tokens_to_keep`` most likely tokens (the last entries of the sort).

    The **boundary token**, the one whose probability makes the kept mass reach ``p``, is kept:
    with probabilities ``[0.5, 0.25, 0.125, 0.125]`` and ``p = 0.75`` the tail masses are
    ``0.125, 0.25, 0.5, 1.0``; those ``<= 0.25`` go, so ``{0.5, 0.25}`` stays (mass exactly 0.75).
    Among tied logits the sort order decides which one falls at the boundary; we use the same
    ``torch.sort`` call as ``transformers`` so the kept set is the same. ``p = 1`` removes only
    tokens of probability 0.

    Probabilities are computed in at least float32; kept entries are returned unchanged in the
    input's dtype.
    """
    _check_logits(logits)
    _check_top_p(p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    sorted_logits, sorted_indices = torch.sort(_upcast(logits), descending=False)
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = tail_mass <= (1 - p)
    sorted_remove[..., -min_tokens_to_keep:] = False  # the most likely tokens always survive
    # Undo the sort: position sorted_indices[b, i] of the result gets sorted_remove[b, i].
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the tokens whose probability is at least ``p`` times the top token's probability.

    Hugging Face semantics (``MinPLogitsWarper``): with ``probs = softmax(logits)``, a token is
    removed when ``probs < p * probs.max()`` (strictly less: a token exactly at the threshold
    stays). The cut-off scales with the model's confidence: a peaked distribution keeps few
    tokens, a flat one keeps many. ``p = 0`` keeps everything, ``p = 1`` keeps the tokens tied
    for the maximum. The ``min_tokens_to_keep`` most likely tokens are always kept; its default 1
    is the warper's default (``generate`` raises it to 2 only for beam search), and since the top
    token is never below ``p * max`` for ``p <= 1``, the default changes nothing.

    Probabilities are computed in at least float32; kept entries are returned unchanged in the
    input's dtype.
    """
    _check_logits(logits)
    _check_min_p(p)
    _check_min_tokens_to_keep(min_tokens_to_keep)
    probs = torch.softmax(_upcast(logits), dim=-1)
    threshold = p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    k = min(min_tokens_to_keep, probs.shape[-1])
    remove.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
    return logits.masked_fill(remove, float("-inf"))


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------


def _check_sampling_args(temperature, top_k, top_p, min_p, allow_zero_temperature: bool) -> None:
    _check_temperature(temperature, allow_zero=allow_zero_temperature)
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)
    if min_p is not None:
        _check_min_p(min_p)


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """The sampling distribution's logits: float32 logits after temperature, top-k, top-p, min-p.

    The order is that of Hugging Face ``generate``: temperature first (so the probability-based
    filters see the tempered distribution), then top-k, top-p and min-p, each on the output of the
    previous one. ``None`` disables a filter; so does ``top_p == 1`` (``generate`` skips it too).
    ``softmax`` of the result is the distribution :func:`sample_next_token` draws from.
    Like ``generate``, this works in (at least) float32 whatever the input dtype. ``temperature``
    must be > 0 here.
    """
    _check_logits(logits)
    _check_sampling_args(temperature, top_k, top_p, min_p, allow_zero_temperature=False)
    scores = _upcast(logits)
    if temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k is not None:
        scores = top_k_filter(scores, top_k)
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if min_p is not None:
        scores = min_p_filter(scores, min_p)
    return scores


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of each row: greedy for ``temperature == 0``, otherwise a random draw.

    ``temperature == 0``: ``argmax`` of the logits (the first index among ties, as
    ``torch.argmax`` and greedy ``generate`` do); the filters would not change it, since every
    one of them keeps the most likely token.

    ``temperature > 0``: :func:`filter_logits` (temperature, top-k, top-p, min-p, in that order),
    then ``softmax`` and ``torch.multinomial``, which is what ``transformers`` does with
    ``do_sample=True``. Pass a seeded ``torch.Generator`` (on the logits' device) for reproducible
    draws.

    ``logits``: ``[B, V]`` -> token ids ``[B]``; ``[V]`` -> a 0-d tensor. ``torch.long``, on the
    logits' device. Apply :func:`apply_repetition_penalty` before calling this, as ``generate``
    does.
    """
    _check_logits(logits)
    _check_sampling_args(temperature, top_k, top_p, min_p, allow_zero_temperature=True)
    if temperature == 0:
        return _upcast(logits).argmax(dim=-1)

    scores = filter_logits(logits, temperature, top_k, top_p, min_p)
    probs = torch.softmax(scores, dim=-1)
    if torch.isnan(probs).any():
        raise ValueError(
            "cannot sample: a row of logits is all -inf or contains NaN (or inf), so softmax is undefined"
        )
    rows = probs.reshape(-1, probs.shape[-1])  # multinomial wants [B, V]
    tokens = torch.multinomial(rows, num_samples=1, generator=generator).squeeze(-1)
    return tokens.reshape(probs.shape[:-1])
