"""Checks of chapter 7's exercises: temperature, top-k, top-p (nucleus), min-p, the repetition
penalty, and one step of beam search.

Each check draws fresh random logits at grading time: odd vocabulary sizes, one row (``[V]``) or
a batch (``[B, V]``), integer-valued logits full of ties, and distributions whose probabilities
are exact powers of two (so that a top-p threshold falls exactly on a cumulative sum). It compares
the student's function with the package (``llama_from_scratch.sampling``, itself tested to keep
the same sets as the ``transformers`` warpers) and raises ``AssertionError`` naming the input,
what was expected and what came back.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

from llama_from_scratch.sampling import apply_repetition_penalty, min_p_filter, top_k_filter, top_p_filter


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def _show(t: torch.Tensor, n: int = 8) -> str:
    values = t.flatten()[:n].tolist()
    text = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
    return f"[{text}{', ...' if t.numel() > n else ''}] (shape {tuple(t.shape)})"


def _as_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach()


def _random_logits(rng: random.Random) -> torch.Tensor:
    """``[V]`` or ``[B, V]`` logits: Gaussian (scale 0.5 .. 8), or small integers (many ties)."""
    vocab = rng.choice([1, 2, 3, 7, rng.randrange(4, 60), rng.randrange(100, 700)])
    shape = (vocab,) if rng.random() < 0.35 else (rng.randrange(1, 5), vocab)
    g = _generator(rng)
    if rng.random() < 0.4:
        return torch.randint(-3, 4, shape, generator=g).float()  # ties everywhere
    return torch.randn(shape, generator=g) * rng.choice([0.5, 1.0, 3.0, 8.0]) + rng.uniform(-5, 5)


def _power_of_two_logits(rng: random.Random) -> tuple[torch.Tensor, list[float]]:
    """One row whose softmax is a distribution of powers of two (1/2, 1/4, 1/8, ...), shuffled,
    and the cumulative sums of its sorted probabilities: top-p thresholds that fall exactly on a
    boundary."""
    probs = [1.0]
    for _ in range(rng.randrange(1, 9)):
        x = probs.pop(rng.randrange(len(probs)))
        probs += [x / 2, x / 2]
    rng.shuffle(probs)
    logits = torch.tensor(probs).log()  # softmax gives these probabilities back exactly
    ordered = sorted(probs, reverse=True)
    return logits, [sum(ordered[: j + 1]) for j in range(len(ordered))]


def _check_kept_values(got: torch.Tensor, logits: torch.Tensor, what: str) -> torch.Tensor:
    """``got`` must be the logits with some entries set to -inf; returns the kept mask."""
    if tuple(got.shape) != tuple(logits.shape):
        raise AssertionError(f"{what}: expected shape {tuple(logits.shape)} (same as the logits), got {tuple(got.shape)}")
    if got.dtype != logits.dtype:
        raise AssertionError(f"{what}: expected dtype {logits.dtype} (same as the logits), got {got.dtype}")
    kept = got != float("-inf")
    if not torch.equal(got[kept], logits[kept]):
        bad = (kept & (got != logits)).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: kept entries must keep their original logit (only removed ones become -inf); at index "
            f"{bad} the logit was {logits[tuple(bad)].item():.4g}, you returned {got[tuple(bad)].item():.4g}")
    return kept


def _set_message(kept: torch.Tensor, expected: torch.Tensor, logits: torch.Tensor) -> str:
    row = (kept != expected).reshape(-1, kept.shape[-1]).any(dim=-1).nonzero()[0].item()
    k_row, e_row, l_row = (t.reshape(-1, t.shape[-1])[row] for t in (kept, expected, logits))
    probs = torch.softmax(l_row.double(), dim=-1)
    return (f"row {row}: logits {_show(l_row)}, probabilities {_show(probs)}; expected to keep indices "
            f"{e_row.nonzero().flatten().tolist()}, you kept {k_row.nonzero().flatten().tolist()}")


# ----- temperature_probs ----------------------------------------------------------------------


def check_temperature_probs(fn: Callable) -> None:
    """``fn(logits, temperature)`` = ``softmax(logits / T)`` on the last dim; ``T = 0`` -> one-hot argmax."""
    rng = _rng()
    cases = [(torch.tensor([2.0, 1.0, 0.0]), 1.0), (torch.tensor([2.0, 1.0, 0.0]), 0.5),
             (torch.tensor([[1.0, 3.0, 3.0, -1.0]]), 0.0), (torch.tensor([1000.0, -1000.0, 999.0]), 0.7)]
    for _ in range(25):
        cases.append((_random_logits(rng), rng.choice([0.0, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, rng.uniform(0.05, 5)])))
    for logits, t in cases:
        what = f"temperature_probs(logits {_show(logits)}, temperature={t:g})"
        got = _as_tensor(fn(logits.clone(), t), what)
        if t == 0:
            expected = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
            hint = ("Temperature 0 means greedy: all probability on the argmax (the FIRST maximal index among "
                    "ties, as torch.argmax), a one-hot vector, not a division by zero.")
        else:
            expected = torch.softmax(logits / t, dim=-1)
            hint = "softmax(logits / temperature) along the last dimension (divide, do not multiply)."
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != expected.dtype:
            raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
        if torch.isnan(got).any():
            raise AssertionError(f"{what}: your result contains NaN. {hint}")
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            diff = (got - expected).abs().max().item()
            raise AssertionError(f"{what}: max abs difference {diff:.3g}; expected {_show(expected)}, got {_show(got)}. {hint}")


# ----- top_k_logits -----------------------------------------------------------------------------


def check_top_k_logits(fn: Callable) -> None:
    """``fn(logits, k)`` keeps the logits >= the k-th largest (ties at the k-th value kept), rest -inf."""
    rng = _rng()
    cases = [(torch.tensor([3.0, 2.0, 2.0, 1.0]), 2), (torch.tensor([[0.5, -1.0, 4.0]]), 5),
             (torch.tensor([1.0, 1.0, 1.0]), 1), (torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 2)]
    for _ in range(30):
        logits = _random_logits(rng)
        cases.append((logits, rng.choice([1, 2, 3, rng.randrange(1, logits.shape[-1] + 3)])))
    for logits, k in cases:
        what = f"top_k_logits(logits {_show(logits)}, k={k})"
        got = _as_tensor(fn(logits.clone(), k), what)
        kept = _check_kept_values(got, logits, what)
        expected = top_k_filter(logits, k) != float("-inf")
        if not torch.equal(kept, expected):
            hint = ""
            if kept.sum() < expected.sum():
                hint = (" Every logit equal to the k-th largest is kept (ties at the boundary all survive, as in "
                        "Hugging Face's TopKLogitsWarper), and k larger than the vocabulary keeps everything.")
            raise AssertionError(f"{what}: wrong kept set. {_set_message(kept, expected, logits)}.{hint}")


# ----- nucleus_logits ---------------------------------------------------------------------------


def check_nucleus_logits(fn: Callable) -> None:
    """``fn(logits, p)``: the smallest top set with probability >= p (Hugging Face's recipe)."""
    rng = _rng()
    quarter = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    # (logits, p, exact): exact cases have power-of-two probabilities, which softmax gives back exactly,
    # so their cumulative sums are exact too and every correct way of computing top-p agrees on them.
    cases = [(quarter, 0.75, True), (quarter, 0.7, True), (quarter, 0.875, True), (quarter[[2, 0, 3, 1]], 0.5, True),
             (torch.tensor([[2.0, 1.0, 0.0]]), 1.0, False), (torch.tensor([5.0, 1.0, 0.0]), 0.01, False)]
    for _ in range(12):
        logits, sums = _power_of_two_logits(rng)
        for p in rng.sample(sums, min(3, len(sums))):
            cases.append((logits, p, True))
    for _ in range(25):
        cases.append((_random_logits(rng), rng.choice([0.1, 0.5, 0.8, 0.9, 0.95, 1.0, rng.uniform(0.01, 1.0)]), False))
    for logits, p, exact in cases:
        what = f"nucleus_logits(logits {_show(logits)}, p={p:g})"
        got = _as_tensor(fn(logits.clone(), p), what)
        kept = _check_kept_values(got, logits, what)
        expected = top_p_filter(logits, p) != float("-inf")
        if torch.equal(kept, expected):
            continue
        rows_l = logits.reshape(-1, logits.shape[-1])
        rows_k = kept.reshape(-1, kept.shape[-1])
        # Among tied probabilities at the boundary, which of them is kept depends on the sort order:
        # any kept set of the right size is fine if it is a top set (no removed token more likely).
        top_set = all((~k).all() or k.all() or l[k].min() >= l[~k].max() for l, k in zip(rows_l, rows_k))
        sizes_ok = torch.equal(kept.sum(-1), expected.sum(-1))
        if not sizes_ok and top_set and not exact:
            # Random logits: a size off by one is accepted only where the float64 mass differs from p
            # by float32 rounding.
            sizes_ok = True
            for l, k in zip(rows_l, rows_k):
                ordered = torch.softmax(l.double(), dim=-1).sort(descending=True).values
                n = int(k.sum())
                if not (n >= 1 and ordered[:n].sum() >= p - 1e-6 and (n == 1 or ordered[: n - 1].sum() < p + 1e-6)):
                    sizes_ok = False
        if sizes_ok and top_set:
            continue
        if sizes_ok:
            hint = " You kept the right number of tokens but not the most likely ones (undo the sort correctly)."
        else:
            hint = (" Keep the smallest set of most likely tokens whose probabilities add up to at least p: the "
                    "token that makes the sum reach p is kept, the next one is not (with probabilities 1/2, 1/4, "
                    "1/8, 1/8 and p = 0.75 keep exactly 1/2 and 1/4). Recipe: sort ascending, cumsum of the "
                    "softmax, remove where the cumulative sum <= 1 - p, always keep the most likely token.")
        raise AssertionError(f"{what}: wrong kept set. {_set_message(kept, expected, logits)}.{hint}")


# ----- min_p_logits -----------------------------------------------------------------------------


def check_min_p_logits(fn: Callable) -> None:
    """``fn(logits, p)`` removes tokens with probability < p * (top probability)."""
    rng = _rng()
    quarter = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    # (logits, p, exact): exact cases have power-of-two probabilities and p a power of two, so some
    # tokens sit exactly at the threshold p * max (they stay) and no rounding blurs the comparison.
    cases = [(quarter, 0.25, True), (quarter, 0.5, True), (torch.tensor([[3.0, 3.0, 0.0]]), 1.0, True),
             (torch.tensor([1.0, 0.0, -1.0]), 0.0, True)]
    for _ in range(8):
        logits, _ = _power_of_two_logits(rng)
        cases.append((logits, rng.choice([1.0, 0.5, 0.25, 0.125, 0.0625]), True))
    for _ in range(30):
        cases.append((_random_logits(rng), rng.choice([0.0, 0.05, 0.1, 0.2, 0.5, 1.0, rng.uniform(0, 1)]), False))
    for logits, p, exact in cases:
        what = f"min_p_logits(logits {_show(logits)}, p={p:g})"
        got = _as_tensor(fn(logits.clone(), p), what)
        kept = _check_kept_values(got, logits, what)
        expected = min_p_filter(logits, p) != float("-inf")
        if torch.equal(kept, expected):
            continue
        if not exact:
            # Tolerate disagreements within float rounding of the threshold (e.g. comparing in log space).
            probs = torch.softmax(logits.double(), dim=-1)
            threshold = p * probs.amax(dim=-1, keepdim=True)
            near = (probs - threshold).abs() <= 1e-6 * threshold + 1e-12
            if (near | (kept == expected)).all():
                continue
        hint = (" Remove a token when its probability is strictly less than p times the largest probability of "
                "its row (a token exactly at the threshold stays; p is relative to the top token, not absolute).")
        raise AssertionError(f"{what}: wrong kept set. {_set_message(kept, expected, logits)}.{hint}")


# ----- penalize_repetition ----------------------------------------------------------------------


def check_penalize_repetition(fn: Callable) -> None:
    """``fn(logits [B, V], input_ids [B, T], penalty)`` equals ``apply_repetition_penalty``."""
    rng = _rng()
    cases = [(torch.tensor([[2.0, -2.0, 0.5, 0.0]]), torch.tensor([[0, 1, 1, 1]]), 2.0),
             (torch.tensor([[1.0, -1.0, 3.0]]), torch.tensor([[2, 2]]), 0.5)]
    for _ in range(25):
        vocab = rng.choice([2, 5, rng.randrange(3, 80), rng.randrange(200, 1000)])
        batch = rng.randrange(1, 5)
        g = _generator(rng)
        logits = torch.randn(batch, vocab, generator=g) * rng.choice([1.0, 4.0])
        length = rng.randrange(1, 3 * vocab + 2)
        ids = torch.randint(0, max(1, vocab // rng.choice([1, 3])), (batch, length), generator=g)  # repeats
        cases.append((logits, ids, rng.choice([1.0, 1.1, 1.3, 2.0, 0.8, rng.uniform(0.3, 3.0)])))
    for logits, ids, penalty in cases:
        what = f"penalize_repetition(logits {_show(logits)}, input_ids {_show(ids)}, penalty={penalty:g})"
        got = _as_tensor(fn(logits.clone(), ids.clone(), penalty), what)
        expected = apply_repetition_penalty(logits, ids, penalty)
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)} and dtype {expected.dtype}, got "
                                 f"{tuple(got.shape)} {got.dtype}")
        if not torch.allclose(got, expected, rtol=1e-6, atol=0.0):
            b, v = (~torch.isclose(got, expected, rtol=1e-6, atol=0.0)).nonzero()[0].tolist()
            seen = int((ids[b] == v).sum())
            raise AssertionError(
                f"{what}: at row {b}, token {v} (logit {logits[b, v].item():.4g}, appears {seen} times in input_ids) "
                f"expected {expected[b, v].item():.6g}, got {got[b, v].item():.6g}. A token that occurs (once or "
                "many times) is penalised exactly once: a negative logit is multiplied by the penalty, a positive "
                "one (or zero) divided by it; tokens that do not occur are unchanged.")


