"""Checks of chapter 15's exercises: a ring all-reduce, a ZeRO-sharded AdamW step, Megatron's
tensor-parallel SwiGLU MLP with its backward pass, and the capstone, data-parallel training with
the sharded step.

The exercises run on a *simulated* world: the ranks are entries of Python lists in one process,
and a collective is arithmetic on those lists (the grader's ``pass_right`` moves messages around
the ring). The grader's sandbox has no network and caps the processes it may start, so real gloo
process groups cannot run there; a simulated world also lets a check see every message and every rank's
state. References (independent of this package):

- ``ring_all_reduce``: the sum of the ranks' tensors (what ``torch.distributed.all_reduce`` with
  ``ReduceOp.SUM`` computes), and every message the ring passes is checked against the running
  sums a ring all-reduce must send (reduce-scatter, then all-gather, ``2 (N - 1)`` steps);
- ``zero_adamw_step``: ``torch.optim.AdamW`` (decay on matrices only, as two parameter groups) on
  one process, given the ranks' averaged gradient, over several steps with a changing learning
  rate; each rank's state must be its shard of torch's state in the flat, padded layout;
- ``tp_swiglu_mlp``: ``transformers``' ``LlamaMLP`` (with and without ``mlp_bias``) and autograd,
  unsplit, in float64: outputs, input gradient and the blocks of the weight gradients;
- ``train_data_parallel``: one process training a tiny ``transformers`` Llama on the global batch
  with ``torch.optim.AdamW``: losses, every rank's weights and its optimizer-state shard.

Inputs are drawn fresh at every grading run; failure messages say what differed, never the
expected values.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch07_decoding import call, construct_llama, one_thread, tiny_llama
from llama_from_scratch.course.checks.common import Callback, as_tensor, assert_close, fresh_generator, fresh_rng

_DISTRIBUTED = ["torch.distributed", "torch.nn.parallel"]
FORBIDDEN = {
    "ring_all_reduce": _DISTRIBUTED,
    "zero_adamw_step": _DISTRIBUTED + ["torch.optim"],
    "tp_swiglu_mlp": _DISTRIBUTED + ["torch.autograd", "torch.Tensor.backward", "torch.func", "transformers"],
    "train_data_parallel": _DISTRIBUTED + ["torch.optim"],
}


# ----- ring_all_reduce ------------------------------------------------------------------------


class _Ring:
    """The grader's side of the ring: ``pass_right(outgoing)`` gives rank ``r`` what rank ``r - 1``
    sent, and checks each message against what a ring all-reduce sends at that step. The first
    problem is kept (and raised after the student's function returns), so a wrong message never
    crashes the student's code halfway."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.world = len(inputs)
        flat = torch.stack([t.reshape(-1).double() for t in inputs])          # [N, numel]
        self.bounds = _split_bounds(flat.shape[1], self.world)
        self.flat = flat
        self.calls = 0
        self.problem: str | None = None

    def _running_sum(self, chunk: int, last_rank: int, count: int) -> torch.Tensor:
        lo, hi = self.bounds[chunk]
        ranks = [(last_rank - j) % self.world for j in range(count)]
        return self.flat[ranks, lo:hi].sum(0)

    def _matches(self, message: torch.Tensor, rank: int, count: int) -> bool:
        for chunk, (lo, hi) in enumerate(self.bounds):
            if message.numel() != hi - lo:
                continue
            expected = self._running_sum(chunk, rank, count)
            if torch.allclose(message.reshape(-1).double(), expected, rtol=1e-5, atol=1e-5):
                return True
        return False

    def pass_right(self, outgoing: Any) -> list[torch.Tensor]:
        n = self.world
        if not isinstance(outgoing, (list, tuple)) or len(outgoing) != n or not all(
                isinstance(t, torch.Tensor) for t in outgoing):
            self._fail(f"pass_right takes a list of {n} tensors (one message per rank), got "
                       f"{type(outgoing).__name__}{' of length ' + str(len(outgoing)) if isinstance(outgoing, (list, tuple)) else ''}")
            raise ValueError("pass_right takes a list of one tensor per rank")
        call_index = self.calls
        self.calls += 1
        total_steps = 2 * (n - 1)
        if call_index >= total_steps:
            self._fail(f"pass_right was called more than {total_steps} times; a ring all-reduce over {n} ranks takes "
                       f"{n - 1} reduce-scatter steps and {n - 1} all-gather steps")
        else:
            reduce_phase = call_index < n - 1
            step = call_index if reduce_phase else call_index - (n - 1)
            count = step + 1 if reduce_phase else n
            for rank, message in enumerate(outgoing):
                if not self._matches(message, rank, count):
                    sizes = sorted({hi - lo for lo, hi in self.bounds})
                    if reduce_phase:
                        ranks = ", ".join(str((rank - j) % n) for j in range(step, -1, -1))
                        want = (f"the running sum, over ranks {ranks}, of one chunk"
                                if step else f"one of rank {rank}'s own chunks")
                    else:
                        want = "one chunk of the full sum"
                    self._fail(f"pass_right call {call_index + 1} ({'reduce-scatter' if reduce_phase else 'all-gather'} "
                               f"step {step + 1} of {n - 1}): rank {rank} sent {message.numel()} elements, which are not "
                               f"{want}. Chunks are torch.tensor_split(flat, {n}) of the flattened tensor "
                               f"({'sizes ' + ' or '.join(map(str, sizes))}); each step every rank sends one chunk "
                               f"to rank + 1.")
                    break
        return [outgoing[(r - 1) % n].detach().clone() for r in range(n)]

    def _fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = message


def _split_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """``torch.tensor_split``'s pieces of ``numel`` elements: the first ``numel % world`` one longer."""
    base, extra = divmod(numel, world)
    bounds, start = [], 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _ring_case(fn: Callable, shape: tuple[int, ...], world: int, dtype: torch.dtype, g: torch.Generator) -> None:
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(world)]
    expected = torch.stack([t.double() for t in inputs]).sum(0)
    ring = _Ring(inputs)
    numel = math.prod(shape)
    what = f"ring_all_reduce({world} ranks, tensors of shape {shape} ({numel} elements), {dtype})"
    try:
        got = call(fn, [t.clone() for t in inputs], Callback(ring.pass_right))
    except (AssertionError, Exception) as exc:  # noqa: BLE001 - the ring's own complaint explains it best
        if ring.problem is not None:
            raise AssertionError(f"{what}: {ring.problem}") from None
        if isinstance(exc, (AssertionError, NotImplementedError)):
            raise
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from None
    if ring.problem is not None:
        raise AssertionError(f"{what}: {ring.problem}")
    if ring.calls != 2 * (world - 1):
        raise AssertionError(f"{what}: pass_right was called {ring.calls} times; a ring all-reduce over {world} ranks "
                             f"takes {world - 1} reduce-scatter steps then {world - 1} all-gather steps "
                             f"({2 * (world - 1)} calls)")
    if not isinstance(got, (list, tuple)) or len(got) != world:
        raise AssertionError(f"{what}: expected a list of {world} tensors (rank r's result at index r), got "
                             f"{type(got).__name__}")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for rank, out in enumerate(got):
        out = as_tensor(out, f"{what}: rank {rank}'s result")
        if out.dtype != dtype:
            raise AssertionError(f"{what}: rank {rank}'s result has dtype {out.dtype}, expected {dtype} (the inputs')")
        assert_close(out, expected, f"{what}: rank {rank}'s result", **tol,
                     hint="Every rank must end with the sum of all ranks' tensors, in the input's shape.")
    for rank in range(1, world):
        if not torch.equal(got[rank], got[0]):
            raise AssertionError(f"{what}: ranks 0 and {rank} hold different bits; in a ring all-reduce each chunk is "
                                 "summed once, by one rank, and the all-gather copies it, so every rank ends with "
                                 "identical tensors")


