"""Chapter 15's checks fail on the stub and on plausible wrong answers, and pass on the solution and
on correct answers written differently.

Each check is called as a notebook's ``check(fn)`` calls it (through ``LocalObject``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch15_scaling_out import CHECKS, FORBIDDEN
from llama_from_scratch.course.grade import LocalObject

from answers import fails_on, forbidden_rules_test, passes_on, solution, solution_and_stub_tests, stub

NS = solution("ch15_scaling_out")
STUBS = stub("ch15_scaling_out")
passes = passes_on(CHECKS, LocalObject)
fails = fails_on(CHECKS, LocalObject)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, NS, STUBS, wrap=LocalObject)
test_every_exercise_has_forbidden_rules_and_a_solution = forbidden_rules_test(CHECKS, FORBIDDEN, NS)


# ----- ring_all_reduce ------------------------------------------------------------------------


def _ring(tensors, pass_right, *, split="tensor_split", offset=0, rotate=True, gather=True, average=False,
          reduce_steps=None, whole=False):
    world = len(tensors)
    numel = tensors[0].numel()
    if whole:                                # every step passes whole running sums around the ring
        sums = [t.reshape(-1).clone() for t in tensors]
        moving = [t.reshape(-1).clone() for t in tensors]
        for _ in range(world - 1):
            moving = pass_right(moving)
            sums = [s + m for s, m in zip(sums, moving)]
        for _ in range(world - 1):
            pass_right(sums)
        return [s.reshape(t.shape) for s, t in zip(sums, tensors)]
    if split == "tensor_split":
        bounds = [len(c) for c in torch.tensor_split(torch.arange(numel), world)]
    elif split == "floor_rest_last":         # numel // N each, the remainder in the last chunk
        bounds = [numel // world] * (world - 1) + [numel - (numel // world) * (world - 1)]
    else:                                    # ceil-sized chunks padded with zeros
        size = -(-numel // world)
        bounds = [size] * world
    flat = []
    for t in tensors:
        f = t.reshape(-1)
        if split == "padded":
            f = torch.cat([f, f.new_zeros(sum(bounds) - numel)])
        flat.append(list(f.split(bounds)))
    steps = world - 1 if reduce_steps is None else reduce_steps
    for step in range(steps):
        idx = [((r - step + offset) if rotate else r) % world for r in range(world)]
        incoming = pass_right([flat[r][idx[r]] for r in range(world)])
        for r in range(world):
            c = idx[(r - 1) % world]
            flat[r][c] = flat[r][c] + incoming[r]
    if gather:
        for step in range(world - 1):
            idx = [(r + 1 - step + offset) % world for r in range(world)]
            incoming = pass_right([flat[r][idx[r]] for r in range(world)])
            for r in range(world):
                flat[r][idx[(r - 1) % world]] = incoming[r]
    out = [torch.cat(f)[:numel].reshape(t.shape) for f, t in zip(flat, tensors)]
    return [o / world for o in out] if average else out


@pytest.mark.parametrize("options", [
    dict(whole=True),                     # whole tensors around the ring instead of chunks
    dict(split="floor_rest_last"),        # numel // N per chunk, the remainder in the last chunk
    dict(split="padded"),                 # ceil-sized chunks, zero-padded
    dict(rotate=False),                   # rank r always sends chunk r in the reduce-scatter
    dict(gather=False),                   # reduce-scatter only
    dict(average=True),                   # divides by the world size
    dict(reduce_steps=1),                 # one reduce-scatter step
], ids=lambda o: next(iter(o)))
def test_ring_wrong(options):
    assert fails("ring_all_reduce", lambda tensors, pass_right: _ring(tensors, pass_right, **options))


def test_ring_summing_locally_and_passing_dummies_fails():
    def cheat(tensors, pass_right):
        world = len(tensors)
        for _ in range(2 * (world - 1)):
            pass_right([torch.zeros(1) for _ in tensors])
        total = sum(tensors)
        return [total.clone() for _ in tensors]

    assert fails("ring_all_reduce", cheat)


def test_ring_another_chunk_order_passes():
    """Rank r starts its reduce-scatter with chunk r + 1 (so that it ends owning chunk r + 2): also a ring."""
    assert passes("ring_all_reduce", lambda tensors, pass_right: _ring(tensors, pass_right, offset=1)) is None


def test_ring_tensor_split_by_hand_passes():
    assert passes("ring_all_reduce", lambda tensors, pass_right: _ring(tensors, pass_right)) is None


# ----- zero_adamw_step ------------------------------------------------------------------------


@torch.no_grad()
def _zero(params, grads, states, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *, summed=False,
          gather=True, shard_rule="ceil", step_rule="own", decay_rule="matrices", full_state=False):
    world, (b1, b2) = len(params), betas
    sizes = [p.numel() for p in params[0]]
    total = sum(sizes)
    if shard_rule == "ceil":
        shard = -(-total // world)
        bounds = [(r * shard, (r + 1) * shard) for r in range(world)]
    else:                                # floor, the last rank takes the rest
        shard = total // world
        bounds = [(r * shard, (r + 1) * shard if r < world - 1 else total) for r in range(world)]
    padded = max(hi for _, hi in bounds)
    mask = torch.cat([torch.full((p.numel(),), 1.0 if (p.dim() >= 2 or decay_rule == "all") else 0.0) for p in params[0]])
    mask = torch.cat([mask, mask.new_zeros(max(padded, total) - total)])
    flat_grads = [torch.cat([torch.cat([x.reshape(-1) for x in g]), torch.zeros(max(padded, total) - total)])
                  for g in grads]
    new = []
    for r, (lo, hi) in enumerate(bounds):
        if full_state:
            lo_s, hi_s = 0, total
        else:
            lo_s, hi_s = lo, hi
        g = sum(fg[lo_s:hi_s] for fg in flat_grads)
        g = g if summed else g / world
        w = torch.cat([torch.cat([p.reshape(-1) for p in params[r]]), torch.zeros(max(padded, total) - total)])[lo_s:hi_s]
        m = mask[lo_s:hi_s] if decay_rule != "local_offset" else mask[: hi_s - lo_s]
        st = states[r]
        if not st:
            st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        st["step"] += 1
        t = float(st["step"])
        if step_rule == "shared":
            t = float(sum(float(s["step"]) for s in states if s))
        w = w * (1 - lr * weight_decay * m)
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = st["exp_avg"] / (1 - b1 ** t)
        v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
        new.append((lo_s, hi_s, w))
    if full_state:
        full = new[0][2]
    else:
        full = torch.cat([w for _, _, w in new])[:total]
    for r, replica in enumerate(params):
        if not gather:
            lo, hi, w = new[r]
            current = torch.cat([p.reshape(-1) for p in replica])
            current[lo:min(hi, total)] = w[: min(hi, total) - lo]
            source = current
        else:
            source = full
        for p, piece in zip(replica, source.split(sizes)):
            p.copy_(piece.view_as(p))


@pytest.mark.parametrize("options", [
    dict(summed=True),                    # sums the ranks' gradients instead of averaging them
    dict(gather=False),                   # no all-gather: each rank has only its own shard updated
    dict(shard_rule="floor"),             # P // N per shard, the last rank takes the rest
    dict(step_rule="shared"),             # bias correction with the steps of all ranks together
    dict(decay_rule="all"),               # decays the norm gains and biases too
    dict(decay_rule="local_offset"),      # decay mask read from the start of the buffer, not the shard's
    dict(full_state=True),                # every rank keeps the whole state (plain data parallelism)
], ids=lambda o: f"{next(iter(o))}={next(iter(o.values()))}")
def test_zero_wrong(options):
    assert fails("zero_adamw_step", lambda *a: _zero(*a, **options))


def test_zero_bias_correction_before_the_increment_fails():
    @torch.no_grad()
    def off_by_one(params, grads, states, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        # bias correction with t - 1 from the second step on (the step counter incremented after the update)
        for st in states:
            if st:
                st["step"] -= 1
        _zero(params, grads, states, lr, betas, eps, weight_decay)
        for st in states:
            if float(st["step"]) > 1:
                st["step"] += 1

    assert fails("zero_adamw_step", off_by_one)


def test_zero_by_the_formula_per_parameter_pieces_passes():
    """The formula (m_hat, v_hat) instead of lerp/addcdiv, each shard assembled parameter by parameter."""
    assert passes("zero_adamw_step", lambda *a: _zero(*a)) is None


# ----- tp_swiglu_mlp --------------------------------------------------------------------------


def _tp(x, weights, grad_output, world_size, *, bias_every_rank=False, average=False, reduce_grad_input=True,
        interleave_up=False, split_columns=False, silu_grad="exact", down_bias_share=False, fused=False):
    inter, hidden = weights["gate_proj.weight"].shape
    n = inter // world_size
    x2, go = x.reshape(-1, hidden), grad_output.reshape(-1, hidden)
    has_bias = "gate_proj.bias" in weights
    out = []
    for r in range(world_size):
        rows = torch.arange(r * n, (r + 1) * n)
        up_rows = torch.arange(r, inter, world_size) if interleave_up else rows
        if split_columns:
            cols = torch.arange(r * (hidden // world_size), (r + 1) * (hidden // world_size))
            wg, wu = weights["gate_proj.weight"][:, cols], weights["up_proj.weight"][:, cols]
        else:
            wg, wu = weights["gate_proj.weight"][rows], weights["up_proj.weight"][up_rows]
        wd = weights["down_proj.weight"][:, rows]
        if fused:                             # one matmul for gate and up, as fused kernels do
            a, u = (x2 @ torch.cat([wg, wu]).T).split(n, dim=1)
        else:
            a, u = x2 @ wg.T, x2 @ wu.T
        if has_bias:
            a, u = a + weights["gate_proj.bias"][rows], u + weights["up_proj.bias"][up_rows]
        sig = torch.sigmoid(a)
        h = a * sig * u
        partial = h @ wd.T
        if bias_every_rank and has_bias:
            partial = partial + weights["down_proj.bias"]
        gh = go @ wd
        dsilu = sig if silu_grad == "sigmoid" else sig * (1 + a * (1 - sig))
        if silu_grad == "derivative_form":
            dsilu = sig + a * sig * (1 - sig)
        ga, gu = gh * u * dsilu, gh * a * sig
        grads = {"gate_proj.weight": ga.T @ x2, "up_proj.weight": gu.T @ x2, "down_proj.weight": go.T @ h}
        if has_bias:
            grads.update({"gate_proj.bias": ga.sum(0), "up_proj.bias": gu.sum(0),
                          "down_proj.bias": go.sum(0) / (world_size if down_bias_share else 1)})
        out.append({"partial_output": partial.reshape(x.shape), "grads": grads,
                    "partial_grad_input": torch.cat([ga, gu], 1).matmul(torch.cat([wg, wu])).reshape(x.shape)
                    if fused else (ga @ wg + gu @ wu).reshape(x.shape)})
    total = sum(o["partial_output"] for o in out)
    if average:
        total = total / world_size
    if has_bias and not bias_every_rank:
        total = total + weights["down_proj.bias"]
    grad_input = sum(o["partial_grad_input"] for o in out)
    for o in out:
        o["output"] = total.clone()
        o["grad_input"] = grad_input.clone() if reduce_grad_input else o["partial_grad_input"].clone()
    return out


@pytest.mark.parametrize("options", [
    dict(bias_every_rank=True),           # down_proj's bias added by every rank before the all-reduce
    dict(average=True),                   # the forward all-reduce averages
    dict(reduce_grad_input=False),        # no all-reduce of the input gradient
    dict(interleave_up=True),             # up_proj split in strides, gate_proj in blocks
    dict(split_columns=True),             # gate/up split along their input features
    dict(silu_grad="sigmoid"),            # silu'(a) taken as sigmoid(a)
    dict(down_bias_share=True),           # each rank keeps 1/N of down_proj's bias gradient
], ids=lambda o: next(iter(o)))
def test_tp_wrong(options):
    assert fails("tp_swiglu_mlp", lambda *a: _tp(*a, **options))


def test_tp_fused_gate_up_passes():
    """gate and up as one fused matrix (one matmul forward, one backward), silu' written as s + a s (1 - s)."""
    assert passes("tp_swiglu_mlp", lambda *a: _tp(*a, fused=True, silu_grad="derivative_form")) is None


