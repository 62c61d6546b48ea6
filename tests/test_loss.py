"""Chapter 2: cross-entropy from scratch, checked against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.loss import (
    chunked_cross_entropy,
    cross_entropy,
    log_softmax,
    logsumexp,
    perplexity,
    softmax,
)

REDUCTIONS = ["mean", "sum", "none"]


def torch_reference(logits: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.cross_entropy with the vocabulary in the last dimension (torch wants it in dimension 1)."""
    out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), **kwargs)
    return out.reshape(targets.shape) if kwargs.get("reduction") == "none" else out


def random_problem(shape: tuple[int, ...], seed: int, scale: float = 3.0, ignore_fraction: float = 0.0):
    """Logits of ``shape`` (vocabulary last) and matching targets, some set to -100."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * scale
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_fraction:
        targets[torch.rand(shape[:-1], generator=g) < ignore_fraction] = -100
    return logits, targets


# ------------------------------------------------------------------ building blocks


def test_logsumexp_softmax_log_softmax_match_torch_and_survive_huge_logits():
    x = torch.randn(5, 33) * 1e4
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, dim=-1))
    torch.testing.assert_close(softmax(x), torch.softmax(x, dim=-1))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))
    assert torch.isfinite(logsumexp(x)).all()
    # the naive formula really does overflow here: the trick is what saves it
    assert torch.isinf(torch.log(torch.exp(x).sum(-1))).any()


def test_logsumexp_gradient_is_softmax():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(logsumexp, (x,))
    (grad,) = torch.autograd.grad(logsumexp(x).sum(), x)
    torch.testing.assert_close(grad, torch.softmax(x.detach(), dim=-1))


# ------------------------------------------------------------------ equality with torch


@pytest.mark.parametrize("shape", [(1, 5), (7, 11), (64, 257), (2, 3, 13), (1, 1, 2)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_equals_torch(shape, reduction):
    logits, targets = random_problem(shape, seed=sum(shape))
    got = cross_entropy(logits, targets, reduction=reduction)
    expected = torch_reference(logits, targets, reduction=reduction)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_three_dimensional_logits_equal_torch_class_dim_one_layout():
    logits, targets = random_problem((3, 6, 17), seed=1)
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # torch's [B, V, T]
    torch.testing.assert_close(cross_entropy(logits, targets, reduction="none"), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_some_targets(reduction):
    logits, targets = random_problem((4, 9, 31), seed=2, ignore_fraction=0.4)
    assert (targets == -100).any() and (targets != -100).any()
    got = cross_entropy(logits, targets, reduction=reduction)
    torch.testing.assert_close(got, torch_reference(logits, targets, reduction=reduction))
    if reduction == "none":
        assert (got[targets == -100] == 0).all()


def test_custom_ignore_index():
    logits, targets = random_problem((20, 10), seed=3)
    targets[::3] = 0  # ignore class 0, a real class id (e.g. a pad token id)
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=0),
                               F.cross_entropy(logits, targets, ignore_index=0))


def test_all_targets_ignored_gives_nan_mean_and_zero_gradients_like_torch():
    logits, _ = random_problem((6, 8), seed=4)
    targets = torch.full((6,), -100)
    for smoothing in (0.0, 0.1):
        ours = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        loss = cross_entropy(ours, targets, label_smoothing=smoothing)
        ref = F.cross_entropy(theirs, targets, label_smoothing=smoothing)
        assert torch.isnan(loss) and torch.isnan(ref)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(ours.grad, theirs.grad)
        assert (ours.grad == 0).all()
    assert cross_entropy(logits, targets, reduction="sum").item() == 0.0
    assert (cross_entropy(logits, targets, reduction="none") == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.3])
def test_label_smoothing_matches_torch(reduction, smoothing, ignore_fraction):
    logits, targets = random_problem((3, 7, 19), seed=5, ignore_fraction=ignore_fraction)
    got = cross_entropy(logits, targets, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(
        got, torch_reference(logits, targets, reduction=reduction, label_smoothing=smoothing))


# ------------------------------------------------------------------ stability and dtypes


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logits_of_magnitude_1e4_stay_finite(smoothing):
    logits, targets = random_problem((16, 50), seed=6, scale=1e4)
    got = cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(
        got, F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing))
    # a correct prediction by a margin of 1e4 costs (almost) nothing, a wrong one costs 1e4
    confident = torch.tensor([[1e4, 0.0, -1e4]])
    assert cross_entropy(confident, torch.tensor([0])).item() == 0.0
    assert cross_entropy(confident, torch.tensor([1])).item() == pytest.approx(1e4)


def test_bfloat16_inputs_are_computed_in_float32():
    logits, targets = random_problem((32, 1000), seed=7, ignore_fraction=0.2)
    bf = logits.bfloat16()
    got = cross_entropy(bf, targets)
    assert got.dtype == torch.bfloat16  # the dtype torch returns too
    exact = F.cross_entropy(bf.float(), targets)  # the same bf16 values, float32 arithmetic
    # our only rounding is the final cast to bf16 (relative error <= 2**-8)
    torch.testing.assert_close(got.float(), exact, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(got, F.cross_entropy(bf, targets))  # bf16 default tolerance
    none = cross_entropy(bf, targets, reduction="none")
    torch.testing.assert_close(none.float(), F.cross_entropy(bf.float(), targets, reduction="none"),
                               rtol=2 ** -8, atol=1e-5)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_gradients_equal_torch(reduction, smoothing):
    logits, targets = random_problem((2, 5, 23), seed=8, ignore_fraction=0.3)
    ours = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    upstream = torch.randn(targets.shape) if reduction == "none" else torch.tensor(1.7)
    (cross_entropy(ours, targets, reduction=reduction, label_smoothing=smoothing) * upstream).sum().backward()
    (torch_reference(theirs, targets, reduction=reduction, label_smoothing=smoothing) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_gradcheck_in_float64():
    logits, targets = random_problem((4, 6), seed=9)
    targets[1] = -100
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, targets, label_smoothing=0.1), (x,))


def test_gradient_is_softmax_minus_onehot_over_n():
    logits, targets = random_problem((10, 12), seed=10)
    x = logits.clone().requires_grad_()
    cross_entropy(x, targets).backward()
    expected = (torch.softmax(logits, -1) - F.one_hot(targets, 12).float()) / 10
    torch.testing.assert_close(x.grad, expected)


# ------------------------------------------------------------------ chunked loss


def chunked_problem(n: int, d: int, v: int, seed: int, ignore_fraction: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_fraction] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 37, 100])  # divides 28 or not; larger than N
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_equals_unchunked_value_and_gradients(chunk_size, reduction, smoothing):
    hidden, weight, targets = chunked_problem(28, 16, 101, seed=chunk_size)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = chunked_cross_entropy(h1, w1, targets, chunk_size=chunk_size, reduction=reduction,
                                 label_smoothing=smoothing)
    ref = F.cross_entropy(h2 @ w2.T, targets, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref)
    (ours * 0.5).backward()  # an upstream gradient other than 1 must be applied too
    (ref * 0.5).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_chunked_accepts_batch_time_hidden_and_matches_cross_entropy():
    hidden, weight, targets = chunked_problem(2 * 9, 8, 33, seed=11)
    h3 = hidden.reshape(2, 9, 8).requires_grad_()
    t3 = targets.reshape(2, 9)
    loss = chunked_cross_entropy(h3, weight, t3, chunk_size=5)
    loss.backward()
    h_ref = hidden.reshape(2, 9, 8).clone().requires_grad_()
    ref = cross_entropy(h_ref @ weight.T, t3)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h3.grad, h_ref.grad)


def test_chunked_all_ignored_and_no_grad():
    hidden, weight, _ = chunked_problem(10, 4, 9, seed=12)
    targets = torch.full((10,), -100)
    h = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight, targets, chunk_size=3)
    assert torch.isnan(loss)
    loss.backward()
    assert (h.grad == 0).all()
    with torch.no_grad():
        _, _, targets = chunked_problem(10, 4, 9, seed=12)
        value = chunked_cross_entropy(hidden, weight, targets, chunk_size=3)
    torch.testing.assert_close(value, F.cross_entropy(hidden @ weight.T, targets))


def test_chunked_bfloat16():
    hidden, weight, targets = chunked_problem(40, 32, 500, seed=13)
    hb = hidden.bfloat16().requires_grad_()
    wb = weight.bfloat16().requires_grad_()
    loss = chunked_cross_entropy(hb, wb, targets, chunk_size=16)
    loss.backward()
    assert loss.dtype == hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    h32 = hb.detach().float().requires_grad_()
    w32 = wb.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w32.T, targets)  # same bf16 values, float32 arithmetic
    ref.backward()
    torch.testing.assert_close(loss.float(), ref, rtol=2 ** -8, atol=0)
    torch.testing.assert_close(hb.grad.float(), h32.grad, rtol=2 ** -7, atol=1e-5)
    torch.testing.assert_close(wb.grad.float(), w32.grad, rtol=2 ** -7, atol=1e-5)


def test_chunked_large_logits_stay_finite():
    hidden, weight, targets = chunked_problem(12, 8, 40, seed=14)
    hidden = hidden * 3e3  # logits of magnitude ~1e4
    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))


# ------------------------------------------------------------------ perplexity


def test_perplexity_float_and_tensor_and_uniform_baseline():
    assert perplexity(0.0) == 1.0
    assert isinstance(perplexity(1.0), float)
    assert perplexity(math.log(49152)) == pytest.approx(49152)
    value = perplexity(torch.tensor(2.0))
    assert isinstance(value, torch.Tensor)
    torch.testing.assert_close(value, torch.exp(torch.tensor(2.0)))
    uniform = cross_entropy(torch.zeros(5, 1000), torch.randint(0, 1000, (5,)))
    assert perplexity(uniform).item() == pytest.approx(1000, rel=1e-5)


# ------------------------------------------------------------------ errors


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(5,\)"):
        cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(3, 2\)"):
        cross_entropy(torch.randn(2, 3, 10), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(5,\)"):
        chunked_cross_entropy(torch.randn(6, 4), torch.randn(9, 4), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(9, 3\).*\(6, 4\)"):
        chunked_cross_entropy(torch.randn(6, 4), torch.randn(9, 3), torch.zeros(6, dtype=torch.long))


def test_bad_reduction_dtype_and_range_errors():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        cross_entropy(logits, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="integer class indices.*float32"):
        cross_entropy(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"target 5 at position \(1,\) is outside \[0, 5\)"):
        cross_entropy(logits, torch.tensor([0, 5, -100]))
    with pytest.raises(ValueError, match=r"target -1 .* not ignore_index"):
        cross_entropy(logits, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), chunk_size=0)
    # int32 targets are accepted (torch insists on int64; there is no reason to)
    torch.testing.assert_close(cross_entropy(logits, torch.tensor([0, 1, 2], dtype=torch.int32)),
                               F.cross_entropy(logits, torch.tensor([0, 1, 2])))


def test_chunked_gradcheck_in_float64():
    hidden, weight, targets = chunked_problem(7, 3, 11, seed=15)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: chunked_cross_entropy(a, b, targets, chunk_size=3, label_smoothing=0.1), (h, w))


def test_chunked_backward_twice_with_retain_graph_accumulates_like_autograd():
    hidden, weight, targets = chunked_problem(10, 4, 9, seed=16)
    w = weight.clone().requires_grad_()
    loss = chunked_cross_entropy(hidden, w, targets, chunk_size=3)
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * once)
    w_ref = weight.clone().requires_grad_()
    F.cross_entropy(hidden @ w_ref.T, targets).backward()
    torch.testing.assert_close(once, w_ref.grad)
