"""Chapter 8's checks fail on the stub and on plausible wrong answers, and pass on the solution and
on correct answers written differently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch08_pretraining import CHECKS

from answers import fails_on, solution, stub_and_solution_test

SOLUTIONS = solution("ch08_pretraining")
fails = fails_on(CHECKS)
test_stub_fails_and_solution_passes = stub_and_solution_test(CHECKS, SOLUTIONS)


# ----- wsd_lr_lambda --------------------------------------------------------------------------

SHAPES_UP = {"linear": lambda q: q, "cosine": lambda q: 0.5 * (1 - math.cos(math.pi * q)),
             "1-sqrt": lambda q: 1 - math.sqrt(1 - q)}
SHAPES_DOWN = {"linear": lambda q: 1 - q, "cosine": lambda q: 0.5 * (1 + math.cos(math.pi * q)),
               "1-sqrt": lambda q: 1 - math.sqrt(q)}


def _wsd(step, w, s, d, up="linear", down="cosine", r=0.0, *, plus_one=False, ratio_in_warmup=True,
         skip_stable=False, end=None, sqrt_flip=False):
    if step < w:
        q = (step + 1) / w if plus_one else step / w
        shape = SHAPES_UP[up](q)
        return r + (1 - r) * shape if ratio_in_warmup else shape
    if step < w + s:
        return 1.0
    if step < w + s + d:
        q = (step - w - (0 if skip_stable else s)) / d
        q = min(q, 1.0)
        shape = math.sqrt(1 - q) if (sqrt_flip and down == "1-sqrt") else SHAPES_DOWN[down](q)
        return r + (1 - r) * shape
    return r if end is None else end


@pytest.mark.parametrize("options", [
    dict(plus_one=True),          # chapter 8's (step + 1) / warmup
    dict(ratio_in_warmup=False),  # the warm-up starts from 0, not min_lr_ratio
    dict(skip_stable=True),       # decay progress counted from the end of the warm-up
    dict(end=0.0),                # 0 after the decay
    dict(sqrt_flip=True),         # sqrt(1 - q) for the 1-sqrt decay
], ids=lambda o: next(iter(o)))
def test_wsd_wrong(options):
    assert fails("wsd_lr_lambda", lambda *a: _wsd(*a, **options))


def test_wsd_with_phase_boundaries_and_num_cycles_passes():
    def by_boundaries(step, w, s, d, up="linear", down="cosine", r=0.0):
        ends = [w, w + s, w + s + d]
        if step >= ends[2]:
            return r
        if ends[0] <= step < ends[1]:
            return 1.0
        warm = step < ends[0]
        q = step / w if warm else (step - ends[1]) / d
        if warm:
            shape = {"linear": q, "cosine": (1 - math.cos(math.pi * q)) / 2, "1-sqrt": 1 - (1 - q) ** 0.5}[up]
        else:
            shape = {"linear": 1 - q, "cosine": 0.5 * (1 + math.cos(math.pi * 0.5 * 2.0 * q)), "1-sqrt": 1 - q ** 0.5}[down]
        return shape * (1 - r) + r

    assert CHECKS["wsd_lr_lambda"](by_boundaries) is None


# ----- clip_grad_norm -------------------------------------------------------------------------


@torch.no_grad()
def _clip(grads, max_norm, p=2.0, *, always=False, per_tensor=False, eps=1e-6, after=False, ignore_p=False,
          sum_of_norms=False):
    present = [g for g in grads if g is not None]
    if not present:
        return torch.tensor(0.0)
    p = 2.0 if ignore_p else p
    norms = [torch.linalg.vector_norm(g, p) for g in present]
    total = torch.stack(norms).sum() if sum_of_norms else torch.linalg.vector_norm(torch.stack(norms), p)
    for g, n in zip(present, norms):
        scale = max_norm / ((n if per_tensor else total) + eps)
        g.mul_(scale if always else min(1.0, float(scale)))
    if after:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, p) for g in present]), p)
    return total


@pytest.mark.parametrize("options", [
    dict(always=True),            # scales small gradients up too
    dict(per_tensor=True),        # clips each gradient by its own norm
    dict(eps=0.0),                # no 1e-6 in the denominator
    dict(after=True),             # returns the norm after clipping
    dict(ignore_p=True),          # always the L2 norm
    dict(sum_of_norms=True),      # adds the per-tensor norms
], ids=lambda o: next(iter(o)))
def test_clip_wrong(options):
    assert fails("clip_grad_norm", lambda g, m, p=2.0: _clip(g, m, p, **options))


def test_clip_norm_of_norms_passes():
    assert CHECKS["clip_grad_norm"](lambda g, m, p=2.0: _clip(g, m, p)) is None


# ----- adamw_step -----------------------------------------------------------------------------


@torch.no_grad()
def _adamw(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.01, *, coupled=False, decay_all=False,
           decay_after=False, eps_inside=False, no_bias_correction=False, names=("exp_avg", "exp_avg_sq")):
    b1, b2 = betas
    m_name, v_name = names
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        entry = state.setdefault(i, {"step": torch.tensor(0.0), m_name: torch.zeros_like(p), v_name: torch.zeros_like(p)})
        entry["step"] += 1
        t = float(entry["step"])
        decays = decay_all or p.dim() >= 2
        if coupled and decays:
            g = g + wd * p
        if decays and not coupled and not decay_after:
            p.mul_(1 - lr * wd)
        entry[m_name].mul_(b1).add_(g, alpha=1 - b1)
        entry[v_name].mul_(b2).addcmul_(g, g, value=1 - b2)
        c1, c2 = (1.0, 1.0) if no_bias_correction else (1 - b1 ** t, 1 - b2 ** t)
        m_hat, v_hat = entry[m_name] / c1, entry[v_name] / c2
        p.sub_(lr * m_hat / ((v_hat + eps).sqrt() if eps_inside else (v_hat.sqrt() + eps)))
        if decays and decay_after and not coupled:
            p.mul_(1 - lr * wd)


@pytest.mark.parametrize("options", [
    dict(coupled=True),               # Adam with L2 in the gradient, not decoupled decay
    dict(decay_all=True),             # decays norms and biases too
    dict(decay_after=True),           # decays after the Adam step
    dict(eps_inside=True),            # sqrt(v_hat + eps)
    dict(no_bias_correction=True),    # m and v used without 1 - beta^t
    dict(names=("m", "v")),           # its own state names: cannot resume torch's state
], ids=lambda o: next(iter(o)))
def test_adamw_wrong(options):
    assert fails("adamw_step", lambda *a: _adamw(*a, **options))


def test_adamw_by_the_formula_passes():
    """Chapter 8's order of operations (m_hat, v_hat), not torch's (lerp, addcdiv): equal within float32."""
    assert CHECKS["adamw_step"](lambda *a: _adamw(*a)) is None


# ----- train ----------------------------------------------------------------------------------

wsd, clip, adamw = SOLUTIONS["wsd_lr_lambda"], SOLUTIONS["clip_grad_norm"], SOLUTIONS["adamw_step"]
SCHEDULE = ("num_warmup_steps", "num_stable_steps", "num_decay_steps", "warmup_type", "decay_type", "min_lr_ratio")


def _train(model, blocks, batches, config, *, divide=True, lr_shift=0, clip_on=True, zero=True, decay_all=False,
           last_loss=False, token_sum=False):
    params = list(model.parameters())
    state, history = {}, {"lrs": [], "losses": [], "grad_norms": []}
    accum = config["grad_accum_steps"]
    for step, indices in enumerate(batches):
        lr = config["max_lr"] * wsd(step + lr_shift, **{k: config[k] for k in SCHEDULE})
        total = 0.0
        micro_batches = torch.tensor(indices).chunk(accum)
        n_targets = sum(blocks[m][:, 1:].numel() for m in micro_batches)
        for micro in micro_batches:
            block = blocks[micro]
            logits = model(input_ids=block[:, :-1]).logits.reshape(-1, 257)
            if token_sum:
                loss = F.cross_entropy(logits, block[:, 1:].reshape(-1), reduction="sum") / n_targets
            else:
                loss = F.cross_entropy(logits, block[:, 1:].reshape(-1)) / (accum if divide else 1)
            loss.backward()
            total = loss.item() * (accum if last_loss else 1) if last_loss else total + loss.item()
        grads = [p.grad for p in params]
        norm = clip(grads, config["max_grad_norm"]) if clip_on else torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if decay_all:
            with torch.no_grad():
                for p in params:
                    if p.dim() < 2:
                        p.mul_(1 - lr * config["weight_decay"])
        adamw(params, grads, state, lr, tuple(config["betas"]), config["eps"], config["weight_decay"])
        if zero:
            for p in params:
                p.grad = None
        history["lrs"].append(lr)
        history["losses"].append(total)
        history["grad_norms"].append(float(norm))
    history["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return history


@pytest.mark.parametrize("options", [
    dict(divide=False),       # micro-batch losses not divided by grad_accum_steps
    dict(lr_shift=1),         # the schedule one step ahead
    dict(clip_on=False),      # no clipping
    dict(zero=False),         # gradients never reset: they pile up across steps
    dict(decay_all=True),     # weight decay on norms too
    dict(last_loss=True),     # reports the last micro-batch's loss
], ids=lambda o: next(iter(o)))
def test_train_wrong(options):
    assert fails("train", lambda *a: _train(*a, **options))


def test_train_with_summed_token_losses_passes():
    assert CHECKS["train"](lambda *a: _train(*a, token_sum=True)) is None


# ----- document_mask --------------------------------------------------------------------------


def _document_mask(input_ids, eos, *, eos_starts_next=False, causal=True, restart=True, own_key=True,
                   positions_from=0, float_mask=False):
    is_eos = (input_ids == eos).long()
    if eos_starts_next:
        document = is_eos.cumsum(dim=1)                         # the EOS opens the next document
    else:
        document = is_eos.cumsum(dim=1) - is_eos
    seq_len = input_ids.shape[1]
    lower = torch.ones(seq_len, seq_len, dtype=torch.bool).tril(0 if own_key else -1)
    same = document[:, :, None] == document[:, None, :]
    mask = (same & lower) if causal else same
    mask = mask.unsqueeze(1)
    t = torch.arange(seq_len).expand_as(document)
    if restart:
        start = torch.where(torch.cat([torch.ones_like(is_eos[:, :1]), (document[:, 1:] != document[:, :-1]).long()],
                                      dim=1).bool(), t, torch.zeros_like(t)).cummax(dim=1).values
        positions = t - start + positions_from
    else:
        positions = t + positions_from
    return (mask.float() if float_mask else mask), positions


def _plain_causal(input_ids, eos):
    seq_len = input_ids.shape[1]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(input_ids.shape[0], 1, seq_len, seq_len)
    _, positions = _document_mask(input_ids, eos)
    return mask, positions                                          # right positions, plain causal mask


@pytest.mark.parametrize("options", [
    dict(eos_starts_next=True),   # the EOS counted as the first token of the next document
    dict(causal=False),           # whole documents visible: not causal inside a document
    dict(restart=False),          # positions counted from the start of the block
    dict(own_key=False),          # off by one: a query may not attend to itself
    dict(positions_from=1),       # off by one: positions start at 1
    dict(float_mask=True),        # an additive-style float mask instead of True/False
], ids=lambda o: next(iter(o)))
def test_document_mask_wrong(options):
    assert fails("document_mask", lambda ids, eos: _document_mask(ids, eos, **options))


def test_document_mask_plain_causal_fails():
    assert fails("document_mask", _plain_causal)


def test_document_mask_by_loops_passes():
    """A correct answer written differently: Python loops over the tokens."""
    def by_loops(input_ids, eos):
        batch, seq_len = input_ids.shape
        mask = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.bool)
        positions = torch.zeros(batch, seq_len, dtype=torch.int32)
        for b in range(batch):
            start = 0
            for i in range(seq_len):
                positions[b, i] = i - start
                mask[b, 0, i, start:i + 1] = True
                if int(input_ids[b, i]) == eos:
                    start = i + 1
        return mask, positions

    assert CHECKS["document_mask"](by_loops) is None


def test_document_mask_returned_as_a_list_passes():
    assert CHECKS["document_mask"](lambda ids, eos: list(_document_mask(ids, eos))) is None


# ----- chinchilla_allocation ------------------------------------------------------------------


def _allocation(law, budgets, runs, *, swap=False, no_six=False, d_without_six=False, inverted_g=False, no_e=False,
                run_compute=False, bisect=False):
    E, A, B, a, b = (law[k] for k in ("E", "A", "B", "alpha", "beta"))
    loss = lambda n, d: E + A / n ** a + B / d ** b  # noqa: E731
    g = ((b * B) / (a * A) if inverted_g else (a * A) / (b * B)) ** (1 / (a + b))

    def optimum(c):
        base = c if no_six else c / 6
        n = g * base ** ((a if swap else b) / (a + b))
        return n, (c / n if (no_six or d_without_six) else c / (6 * n))

    def optimal_loss(c):
        n, d = optimum(c)
        return loss(n, d) - (E if no_e else 0.0)

    n_opt, d_opt = zip(*(optimum(c) for c in budgets))
    equivalent = []
    for n, d in runs:
        target = loss(n, d)
        if run_compute:                    # the run's own compute, not the compute-optimal model's
            equivalent.append(6 * n * d)
        elif bisect:                       # another correct route: bisection on log C
            lo, hi = -20.0, 200.0
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if optimal_loss(math.exp(mid)) > target else (lo, mid)
            equivalent.append(math.exp((lo + hi) / 2))
        else:                              # closed form: L_opt(C) = E + K (C/6)^(-a b / (a + b))
            k = A * g ** -a + B * g ** b
            equivalent.append(6 * ((target - E) / k) ** (-(a + b) / (a * b)))
    return {"N_opt": list(n_opt), "D_opt": list(d_opt), "L_opt": [optimal_loss(c) for c in budgets],
            "equivalent_compute": equivalent}


@pytest.mark.parametrize("options", [
    dict(swap=True),            # N_opt grows as C^(alpha / (alpha + beta)): the exponents swapped
    dict(no_six=True),          # C = N D, without the 6 FLOPs per parameter and token
    dict(d_without_six=True),   # N_opt right, but D_opt = C / N_opt
    dict(inverted_g=True),      # G = (beta B / (alpha A))^(1 / (alpha + beta))
    dict(no_e=True),            # the optimal loss without the irreducible E
    dict(run_compute=True),     # the run's own 6 N D as its equivalent compute
], ids=lambda o: next(iter(o)))
def test_chinchilla_allocation_wrong(options):
    assert fails("chinchilla_allocation", lambda *a: _allocation(*a, **options))


def test_chinchilla_allocation_by_bisection_passes():
    assert CHECKS["chinchilla_allocation"](lambda *a: _allocation(*a, bisect=True)) is None
