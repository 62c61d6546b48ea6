# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 exercises: cross-entropy
#
# Five functions, each graded by `check(...)` on random inputs drawn when you run it, compared
# with `torch.nn.functional.cross_entropy` / `torch.logsumexp`. The inputs include logits of
# magnitude `1e4`, where `torch.exp` overflows to `inf`, and targets set to `-100`.
#
# Rules: use only elementwise torch operations, reductions (`sum`, `amax`, `mean`), `gather` and
# indexing. **Not allowed**: `F.cross_entropy`, `F.log_softmax`, `torch.logsumexp`, `torch.softmax`
# (those are what you are rebuilding). Read chapter 2 first (`chapters/02_cross_entropy.ipynb`).
#
# Grade the whole notebook from a terminal with
# `python -m llama_from_scratch.grade exercises/ch02_cross_entropy.ipynb`.

# %%
import torch
import torch.nn.functional as F

from llama_from_scratch.grade import check

# %% [markdown]
# ## Exercise 1: a stable log-sum-exp
#
# Return `log(sum(exp(x)))` over the **last** dimension of `x` (any number of leading
# dimensions; the result has shape `x.shape[:-1]`). It must stay finite for logits of magnitude
# `1e4`, both positive and negative. Hint: subtract the maximum of each row first,
# `logsumexp(x) = m + log(sum(exp(x - m)))`. Do not modify `x` in place.

# %%
# EXERCISE stable_logsumexp (2 points)
def stable_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension, without overflow or underflow."""
    ### BEGIN SOLUTION
    m = x.amax(dim=-1, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    ### END SOLUTION


# %%
check(stable_logsumexp)

# %% [markdown]
# ## Exercise 2: cross-entropy
#
# `logits` is `[N, V]`, `targets` is `[N]` (class indices, `int64`). Return the mean over rows of
# `-log softmax(logits)[target]`, a 0-dimensional tensor. Use your `stable_logsumexp`:
# `-log softmax(z)[t] = logsumexp(z) - z[t]`. Hint: `logits.gather(-1, targets.unsqueeze(-1))`
# picks the target logit of every row.

# %%
# EXERCISE cross_entropy_basic (2 points)
def cross_entropy_basic(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the targets; equals F.cross_entropy(logits, targets)."""
    ### BEGIN SOLUTION
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (stable_logsumexp(logits) - target_logits).mean()
    ### END SOLUTION


# %%
check(cross_entropy_basic)

# %% [markdown]
# ## Exercise 3: ignoring padding
#
# Same as exercise 2, except that rows whose target equals `ignore_index` do not count: the mean
# is over the **other** rows only. Careful: `-100` is not a valid index for `gather`, so replace
# ignored targets by any valid class before gathering, then leave those rows out. When every
# target is ignored, torch returns `nan` (0 / 0); so should you.

# %%
# EXERCISE cross_entropy_masked (2 points)
def cross_entropy_masked(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not ignore_index."""
    ### BEGIN SOLUTION
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    per_row = stable_logsumexp(logits) - logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() / valid.sum()
    ### END SOLUTION


# %%
check(cross_entropy_masked)

# %% [markdown]
# ## Exercise 4: label smoothing
#
# With smoothing `eps`, the target distribution is `(1 - eps) * onehot(t) + eps / V`. The loss of
# a row is the cross-entropy against that distribution:
#
# `(1 - eps) * (lse(z) - z[t]) + eps * mean_j (lse(z) - z[j])`
#
# Return the mean over rows (no ignored targets here). It must equal
# `F.cross_entropy(logits, targets, label_smoothing=eps)` for every `eps` in `[0, 1]`.

# %%
# EXERCISE label_smoothed_cross_entropy (2 points)
def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against the smoothed target distribution."""
    ### BEGIN SOLUTION
    lse = stable_logsumexp(logits)
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    uniform = lse - logits.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()
    ### END SOLUTION


# %%
check(label_smoothed_cross_entropy)

# %% [markdown]
# ## Exercise 5: the gradient, by hand
#
# Return the gradient of `cross_entropy_basic(logits, targets)` (the **mean** over `N` rows) with
# respect to `logits`, a tensor of the same shape `[N, V]`, **without autograd** (the check runs
# your function under `torch.no_grad()`). Chapter 2 derived it: `(softmax(z) - onehot(t)) / N`.
# Compute the softmax stably (`exp(z - logsumexp(z))` is one way).

# %%
# EXERCISE cross_entropy_grad (2 points)
def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d mean_cross_entropy / d logits = (softmax(logits) - onehot(targets)) / N."""
    ### BEGIN SOLUTION
    probs = torch.exp(logits - stable_logsumexp(logits).unsqueeze(-1))
    onehot = torch.zeros_like(probs)
    onehot.scatter_(-1, targets.unsqueeze(-1), 1.0)
    return (probs - onehot) / logits.shape[0]
    ### END SOLUTION


# %%
check(cross_entropy_grad)

# %% [markdown]
# ## Going further (not graded)
#
# * Check your gradient against autograd yourself: `torch.autograd.grad(cross_entropy_basic(x, t), x)`.
# * What is the loss of a model that outputs all-zero logits over SmolLM2's 49152 tokens? Compare
#   with `math.log(49152)`.
# * Read `chunked_cross_entropy` in `llama_from_scratch/loss.py` and work out why it stores the
#   gradients during the forward pass instead of the logits.
