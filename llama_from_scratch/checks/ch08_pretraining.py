"""Checks of chapter 8's exercises: the learning-rate schedule, one AdamW update, gradient
clipping by the global norm, and packing documents into training blocks.

Every check draws its inputs fresh at grading time (hyper-parameters, shapes, gradients with
huge and tiny norms, documents of all lengths including empty ones) and compares with an
independent reference: ``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_``, and the
package's ``cosine_schedule`` / ``pack_tokens`` (themselves tested against torch and by hand).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

from llama_from_scratch.data import pack_tokens
from llama_from_scratch.optim import cosine_schedule


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def check_lr_at_step(fn: Callable) -> None:
    rng = _rng()
    cases = [(0, 1e-3, 1e-4, 10, 100), (9, 1e-3, 1e-4, 10, 100), (10, 1e-3, 1e-4, 10, 100),
             (55, 1e-3, 1e-4, 10, 100), (99, 1e-3, 1e-4, 10, 100), (100, 1e-3, 1e-4, 10, 100),
             (250, 1e-3, 1e-4, 10, 100), (0, 3e-4, 0.0, 0, 50), (7, 6e-4, 6e-5, 0, 8)]
    for _ in range(40):
        total = rng.randrange(1, 2000)
        warmup = rng.randrange(0, total + 1)
        max_lr = 10 ** rng.uniform(-5, -2)
        min_lr = max_lr * rng.choice([0.0, 0.1, rng.random()])
        cases.append((rng.randrange(0, total + 50), max_lr, min_lr, warmup, total))
    for step, max_lr, min_lr, warmup, total in cases:
        expected = cosine_schedule(step, max_lr, min_lr, warmup, total)
        got = fn(step, max_lr, min_lr, warmup, total)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise AssertionError(f"expected a Python float, got {type(got).__name__}")
        if not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-15):
            phase = "warmup" if step < warmup else ("after total_steps" if step >= total else "cosine decay")
            raise AssertionError(
                f"lr_at_step(step={step}, max_lr={max_lr:.3g}, min_lr={min_lr:.3g}, warmup_steps={warmup}, "
                f"total_steps={total}) ({phase}): expected {expected:.6g}, got {got:.6g}")


def check_adamw_update(fn: Callable) -> None:
    rng = _rng()
    for trial in range(6):
        g = _generator(rng)
        shapes = [(rng.randrange(1, 7), rng.randrange(1, 9)), (rng.randrange(1, 11),), ()]
        lr = 10 ** rng.uniform(-4, -1)
        betas = (rng.choice([0.9, 0.8, rng.uniform(0.5, 0.99)]), rng.choice([0.999, 0.95, rng.uniform(0.9, 0.9999)]))
        eps = rng.choice([1e-8, 1e-6, 1e-3])
        wd = rng.choice([0.0, 0.01, 0.1, rng.uniform(0, 0.5)])
        ref_params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        params = [p.clone() for p in ref_params]
        ref_params = [p.requires_grad_() for p in ref_params]
        opt = torch.optim.AdamW(ref_params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        for step in range(1, rng.randrange(2, 6) + 1):
            grads = [torch.randn(s, generator=g, dtype=torch.float64) * rng.choice([1e-3, 1.0, 50.0]) for s in shapes]
            for p, grad in zip(ref_params, grads):
                p.grad = grad.clone()
            opt.step()
            result = fn(params, [x.clone() for x in grads], exp_avgs, exp_avg_sqs, step, lr, betas[0], betas[1], eps, wd)
            if result is not None:
                raise AssertionError("adamw_update must update params, exp_avgs and exp_avg_sqs in place and return None")
            for i, (p, ref) in enumerate(zip(params, ref_params)):
                if not torch.allclose(p, ref.detach(), rtol=1e-9, atol=1e-12):
                    state = opt.state[ref]
                    detail = ""
                    if not torch.allclose(exp_avgs[i], state["exp_avg"], rtol=1e-9, atol=1e-12):
                        detail = " (the first moment exp_avg already differs: m = beta1 * m + (1 - beta1) * g)"
                    elif not torch.allclose(exp_avg_sqs[i], state["exp_avg_sq"], rtol=1e-9, atol=1e-12):
                        detail = " (the second moment exp_avg_sq already differs: v = beta2 * v + (1 - beta2) * g^2)"
                    raise AssertionError(
                        f"after step {step} (lr={lr:.3g}, betas={betas}, eps={eps}, weight_decay={wd:.3g}) parameter {i} "
                        f"of shape {tuple(p.shape)} differs from torch.optim.AdamW by "
                        f"{(p - ref.detach()).abs().max().item():.3g}{detail}. Remember: decay first, "
                        f"p *= 1 - lr * weight_decay; then bias-corrected m / (sqrt(v_hat) + eps).")


def check_clip_by_global_norm(fn: Callable) -> None:
    rng = _rng()
    for trial in range(12):
        g = _generator(rng)
        n = rng.randrange(1, 5)
        shapes = [tuple(rng.randrange(1, 6) for _ in range(rng.randrange(0, 3))) for _ in range(n)]
        scale = rng.choice([1e-4, 0.1, 1.0, 30.0, 1e3])
        max_norm = rng.choice([0.5, 1.0, 5.0, 1e6])
        ours = [torch.zeros(s, requires_grad=True) for s in shapes]
        refs = [torch.zeros(s, requires_grad=True) for s in shapes]
        for i, (p, q) in enumerate(zip(ours, refs)):
            if i > 0 and rng.random() < 0.2:
                continue  # a parameter without a gradient: skipped, as torch does
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad, q.grad = grad.clone(), grad.clone()
        if all(p.grad is None for p in ours):
            continue
        expected_norm = torch.nn.utils.clip_grad_norm_(refs, max_norm)
        got_norm = fn(ours, max_norm)
        if not isinstance(got_norm, torch.Tensor) or got_norm.numel() != 1:
            raise AssertionError(f"return the total norm before clipping as a 1-element tensor, got {got_norm!r}")
        if not torch.allclose(got_norm.float(), expected_norm, rtol=1e-5, atol=1e-7):
            raise AssertionError(f"total norm of gradients of shapes {shapes} (scale {scale}): expected "
                                 f"{expected_norm.item():.6g}, got {got_norm.item():.6g}. It is the L2 norm of all "
                                 "gradients together, i.e. sqrt of the sum of every squared entry, before clipping.")
        for i, (p, q) in enumerate(zip(ours, refs)):
            if q.grad is None:
                if p.grad is not None:
                    raise AssertionError(f"parameter {i} had no gradient and must keep grad None")
                continue
            if not torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8):
                raise AssertionError(
                    f"max_norm={max_norm}, total norm {expected_norm.item():.4g}: gradient {i} should be "
                    f"{'scaled by max_norm / (total + 1e-6)' if expected_norm > max_norm else 'left unchanged'}; "
                    f"max difference from torch.nn.utils.clip_grad_norm_ {(p.grad - q.grad).abs().max().item():.3g}")


def check_pack_documents(fn: Callable) -> None:
    rng = _rng()
    cases = [([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, 0), ([[5]], 1, 9), ([[], [1, 2], []], 2, 7)]
    for _ in range(25):
        docs = [[rng.randrange(0, 50) for _ in range(rng.choice([0, 1, 2, rng.randrange(3, 40)]))]
                for _ in range(rng.randrange(1, 12))]
        block = rng.choice([1, 2, 3, rng.randrange(4, 33)])
        cases.append((docs, block, rng.randrange(50, 60)))
    for docs, block, eos in cases:
        n_tokens = sum(len(d) + 1 for d in docs)
        if n_tokens < block + 1:
            continue
        expected = pack_tokens(docs, block, eos)
        got = fn([list(d) for d in docs], block, eos)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"expected a torch.Tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(
                f"pack_documents({docs if n_tokens < 40 else '...'}, block_size={block}, eos_id={eos}): "
                f"{n_tokens} tokens with the EOS separators -> expected shape {tuple(expected.shape)} "
                f"((n_tokens - 1) // block_size blocks of block_size + 1), got {tuple(got.shape)}")
        if not torch.equal(got.long(), expected):
            row = (got.long() != expected).any(dim=1).nonzero()[0].item()
            raise AssertionError(
                f"pack_documents(block_size={block}, eos_id={eos}) block {row}: expected {expected[row].tolist()}, "
                f"got {got[row].tolist()} (documents: {docs if n_tokens < 40 else '...'}). Blocks start every "
                "block_size tokens and overlap by one token.")


CHECKS = {
    "lr_at_step": check_lr_at_step,
    "adamw_update": check_adamw_update,
    "clip_by_global_norm": check_clip_by_global_norm,
    "pack_documents": check_pack_documents,
}