# ----- train_data_parallel --------------------------------------------------------------------

zero_adamw_step = NS["zero_adamw_step"]


def _train(models, batches, config, *, weighting="rows", step_fn=None, clear=True, lr_shift=0, strided=False,
           rank0_only=False, unshifted=False):
    world = len(models)
    params = [list(m.parameters()) for m in models]
    states, losses = [{} for _ in models], []
    step_fn = step_fn or zero_adamw_step
    for step, batch in enumerate(batches):
        rows = ([torch.arange(r, batch.shape[0], world) for r in range(world)] if strided
                else torch.tensor_split(torch.arange(batch.shape[0]), world))
        total = 0.0
        for model, mine in zip(models, rows):
            block = batch[mine]
            inputs, targets = (block[:, :-1], block[:, :-1]) if unshifted else (block[:, :-1], block[:, 1:])
            logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            share = len(mine) / batch.shape[0] if weighting == "rows" else 1 / world
            (loss * share * world).backward()
            total += loss.item() * share
        lr = config["lrs"][min(step + lr_shift, len(batches) - 1)]
        if rank0_only:
            step_fn([params[0]], [[p.grad for p in params[0]]], states[:1], lr, tuple(config["betas"]), config["eps"],
                    config["weight_decay"])
        else:
            step_fn(params, [[p.grad for p in ps] for ps in params], states, lr, tuple(config["betas"]), config["eps"],
                    config["weight_decay"])
        if clear:
            for ps in params:
                for p in ps:
                    p.grad = None
        losses.append(total)
    return {"losses": losses, "states": states,
            "state_dicts": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]}


