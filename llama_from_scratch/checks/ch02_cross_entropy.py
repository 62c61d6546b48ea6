"""Checks of chapter 2's exercises: log-sum-exp, cross-entropy, ignore_index, label smoothing, gradient.

Each check draws fresh random inputs (including logits of magnitude 1e4, where a formula without
the max subtraction overflows, and ignored targets), compares the student's function with torch,
and raises ``AssertionError`` saying what input was used, what was expected and what came back.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F


OVERFLOW_HINT = ("Did you subtract the maximum of each row before exp? exp(1e4) overflows to inf "
                 "in float32.")


def _generator() -> torch.Generator:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2 ** 31))


def _cases(g: torch.Generator, batch: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Logits to test with: small and large vocabularies, ordinary and huge magnitudes."""
    shapes = [(1, 2), (3, 5), (16, 257), (4, 1000)]
    scales = [1.0, 5.0, 1e4]
    out = []
    for shape in shapes:
        for scale in scales:
            n = int(torch.randint(1, 4, (1,), generator=g)) if batch else None
            full = (n,) + shape if n else shape
            out.append((f"logits of shape {full} and magnitude ~{scale:g}", torch.randn(full, generator=g) * scale))
    return out


def _as_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _compare(got, expected: torch.Tensor, what: str, hint: str = "") -> None:
    """assert_close with a message a student can act on."""
    got = _as_tensor(got, what)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    got = got.detach().to(expected.dtype)
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        raise AssertionError(f"{what}: your result contains inf or nan ({got.flatten()[:4].tolist()}...), "
                             f"expected finite values. {OVERFLOW_HINT}")
    try:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    except AssertionError as exc:
        first = str(exc).splitlines()[0]
        raise AssertionError(f"{what}: expected {expected.flatten()[:4].tolist()}, got "
                             f"{got.flatten()[:4].tolist()} ({first}). {hint}".rstrip()) from None


def check_stable_logsumexp(fn: Callable) -> None:
    """``fn(x)`` = log(sum(exp(x))) over the last dimension, for any leading shape."""
    g = _generator()
    for what, x in _cases(g, batch=False) + _cases(g, batch=True):
        x_before = x.clone()
        got = fn(x)
        if not torch.equal(x, x_before):
            raise AssertionError(f"stable_logsumexp modified its input in place ({what}); work on a copy")
        _compare(got, torch.logsumexp(x, dim=-1), f"stable_logsumexp on {what}",
             "logsumexp(x) = m + log(sum(exp(x - m))) with m the maximum of the row.")
    # very negative logits: a result of -inf means exp underflowed to 0 before the log
    x = torch.randn(2, 7, generator=g) - 1e4
    got = _as_tensor(fn(x), "stable_logsumexp on logits around -1e4")
    if torch.isinf(got).any():
        raise AssertionError("stable_logsumexp on logits around -1e4 returned -inf: exp(-1e4) underflows "
                             "to 0 and log(0) = -inf; subtracting the maximum avoids it.")
    _compare(got, torch.logsumexp(x, dim=-1), "stable_logsumexp on logits around -1e4")


def check_cross_entropy_basic(fn: Callable) -> None:
    """``fn(logits [N, V], targets [N])`` = mean negative log-likelihood, like F.cross_entropy."""
    g = _generator()
    for what, logits in _cases(g):
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
        got = fn(logits, targets)
        _compare(got, F.cross_entropy(logits, targets), f"cross_entropy_basic on {what}",
                 "The loss is the mean over rows of logsumexp(z) - z[target].")


def check_cross_entropy_masked(fn: Callable) -> None:
    """``fn(logits, targets, ignore_index=-100)``: rows whose target is ``ignore_index`` do not count."""
    g = _generator()
    for what, logits in _cases(g):
        n, v = logits.shape
        targets = torch.randint(0, v, (n,), generator=g)
        if n > 1:
            targets[torch.randperm(n, generator=g)[: max(1, n // 3)]] = -100
        got = fn(logits, targets)
        ignored = int((targets == -100).sum())
        _compare(got, F.cross_entropy(logits, targets, ignore_index=-100),
                 f"cross_entropy_masked on {what} with {ignored} of {n} targets = -100",
                 "The mean is over the rows that are NOT ignored (divide by their count, not by N); "
                 "ignored rows must not be used as an index either.")
    # a different ignore_index, which is also a valid class id
    logits = torch.randn(12, 9, generator=g)
    targets = torch.randint(0, 9, (12,), generator=g)
    targets[:4] = 3
    _compare(fn(logits, targets, ignore_index=3), F.cross_entropy(logits, targets, ignore_index=3),
             "cross_entropy_masked with ignore_index=3", "Use the ignore_index argument, not a hard-coded -100.")
    # every target ignored: 0 / 0 is nan, as in torch
    got = _as_tensor(fn(torch.randn(4, 6, generator=g), torch.full((4,), -100)),
                     "cross_entropy_masked with every target ignored")
    if not torch.isnan(got):
        raise AssertionError(f"cross_entropy_masked with every target ignored: torch returns nan (0 / 0), "
                             f"got {got.item()}; do not guard the division")


def check_label_smoothed_cross_entropy(fn: Callable) -> None:
    """``fn(logits, targets, smoothing)`` equals ``F.cross_entropy(..., label_smoothing=smoothing)``."""
    g = _generator()
    for what, logits in _cases(g):
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
        for smoothing in (0.0, float(torch.rand((), generator=g)) * 0.5, 1.0):
            got = fn(logits, targets, smoothing)
            _compare(got, F.cross_entropy(logits, targets, label_smoothing=smoothing),
                     f"label_smoothed_cross_entropy on {what}, smoothing={smoothing:.3f}",
                     "The target distribution is (1 - eps) * onehot + eps / V, "
                     "so the loss is (1 - eps) * nll + eps * mean_j(-log p_j).")


def check_cross_entropy_grad(fn: Callable) -> None:
    """``fn(logits, targets)`` = gradient of the mean cross-entropy wrt the logits, without autograd."""
    g = _generator()
    for what, logits in _cases(g):
        targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
        x = logits.clone().requires_grad_()
        (expected,) = torch.autograd.grad(F.cross_entropy(x, targets), x)
        with torch.no_grad():
            got = fn(logits.clone(), targets)
        if isinstance(got, torch.Tensor) and got.requires_grad:
            got = got.detach()
        _compare(got, expected, f"cross_entropy_grad on {what}",
                 "The gradient of the mean loss is (softmax(z) - onehot(target)) / N; compute the "
                 "softmax with the maximum subtracted.")


CHECKS = {
    "stable_logsumexp": check_stable_logsumexp,
    "cross_entropy_basic": check_cross_entropy_basic,
    "cross_entropy_masked": check_cross_entropy_masked,
    "label_smoothed_cross_entropy": check_label_smoothed_cross_entropy,
    "cross_entropy_grad": check_cross_entropy_grad,
}
