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
# # Chapter 2: cross-entropy, the loss of a language model
#
# A language model reads tokens and, at every position, outputs one score per vocabulary entry:
# the **logits** `z`, a vector of length `V` (49152 for SmolLM2, 128256 for Llama 3). Training
# asks one thing of those scores: that the token which actually came next gets a high probability.
#
# This chapter builds the loss that says how well a model does that, from the ground up:
#
# 1. **softmax** turns logits into probabilities;
# 2. the **negative log-likelihood** of the correct token is the loss (cross-entropy);
# 3. the **log-sum-exp trick** keeps it finite when logits are large;
# 4. **ignore_index** leaves out positions that should not be trained on (padding, prompts);
# 5. **label smoothing** and **perplexity**, the number people quote;
# 6. the **gradient**, `softmax - onehot`, the simplest formula in deep learning;
# 7. a **chunked** loss that never builds the `[N, V]` logits, and how much memory that saves.
#
# Every piece is checked against `torch.nn.functional.cross_entropy` in a visible cell.

# %%
import json
import math
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from llama_from_scratch.environment import quick_mode, seed_everything
from llama_from_scratch.loss import (
    chunked_cross_entropy,
    cross_entropy,
    log_softmax,
    logsumexp,
    perplexity,
    softmax,
)

QUICK = quick_mode()
seed_everything(0)
print("quick mode:", QUICK)

# %% [markdown]
# ## 1. Why cross-entropy: next-token prediction as maximum likelihood
#
# A language model factorises the probability of a text into next-token predictions:
#
# $$p(x_1, \dots, x_T) = \prod_{t} p(x_{t+1} \mid x_1, \dots, x_t).$$
#
# Training maximises this probability of the training text, which is the same as minimising its
# **negative log**, averaged over positions:
#
# $$\mathcal{L} = -\frac{1}{N}\sum_{t} \log p(x_{t+1} \mid x_{\le t}).$$
#
# This is the **cross-entropy** between the data (a one-hot distribution on the true next token)
# and the model's distribution. A few facts to keep in mind:
#
# * the loss of one position is `-log p(correct token)`: 0 when the model is certain and right,
#   `+inf` when it gives the right token probability 0;
# * with natural logarithms the unit is **nats**; divide by `ln 2` for **bits** (the number of
#   yes/no questions an ideal code would need per token);
# * `exp(loss)` is the **perplexity**: the model is "as uncertain as a fair die with that many faces".

# %%
p = torch.linspace(0.001, 1, 500)
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.plot(p, -torch.log(p))
ax.set_xlabel("probability the model gives the correct token")
ax.set_ylabel("loss  -log p  (nats)")
ax.set_title("confident and right costs ~0; confident and wrong costs a lot")
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Softmax: from scores to probabilities
#
# $$\mathrm{softmax}(z)_i = \frac{e^{z_i}}{\sum_j e^{z_j}}$$
#
# Exponentials make every entry positive; dividing by the sum makes them add up to 1. Adding the
# same constant to every logit changes nothing (it multiplies numerator and denominator by the
# same `e^c`): only **differences** between logits matter. Here is a five-word vocabulary.

# %%
# NBVAL_CHECK_OUTPUT
vocab = ["the", "cat", "sat", "on", "mat"]
z = torch.tensor([2.0, 1.0, 0.1, -1.0, 3.0])


def naive_softmax(z: torch.Tensor) -> torch.Tensor:
    """The textbook formula, exactly as written: fine for small logits (see below)."""
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)


probs = naive_softmax(z)
for word, logit, prob in zip(vocab, z.tolist(), probs.tolist()):
    print(f"{word:>4}  logit {logit:5.1f}  ->  p = {prob:.4f}")
print(f"sum = {probs.sum().item():.4f}")
print("adding 10 to every logit changes nothing:", torch.allclose(naive_softmax(z + 10), probs))
print("adding 100 breaks the naive formula:     ", naive_softmax(z + 100), " <- see section 3")

# %% [markdown]
# ## 3. Overflow, and the log-sum-exp trick
#
# float32 cannot hold `e^89` (its largest value is about `3.4e38 = e^88.7`). Logits of a few
# hundred are rare in a healthy model, but they do occur: an untrained or diverging model, a
# logit scale, a `-1e4` mask value used instead of `-inf`, or low-precision arithmetic where the
# limit is much lower (float16 overflows at `e^11`). The naive formula then computes `inf / inf`:

