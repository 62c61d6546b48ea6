"""Chapter 2's checks: they pass on the solutions and on correct but unusual answers, and fail on
the stub and on the mistakes a learner plausibly makes."""

from __future__ import annotations

import pytest
import torch

from llama_from_scratch.course.checks.ch02_cross_entropy import CHECKS

from answers import FAILS, solution, unanswered

NS = solution("ch02_cross_entropy")
stub = unanswered


def _lse(z: torch.Tensor) -> torch.Tensor:
    m = z.amax(dim=-1, keepdim=True).detach()
    return (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))).squeeze(-1)


# --------------------------------------------------------------------------- logsumexp_update

def _update_no_rescale(m, s, chunk):
    new_m = torch.maximum(m, chunk.amax(-1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    return new_m, s + torch.exp(chunk - shift[:, None]).sum(-1)


def _update_wrong_sign(m, s, chunk):
    new_m = torch.maximum(m, chunk.amax(-1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    old = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return new_m, s * torch.exp(shift - old) + torch.exp(chunk - shift[:, None]).sum(-1)


def _update_unguarded(m, s, chunk):
    new_m = torch.maximum(m, chunk.amax(-1))
    return new_m, s * torch.exp(m - new_m) + torch.exp(chunk - new_m[:, None]).sum(-1)


def _update_chunk_max_only(m, s, chunk):
    new_m = chunk.amax(-1)
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
    return new_m, s * torch.exp(m - shift) + torch.exp(chunk - shift[:, None]).sum(-1)


def _update_in_log_space(m, s, chunk):
    """Correct, unusual: combine the old log-sum-exp with the chunk's in float64, then express it
    against the new maximum."""
    m64, s64, c64 = m.double(), s.double(), chunk.double()
    old = torch.where(s64 > 0, m64 + torch.log(s64), torch.full_like(m64, float("-inf")))
    both = torch.cat([old[:, None], c64], dim=1)
    top = both.amax(dim=1)
    top_shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = top_shift + torch.log(torch.exp(both - top_shift[:, None]).sum(dim=1))
    new_m = torch.maximum(m, chunk.amax(dim=1))
    shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m)).double()
    return new_m, torch.exp(lse - shift).float()


UPDATE_WRONG = {"stub": stub, "old sum not rescaled": _update_no_rescale, "rescaled the wrong way": _update_wrong_sign,
                "nan on rows of -inf": _update_unguarded, "forgets the old maximum": _update_chunk_max_only}


def test_logsumexp_update_solution_and_unusual_pass():
    assert CHECKS["logsumexp_update"](NS["logsumexp_update"]) is None
    assert CHECKS["logsumexp_update"](_update_in_log_space) is None


@pytest.mark.parametrize("name", list(UPDATE_WRONG))
def test_logsumexp_update_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["logsumexp_update"](UPDATE_WRONG[name])


# --------------------------------------------------------------------------- packed_lm_loss

def _packed(shift: int = 1, boundaries: bool = True, naive: bool = False, denominator: str = "counted",
            document_key: str = "row", empty_documents: bool = False, ignore_reduction: bool = False):
    """A packed loss with switches for the usual mistakes."""

    def packed_lm_loss(logits, input_ids, segment_ids, reduction="token"):
        b, t, _ = logits.shape
        z = logits[:, : t - shift] if shift else logits
        targets = input_ids[:, shift:]
        prev, nxt = segment_ids[:, : t - shift], segment_ids[:, shift:]
        counted = ((nxt == prev) if boundaries else (nxt != 0)) & (prev != 0)
        lse = torch.log(torch.exp(z).sum(-1)) if naive else _lse(z)
        per_token = torch.where(counted, lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1), torch.zeros(()))
        if reduction == "token" or ignore_reduction:
            return per_token.sum() / (counted.sum() if denominator == "counted" else per_token.numel())
        stride = int(segment_ids.max()) + 1
        offset = stride * torch.arange(b)[:, None] if document_key == "row" else 0
        docs = prev + offset
        sums = torch.zeros(b * stride).index_add(0, docs[counted], per_token[counted])
        counts = torch.bincount(docs[counted], minlength=b * stride).float()
        if empty_documents:   # documents without a prediction count as 0
            real = torch.zeros(b * stride, dtype=torch.bool)
            real[(segment_ids + (stride * torch.arange(b)[:, None] if document_key == "row" else 0))[segment_ids != 0]] = True
            return (sums[real] / counts[real].clamp(min=1)).mean()
        present = counts > 0
        return (sums[present] / counts[present]).mean()

    return packed_lm_loss


def _packed_loop(logits, input_ids, segment_ids, reduction="token"):
    """Correct, unusual: a Python loop over rows and documents."""
    losses, documents = [], []
    for row in range(logits.shape[0]):
        current: list = []
        for pos in range(logits.shape[1]):
            seg = int(segment_ids[row, pos])
            if seg != 0 and pos + 1 < logits.shape[1] and int(segment_ids[row, pos + 1]) == seg:
                z = logits[row, pos]
                current.append(_lse(z) - z[input_ids[row, pos + 1]])
            if pos + 1 == logits.shape[1] or int(segment_ids[row, pos + 1]) != seg:
                if current:
                    documents.append(torch.stack(current).mean())
                    losses += current
                current = []
    if not losses:
        return torch.tensor(float("nan"))
    if reduction == "token":
        return torch.stack(losses).mean()
    return torch.stack(documents).mean()


PACKED_WRONG = {
    "stub": stub, "labels not shifted": _packed(shift=0), "predicts across documents": _packed(boundaries=False),
    "naive log-sum-exp": _packed(naive=True), "divides by every position": _packed(denominator="all"),
    "documents merged across rows": _packed(document_key="segment"),
    "one-token documents count as 0": _packed(empty_documents=True),
    "ignores reduction": _packed(ignore_reduction=True),
}


def test_packed_lm_loss_solution_and_unusual_pass():
    assert CHECKS["packed_lm_loss"](NS["packed_lm_loss"]) is None
    assert CHECKS["packed_lm_loss"](_packed_loop) is None
    assert CHECKS["packed_lm_loss"](_packed()) is None


@pytest.mark.parametrize("name", list(PACKED_WRONG))
def test_packed_lm_loss_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["packed_lm_loss"](PACKED_WRONG[name])


# --------------------------------------------------------------------------- distillation_loss

def _log_probs(z):
    return z - _lse(z).unsqueeze(-1)


def _distill(power: int = 2, reverse: bool = False, per_element: bool = False, student_only_t: bool = False,
             naive: bool = False, kl_on_every_row: bool = False, ce_at_temperature: bool = False,
             swap_alpha: bool = False):
    """A distillation loss with switches for the usual mistakes."""

    def distillation_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5, ignore_index=-100):
        v = student_logits.shape[-1]
        keep = targets.reshape(-1) != ignore_index
        every = torch.ones_like(keep)
        s_all, t_all = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
        s = s_all[every if kl_on_every_row else keep] / temperature
        t = t_all[every if kl_on_every_row else keep] / (1.0 if student_only_t else temperature)
        if naive:
            ls = torch.log(torch.exp(s) / torch.exp(s).sum(-1, keepdim=True))
            lt = torch.log(torch.exp(t) / torch.exp(t).sum(-1, keepdim=True))
        else:
            ls, lt = _log_probs(s), _log_probs(t)
        if reverse:
            ls, lt = lt, ls
        kl_terms = torch.exp(lt) * (lt - ls)
        kl = kl_terms.mean() if per_element else kl_terms.sum(-1).mean()
        ce_logits = s_all[keep] / (temperature if ce_at_temperature else 1.0)
        nll = -_log_probs(ce_logits).gather(-1, targets.reshape(-1)[keep].unsqueeze(-1)).mean()
        a = 1 - alpha if swap_alpha else alpha
        return a * temperature ** power * kl + (1 - a) * nll

    return distillation_loss