def _summing_step(params, grads, states, lr, betas, eps, weight_decay):
    world = len(params)
    zero_adamw_step(params, [[g * world for g in gr] for gr in grads], states, lr, betas, eps, weight_decay)


@pytest.mark.parametrize("options", [
    dict(weighting="equal"),              # the mean of the ranks' mean losses, whatever their sizes
    dict(step_fn=_summing_step),          # gradients summed over ranks instead of averaged
    dict(clear=False),                    # gradients never cleared: they pile up across steps
    dict(lr_shift=1),                     # step s uses lrs[s + 1]
    dict(rank0_only=True),                # only rank 0 steps (the other replicas never change)
    dict(unshifted=True),                 # targets not shifted
], ids=lambda o: next(iter(o)) if not callable(next(iter(o.values()))) else "summed")
def test_train_wrong(options):
    assert fails("train_data_parallel", lambda *a: _train(*a, **options))


def test_train_with_strided_rows_passes():
    """Rank r takes rows r, r + N, ...: another split, the same global mean when weighted by rows."""
    assert passes("train_data_parallel", lambda *a: _train(*a, strided=True)) is None


def test_chunk_bounds_helper_is_tensor_splits():
    from llama_from_scratch.course.checks.ch15_scaling_out import _split_bounds

    for numel in range(0, 30):
        for world in range(1, 6):
            pieces = torch.tensor_split(torch.arange(numel), world)
            assert [hi - lo for lo, hi in _split_bounds(numel, world)] == [len(p) for p in pieces]
            assert math.fsum(hi - lo for lo, hi in _split_bounds(numel, world)) == numel