# %%
# NBVAL_CHECK_OUTPUT
big = torch.tensor([1e4, 0.0, -1e4])
print("naive softmax at logits 1e4:", naive_softmax(big))
print("naive log(sum(exp(z))):     ", torch.log(torch.exp(big).sum()))
print("naive at -1e4, -2e4, -3e4:   ", torch.log(torch.exp(big - 2e4).sum()), " (exp underflows to 0)")

# %% [markdown]
# The fix costs one line. Let `m = max(z)`. Then, exactly,
#
# $$\log\sum_j e^{z_j} = m + \log\sum_j e^{z_j - m}.$$
#
# Now every exponent is `<= 0`, so every `exp` lies in `(0, 1]` and the largest is exactly 1:
# nothing can overflow, and the sum is at least 1, so the `log` never sees 0. The same shift
# makes softmax safe, since `softmax(z) = softmax(z - m)`. The package's `logsumexp` and
# `softmax` (in `llama_from_scratch/loss.py`) are written exactly like this:

# %%
def stable_logsumexp(z: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(z))) over the last dimension, shifted by the row maximum."""
    m = z.amax(dim=-1, keepdim=True)
    return (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))).squeeze(-1)


# %%
# NBVAL_CHECK_OUTPUT
print("stable logsumexp at 1e4:  ", stable_logsumexp(big))
print("stable at -1e4, -2e4, -3e4:", stable_logsumexp(big - 2e4))
print("package softmax at 1e4:   ", softmax(big))

x = torch.randn(64, 1000) * 1e4
torch.testing.assert_close(stable_logsumexp(x), torch.logsumexp(x, dim=-1))
torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, dim=-1))
torch.testing.assert_close(softmax(x), torch.softmax(x, dim=-1))
torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))
print("logsumexp, softmax, log_softmax equal torch's at logits of magnitude 1e4")

# %% [markdown]
# ## 4. Cross-entropy from scratch
#
# For one row with target `t`:
#
# $$-\log \mathrm{softmax}(z)_t = -\left(z_t - \log\sum_j e^{z_j}\right) = \mathrm{logsumexp}(z) - z_t.$$
#
# No softmax, no division, no `log` of a probability that might have underflowed to 0: just the
# stable log-sum-exp minus one logit. That is all cross-entropy is.

# %%
def cross_entropy_from_scratch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of logsumexp(z) - z[target]; logits [N, V], targets [N]."""
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (stable_logsumexp(logits) - target_logits).mean()


logits = torch.randn(8, 49152) * 3
targets = torch.randint(0, 49152, (8,))
ours, theirs = cross_entropy_from_scratch(logits, targets), F.cross_entropy(logits, targets)
print(f"from scratch: {ours.item():.6f}   F.cross_entropy: {theirs.item():.6f}")
torch.testing.assert_close(ours, theirs)

big_logits = torch.randn(8, 100) * 1e4
torch.testing.assert_close(cross_entropy_from_scratch(big_logits, targets % 100),
                           F.cross_entropy(big_logits, targets % 100))
print("equal at logits of magnitude 1e4 too:", cross_entropy_from_scratch(big_logits, targets % 100).item())

# %% [markdown]
# The package's `cross_entropy(logits, targets, ignore_index=-100, reduction="mean",
# label_smoothing=0.0)` is the same computation with everything `F.cross_entropy` offers. Two
# conventions to know:
#
# * the vocabulary is the **last** dimension, `[N, V]` or `[B, T, V]`, as a model outputs it.
#   `F.cross_entropy` wants classes in dimension 1, so for `[B, T, V]` you either flatten to
#   `[B*T, V]` or transpose to `[B, V, T]`;
# * it computes in float32 even for bfloat16 logits (8 mantissa bits cannot add up 49152 small
#   exponentials accurately) and returns the loss in the logits' dtype, like torch.
#
# Here it is against torch over shapes, reductions, ignored targets and label smoothing:

# %%
B, T, V = 4, 16, 1000
logits = torch.randn(B, T, V) * 4
targets = torch.randint(0, V, (B, T))
targets[:, :5] = -100                      # e.g. a prompt that is not trained on
targets[-1, 10:] = -100                    # e.g. padding
checked = 0
for reduction in ["mean", "sum", "none"]:
    for smoothing in [0.0, 0.1]:
        ours = cross_entropy(logits, targets, reduction=reduction, label_smoothing=smoothing)
        theirs = F.cross_entropy(logits.transpose(1, 2), targets, reduction=reduction,
                                 label_smoothing=smoothing)
        torch.testing.assert_close(ours, theirs)
        checked += 1