def _distill_cross_entropy_minus_entropy(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5,
                                         ignore_index=-100):
    """Correct, unusual: weights instead of indexing, cross-entropy against the teacher minus the
    teacher's entropy, in float64."""
    v = student_logits.shape[-1]
    weight = (targets.reshape(-1) != ignore_index).double()
    safe = torch.where(weight > 0, targets.reshape(-1), torch.zeros_like(targets.reshape(-1)))
    ls = _log_probs(student_logits.reshape(-1, v).double() / temperature)
    lt = _log_probs(teacher_logits.reshape(-1, v).double() / temperature)
    pt = torch.exp(lt)
    per_row_kl = -(pt * ls).sum(-1) + (pt * lt).sum(-1)
    per_row_ce = -_log_probs(student_logits.reshape(-1, v).double()).gather(-1, safe[:, None]).squeeze(-1)
    n = weight.sum()
    total = alpha * temperature * temperature * (per_row_kl * weight).sum() / n + (1 - alpha) * (per_row_ce * weight).sum() / n
    return total.float()


DISTILL_WRONG = {"stub": stub, "no T squared": _distill(power=0), "T instead of T squared": _distill(power=1),
                 "KL the other way round": _distill(reverse=True), "mean over every element": _distill(per_element=True),
                 "temperature on the student only": _distill(student_only_t=True), "log of a softmax": _distill(naive=True),
                 "KL over ignored rows too": _distill(kl_on_every_row=True),
                 "cross-entropy at temperature T": _distill(ce_at_temperature=True),
                 "alpha on the wrong term": _distill(swap_alpha=True)}