# ----- beam_search_step -------------------------------------------------------------------------


def check_beam_search_step(fn: Callable) -> None:
    """``fn(log_probs [beams, V], beam_scores [beams], num_beams)`` -> the best ``num_beams``
    (beam, token) continuations: ``(new_scores, beam_indices, token_ids)``, best first."""
    rng = _rng()
    cases = []
    toy = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]).log()
    cases.append((toy, torch.tensor([-0.1, -0.5]), 2))
    first = torch.full((3,), -1e9)
    first[0] = 0.0
    cases.append((torch.randn(3, 11).log_softmax(-1), first, 3))  # first step: only beam 0 is real
    for _ in range(20):
        beams = rng.choice([1, 2, 3, 4, rng.randrange(1, 9)])
        vocab = rng.choice([3, 7, rng.randrange(2, 50), rng.randrange(100, 500)])
        g = _generator(rng)
        log_probs = (torch.randn(beams, vocab, generator=g) * rng.choice([1.0, 3.0])).log_softmax(-1)
        scores = -torch.rand(beams, generator=g) * rng.choice([0.5, 5.0, 20.0])
        num_beams = rng.randrange(1, min(beams * vocab, 2 * beams + 2) + 1)
        cases.append((log_probs, scores, num_beams))
    for log_probs, scores, num_beams in cases:
        what = f"beam_search_step(log_probs {_show(log_probs)}, beam_scores {_show(scores)}, num_beams={num_beams})"
        out = fn(log_probs.clone(), scores.clone(), num_beams)
        if not isinstance(out, tuple) or len(out) != 3:
            raise AssertionError(f"{what}: must return a tuple (new_scores, beam_indices, token_ids), got {type(out).__name__}")
        new_scores, beam_idx, token_ids = (_as_tensor(x, what) for x in out)
        total = scores[:, None] + log_probs
        expected = torch.topk(total.flatten(), num_beams).values
        for name, t in (("new_scores", new_scores), ("beam_indices", beam_idx), ("token_ids", token_ids)):
            if tuple(t.shape) != (num_beams,):
                raise AssertionError(f"{what}: {name} must have shape [num_beams] = [{num_beams}], got {tuple(t.shape)}")
        if beam_idx.dtype != torch.long or token_ids.dtype != torch.long:
            raise AssertionError(f"{what}: beam_indices and token_ids must be torch.long, got {beam_idx.dtype} and "
                                 f"{token_ids.dtype}")
        if not torch.allclose(new_scores, expected, rtol=1e-6, atol=1e-6):
            hint = (" Score every (beam, token) pair by beam_scores[beam] + log_probs[beam, token], then take the "
                    "num_beams best over ALL pairs together (flatten [beams, V]), sorted best first.")
            raise AssertionError(f"{what}: new_scores {_show(new_scores)}, expected {_show(expected)}.{hint}")
        if ((beam_idx < 0) | (beam_idx >= log_probs.shape[0]) | (token_ids < 0) | (token_ids >= log_probs.shape[1])).any():
            raise AssertionError(f"{what}: beam_indices {_show(beam_idx)} / token_ids {_show(token_ids)} out of range "
                                 f"(beams 0..{log_probs.shape[0] - 1}, tokens 0..{log_probs.shape[1] - 1}). From a flat "
                                 "index i over [beams, V]: beam = i // V, token = i % V.")
        pair_scores = total[beam_idx, token_ids]
        if not torch.allclose(pair_scores, new_scores, rtol=1e-6, atol=1e-6):
            raise AssertionError(
                f"{what}: your (beam, token) pairs do not have the scores you returned: beam_scores[beam] + "
                f"log_probs[beam, token] = {_show(pair_scores)}, new_scores {_show(new_scores)}. From a flat index i "
                "over [beams, V]: beam = i // V, token = i % V.")
        pairs = set(zip(beam_idx.tolist(), token_ids.tolist()))
        if len(pairs) != num_beams:
            raise AssertionError(f"{what}: the same (beam, token) pair was chosen twice: {sorted(pairs)}")


CHECKS = {
    "temperature_probs": check_temperature_probs,
    "top_k_logits": check_top_k_logits,
    "nucleus_logits": check_nucleus_logits,
    "min_p_logits": check_min_p_logits,
    "penalize_repetition": check_penalize_repetition,
    "beam_search_step": check_beam_search_step,
}