print(f"{checked} combinations equal to F.cross_entropy; loss (mean) = {cross_entropy(logits, targets).item():.4f}")

bf16 = cross_entropy(logits.bfloat16(), targets)
print(f"bfloat16 logits: {bf16.item():.4f} ({bf16.dtype}), computed in float32: "
      f"{F.cross_entropy(logits.bfloat16().float().transpose(1, 2), targets).item():.4f}")

# %% [markdown]
# ## 5. `ignore_index`: positions that do not count
#
# Batches are rectangular, texts are not: short sequences are **padded**, and the model must not be
# trained to predict padding. Later (chapter 9) we will also **mask the prompt** in instruction
# tuning, so that the model learns to write answers, not to repeat questions. Both are done the
# same way: the target of such a position is set to `-100`, and the loss skips it.
#
# Two details matter, and torch gets both right:
#
# * the mean divides by the number of **counted** positions, not by `N`, so padding does not dilute
#   the loss;
# * if *every* target is ignored, that is `0 / 0 = nan` (torch does not hide it), while the
#   gradient is exactly zero.

# %%
# NBVAL_CHECK_OUTPUT
seed_everything(1)
logits = torch.randn(6, 10)
targets = torch.tensor([3, 1, 4, -100, -100, -100])  # three real tokens, three pads
per_token = cross_entropy(logits, targets, reduction="none")
print("per-token losses:", [round(v, 3) for v in per_token.tolist()])
print(f"mean over the 3 counted tokens: {cross_entropy(logits, targets).item():.4f} "
      f"= {per_token[:3].mean().item():.4f}")
print(f"torch: {F.cross_entropy(logits, targets).item():.4f}")
print("dividing by all 6 instead would give", round(per_token.sum().item() / 6, 4), "(wrong)")
all_ignored = torch.full((6,), -100)
print("every target ignored:", cross_entropy(logits, all_ignored).item(), "torch:",
      F.cross_entropy(logits, all_ignored).item())

# %% [markdown]
# ## 6. Label smoothing
#
# The one-hot target asks the model to push the correct logit to `+inf`. **Label smoothing**
# (Szegedy et al., 2016) replaces it by `(1 - eps) * onehot + eps / V`: the correct token gets most
# of the mass, every token a little. The loss becomes
#
# $$\mathcal{L} = (1-\varepsilon)\,(\mathrm{lse}(z) - z_t) + \frac{\varepsilon}{V}\sum_j (\mathrm{lse}(z) - z_j),$$
#
# and ignored positions are left out of both terms (torch's exact semantics, which the package
# reproduces). LLM pretraining normally uses `eps = 0`; it is common in translation and vision.
# Even a perfect prediction now costs something, so the minimum of the loss is no longer 0:

# %%
V = 10
eps_values = torch.linspace(0, 0.5, 6)
margins = torch.linspace(0, 12, 100)
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for eps in eps_values:
    logits = torch.zeros(len(margins), V)
    logits[:, 0] = margins                       # the correct token leads by `margin`
    loss = cross_entropy(logits, torch.zeros(len(margins), dtype=torch.long), reduction="none",
                         label_smoothing=float(eps))
    ref = F.cross_entropy(logits, torch.zeros(len(margins), dtype=torch.long), reduction="none",
                          label_smoothing=float(eps))
    torch.testing.assert_close(loss, ref)
    ax.plot(margins, loss, label=f"eps = {eps:.1f}")
ax.set_xlabel("margin of the correct logit over the others")
ax.set_ylabel("loss (nats)")
ax.set_title(f"label smoothing rewards a finite margin (V = {V})")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. Perplexity and the uniform baseline
#
# A model that knows nothing gives every token probability `1/V`. Its loss is `ln V` and its
# perplexity `V`: for SmolLM2's vocabulary that is 10.80 nats, or 15.58 bits, per token. A freshly
# initialised model starts near this value (its logits are small, so its softmax is nearly
# uniform); a loss *above* `ln V` at the start of training is a sign of a bad initialisation. A good
# 135M-parameter model reaches perplexities in the tens on ordinary text.