def check_ring_all_reduce(fn: Callable) -> None:
    """``fn(tensors, pass_right)`` is a ring all-reduce over ``len(tensors)`` simulated ranks."""
    rng, g = fresh_rng(), fresh_generator()
    world = rng.choice([3, 4])
    cases = [((rng.randrange(2, 6),), 2, torch.float32),                              # a handful of elements
             ((rng.randrange(3, 9), rng.randrange(3, 9) * world + rng.randrange(1, world)), world, torch.float32),
             ((2, 3, rng.randrange(2, 5) * 4 + rng.choice([1, 3])), 4, torch.float64),
             ((rng.randrange(1, 3),), 3, torch.float32)]                               # fewer elements than ranks
    for shape, n, dtype in cases:
        _ring_case(fn, shape, n, dtype, g)


# ----- zero_adamw_step ------------------------------------------------------------------------


def _flat_padded(tensors: list[torch.Tensor], world: int) -> torch.Tensor:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    shard = -(-flat.numel() // world)
    return torch.cat([flat, flat.new_zeros(shard * world - flat.numel())])


def _torch_adamw(params: list[torch.Tensor], lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps, foreach=False)


def _compare_states(states: Any, optimizer: torch.optim.AdamW, ref: list[torch.Tensor], world: int, step: int,
                    what: str, rtol: float = 1e-5, atol_scale: float = 1e-7, norm_rtol: float | None = None) -> None:
    """Each rank's state: ``step``, and its shard of torch's moments in the flat padded layout:
    element by element within ``rtol`` and an absolute tolerance of ``atol_scale`` times the
    moment's largest entry, or, with ``norm_rtol``, within that relative distance as a whole
    (``|got - expected| / |expected|``, for a training run whose rounding has had steps to grow)."""
    if not isinstance(states, (list, tuple)) or len(states) != world:
        raise AssertionError(f"{what}: states must stay a list of {world} dicts, one per rank")
    moments = {key: _flat_padded([optimizer.state[p][key] for p in ref], world) for key in ("exp_avg", "exp_avg_sq")}
    shard = moments["exp_avg"].numel() // world
    for rank, state in enumerate(states):
        if not isinstance(state, dict) or set(state) != {"step", "exp_avg", "exp_avg_sq"}:
            raise AssertionError(f"{what}: states[{rank}] must be a dict with the keys 'step', 'exp_avg', 'exp_avg_sq', "
                                 f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        value = state["step"]
        value = float(value) if isinstance(value, (int, float, torch.Tensor)) and (
            not isinstance(value, torch.Tensor) or value.numel() == 1) else None
        if value != float(step):
            raise AssertionError(f"{what}: states[{rank}]['step'] is {state['step']!r}, expected {step} (the number of "
                                 "steps this rank's shard has taken: bias correction uses it)")
        for key, full in moments.items():
            got = as_tensor(state[key], f"{what}: states[{rank}][{key!r}]")
            if tuple(got.shape) != (shard,):
                raise AssertionError(f"{what}: states[{rank}][{key!r}] has shape {tuple(got.shape)}, expected ({shard},): "
                                     f"rank {rank} keeps only its shard, ceil(P / N) = ceil({sum(p.numel() for p in ref)} "
                                     f"/ {world}) elements of the padded flat vector")
            expected = full[rank * shard:(rank + 1) * shard]
            hint = ("Rank r's shard is elements [r * S, (r + 1) * S) of all parameters flattened in order and padded "
                    "with zeros (S = ceil(P / N)); its gradient is the AVERAGE of the ranks' gradients of those "
                    "elements.")
            if norm_rtol is not None:
                distance = float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
                if not distance <= norm_rtol:
                    raise AssertionError(f"{what}: states[{rank}][{key!r}] is {distance:.3g} away from the reference "
                                         f"(|yours - reference| / |reference|; tolerance {norm_rtol:g}). {hint}")
                continue
            atol = atol_scale * float(full.abs().max()) + 1e-12
            assert_close(got, expected, f"{what}: states[{rank}][{key!r}]", rtol=rtol, atol=atol, hint=hint)


def _random_shapes(rng, world: int) -> list[tuple[int, ...]]:
    """Matrices and vectors whose total is not a multiple of ``world`` (so the last shard is padded),
    with a vector between matrices so that shard boundaries fall inside decayed and undecayed ones."""
    while True:
        d = rng.randrange(3, 8)
        shapes = [(rng.randrange(2, 6), d), (d,), (rng.randrange(2, 7), d), (rng.randrange(2, 9),), (d, rng.randrange(2, 5))]
        if sum(math.prod(s) for s in shapes) % world:
            return shapes


def check_zero_adamw_step(fn: Callable) -> None:
    """``fn(params, grads, states, lr, betas, eps, weight_decay)``: a ZeRO-1 AdamW step on a simulated
    world; every rank's parameters after each step equal ``torch.optim.AdamW`` on one process given
    the ranks' averaged gradient, and each rank's state is its shard of torch's."""
    rng, g = fresh_rng(), fresh_generator()
    for world in (rng.choice([2, 3]), 4):
        shapes = _random_shapes(rng, world)
        ref = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        betas, eps, weight_decay = (0.9, rng.choice([0.95, 0.999])), 1e-8, rng.choice([0.1, 0.5])
        optimizer = _torch_adamw(ref, 1e-2, betas, eps, weight_decay)
        params = [[p.detach().clone() for p in ref] for _ in range(world)]
        states: list[dict] = [{} for _ in range(world)]
        n_params = sum(math.prod(s) for s in shapes)
        for step in range(1, 4):
            lr = rng.choice([3e-3, 1e-2, 3e-2])
            grads = [[torch.randn(s, generator=g) * rng.choice([0.1, 1.0]) for s in shapes] for _ in range(world)]
            for i, p in enumerate(ref):
                p.grad = torch.stack([grads[r][i] for r in range(world)]).mean(0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            what = (f"zero_adamw_step, step {step} ({world} ranks, parameters of shapes {shapes}: P={n_params}, "
                    f"lr={lr:g}, betas={betas}, eps={eps:g}, weight_decay={weight_decay:g})")
            result = call(fn, params, [[x.clone() for x in gr] for gr in grads], states, lr, betas, eps, weight_decay)
            if result is not None:
                raise AssertionError(f"{what}: zero_adamw_step updates params and states in place and returns None, got "
                                     f"{type(result).__name__}")
            if not isinstance(params, list) or len(params) != world:
                raise AssertionError(f"{what}: params must stay a list of {world} lists, one per rank")
            for rank in range(world):
                replica = params[rank]
                if not isinstance(replica, list) or len(replica) != len(ref):
                    raise AssertionError(f"{what}: params[{rank}] must stay a list of {len(ref)} tensors")
                for i, p in enumerate(ref):
                    assert_close(replica[i], p.detach(), f"{what}: rank {rank}'s parameter {i} (shape {shapes[i]})",
                                 rtol=1e-5, atol=1e-6,
                                 hint="After each rank updates its shard, an all-gather gives EVERY rank every updated "
                                      "shard. Decay (p *= 1 - lr * weight_decay) only elements of parameters with 2+ "
                                      "dimensions; bias-correct with the number of steps taken (1 at the first).")
            _compare_states(states, optimizer, ref, world, step, what)


# ----- tp_swiglu_mlp --------------------------------------------------------------------------

_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def _reference_mlp(weights: dict[str, torch.Tensor], x: torch.Tensor, grad_output: torch.Tensor, bias: bool):
    """transformers' LlamaMLP (unsplit) in float64: output, input gradient, weight gradients by name."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    inter, hidden = weights["gate_proj.weight"].shape
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, mlp_bias=bias, hidden_act="silu",
                                 num_attention_heads=1, num_key_value_heads=1)).double()
    mlp.load_state_dict(weights)
    x = x.clone().requires_grad_(True)
    out = mlp(x)
    out.backward(grad_output)
    return out.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


def _shard_of(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Megatron's split: gate/up column-parallel (rows of the weight, the bias's pieces), down
    row-parallel (columns of the weight; its bias whole on every rank)."""
    if name == "down_proj.bias":
        return full
    dim = 1 if name == "down_proj.weight" else 0
    return full.chunk(world, dim=dim)[rank]


def _rank_partials(weights: dict[str, torch.Tensor], x: torch.Tensor, grad_output: torch.Tensor, rank: int,
                   world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s partial output (its features through down_proj, no down bias) and partial input
    gradient, by autograd on its block of the weights."""
    piece = {n: _shard_of(n, w, rank, world) for n, w in weights.items()}
    x = x.clone().requires_grad_(True)
    gate = x @ piece["gate_proj.weight"].T + piece.get("gate_proj.bias", 0.0)
    up = x @ piece["up_proj.weight"].T + piece.get("up_proj.bias", 0.0)
    partial = (F.silu(gate) * up) @ piece["down_proj.weight"].T
    partial.backward(grad_output)
    return partial.detach(), x.grad


def _tp_case(fn: Callable, rng, g: torch.Generator, world: int, bias: bool) -> None:
    hidden, per_rank = rng.choice([6, 8, 10, 12]), rng.randrange(2, 6)
    inter, batch, seq = per_rank * world, rng.randrange(1, 4), rng.randrange(2, 6)
    shapes = {"gate_proj.weight": (inter, hidden), "up_proj.weight": (inter, hidden), "down_proj.weight": (hidden, inter)}
    if bias:
        shapes.update({"gate_proj.bias": (inter,), "up_proj.bias": (inter,), "down_proj.bias": (hidden,)})
    weights = {n: torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for n, s in shapes.items()}
    x = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    grad_output = torch.randn(batch, seq, hidden, generator=g, dtype=torch.float64)
    out, grad_input, grads = _reference_mlp(weights, x, grad_output, bias)
    what = (f"tp_swiglu_mlp({world} ranks, x of shape {tuple(x.shape)}, intermediate size {inter}, "
            f"{'with' if bias else 'without'} biases, float64)")
    got = call(fn, x.clone(), {n: w.clone() for n, w in weights.items()}, grad_output.clone(), world)
    if not isinstance(got, (list, tuple)) or len(got) != world:
        raise AssertionError(f"{what}: expected a list of {world} dicts (rank r's at index r), got {type(got).__name__}")
    tol = dict(rtol=1e-9, atol=1e-10)
    keys = {"partial_output", "output", "partial_grad_input", "grad_input", "grads"}
    for rank, result in enumerate(got):
        if not isinstance(result, dict) or set(result) != keys:
            raise AssertionError(f"{what}: rank {rank}'s result must be a dict with the keys {sorted(keys)}, got "
                                 f"{sorted(result) if isinstance(result, dict) else type(result).__name__}")
        rank_grads = result["grads"]
        if not isinstance(rank_grads, dict) or set(rank_grads) != set(weights):
            raise AssertionError(f"{what}: rank {rank}'s 'grads' must have one entry per weight, named as in `weights` "
                                 f"({sorted(weights)}), got {sorted(rank_grads) if isinstance(rank_grads, dict) else rank_grads!r}")
        for name, full in grads.items():
            expected = _shard_of(name, full, rank, world)
            got_grad = as_tensor(rank_grads[name], f"{what}: rank {rank}'s gradient of {name}")
            if tuple(got_grad.shape) != tuple(expected.shape):
                raise AssertionError(
                    f"{what}: rank {rank}'s gradient of {name} has shape {tuple(got_grad.shape)}, expected its shard's "
                    f"{tuple(expected.shape)}: gate_proj and up_proj are column-parallel (each rank holds a block of "
                    "their OUTPUT features, rows of the weight), down_proj is row-parallel (a block of its INPUT "
                    "features, columns of the weight), and down_proj's bias is whole on every rank.")
        partial, partial_grad = _rank_partials(weights, x, grad_output, rank, world)
        assert_close(result["partial_output"], partial, f"{what}: rank {rank}'s partial output", **tol,
                     hint="Before the all-reduce, rank r holds its features' contribution through its columns of "
                          "down_proj, without down_proj's bias (that is added once, after the sum).")
        assert_close(result["output"], out, f"{what}: rank {rank}'s output", **tol,
                     hint="The output is the SUM over ranks of the partial outputs (an all-reduce), plus "
                          "down_proj's bias once.")
        assert_close(result["partial_grad_input"], partial_grad, f"{what}: rank {rank}'s partial input gradient",
                     **tol, hint="Rank r's contribution to dL/dx comes through its rows of gate_proj and up_proj; "
                                 "silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a))).")
        assert_close(result["grad_input"], grad_input, f"{what}: rank {rank}'s input gradient", **tol,
                     hint="The column-parallel layers' backward ends with an all-reduce (sum) of the ranks' partial "
                          "input gradients.")
        for name, full in grads.items():
            assert_close(rank_grads[name], _shard_of(name, full, rank, world),
                         f"{what}: rank {rank}'s gradient of {name}", **tol,
                         hint="Weight gradients need no communication: each rank's is its shard's, from its own "
                              "activations (summed over batch and positions).")


def check_tp_swiglu_mlp(fn: Callable) -> None:
    """``fn(x, weights, grad_output, world_size)``: Megatron's tensor-parallel SwiGLU MLP, forward
    and backward by hand, equal to transformers' unsplit ``LlamaMLP`` and autograd."""
    rng, g = fresh_rng(), fresh_generator()
    _tp_case(fn, rng, g, rng.choice([2, 3]), bias=False)
    _tp_case(fn, rng, g, rng.choice([2, 4]), bias=True)


# ----- train_data_parallel (the capstone) -----------------------------------------------------


def _tiny_config(rng) -> dict:
    heads, kv_heads = rng.choice([(4, 2), (2, 1), (4, 4)])
    return dict(vocab_size=rng.randrange(40, 80), hidden_size=32, intermediate_size=rng.choice([48, 64]),
                num_hidden_layers=rng.choice([1, 2]), num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, initializer_range=0.2)


def _reference_train(model, batches: list[torch.Tensor], config: dict) -> tuple[list[float], torch.optim.AdamW]:
    params = list(model.parameters())
    optimizer = _torch_adamw(params, config["lrs"][0], tuple(config["betas"]), config["eps"], config["weight_decay"])
    losses = []
    for lr, batch in zip(config["lrs"], batches):
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def _capstone_case(fn: Callable, rng, g: torch.Generator, world: int) -> None:
    cfg = _tiny_config(rng)
    steps, seq = 3, rng.randrange(8, 14)
    rows = rng.choice([r for r in range(world + 1, 3 * world) if r % world])        # uneven slices
    reference = tiny_llama(cfg, rng.randrange(2**31)).train()
    weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    batches = [torch.randint(cfg["vocab_size"], (rows, seq + 1), generator=g) for _ in range(steps)]
    config = dict(lrs=[rng.choice([1e-3, 2e-3, 3e-3]) for _ in range(steps)], betas=(0.9, 0.95), eps=1e-8,
                  weight_decay=rng.choice([0.1, 0.5]))
    losses, optimizer = _reference_train(reference, batches, config)
    ref_params = list(reference.parameters())
    what = (f"train_data_parallel({world} ranks, a tiny Llama ({cfg['num_hidden_layers']} layers, vocab "
            f"{cfg['vocab_size']}), {steps} steps of a global batch of {rows} x {seq + 1} tokens, config={config})")
    replicas = [construct_llama(cfg, {k: v.clone() for k, v in weights.items()}) for _ in range(world)]
    result = call(fn, replicas, [b.clone() for b in batches], dict(config))
    if not isinstance(result, dict) or set(result) != {"losses", "state_dicts", "states"}:
        raise AssertionError(f"{what}: expected a dict with the keys 'losses', 'state_dicts', 'states', got "
                             f"{sorted(result) if isinstance(result, dict) else type(result).__name__}")
    got_losses = result["losses"]
    if not isinstance(got_losses, (list, tuple)) or len(got_losses) != steps or not all(
            isinstance(v, (int, float)) for v in got_losses):
        raise AssertionError(f"{what}: result['losses'] must be a list of {steps} floats, one per step")
    assert_close(torch.tensor([float(v) for v in got_losses], dtype=torch.float64),
                 torch.tensor(losses, dtype=torch.float64), f"{what}: the global loss of each step", rtol=1e-5, atol=1e-6,
                 hint="A step's loss is the mean cross-entropy over ALL the global batch's target tokens, measured "
                      "before the update; with slices of unequal size that is not the mean of the ranks' means.")
    state_dicts = result["state_dicts"]
    if not isinstance(state_dicts, (list, tuple)) or len(state_dicts) != world:
        raise AssertionError(f"{what}: result['state_dicts'] must be a list of {world} state dicts, rank r's at index r")
    expected = reference.state_dict()
    for rank, state in enumerate(state_dicts):
        if not isinstance(state, dict) or sorted(state) != sorted(expected):
            raise AssertionError(f"{what}: result['state_dicts'][{rank}] must be rank {rank}'s model.state_dict()")
        for name in expected:
            as_tensor(state[name], f"{what}: rank {rank}'s {name!r}")
            if rank and not torch.equal(state[name], state_dicts[0][name]):
                raise AssertionError(f"{what}: ranks 0 and {rank} hold different {name!r}; after the all-gather every "
                                     "rank holds the same bits")
    for name, value in expected.items():
        _assert_close_but_a_few(state_dicts[0][name], value, f"{what}: trained weight {name!r}",
                                max_move=3 * sum(config["lrs"]),
                                hint="Each rank's gradient must be scaled so that the ranks' AVERAGE is the gradient "
                                     "of the global batch's mean loss (a rank with more rows weighs more); use step "
                                     "s's learning rate lrs[s]; clear the gradients after each step.")
    _compare_states(result["states"], optimizer, ref_params, world, steps, f"{what}: after the last step",
                    norm_rtol=1e-3)


def _assert_close_but_a_few(got: torch.Tensor, expected: torch.Tensor, what: str, max_move: float, hint: str,
                            rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Weights after a few AdamW steps: within ``atol + rtol |w|`` except at most one entry in 256
    (none in a tensor of fewer than 256), and those within ``max_move``. Adam divides by
    ``sqrt(v) + eps``: where a gradient entry is as small as its float32 rounding (two ways of
    adding the ranks' gradients round differently) the step's size there is noise, up to ``lr``.
    In 5 of 120 runs of a correct answer one weight of a matrix moved 4e-5 to 3e-4 from the
    reference's; a wrong rule moves every entry of the tensors it touches."""
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    diff = (got.detach().double() - expected.detach().double()).abs()
    outside = diff > atol + rtol * expected.detach().double().abs()
    allowed = expected.numel() // 256
    if int(outside.sum()) > allowed or bool((diff > max_move).any()) or not bool(torch.isfinite(got).all()):
        first = tuple(int(i) for i in torch.nonzero(outside)[0]) if outside.any() else ()
        raise AssertionError(f"{what}: {int(outside.sum())} of {expected.numel()} values differ (first at index {first}, "
                             f"largest difference {float(diff.max()):.3g}, tolerance rtol={rtol:g}, atol={atol:g}, "
                             f"{allowed} allowed beyond it by float rounding through Adam). {hint}")


@one_thread
def check_train_data_parallel(fn: Callable) -> None:
    """``fn(models, batches, config)``: data-parallel training of a tiny Llama over simulated ranks
    with the learner's ``zero_adamw_step``, equal to one process with the global batch."""
    rng, g = fresh_rng(), fresh_generator()
    _capstone_case(fn, rng, g, 2)
    _capstone_case(fn, rng, g, 3)


CHECKS = {
    "ring_all_reduce": check_ring_all_reduce,
    "zero_adamw_step": check_zero_adamw_step,
    "tp_swiglu_mlp": check_tp_swiglu_mlp,
    "train_data_parallel": check_train_data_parallel,
}
