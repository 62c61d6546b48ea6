"""Training-step speed: this package's Llama vs transformers' ``LlamaForCausalLM``, same config and weights.

One training step = forward, loss, backward and an AdamW update, on ``--batch`` sequences of
``--seq-len`` random tokens. Both models are built in this one process from the same config (the
SmolLM2-135M architecture by default) and hold the same weights (ours is initialised, transformers'
loads its state dict: the key names are identical). They run interleaved: every round times one
step of each side, in reversed order every other round, so that both see the same moments of a
shared machine (single steps on a busy 2-core machine vary by 10% and more). Printed per
precision (float32, and bfloat16 autocast where the CPU supports it):

* tokens/s of each side (median step time), and the speed ratio ours / transformers (> 1: ours
  is faster) as the median of the per-round ratios, with its quartiles: for the models alone
  (both with ``torch.optim.AdamW``) and for the training step as each library runs it (ours with
  the package's AdamW, which the ``Trainer`` uses);
* model FLOPs utilisation (MFU): ``6 N + 12 L d T`` FLOPs per token (see
  :func:`llama_from_scratch.trainer.estimate_flops_per_token`) times tokens/s, over the matmul
  peak measured here (the best FLOP/s of a large square matmul in that precision).

Both sides use ``torch.optim.AdamW`` for the comparison of the models; our from-scratch
``AdamW`` is timed too (its step on the same parameters).

    python benchmarks/training.py                  # SmolLM2-135M config, 4 x 256 tokens
    python benchmarks/training.py --quick          # a 4-layer model, fewer steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.environment import supports_bf16
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama
from llama_from_scratch.optim import AdamW
from llama_from_scratch.trainer import estimate_flops_per_token


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool,
              hf: bool):
    """A closure running one training step; returns the loss (a float)."""
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits if hf else model(x)
        loss = cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def interleaved_step_times(sides: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each side's step in each round; every round runs each side once, alternating the order."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds):
        order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
        for side, step in order:
            t = time.perf_counter()
            step()
            times[side].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12, help="timed steps per side (one per round)")
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, 3 rounds")
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even where the CPU emulates it")
    args = parser.parse_args()
    import transformers

    config = LlamaConfig.smollm2_135m()
    if args.quick:
        config = LlamaConfig.from_hf({**config.to_hf(), "num_hidden_layers": 4})
        args.rounds = 3
    config = LlamaConfig.from_hf({**config.to_hf(), "max_position_embeddings": max(args.seq_len + 1, 2048)})
    torch.manual_seed(0)
    ours = Llama(config)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    theirs.load_state_dict(ours.state_dict())
    ours.train(), theirs.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    tokens = args.batch * args.seq_len
    flops_per_token = estimate_flops_per_token(ours, args.seq_len)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {config.n_layers} layers, dim {config.dim}; "
          f"batch {args.batch} x {args.seq_len} tokens; {torch.get_num_threads()} threads")

    # Same weights, same data: the first losses must agree (float32), or the comparison is void.
    check_ours = Llama(config)
    check_ours.load_state_dict(ours.state_dict())
    with torch.no_grad():
        diff = (check_ours(ids[:, :-1]) - theirs(ids[:, :-1]).logits).abs().max().item()
    print(f"same weights: max |logits ours - transformers| = {diff:.1e}")
    del check_ours

    # bf16 autocast runs on every CPU; it pays off only where the CPU has bf16 instructions
    # (AVX512-BF16, AMX). Elsewhere torch emulates it, tens of times slower: skipped unless --bf16.
    precisions = [("float32", False)]
    if args.bf16 or supports_bf16("cpu"):
        precisions.append(("bf16 autocast", True))
    else:
        print("bf16 autocast skipped: this CPU has no bfloat16 instructions (--bf16 times it anyway)")
    for name, bf16 in precisions:
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        sides = {
            "ours": make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), ids, bf16, hf=False),
            "transformers": make_step(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4), ids, bf16, hf=True),
            "ours + our AdamW": make_step(ours, AdamW(ours.parameters(), lr=1e-4), ids, bf16, hf=False),
        }
        for step in sides.values():  # warm-up (allocations, oneDNN primitives)
            step()
        times = interleaved_step_times(sides, args.rounds)
        print(f"\n{name}: measured matmul peak {peak / 1e9:.0f} GFLOP/s")
        for side, seconds in times.items():
            tok_s = tokens / statistics.median(seconds)
            mfu = flops_per_token * tok_s / peak
            print(f"  {side:18s} {statistics.median(seconds) * 1e3:8.0f} ms/step  {tok_s:8.0f} tok/s  MFU {100 * mfu:5.1f}%")
        for side in ("ours", "ours + our AdamW"):
            ratios = [t / o for t, o in zip(times["transformers"], times[side])]
            q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"  speed ratio {side} / transformers (median of {len(ratios)} paired steps): {q2:.2f}x "
                  f"(quartiles {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