def test_distillation_loss_solution_and_unusual_pass():
    assert CHECKS["distillation_loss"](NS["distillation_loss"]) is None
    assert CHECKS["distillation_loss"](_distill_cross_entropy_minus_entropy) is None
    assert CHECKS["distillation_loss"](_distill()) is None


@pytest.mark.parametrize("name", list(DISTILL_WRONG))
def test_distillation_loss_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["distillation_loss"](DISTILL_WRONG[name])


# --------------------------------------------------------------------------- ChunkedCrossEntropy

def _chunked(divide_by_all_rows=False, ignore_grad_output=False, smoothing_over_chunk=False, no_rescale=False,
             no_inside_mask=False, no_backward_mask=False, nan_grads_when_empty=False, no_upcast=False):
    """A vocabulary-chunked Function with switches for the usual mistakes."""

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk_size=1024, ignore_index=-100, label_smoothing=0.0):
            n, vocab = hidden.shape[0], weight.shape[0]
            h = hidden if no_upcast else hidden.float()
            valid = targets != ignore_index
            safe = torch.where(valid, targets, torch.zeros_like(targets))
            m = torch.full((n,), float("-inf"), dtype=h.dtype)
            s = torch.zeros(n, dtype=h.dtype)
            target_logit, logit_sum = torch.zeros(n, dtype=h.dtype), torch.zeros(n, dtype=h.dtype)
            for start in range(0, vocab, chunk_size):
                z = h @ weight[start:start + chunk_size].to(h.dtype).T
                new_m = torch.maximum(m, z.amax(1))
                shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
                s = (s if no_rescale else s * torch.exp(m - shift)) + torch.exp(z - shift[:, None]).sum(1)
                m = new_m
                inside = (safe >= start) & (safe < start + z.shape[1])
                picked = z.gather(1, (safe - start).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
                target_logit = picked if no_inside_mask else torch.where(inside, picked, target_logit)
                logit_sum += z.sum(1) / (z.shape[1] / vocab if smoothing_over_chunk else 1)
            lse = m + torch.log(s)
            eps = label_smoothing
            per_row = (1 - eps) * (lse - target_logit) + eps * (lse - logit_sum / vocab)
            n_valid = int(valid.sum())
            denominator = n if divide_by_all_rows else valid.sum()
            loss = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / denominator
            ctx.save_for_backward(hidden, weight, safe, valid, lse)
            ctx.chunk_size, ctx.eps, ctx.n_valid, ctx.n = chunk_size, eps, n_valid, n
            return loss.to(hidden.dtype)

        @staticmethod
        def backward(ctx, grad_loss):
            hidden, weight, safe, valid, lse = ctx.saved_tensors
            h = hidden if no_upcast else hidden.float()
            vocab, eps = weight.shape[0], ctx.eps
            g = 1.0 if ignore_grad_output else grad_loss.float()
            count = ctx.n if divide_by_all_rows else (ctx.n_valid if nan_grads_when_empty else max(ctx.n_valid, 1))
            scale = (torch.ones(ctx.n) if no_backward_mask else valid.float()) * g / count
            rows = torch.arange(ctx.n)
            grad_h, grad_w = torch.zeros_like(h), torch.empty(weight.shape, dtype=h.dtype)
            for start in range(0, vocab, ctx.chunk_size):
                w = weight[start:start + ctx.chunk_size].to(h.dtype)
                dz = torch.exp(h @ w.T - lse[:, None]) - eps / vocab
                inside = (safe >= start) & (safe < start + w.shape[0])
                dz[rows[inside], safe[inside] - start] -= 1 - eps
                dz *= scale[:, None]
                grad_h += dz @ w
                grad_w[start:start + w.shape[0]] = dz.T @ h
            return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None

    return Chunked


class StubChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size=1024, ignore_index=-100, label_smoothing=0.0):
        raise NotImplementedError("Exercise: write your code here")

    @staticmethod
    def backward(ctx, grad_loss):
        raise NotImplementedError("Exercise: write your code here")


