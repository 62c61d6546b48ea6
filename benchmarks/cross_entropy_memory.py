"""Peak memory and time of forward + backward: plain cross-entropy vs the chunked loss.

Printed output (2-core shared CPU, torch 2.13, float32):

    $ python benchmarks/cross_entropy_memory.py --repeats 1 --plot ce.png
         N variant   logits MiB  peak MiB  x torch   time s  x torch
      1024 torch            192       599     1.00     3.36     1.00
      1024 ours             192       599     1.00     4.47     1.33
      1024 chunk1024        192       331     0.55     4.20     1.25
      2048 torch            384      1175     1.00     9.13     1.00
      2048 ours             384      1175     1.00    10.03     1.10
      2048 chunk1024        384       333     0.28     5.86     0.64
      4096 torch            768      2327     1.00    10.63     1.00
      4096 ours             768      2327     1.00    15.33     1.44
      4096 chunk1024        768       340     0.15    12.43     1.17
      8192 torch           1536      4631     1.00    20.61     1.00
      8192 ours            1536      4631     1.00    27.83     1.35
      8192 chunk1024       1536       347     0.07    25.13     1.22
    largest loss difference between variants at the same N: 9.54e-07

Peak memory is reproducible to a few MiB from run to run. The plain loss (torch's or ours, the
same) needs ~3 [N, V] float32 tensors at its peak (logits, softmax / exp, gradient of the
logits) plus the [V, D] weight gradient (108 MiB); the chunked one needs one [chunk_size, V]
buffer plus that weight gradient, whatever N is: 13x less at N = 8192 (347 MiB vs 4631 MiB).
The times were taken while other jobs loaded the machine (load average ~6.5 on 2 cores) and are
noise-dominated (the same variant ran 2x faster or slower between runs): rerun on a quiet machine
before quoting a time ratio. All three variants do the same three matmuls (2 * N * D * V flops
each), so no variant should be much slower.

Setting: SmolLM2-135M's output layer (vocabulary 49152, hidden size 576), float32, gradients
with respect to both the hidden states and the output weight. Variants:

* ``torch``   ``F.cross_entropy(hidden @ weight.T, targets)``: the [N, V] logits are materialised;
* ``ours``    ``llama_from_scratch.cross_entropy(hidden @ weight.T, targets)``: same, from scratch;
* ``chunked`` ``llama_from_scratch.chunked_cross_entropy(hidden, weight, targets, chunk_size)``.

How peak memory is measured on a CPU. ``tracemalloc`` does not see torch's allocations (they are
made in C++), and torch has no CPU equivalent of ``torch.cuda.max_memory_allocated``. So every
measurement runs in a fresh subprocess: it builds the inputs, reads the resident
memory now (the *baseline*, ``psutil.Process().memory_info().rss``), runs forward + backward once, and reads
the resident-set high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The difference is
the extra memory the loss needed at its peak. (Inputs are built in place, so that no transient
copy before the baseline raises the high-water mark.) (glibc serves
big blocks with ``mmap`` and returns them on ``free``, so the RSS follows live tensors closely.)
The time is the best of ``--repeats`` further runs in the same subprocess. Ratios are taken
between variants measured in this one invocation, on the same machine, one after another.

    python benchmarks/cross_entropy_memory.py                      # the table above
    python benchmarks/cross_entropy_memory.py --tokens 1024 4096 --chunk-size 512 --plot ce.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VOCAB = 49152   # SmolLM2's vocabulary
DIM = 576       # SmolLM2-135M's hidden size
VARIANTS = ("torch", "ours", "chunked")

_WORKER = r"""
import json, resource, sys, time
import psutil
import torch
import torch.nn.functional as F
from llama_from_scratch.loss import chunked_cross_entropy, cross_entropy

variant, n, vocab, dim, chunk_size, repeats, threads = sys.argv[1:8]
n, vocab, dim, chunk_size, repeats, threads = map(int, (n, vocab, dim, chunk_size, repeats, threads))
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
def rss_mib():
    # resident memory now, on every OS
    return psutil.Process().memory_info().rss / 2 ** 20

def peak_mib():
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10