# %%
# NBVAL_CHECK_OUTPUT
V = 49152
uniform_loss = cross_entropy(torch.zeros(4, V), torch.randint(0, V, (4,)))
print(f"uniform guess over V = {V}: loss = {uniform_loss.item():.4f} nats "
      f"(ln V = {math.log(V):.4f}), {uniform_loss.item() / math.log(2):.2f} bits")
print(f"perplexity = exp(loss) = {perplexity(uniform_loss).item():.0f}")
for loss in [10.8, 6.0, 3.0, 2.0]:
    print(f"loss {loss:4.1f} nats -> perplexity {perplexity(loss):9.1f}")

# %% [markdown]
# ## 8. The gradient: softmax minus one-hot
#
# Differentiating `lse(z) - z_t` gives the gradient of one row:
#
# $$\frac{\partial \mathcal{L}}{\partial z_j} = \mathrm{softmax}(z)_j - [j = t].$$
#
# Every wrong token is pushed down by its probability, the right token pushed up by `1 - p_t`,
# and the gradient of a row sums to zero. For the mean over `N` rows, divide by `N`. This is why
# frameworks fuse softmax and cross-entropy: the backward pass needs nothing but the probabilities.

# %%
seed_everything(2)
N, V = 32, 500
logits = (torch.randn(N, V) * 3).requires_grad_()
targets = torch.randint(0, V, (N,))
cross_entropy(logits, targets).backward()
by_hand = (softmax(logits.detach()) - F.one_hot(targets, V).float()) / N
torch.testing.assert_close(logits.grad, by_hand)
print("autograd gradient == (softmax - onehot) / N")
print(f"each row's gradient sums to ~0: max |row sum| = {logits.grad.sum(-1).abs().max().item():.1e}")

# %% [markdown]
# ## 9. Large vocabularies: the chunked loss
#
# The logits are by far the largest activation of a small language model. For SmolLM2 (hidden size
# 576, vocabulary 49152) one token's logits are `49152 * 4` bytes = 192 KiB in float32, **85 times**
# its hidden state. A batch of 4096 tokens needs 768 MiB of logits, and the backward pass needs
# another tensor of the same size for their gradient (plus softmax intermediates).
#
# But we never need all logits at once: the loss of a row only depends on that row's logits. So we
# process `chunk_size` rows at a time: compute `h @ W.T` for the chunk, its loss, and (while the
# chunk's logits exist anyway) its gradients,
#
# $$\frac{\partial\mathcal L}{\partial h} = (\mathrm{softmax}(z) - \mathrm{onehot}) W, \qquad
#   \frac{\partial\mathcal L}{\partial W} \mathrel{+}= (\mathrm{softmax}(z) - \mathrm{onehot})^\top h,$$
#
# then drop the chunk. Plain autograd would keep every chunk's logits for the backward pass, so
# `chunked_cross_entropy` is a `torch.autograd.Function` that stores only the two gradients (the
# size of the inputs) and scales them by the incoming gradient in `backward`. This is the idea of
# fused linear cross-entropy kernels such as Liger-Kernel's. First: same value, same gradients.

# %%
seed_everything(3)
N, D, V = 300, 64, 5000
hidden = torch.randn(N, D)
weight = torch.randn(V, D) / math.sqrt(D)
targets = torch.randint(0, V, (N,))
targets[::7] = -100
for chunk_size in [64, 100, 128, 1000]:                  # some divide N = 300, some do not
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = chunked_cross_entropy(h1, w1, targets, chunk_size=chunk_size)
    plain = F.cross_entropy(h2 @ w2.T, targets)
    chunked.backward()
    plain.backward()
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    print(f"chunk {chunk_size:4d}: loss {chunked.item():.6f} vs {plain.item():.6f}; gradients equal")

# %% [markdown]
# ### Measuring peak memory on a CPU
#
# On a GPU one would call `torch.cuda.max_memory_allocated()`. On a CPU torch has no such counter,
# and Python's `tracemalloc` does not see torch's C++ allocations. What the operating system does
# report is the process's **peak resident memory**, `resource.getrusage(...).ru_maxrss`. It only
# ever goes up, so each measurement runs in a **fresh subprocess**: build the inputs, read the
# memory in use (the baseline), run forward + backward once, read the peak. The difference is
# what the loss needed at its worst moment. (The same measurement, with a sweep and timings, is
# `benchmarks/cross_entropy_memory.py`.)