class PlainAutograd:
    """Not a Function: ordinary differentiable operations, so autograd keeps every logit."""

    @staticmethod
    def apply(hidden, weight, targets, chunk_size=1024, ignore_index=-100, label_smoothing=0.0):
        z = hidden.float() @ weight.float().T
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = _lse(z)
        eps = label_smoothing
        per_row = (1 - eps) * (lse - z.gather(1, safe[:, None]).squeeze(1)) + eps * (lse - z.mean(1))
        return (torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / valid.sum()).to(hidden.dtype)


class GradientsInForward(torch.autograd.Function):
    """Correct, unusual: two passes over the vocabulary in forward (log-sum-exp, then gradients),
    the gradients stored for a backward that only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size=1024, ignore_index=-100, label_smoothing=0.0):
        h, vocab, eps = hidden.float(), weight.shape[0], label_smoothing
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        chunks = [weight[i:i + chunk_size].float() for i in range(0, vocab, chunk_size)]
        m = torch.stack([(h @ w.T).amax(1) for w in chunks], 1).amax(1)
        lse = m + torch.log(sum(torch.exp(h @ w.T - m[:, None]).sum(1) for w in chunks))
        w_t = weight.float()[safe]
        target_logit = (h * w_t).sum(1)
        mean_logit = h @ weight.float().sum(0) / vocab
        per_row = (1 - eps) * (lse - target_logit) + eps * (lse - mean_logit)
        loss = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / valid.sum()
        scale = valid.float() / max(int(valid.sum()), 1)
        grad_h = torch.zeros_like(h)
        grad_w = []
        for i, w in enumerate(chunks):
            dz = torch.exp(h @ w.T - lse[:, None]) - eps / vocab
            onehot = torch.nn.functional.one_hot((safe - i * chunk_size).clamp(0, w.shape[0] - 1), w.shape[0]).float()
            inside = ((safe >= i * chunk_size) & (safe < i * chunk_size + w.shape[0])).float()
            dz = (dz - (1 - eps) * onehot * inside[:, None]) * scale[:, None]
            grad_h += dz @ w
            grad_w.append(dz.T @ h)
        ctx.grads = (grad_h, torch.cat(grad_w))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        g = grad_loss.float()
        return (grad_h * g).to(ctx.dtypes[0]), (grad_w * g).to(ctx.dtypes[1]), None, None, None, None


CHUNKED_WRONG = {
    "stub": StubChunked, "plain autograd, not a Function": PlainAutograd,
    "mean over every row": _chunked(divide_by_all_rows=True), "incoming gradient ignored": _chunked(ignore_grad_output=True),
    "smoothing divided by the chunk": _chunked(smoothing_over_chunk=True), "running sum not rescaled": _chunked(no_rescale=True),
    "target logit without the in-chunk mask": _chunked(no_inside_mask=True),
    "ignored rows get gradient": _chunked(no_backward_mask=True),
    "nan gradients when every target is ignored": _chunked(nan_grads_when_empty=True),
    "bfloat16 arithmetic (no upcast)": _chunked(no_upcast=True),
}


def test_chunked_cross_entropy_solution_and_unusual_pass():
    assert CHECKS["ChunkedCrossEntropy"](NS["ChunkedCrossEntropy"]) is None
    assert CHECKS["ChunkedCrossEntropy"](GradientsInForward) is None
    assert CHECKS["ChunkedCrossEntropy"](_chunked()) is None


@pytest.mark.parametrize("name", list(CHUNKED_WRONG))
def test_chunked_cross_entropy_wrong_answers_fail(name):
    with pytest.raises(FAILS):
        CHECKS["ChunkedCrossEntropy"](CHUNKED_WRONG[name])
