"""Optimization for pretraining, from scratch (chapter 8): AdamW, the cosine schedule with warmup,
gradient clipping, and GaLore's low-rank gradient projection.

* :class:`AdamW` is equal to ``torch.optim.AdamW`` step for step (same formulas, same order of
  floating-point operations, same ``state_dict`` layout, so checkpoints move between the two).
* :func:`cosine_schedule` is the learning-rate curve of LLaMA / nanoGPT: a linear warmup, a cosine
  decay to ``min_lr``, then constant.
* :func:`clip_grad_norm` is equal to ``torch.nn.utils.clip_grad_norm_``.
* :class:`GaLoreAdamW` runs Adam on a low-rank projection of each weight matrix's gradient
  (Zhao et al. 2024, "GaLore"), so the two Adam moments of an ``m x n`` matrix take ``2 r n``
  numbers instead of ``2 m n``; :func:`optimizer_state_bytes` measures the saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "AdamW",
    "GaLoreAdamW",
    "cosine_schedule",
    "clip_grad_norm",
    "optimizer_state_bytes",
    "weight_decay_groups",
    "galore_param_groups",
]


# Elements per tile of the AdamW update: 2**18 float32 numbers are 1 MiB per tensor, so the five
# tensors one tile touches (parameter, gradient, two moments, scratch) stay in the CPU's cache.
TILE_SIZE = 2 ** 18


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _adam_direction(grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
                    eps: float) -> torch.Tensor:
    """Updates the moments in ``state`` with ``grad`` and returns the Adam direction
    ``m_hat / (sqrt(v_hat) + eps)`` scaled by ``lr`` (torch's exact operation order)."""
    exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    step_t += 1
    step = step_t.item()
    # m = beta1 m + (1 - beta1) g, written as torch writes it: m += (1 - beta1) (g - m)
    exp_avg.lerp_(grad, 1 - beta1)
    # v = beta2 v + (1 - beta2) g^2
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # Bias correction: m and v start at 0, so early averages are too small by (1 - beta^t).
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # eps after the sqrt
    return exp_avg / denom * step_size


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), equal to ``torch.optim.AdamW``.

    For every parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``::

        p  <- p * (1 - lr * weight_decay)          # decoupled decay, before the update
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g^2
        p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Param groups (a list of dicts with ``"params"`` and any of the hyper-parameters) and
    ``state_dict`` / ``load_state_dict`` come from ``torch.optim.Optimizer``; the per-parameter
    state (``step`` as a float32 tensor, ``exp_avg``, ``exp_avg_sq``) has torch's names, so a
    ``torch.optim.AdamW`` state dict loads here and the other way round.

    ``tile_size`` (elements) only changes speed, not results: on a CPU each parameter is updated
    a tile at a time, so that the update runs in cache (see :func:`_adamw_update_`).

    Sharded parameters (``DTensor``, e.g. FSDP2's, chapter 15) are updated shard by shard: every
    line of the update is elementwise, so each rank updating its own piece of ``p``, ``g``, ``m``
    and ``v`` is the whole update, and the state stays sharded as the parameter is.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, tile_size: int = TILE_SIZE) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.tile_size = _check_tile_size(tile_size)
        self._scratch: dict = {}  # a reusable buffer per (dtype, device), see _adamw_update_

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if _is_dtensor(p):  # this rank's shard of everything (see the class docstring)
                    if p.grad.placements != p.placements:
                        raise ValueError(f"a DTensor parameter placed {p.placements} has a gradient placed "
                                         f"{p.grad.placements}: AdamW updates matching shards only")
                    local = {"step": state["step"], "exp_avg": state["exp_avg"].to_local(),
                             "exp_avg_sq": state["exp_avg_sq"].to_local()}
                    _adamw_update_(p.to_local(), p.grad.to_local(), local, lr, beta1, beta2, eps, wd,
                                   self.tile_size, self._scratch)
                else:
                    _adamw_update_(p, p.grad, state, lr, beta1, beta2, eps, wd, self.tile_size, self._scratch)
        return loss


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a tensor sharded over ranks)."""
    return callable(getattr(t, "to_local", None)) and hasattr(t, "placements")


def _check_tile_size(tile_size: int) -> int:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    return tile_size


def _adamw_update_(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
                   eps: float, weight_decay: float, tile_size: int, scratch: dict) -> None:
    """Decoupled weight decay, then the Adam update of ``p`` (and its moments in ``state``), in place.

    These are torch's operations in torch's order, so the result is bit-identical to
    ``torch.optim.AdamW``; they are applied one *tile* of ``tile_size`` elements at a time. Why:
    every line below is a separate pass over its tensors, about 20 passes in all. Done on the whole
    of a 113 MB embedding matrix, each pass streams it from main memory; done on a 1 MiB tile, the
    tile stays in cache and main memory sees each tensor about once. The denominator goes into a
    reused ``scratch`` buffer instead of two fresh tensors per parameter and step (on a CPU, fresh
    large allocations cost page faults). Together less than half the time of torch's default
    (single-tensor) AdamW on a CPU (``benchmarks/training.py``); torch's ``fused=True`` kernel does
    all of it in one pass in C++. On a GPU the whole tensor is one tile.
    """
    step_t = state["step"]
    step_t += 1
    step = step_t.item()
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / bias_correction1
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    tensors = (p, grad, exp_avg, exp_avg_sq)
    n = p.numel()
    if p.device.type != "cpu":  # a GPU streams whole tensors fast; tiles would only add kernel launches
        tile_size = max(n, 1)
    if all(t.is_contiguous() for t in tensors):
        key = (p.dtype, p.device)
        if key not in scratch or scratch[key].numel() < min(tile_size, n):
            scratch[key] = torch.empty(min(tile_size, n), dtype=p.dtype, device=p.device)
        flat = [t.view(-1) for t in tensors]
        tiles = [[t[start:start + tile_size] for t in flat] + [scratch[key][: min(tile_size, n - start)]]
                 for start in range(0, n, tile_size)]
    else:  # a strided tensor cannot be cut into flat tiles: one tile, the whole tensor
        tiles = [[*tensors, torch.empty_like(exp_avg_sq)]]
    for param, g, m, v, denom in tiles:
        param.mul_(1 - lr * weight_decay)                  # decoupled decay, before the update
        m.lerp_(g, 1 - beta1)                             # m += (1 - beta1) (g - m)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)      # v = beta2 v + (1 - beta2) g^2
        torch.sqrt(v, out=denom)                          # sqrt(v_hat) + eps = sqrt(v) / sqrt(bc2) + eps
        denom.div_(bias_correction2_sqrt).add_(eps)
        param.addcdiv_(m, denom, value=-step_size)        # p -= lr / bc1 * m / denom


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def cosine_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at (0-based) optimizer step ``step``: linear warmup, cosine decay, floor.

    * ``step < warmup_steps``: ``max_lr * (step + 1) / warmup_steps`` (nanoGPT's choice: the first
      step already learns a little instead of wasting an update at lr 0, and the last warmup step,
      ``warmup_steps - 1``, reaches ``max_lr``);
    * ``warmup_steps <= step < total_steps``: ``min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2``
      with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` going from 0 to 1;
    * ``step >= total_steps``: ``min_lr`` (training past the planned end keeps the floor).
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------


def clip_grad_norm(params: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scales all gradients together so that their joint norm is at most ``max_norm``.

    Equal to ``torch.nn.utils.clip_grad_norm_``: the total norm is the norm of the per-tensor
    norms (for ``norm_type=inf``, the largest absolute entry); every gradient is multiplied by
    ``min(1, max_norm / (total + 1e-6))``. Parameters without a gradient are skipped. Returns the
    total norm *before* clipping (a float32 tensor), the number worth logging.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    if len(grads) == 0:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(g.detach(), norm_type) for g in grads]
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(clip_coef.to(g.device))
    return total


# --------------------------------------------------------------------------------------------
# Parameter groups and state size
# --------------------------------------------------------------------------------------------


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: matrices (dim >= 2: linear weights, embeddings) decay, vectors (RMSNorm
    gains, biases) do not, as in LLaMA / nanoGPT. Frozen parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state (moments, step counters, projections)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------------------------
# GaLore
# --------------------------------------------------------------------------------------------


def _galore_projectable(p: torch.Tensor, rank: int) -> bool:
    return p.dim() == 2 and min(p.shape) > rank


def galore_param_groups(model: nn.Module, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                        weight_decay: float = 0.0,
                        exclude: tuple[str, ...] = ("embed_tokens", "lm_head")) -> list[dict]:
    """Param groups for :class:`GaLoreAdamW` (galore-torch's layout): one group with
    ``rank`` / ``update_proj_gap`` / ``scale`` holding the 2-D weights whose smaller side exceeds
    ``rank``, one plain group for the rest. Names containing an ``exclude`` entry (by default the
    embedding and output layer, as in the GaLore paper, which projects attention and MLP weights)
    stay plain. ``weight_decay`` applies to matrices only, as in :func:`weight_decay_groups`.
    """
    seen: set[int] = set()
    low_rank, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if _galore_projectable(p, rank) and not any(e in name for e in exclude):
            low_rank.append(p)
        elif p.dim() >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    groups = []
    if matrices:
        groups.append({"params": matrices, "weight_decay": weight_decay})
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0})
    if low_rank:
        groups.append({"params": low_rank, "weight_decay": weight_decay, "rank": rank,
                       "update_proj_gap": update_proj_gap, "scale": scale})
    return groups


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW on low-rank projected gradients (GaLore, Zhao et al. 2024) for groups that set ``rank``.

    For a weight ``W`` of shape ``m x n`` in a group with ``rank=r`` (and ``min(m, n) > r``):

    * every ``update_proj_gap`` steps (starting at the first), take the SVD ``G = U S Vh`` of the
      current gradient and keep ``P = Vh[:r]`` (``r x n``) if ``m >= n``, else ``P = U[:, :r]``
      (``m x r``): the directions in which the gradient is currently largest;
    * project: ``G_low = G @ P.T`` (``m x r``) if ``m >= n``, else ``P.T @ G`` (``r x n``);
    * run Adam on ``G_low`` (its moments are ``r``-sized: that is the memory saving);
    * project the Adam direction back (``D @ P`` or ``P @ D``), multiply by ``scale`` and apply.

    Everything else (groups without ``rank``, vectors, small matrices) is exactly :class:`AdamW`.
    Weight decay is decoupled and applied before the update, as in AdamW (galore-torch applies it
    after the update and puts ``eps`` inside the bias correction: differences of order ``lr * wd``
    and ``eps``). The projection matrix is kept in the state as ``"projector"``, so
    ``state_dict`` holds everything needed to resume.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._scratch: dict = {}  # reusable AdamW buffers, see _adamw_update_
        for group in self.param_groups:
            if "rank" in group:
                if not isinstance(group["rank"], int) or group["rank"] <= 0:
                    raise ValueError(f"GaLore rank must be a positive integer, got {group['rank']!r}")
                group.setdefault("update_proj_gap", 200)
                group.setdefault("scale", 0.25)
                if group["update_proj_gap"] <= 0:
                    raise ValueError(f"update_proj_gap must be positive, got {group['update_proj_gap']}")

    @staticmethod
    def _new_projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
        U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
        if grad.shape[0] >= grad.shape[1]:
            return Vh[:rank].to(grad.dtype).contiguous()       # [r, n]
        return U[:, :rank].to(grad.dtype).contiguous()         # [m, r]

    @staticmethod
    def project(grad: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """``G @ P.T`` for tall-or-square ``G`` (P is ``r x n``), ``P.T @ G`` for wide ``G``."""
        return grad @ P.T if grad.shape[0] >= grad.shape[1] else P.T @ grad

    @staticmethod
    def project_back(low: torch.Tensor, P: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return low @ P if shape[0] >= shape[1] else P @ low

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            rank = group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                low_rank = rank is not None and _galore_projectable(p, rank)
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    if low_rank:
                        state["projector"] = self._new_projector(grad, rank)
                        like = self.project(grad, state["projector"])
                    else:
                        like = p
                    state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
                if not low_rank:
                    _adamw_update_(p, grad, state, lr, beta1, beta2, eps, wd, TILE_SIZE, self._scratch)
                    continue
                p.mul_(1 - lr * wd)
                # The step counter before this update decides whether the subspace is refreshed
                # (steps 0, gap, 2 gap, ...); the moments are kept across refreshes, as in GaLore.
                if int(state["step"].item()) % group["update_proj_gap"] == 0 and state["step"].item() > 0:
                    state["projector"] = self._new_projector(grad, rank)
                low_grad = self.project(grad, state["projector"])
                direction = _adam_direction(low_grad, state, lr, beta1, beta2, eps)
                p.add_(self.project_back(direction, state["projector"], p.shape), alpha=-group["scale"])
        return loss