# %%
WORKER = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
from llama_from_scratch.loss import chunked_cross_entropy
variant, n, vocab, dim, chunk = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
hidden = torch.randn(n, dim, requires_grad=True)
weight = torch.randn(vocab, dim).div_(dim ** 0.5).requires_grad_()   # in place: no transient copy
targets = torch.randint(0, vocab, (n,))
hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
F.cross_entropy(hidden[:4] @ weight[:8].T, targets[:4] % 8).backward()   # warm-up
KIB = 1 if sys.platform != "darwin" else 1024                            # macOS reports bytes
try:                                      # resident memory now (Linux); else the high-water mark
    before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 1024
except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB
start = time.perf_counter()
if variant == "plain":
    F.cross_entropy(hidden @ weight.T, targets).backward()
else:
    chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB
print(json.dumps({"peak_mib": (after - before) / 1024, "seconds": seconds}))
"""


def measure(variant: str, n: int, vocab: int = 49152, dim: int = 576, chunk: int = 1024) -> dict:
    """Extra peak memory (MiB) and time of forward + backward, in a fresh Python process."""
    done = subprocess.run([sys.executable, "-c", WORKER, variant, str(n), str(vocab), str(dim), str(chunk)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


token_counts = [256, 512, 1024] if QUICK else [512, 1024, 2048, 4096]
CHUNK = 512
started = time.perf_counter()
results = {variant: [measure(variant, n, chunk=CHUNK) for n in token_counts] for variant in ["plain", "chunked"]}
print(f"measured in {time.perf_counter() - started:.0f} s\n")
print(f"{'tokens':>6} {'logits MiB':>10} {'plain MiB':>10} {'chunked MiB':>12} {'ratio':>6} {'time ratio':>10}")
for i, n in enumerate(token_counts):
    plain, chunked = results["plain"][i], results["chunked"][i]
    print(f"{n:>6} {n * 49152 * 4 / 2**20:>10.0f} {plain['peak_mib']:>10.0f} {chunked['peak_mib']:>12.0f} "
          f"{plain['peak_mib'] / chunked['peak_mib']:>6.1f} {chunked['seconds'] / plain['seconds']:>10.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.8))
ax.plot(token_counts, [r["peak_mib"] for r in results["plain"]], "o-", label="F.cross_entropy(hidden @ W.T)")
ax.plot(token_counts, [r["peak_mib"] for r in results["chunked"]], "o-", label=f"chunked_cross_entropy, chunk {CHUNK}")
ax.plot(token_counts, [n * 49152 * 4 / 2**20 for n in token_counts], "k--", lw=1, label="one [N, V] float32 logits tensor")
ax.set_xlabel("tokens in the batch (N)")
ax.set_ylabel("extra peak memory, MiB")
ax.set_title("forward + backward of the loss, vocabulary 49152, hidden 576")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The plain loss grows linearly with the number of tokens, at roughly **2.5 to 3 logits tensors**
# (the logits, the softmax, the gradient of the logits); the chunked loss stays flat at about one
# `[chunk_size, V]` buffer whatever `N` is. Its time is the same matrix multiplications done in
# pieces, so it costs little or nothing extra. On a GPU with a 128k vocabulary and long sequences
# this is the difference between fitting a batch and running out of memory.
#
# ## Summary
#
# * Cross-entropy is the negative log-likelihood of the next token: `logsumexp(z) - z[target]`,
#   averaged over the counted positions. Units: nats (divide by `ln 2` for bits).
# * Never exponentiate raw logits: subtract the row maximum first (the log-sum-exp trick). The
#   naive formula gives `nan` at logits of 1e4; the stable one is exact.
# * `ignore_index = -100` removes padding and (later) prompt tokens; the mean is over counted
#   positions, and "nothing counted" is `nan`, as in torch.
# * Label smoothing mixes the target with the uniform distribution; pretraining uses 0.
# * Perplexity = `exp(loss)`; a uniform guess scores `ln V` (10.80 for SmolLM2), where training starts.
# * The gradient with respect to the logits is `softmax - onehot` (divided by N for the mean).
# * For big vocabularies, compute loss and gradients chunk by chunk: peak memory stops growing with
#   the batch. The package functions: `cross_entropy`, `chunked_cross_entropy`, `perplexity`.
#
# ## Exercises
#
# Open `exercises/ch02_cross_entropy.ipynb`: you will write a stable log-sum-exp, cross-entropy with
# and without `ignore_index`, label smoothing, and the gradient by hand. Each one is graded with
# `check(...)` against torch on fresh random inputs, including logits of magnitude 1e4.
