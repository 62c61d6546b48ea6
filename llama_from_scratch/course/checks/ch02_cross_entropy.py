"""Checks of chapter 2's exercises: the streaming log-sum-exp update, the loss of packed sequences,
distillation against a teacher, and a vocabulary-chunked cross-entropy as a
``torch.autograd.Function``.

Every check draws fresh inputs, among them logits large enough that ``exp`` overflows in float32
(hundreds to 1e4) and rows that are entirely ``-inf``, and compares in the grader's process with
torch: ``torch.logsumexp``, ``F.cross_entropy`` (with ``ignore_index`` and ``label_smoothing``),
``F.kl_div`` with ``F.log_softmax``, and autograd's gradients of those references (in float64).
Failure messages give shapes, the first index that differs and the size of the difference, never
the expected values.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.common import (as_tensor, assert_close, assert_equal, fresh_generator,
                                              value_and_grad)

_SOFTMAX_FAMILY = [
    "torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss", "torch.nn.functional.log_softmax",
    "torch.nn.functional.softmax", "torch.nn.functional.kl_div", "torch.kl_div", "torch.logsumexp",
    "torch.Tensor.logsumexp", "torch.special.logsumexp", "torch.log_softmax", "torch.softmax",
    "torch.Tensor.log_softmax", "torch.Tensor.softmax", "torch.special.log_softmax", "torch.special.softmax",
]
FORBIDDEN = {
    "logsumexp_update": _SOFTMAX_FAMILY,
    "packed_lm_loss": _SOFTMAX_FAMILY,
    "distillation_loss": _SOFTMAX_FAMILY,
    "ChunkedCrossEntropy": _SOFTMAX_FAMILY + [
        "torch.autograd.grad", "torch.autograd.backward", "torch.Tensor.backward", "torch.func.vjp",
        "torch.func.grad", "torch.func.grad_and_value", "torch.autograd.functional.vjp"],
}

_OVERFLOW = "Subtract the row maximum before exp: exp(100) is already inf in float32."


def _rng(g: torch.Generator) -> random.Random:
    return random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=g)))


# --------------------------------------------------------------------------- logsumexp_update

def check_logsumexp_update(fn: Callable) -> None:
    """``fn(m, s, chunk) -> (m, s)``: the running maximum and the running sum of ``exp(x - m)``."""
    g = fresh_generator()
    rng = _rng(g)
    for case in range(8):
        n = rng.choice([1, 3, 6])
        widths = [rng.randint(1, 7) for _ in range(rng.randint(1, 5))]
        scale = [1.0, 10.0, 1e4][case % 3]
        chunks = [torch.randn(n, w, generator=g) * scale for w in widths]
        # some rows start with chunks that are entirely -inf (masked vocabulary); one row may stay -inf
        for row in range(n):
            if rng.random() < 0.4:
                for c in range(rng.randint(1, len(widths))):
                    chunks[c][row] = float("-inf")
        if case % 4 == 3 and len(widths) > 1:
            chunks[-1][0, 0] = chunks[-1][0].max() + 100.0 * scale     # a new maximum arrives late
        m = torch.full((n,), float("-inf"))
        s = torch.zeros(n)
        seen = torch.empty(n, 0, dtype=torch.float64)
        for step, chunk in enumerate(chunks):
            seen = torch.cat([seen, chunk.double()], dim=1)
            expected_m = seen.amax(dim=1)
            shift = torch.where(torch.isfinite(expected_m), expected_m, torch.zeros_like(expected_m))
            expected_s = torch.exp(seen - shift[:, None]).sum(dim=1)
            what = f"logsumexp_update, chunk {step + 1} of widths {widths} (rows of {n}, magnitude ~{scale:g})"
            out = fn(m.clone(), s.clone(), chunk.clone())
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise AssertionError(f"{what}: expected a tuple (m, s), got {type(out).__name__}")
            new_m, new_s = as_tensor(out[0], what + ", m"), as_tensor(out[1], what + ", s")
            assert_equal(new_m, expected_m.float(), what + ": m",
                         "m is the largest value seen so far in each row (-inf while a row has seen only -inf)")
            assert_close(new_s, expected_s, what + ": s", rtol=2e-5, atol=1e-30,
                         hint="s is the sum of exp(x - m) over every value seen so far, with the new m: rescale the "
                              "old sum by exp(old m - new m). A row that has seen only -inf has s = 0, not nan.")
            m, s = new_m.float(), new_s.float()
        lse = m + torch.log(s)
        assert_close(lse, torch.logsumexp(torch.cat(chunks, dim=1), dim=1),
                     f"m + log(s) after all chunks of widths {widths}", rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- packed_lm_loss

def _packed_segments(rng: random.Random) -> torch.Tensor:
    """segment_ids [B, T]: documents numbered 1, 2, ... in every row, then padding 0."""
    b, t = rng.randint(1, 3), rng.randint(1, 14)
    segments = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        pos, doc = 0, 1
        end = t - (rng.randint(0, 3) if rng.random() < 0.5 else 0)
        while pos < end:
            length = rng.choice([1, 1, 2, 3, 4, 6])
            segments[row, pos:min(end, pos + length)] = doc
            pos += length
            doc += 1
    return segments


def _packed_reference(logits: torch.Tensor, ids: torch.Tensor, segments: torch.Tensor, reduction: str) -> torch.Tensor:
    """Labels built position by position, then F.cross_entropy (float64); one document = one run
    of a segment id in one row."""
    b, t, v = logits.shape
    labels = torch.full((b, t), -100, dtype=torch.long)
    for row in range(b):
        for pos in range(t - 1):
            if segments[row, pos] != 0 and segments[row, pos + 1] == segments[row, pos]:
                labels[row, pos] = ids[row, pos + 1]
    flat = logits.double().reshape(-1, v)
    if reduction == "token":
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)
    per_token = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none").reshape(b, t)
    means = []
    for row in range(b):
        for doc in segments[row].unique().tolist():
            mask = (segments[row] == doc) & (labels[row] != -100) & (doc != 0)
            if mask.any():
                means.append(per_token[row][mask].mean())
    return torch.stack(means).mean() if means else torch.tensor(float("nan"), dtype=torch.float64)


def check_packed_lm_loss(fn: Callable) -> None:
    """``fn(logits [B, T, V], input_ids, segment_ids, reduction)``: next-token loss of packed documents."""
    g = fresh_generator()
    rng = _rng(g)
    hint = ("Position t predicts input_ids[t + 1], and only inside one document: segment_ids[t + 1] == "
            "segment_ids[t] != 0. 'token' averages over those predictions; 'document' averages each "
            "document's mean (a document is a run of one segment id in one row; documents without "
            "predictions are left out).")
    fixed = [torch.tensor([[1, 1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2, 2]]),   # document 1 in two rows
             torch.tensor([[1, 1, 1, 2, 2, 3, 3, 0]]),
             torch.tensor([[1, 2, 3, 0]])]                                     # nothing to predict: nan
    cases = [(segments, 4.0, reduction) for segments in fixed for reduction in ("document", "token")]
    for case in range(10):
        cases.append((_packed_segments(rng), [1.0, 30.0, 1e3][case % 3], ["token", "document"][case % 2]))
    for segments, scale, reduction in cases:
        b, t = segments.shape
        v = rng.randint(5, 40)
        ids = torch.randint(0, v, (b, t), generator=g)
        logits = torch.randn(b, t, v, generator=g) * scale
        expected = _packed_reference(logits, ids, segments, reduction)
        what = (f"packed_lm_loss(logits {tuple(logits.shape)} of magnitude ~{scale:g}, segment_ids "
                f"{segments.tolist()}, reduction={reduction!r})")
        if torch.isnan(expected):   # nothing to predict: nan, as torch; no gradient to compare
            got = as_tensor(fn(logits.clone(), ids.clone(), segments.clone(), reduction), what)
            assert_close(got.reshape(()), expected, what, hint="No prediction at all: 0 / 0 = nan, as in torch. " + hint)
            continue
        x = logits.clone().double().requires_grad_()
        expected = _packed_reference(x, ids, segments, reduction)
        (expected_grad,) = torch.autograd.grad(expected, x)
        out, grads, _ = value_and_grad(fn, logits.clone().requires_grad_(), ids.clone(), segments.clone(), reduction)
        out = as_tensor(out, what)
        if out.numel() != 1:
            raise AssertionError(f"{what}: expected a single number, got shape {tuple(out.shape)}")
        if torch.isinf(out).any() or torch.isnan(out).any():
            raise AssertionError(f"{what}: the loss is {'nan' if torch.isnan(out).any() else 'inf'}. {_OVERFLOW}")
        assert_close(out.reshape(()), expected.detach(), what, rtol=1e-4, atol=1e-4 * max(1.0, scale / 100), hint=hint)
        assert_close(grads[0], expected_grad, what + ": gradient wrt logits", rtol=1e-3,
                     atol=1e-5 + 1e-4 * float(expected_grad.abs().max()),
                     hint="compute it with differentiable torch operations (no .item(), no in-place writes into "
                          "the logits); masked positions get zero gradient")


# --------------------------------------------------------------------------- distillation_loss

def _distillation_reference(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                            alpha: float, ignore_index: int) -> torch.Tensor:
    v = student.shape[-1]
    keep = targets.reshape(-1) != ignore_index
    s, t = student.reshape(-1, v), teacher.reshape(-1, v)
    kl = F.kl_div(F.log_softmax(s[keep] / temperature, dim=-1), F.log_softmax(t[keep] / temperature, dim=-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s, targets.reshape(-1), ignore_index=ignore_index)
    return alpha * kl + (1 - alpha) * ce


def check_distillation_loss(fn: Callable) -> None:
    """``fn(student_logits, teacher_logits, targets, temperature, alpha, ignore_index)`` =
    ``alpha * T**2 * KL(softmax(t/T) || softmax(s/T))`` (``F.kl_div(..., log_target=True,
    reduction='batchmean')``) ``+ (1 - alpha) * F.cross_entropy(s, targets)``, both over the rows
    whose target is not ``ignore_index``."""
    g = fresh_generator()
    rng = _rng(g)
    hint = ("loss = alpha * T^2 * mean over counted rows of sum_j p_t[j] * (log p_t[j] - log p_s[j]), with "
            "p_t = softmax(teacher/T) and p_s = softmax(student/T) computed stably, + (1 - alpha) * the mean "
            "cross-entropy of the raw student logits (T = 1); rows whose target is ignore_index count in neither "
            "term; the teacher gets no gradient.")
    for case in range(10):
        lead = rng.choice([(rng.randint(2, 6),), (rng.randint(1, 3), rng.randint(2, 5))])
        v = rng.choice([3, 7, 64, 300])
        scale = [1.0, 20.0, 1e3][case % 3]
        temperature = [2.0, 0.5, 1.0][case % 3] if case < 3 else round(rng.uniform(0.7, 4.0), 3)
        alpha = [0.5, 1.0, 0.0, 0.5][case] if case < 4 else round(rng.uniform(0.1, 0.9), 3)
        ignore_index = 1 if case == 5 else -100
        student = torch.randn(*lead, v, generator=g) * scale
        teacher = student.clone() if case == 4 else torch.randn(*lead, v, generator=g) * scale
        targets = torch.randint(0, v, lead, generator=g)
        flat = targets.view(-1)
        for i in range(flat.numel()):
            if rng.random() < 0.3:
                flat[i] = ignore_index
        flat[0] = 0 if ignore_index != 0 else 2            # at least one counted row
        if case != 2:
            flat[-1] = ignore_index                        # and at least one ignored row
        s64 = student.double().requires_grad_()
        expected = _distillation_reference(s64, teacher.double(), targets, temperature, alpha, ignore_index)
        (expected_grad,) = torch.autograd.grad(expected, s64)
        what = (f"distillation_loss(student and teacher logits {tuple(student.shape)} of magnitude ~{scale:g}, "
                f"targets with {int((targets == ignore_index).sum())} of {targets.numel()} = ignore_index {ignore_index}, "
                f"temperature={temperature}, alpha={alpha})")
        out, grads, _ = value_and_grad(fn, student.clone().requires_grad_(), teacher.clone(), targets.clone(),
                                       temperature, alpha, ignore_index)
        out = as_tensor(out, what)
        if out.numel() != 1:
            raise AssertionError(f"{what}: expected a single number, got shape {tuple(out.shape)}")
        if torch.isinf(out).any() or torch.isnan(out).any():
            raise AssertionError(f"{what}: the loss is {'nan' if torch.isnan(out).any() else 'inf'}. {_OVERFLOW} "
                                 "And never take the log of a probability that may have underflowed to 0.")
        assert_close(out.reshape(()), expected.detach(), what, rtol=1e-4, atol=1e-5 * max(1.0, scale), hint=hint)
        assert_close(grads[0], expected_grad, what + ": gradient wrt the student logits", rtol=1e-3,
                     atol=1e-6 + 1e-4 * float(expected_grad.abs().max()), hint=hint)
    # every row ignored: nan, as torch
    student, teacher = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    what = "distillation_loss with every target = ignore_index (-100)"
    got = as_tensor(fn(student, teacher, torch.full((3,), -100), 2.0, 0.5, -100), what)
    assert_close(got.reshape(()), torch.tensor(float("nan")), what,
                 hint="no counted row: the means are 0 / 0 = nan, as torch's; do not guard them")


# --------------------------------------------------------------------------- ChunkedCrossEntropy

def _chunked_case(g: torch.Generator, rng: random.Random, n: int, d: int, v: int, scale: float,
                  ignore_index: int, ignored: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (scale / d ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    for i in range(n):
        if rng.random() < ignored:
            targets[i] = ignore_index
    return hidden, weight, targets


def check_ChunkedCrossEntropy(cls: Any) -> None:
    """``ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, label_smoothing)``
    equals ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=..., label_smoothing=...)``
    in value and in both gradients, for any incoming gradient."""
    try:
        is_function = cls.generate_vmap_rule is False
    except AttributeError:
        is_function = False
    if not is_function:
        raise AssertionError("ChunkedCrossEntropy must be a subclass of torch.autograd.Function with its own "
                             "forward and backward (static methods), used as ChunkedCrossEntropy.apply(...)")
    g = fresh_generator()
    rng = _rng(g)
    hint = ("loss = mean over the rows whose target is not ignore_index of (1 - eps) * (lse - z_t) + eps * "
            "(lse - mean_j z_j), with z = hidden @ weight.T; the gradient wrt z is (softmax(z) - (1 - eps) * "
            "onehot - eps / V) / n_valid times the incoming gradient, zero on ignored rows; dhidden = dz @ W, "
            "dweight = dz.T @ hidden.")
    #        n,  d,   v, chunk, scale, ignore_index, fraction ignored, smoothing
    cases = [(6, 8, 37, 8, 3.0, -100, 0.3, 0.0),
             (12, 16, 100, 33, 300.0, -100, 0.2, None),
             (1, 4, 10, 64, 1.0, -100, 0.0, None),
             (9, 8, 50, 1, 20.0, 3, 0.3, 0.0),
             (20, 12, 257, 64, 100.0, -100, 0.25, 1.0),
             (7, 8, 40, 40, 5.0, -100, 0.0, None)]
    for index, (n, d, v, chunk, scale, ignore_index, ignored, smoothing) in enumerate(cases):
        eps = round(rng.uniform(0.05, 0.5), 3) if smoothing is None else smoothing
        hidden, weight, targets = _chunked_case(g, rng, n, d, v, scale, ignore_index, ignored)
        if not bool((targets != ignore_index).any()):
            targets[0] = (ignore_index + 1) % v
        grad_out = torch.tensor([1.0, -2.0][index] if index < 2 else rng.choice([1.0, 0.5, round(rng.uniform(-3, 3), 3)]))
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        expected = F.cross_entropy(h64 @ w64.T, targets, ignore_index=ignore_index, label_smoothing=eps)
        eh, ew = torch.autograd.grad(expected, (h64, w64), grad_outputs=grad_out.double())
        what = (f"ChunkedCrossEntropy.apply(hidden [{n}, {d}], weight [{v}, {d}], targets with "
                f"{int((targets == ignore_index).sum())} of {n} = ignore_index {ignore_index}, chunk_size={chunk}, "
                f"label_smoothing={eps}; logits ~{scale:g}; incoming gradient {float(grad_out):g})")
        out, grads, _ = value_and_grad(cls.apply, hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
                                       targets.clone(), chunk, ignore_index, eps, grad_output=grad_out)
        out = as_tensor(out, what)
        if out.numel() != 1:
            raise AssertionError(f"{what}: expected a scalar loss, got shape {tuple(out.shape)}")
        if not torch.isfinite(out).all():
            raise AssertionError(f"{what}: the loss is not finite. {_OVERFLOW}")
        assert_close(out.reshape(()), expected.detach(), what, rtol=1e-4, atol=1e-4, hint=hint, check_dtype=False)
        for got, want, name in ((grads[0], eh, "hidden"), (grads[1], ew, "weight")):
            if got is None:
                raise AssertionError(f"{what}: backward returned no gradient for {name}")
            assert_close(got, want, f"{what}: gradient wrt {name}", rtol=1e-3,
                         atol=1e-6 + 1e-4 * float(want.abs().max()), hint=hint)
    # every target ignored: the loss is 0 / 0 = nan, as torch's, and the gradients are exactly 0
    hidden, weight, targets = _chunked_case(g, rng, 5, 8, 30, 2.0, -100, 1.0)
    what = "ChunkedCrossEntropy.apply with every target = ignore_index (chunk_size=7, label_smoothing=0.1)"
    out, grads, _ = value_and_grad(cls.apply, hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
                                   targets, 7, -100, 0.1)
    assert_close(as_tensor(out, what).reshape(()), torch.tensor(float("nan")), what,
                 hint="torch returns nan (0 / 0) for the loss; do not guard the division of the loss")
    for got, name in ((grads[0], "hidden"), (grads[1], "weight")):
        assert_close(got, torch.zeros(hidden.shape if name == "hidden" else weight.shape), f"{what}: gradient wrt {name}",
                     hint="with nothing to learn from, the gradients are exactly 0 (not nan): divide the gradient by "
                          "max(n_valid, 1)")
    # bfloat16 inputs: compute in float32, return the loss and the gradients in the inputs' dtype. Many
    # small chunks, so that bfloat16 running sums drift well beyond the rounding of the result.
    hidden, weight, targets = _chunked_case(g, rng, 16, 32, 1024, 3.0, -100, 0.2)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h64 @ w64.T, targets, ignore_index=-100, label_smoothing=0.1)
    eh, ew = torch.autograd.grad(expected, (h64, w64))
    what = "ChunkedCrossEntropy.apply on bfloat16 hidden [16, 32] and weight [1024, 32] (chunk_size=16, label_smoothing=0.1)"
    out, grads, _ = value_and_grad(cls.apply, hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
                                   targets, 16, -100, 0.1)
    bf16_hint = ("upcast each chunk to float32 for the arithmetic (bfloat16 running sums lose precision); return "
                 "the loss and the gradients as bfloat16")
    assert_close(out, expected.detach().bfloat16(), what, rtol=1e-2, atol=1e-2, hint=bf16_hint, check_dtype=True)
    for got, want, name in ((grads[0], eh, "hidden"), (grads[1], ew, "weight")):
        assert_close(got, want, f"{what}: gradient wrt {name}", rtol=4e-3,
                     atol=4e-3 * float(want.abs().max()), hint=bf16_hint)


CHECKS = {
    "logsumexp_update": check_logsumexp_update,
    "packed_lm_loss": check_packed_lm_loss,
    "distillation_loss": check_distillation_loss,
    "ChunkedCrossEntropy": check_ChunkedCrossEntropy,
}
