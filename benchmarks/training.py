"""Training-step speed: this package's Llama vs transformers' ``LlamaForCausalLM``, same config and weights.

One training step = forward, loss, backward and an AdamW update, on ``--batch`` sequences of
``--seq-len`` random tokens, each library computing its own loss: ours ``model(x, targets=y)``
(the chunked cross-entropy of chapter 2, no ``[B, T, V]`` logits stored), transformers'
``model(input_ids=x, labels=y, shift_labels=y).loss`` (logits, then ``F.cross_entropy``). Both
models are built in this one process from the same config (the SmolLM2-135M architecture by
default) and hold the same weights (ours is initialised, transformers' loads its state dict: the
key names are identical); their first losses are printed side by side. Four steps are timed:

* ``ours`` and ``transformers``: the two models, both with ``torch.optim.AdamW`` (torch's
  default implementation on a CPU, one tensor at a time);
* ``ours + our AdamW``: the step as this package's ``Trainer`` runs it, with the from-scratch
  ``AdamW`` (bit-identical to torch's, updating in cache-sized tiles);
* ``transformers + fused AdamW``: the step as transformers' ``Trainer`` runs it by default
  (``optim="adamw_torch_fused"``: torch's one-pass C++ AdamW kernel);
* ``ours compiled + fused AdamW``: the step as ``TrainConfig(compile=True, optimizer="adamw_fused")``
  runs it: our model through ``torch.compile`` (compiled before the timing starts, once per
  precision) and torch's fused AdamW.

They run interleaved: every round times one step of each, in reversed order every other round,
so that all see the same moments of a shared machine (single steps on a busy 2-core machine vary
by 10% and more). Printed per precision (float32, and bfloat16 autocast where the CPU supports it):

* the median step time and tokens/s of each, and model FLOPs utilisation (MFU): ``6 N + 12 L d T``
  FLOPs per token (see :func:`llama_from_scratch.trainer.estimate_flops_per_token`) times tokens/s,
  over the matmul peak measured here (the best FLOP/s of a large square matmul in that precision);
* the optimizer step alone (torch's default AdamW, torch's fused kernel, ours) on the model's
  parameters with random gradients;
* speed ratios (> 1: the first is faster) as the median of the per-round ratios, with quartiles.

    python benchmarks/training.py                  # SmolLM2-135M config, 4 x 256 tokens
    python benchmarks/training.py --quick          # a 4-layer model, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.environment import supports_bf16
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
    """A closure running one training step (each library's own loss); returns the loss (a float)."""
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=y, shift_labels=y).loss if hf else model(x, targets=y)
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


def optimizer_step_ms(config: LlamaConfig, repeats: int = 6) -> dict[str, float]:
    """Median milliseconds of one AdamW step on a fresh model's parameters with random gradients:
    torch's default AdamW, torch's fused kernel, and ours."""
    makers = {
        "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        "torch.optim.AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "our AdamW": lambda ps: AdamW(ps, lr=1e-4),
    }
    model = Llama(config)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {name: make(list(model.parameters())) for name, make in makers.items()}
    for opt in optimizers.values():
        opt.step()  # creates the state
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=16, help="timed steps per side (one per round)")
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

    # Same weights, same data: logits and losses must agree (float32), or the comparison is void.
    with torch.no_grad():
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        diff = (ours(x) - theirs(x).logits).abs().max().item()
        loss_ours, loss_theirs = ours(x, targets=y).item(), theirs(input_ids=x, labels=y, shift_labels=y).loss.item()
    print(f"same weights: max |logits ours - transformers| = {diff:.1e}; "
          f"loss ours {loss_ours:.6f}, transformers {loss_theirs:.6f}")

    # bf16 autocast runs on every CPU; it pays off only where the CPU has bf16 instructions
    # (AVX512-BF16, AMX). Elsewhere torch emulates it, tens of times slower: skipped unless --bf16.
    precisions = [("float32", False)]
    if args.bf16 or supports_bf16("cpu"):
        precisions.append(("bf16 autocast", True))
    else:
        print("bf16 autocast skipped: this CPU has no bfloat16 instructions (--bf16 times it anyway)")
    ours_compiled = copy.deepcopy(ours)
    compiled = torch.compile(ours_compiled)
    for name, bf16 in precisions:
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        sides = {
            "ours": make_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), ids, bf16, hf=False),
            "transformers": make_step(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4), ids, bf16, hf=True),
            "ours + our AdamW": make_step(ours, AdamW(ours.parameters(), lr=1e-4), ids, bf16, hf=False),
            "transformers + fused AdamW": make_step(
                theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True), ids, bf16, hf=True),
            "ours compiled + fused AdamW": make_step(
                compiled, torch.optim.AdamW(ours_compiled.parameters(), lr=1e-4, fused=True), ids, bf16, hf=False),
        }
        t = time.perf_counter()
        for step in sides.values():  # warm-up (allocations, oneDNN primitives; compiles the compiled side)
            step()
        print(f"\n{name}: warm-up (compiling included) {time.perf_counter() - t:.0f} s")
        times = interleaved_step_times(sides, args.rounds)
        print(f"{name}: measured matmul peak {peak / 1e9:.0f} GFLOP/s")
        for side, seconds in times.items():
            tok_s = tokens / statistics.median(seconds)
            mfu = flops_per_token * tok_s / peak
            print(f"  {side:28s} {statistics.median(seconds) * 1e3:8.0f} ms/step  {tok_s:8.0f} tok/s  MFU {100 * mfu:5.1f}%")
        if not bf16:
            steps = optimizer_step_ms(config)
            print("  the optimizer step alone: " + ", ".join(f"{k} {v:.0f} ms" for k, v in steps.items()))
        for faster, slower in (("ours", "transformers"), ("ours + our AdamW", "transformers"),
                               ("ours + our AdamW", "transformers + fused AdamW"),
                               ("ours compiled + fused AdamW", "transformers + fused AdamW")):
            ratios = [s / f for f, s in zip(times[faster], times[slower])]
            q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"  speed ratio {faster} / {slower} (median of {len(ratios)} paired steps): {q2:.3f}x "
                  f"(quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