hidden = torch.randn(n, dim).requires_grad_()
weight = torch.randn(vocab, dim).div_(dim ** 0.5).requires_grad_()  # in place: no transient copy
targets = torch.randint(0, vocab, (n,))
targets[: n // 10] = -100  # some padding, as in a real batch

def step():
    if variant == "torch":
        loss = F.cross_entropy(hidden @ weight.T, targets)
    elif variant == "ours":
        loss = cross_entropy(hidden @ weight.T, targets)
    else:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    loss.backward()
    return loss.item()

# Warm up on a tiny problem (loads kernels, starts threads) so that the baseline includes it.
small_h = torch.randn(8, dim, requires_grad=True)
chunked_cross_entropy(small_h, weight[:64], targets[:8] % 64, chunk_size=4).backward()
F.cross_entropy(small_h @ weight[:64].T, targets[:8] % 64).backward()
hidden.grad = torch.zeros_like(hidden)   # gradient buffers exist before the baseline,
weight.grad = torch.zeros_like(weight)   # so only the loss's own memory is counted
baseline = rss_mib()
loss = step()
peak = peak_mib()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"variant": variant, "n_tokens": n, "vocab": vocab, "dim": dim,
                  "chunk_size": chunk_size, "peak_mb": peak - baseline,  # MiB
                  "seconds": min(times) if times else float("nan"), "loss": loss}))
"""


def measure(variant: str, n_tokens: int, vocab: int = VOCAB, dim: int = DIM, chunk_size: int = 1024,
            repeats: int = 1, threads: int = 0) -> dict:
    """Extra peak memory (MiB) and best time (s) of one forward + backward, in a fresh subprocess."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    args = [sys.executable, "-c", _WORKER, variant, str(n_tokens), str(vocab), str(dim),
            str(chunk_size), str(repeats), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {variant} at N={n_tokens} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["logits_mb"] = n_tokens * vocab * 4 / 2 ** 20   # one float32 [N, V] tensor, MiB
    return row


def sweep(token_counts: list[int], vocab: int = VOCAB, dim: int = DIM, chunk_size: int = 1024,
          repeats: int = 1, variants: tuple[str, ...] = VARIANTS, threads: int = 0) -> list[dict]:
    """``measure`` every variant at every token count."""
    return [measure(v, n, vocab, dim, chunk_size, repeats, threads) for n in token_counts for v in variants]


def format_table(rows: list[dict]) -> str:
    """One line per (N, variant), with memory and time relative to torch's plain loss at that N."""
    lines = [f"{'N':>6} {'variant':<9} {'logits MiB':>10} {'peak MiB':>9} {'x torch':>8} {'time s':>8} {'x torch':>8}"]
    reference = {r["n_tokens"]: r for r in rows if r["variant"] == "torch"}
    for r in rows:
        ref = reference.get(r["n_tokens"])
        mem_ratio = r["peak_mb"] / ref["peak_mb"] if ref else float("nan")
        time_ratio = r["seconds"] / ref["seconds"] if ref else float("nan")
        name = r["variant"] if r["variant"] != "chunked" else f"chunk{r['chunk_size']}"
        lines.append(f"{r['n_tokens']:>6} {name:<9} {r['logits_mb']:>10.0f} {r['peak_mb']:>9.0f} "
                     f"{mem_ratio:>8.2f} {r['seconds']:>8.2f} {time_ratio:>8.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | None = None, ax=None):
    """Peak extra memory against the number of tokens, one line per variant; saves to ``path``."""
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["n_tokens"], r["peak_mb"]) for r in rows if r["variant"] == variant)
        label = {"torch": "F.cross_entropy (logits materialised)", "ours": "cross_entropy (logits materialised)",
                 "chunked": f"chunked_cross_entropy (chunk {rows[0]['chunk_size']})"}[variant]
        style = {"torch": dict(marker="s", lw=3, alpha=0.6), "ours": dict(marker="o", ls=":"),
                 "chunked": dict(marker="o")}[variant]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    logits = sorted({(r["n_tokens"], r["logits_mb"]) for r in rows})
    ax.plot([p[0] for p in logits], [p[1] for p in logits], "k--", lw=1, label="one [N, V] float32 tensor")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("extra peak memory, MiB")
    ax.set_title(f"forward + backward, vocabulary {rows[0]['vocab']}, hidden {rows[0]['dim']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the memory run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--plot", help="write a PNG of peak memory against N")
    args = parser.parse_args(argv)
    rows = sweep(args.tokens, args.vocab, args.dim, args.chunk_size, args.repeats, threads=args.threads)
    print(format_table(rows))
    losses = {}
    for r in rows:
        losses.setdefault(r["n_tokens"], []).append(r["loss"])
    worst = max(max(v) - min(v) for v in losses.values())
    print(f"largest loss difference between variants at the same N: {worst:.2e}")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
