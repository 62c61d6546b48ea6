"""Checks of chapter 8's exercises: the warmup-stable-decay schedule, clipping by a global p-norm,
AdamW in torch's state format, the capstone training loop, and the document mask of packed blocks.

References (independent of this package):

- ``wsd_lr_lambda``: ``transformers.get_wsd_schedule`` (its ``LambdaLR`` multiplier);
- ``clip_grad_norm``: ``torch.nn.utils.clip_grad_norm_``;
- ``adamw_step``: ``torch.optim.AdamW`` with two parameter groups (decay on matrices only), over
  several steps with a changing learning rate, also resumed from torch's own optimizer state;
- ``train``: the same loop in the grader with ``torch.optim.AdamW``, ``clip_grad_norm_`` and
  ``LambdaLR(get_wsd_schedule)`` on a tiny ``transformers`` Llama and byte-level blocks of the
  story corpus (``data/stories``, read through the package's data helpers), and the returned
  weights must score on held-out stories within 2% of the reference run's trained model;
- ``document_mask``: blocks cut from a stream of documents the grader made (each ending in EOS),
  against ``transformers.DataCollatorWithFlattening`` (the positions of those documents, restarting
  at 0) and ``transformers.masking_utils.create_causal_mask`` (the block-diagonal causal mask it
  builds for packed sequences from those positions).

Inputs are drawn fresh at every grading run; failure messages say what differed, never the
expected values.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch07_decoding import call, construct_llama, one_thread, tiny_llama
from llama_from_scratch.course.checks.common import as_tensor, assert_close, assert_equal, fresh_generator, fresh_rng

WARMUP_TYPES = ("linear", "cosine", "1-sqrt")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


# ----- wsd_lr_lambda --------------------------------------------------------------------------


def _wsd_reference(warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str, min_lr_ratio: float):
    from transformers import get_wsd_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_stable_steps=stable,
                                 warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=min_lr_ratio)
    return scheduler.lr_lambdas[0]


def check_wsd_lr_lambda(fn: Callable) -> None:
    """``fn(step, num_warmup_steps, num_stable_steps, num_decay_steps, warmup_type, decay_type,
    min_lr_ratio)`` equals the multiplier of ``transformers.get_wsd_schedule`` at every step."""
    rng = fresh_rng()
    # Fixed plans first: each decay shape over several decay steps, so that a shape that agrees with
    # the right one only at the first decay step (q = 0) cannot pass by drawing a 1-step decay.
    plans = [(4, 3, 5, "linear", "cosine", 0.0), (0, 2, 3, "cosine", "linear", 0.1), (2, 1, 4, "linear", "1-sqrt", 0.0)]
    for warmup_type in WARMUP_TYPES:
        for decay_type in DECAY_TYPES:
            plans.append((rng.choice([0, 1, rng.randrange(2, 12)]), rng.choice([0, rng.randrange(1, 10)]),
                          rng.choice([1, rng.randrange(2, 15)]), warmup_type, decay_type,
                          rng.choice([0.0, 0.1, rng.uniform(0, 0.5)])))
    for warmup, stable, decay, warmup_type, decay_type, ratio in plans:
        reference = _wsd_reference(warmup, stable, decay, warmup_type, decay_type, ratio)
        steps = list(range(warmup + stable + decay + 3))
        expected = torch.tensor([reference(s) for s in steps], dtype=torch.float64)
        got = []
        for s in steps:
            value = call(fn, s, warmup, stable, decay, warmup_type, decay_type, ratio)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise AssertionError(f"wsd_lr_lambda must return a float, got {type(value).__name__}")
            got.append(float(value))
        assert_close(torch.tensor(got, dtype=torch.float64), expected,
                     f"wsd_lr_lambda at steps 0..{steps[-1]} (num_warmup_steps={warmup}, num_stable_steps={stable}, "
                     f"num_decay_steps={decay}, warmup_type={warmup_type!r}, decay_type={decay_type!r}, "
                     f"min_lr_ratio={ratio:.3g})", rtol=1e-9, atol=1e-12,
                     hint="Warm-up progress is step / num_warmup_steps (0 at step 0); decay progress counts from the "
                          "first decay step; every phase but the stable one is rescaled to end at min_lr_ratio "
                          "(min_lr_ratio + (1 - min_lr_ratio) * shape), and after the decay the multiplier stays at "
                          "min_lr_ratio.")


# ----- clip_grad_norm -------------------------------------------------------------------------


def _random_grads(rng, g, scale: float) -> list[torch.Tensor | None]:
    shapes = [(rng.randrange(1, 9), rng.randrange(1, 9)) for _ in range(rng.randrange(1, 5))]
    shapes += [(rng.randrange(1, 17),) for _ in range(rng.randrange(0, 3))]
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=g) * scale for s in shapes]
    if rng.random() < 0.4:
        grads.insert(rng.randrange(len(grads) + 1), None)          # a parameter without a gradient
    return grads


def check_clip_grad_norm(fn: Callable) -> None:
    """``fn(grads, max_norm, norm_type)`` scales the gradients in place as
    ``torch.nn.utils.clip_grad_norm_`` and returns the norm before clipping."""
    rng, g = fresh_rng(), fresh_generator()
    plans = [(2.0, 1.0, 1.0), (2.0, 1e-3, 1.0), (2.0, 1e-4, 1e-4), (float("inf"), 1.0, 0.5), (1.0, 1.0, 3.0)]
    for _ in range(14):
        plans.append((rng.choice([2.0, 2.0, 1.0, 3.0, 1.5, float("inf")]), rng.choice([1e-4, 1e-2, 0.3, 1.0, 10.0]),
                      rng.choice([0.1, 1.0, 5.0, 100.0])))
    for norm_type, scale, max_norm in plans:
        grads = _random_grads(rng, g, scale)
        params = []
        for grad in grads:
            p = torch.nn.Parameter(torch.zeros(grad.shape if grad is not None else (3,)))
            p.grad = None if grad is None else grad.clone()
            params.append(p)
        expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=False)
        shapes = [None if x is None else tuple(x.shape) for x in grads]
        what = f"clip_grad_norm(grads of shapes {shapes}, max_norm={max_norm:g}, norm_type={norm_type:g})"
        mine = [None if x is None else x.clone() for x in grads]
        total = call(fn, mine, max_norm, norm_type)
        assert_close(as_tensor(total, f"{what}: the returned norm").reshape(()).double(), expected_norm.double(),
                     f"{what}: the returned norm", rtol=1e-5, atol=1e-9,
                     hint="Return the norm of ALL gradients together, measured before clipping: (sum over every "
                          "entry of |g|^p)^(1/p), or the largest |g| for norm_type=inf.")
        for i, (got, p) in enumerate(zip(mine, params)):
            if p.grad is None:
                continue
            assert_close(got, p.grad, f"{what}: gradient {i} after clipping", rtol=1e-5, atol=1e-9,
                         hint="Scale every gradient, in place, by min(1, max_norm / (total + 1e-6)).")


# ----- adamw_step -----------------------------------------------------------------------------


def _torch_adamw(params: list[torch.nn.Parameter], lr: float, betas, eps: float, weight_decay: float):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps,
                             foreach=False)


def check_adamw_step(fn: Callable) -> None:
    """``fn(params, grads, state, lr, betas, eps, weight_decay)`` updates ``params`` and ``state``
    in place exactly as ``torch.optim.AdamW`` (weight decay on parameters with 2+ dimensions)."""
    rng, g = fresh_rng(), fresh_generator()
    for trial in range(4):
        shapes = [(rng.randrange(2, 7), rng.randrange(2, 7)), (rng.randrange(2, 9),), (rng.randrange(1, 5), 3, 2),
                  (rng.randrange(2, 9),)]
        rng.shuffle(shapes)
        betas = (rng.choice([0.9, 0.8, rng.uniform(0.5, 0.95)]), rng.choice([0.999, 0.95, rng.uniform(0.8, 0.999)]))
        eps = rng.choice([1e-8, 1e-3, 1e-2])
        weight_decay = rng.choice([0.1, 0.5])   # never 0: decay before and after the update must differ
        ref = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        optimizer = _torch_adamw(ref, 0.1, betas, eps, weight_decay)
        skip = rng.randrange(len(shapes)) if trial % 2 else None       # a parameter that never gets a gradient
        resume = rng.choice([0, 0, 2])                                  # steps torch takes before the student
        lrs = [rng.choice([1e-3, 1e-2, 0.05, 0.1, 0.3]) for _ in range(resume + rng.randrange(3, 6))]
        state: dict = {}
        params: list[torch.Tensor] = []
        for step, lr in enumerate(lrs):
            grads = [None if i == skip else torch.randn(p.shape, generator=g) * rng.choice([1e-3, 1e-2, 1.0])
                     for i, p in enumerate(ref)]
            for p, grad in zip(ref, grads):
                p.grad = None if grad is None else grad.clone()
            if step == resume:           # hand over torch's state, in the exercise's format
                params = [p.detach().clone() for p in ref]
                state = {i: {k: v.clone() for k, v in optimizer.state[p].items()}
                         for i, p in enumerate(ref) if p in optimizer.state}
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            if step < resume:
                continue
            what = (f"adamw_step, call {step - resume + 1} (parameters of shapes {shapes}, "
                    f"{'resumed from torch state after ' + str(resume) + ' steps, ' if resume else ''}"
                    f"{'parameter ' + str(skip) + ' without a gradient, ' if skip is not None else ''}lr={lr:g}, "
                    f"betas=({betas[0]:.3g}, {betas[1]:.3g}), eps={eps:g}, weight_decay={weight_decay:g})")
            result = call(fn, params, [None if x is None else x.clone() for x in grads], state, lr, betas, eps,
                          weight_decay)
            if result is not None:
                raise AssertionError(f"{what}: adamw_step updates in place and returns None, got {type(result).__name__}")
            for i, (mine, p) in enumerate(zip(params, ref)):
                assert_close(mine, p.detach(), f"{what}: parameter {i} (shape {tuple(p.shape)})", rtol=1e-5, atol=1e-7,
                             hint="Per parameter: decoupled decay p *= 1 - lr * weight_decay (only for 2+ dims), "
                                  "m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2, then "
                                  "p -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps), t counted "
                                  "per parameter in state[i]['step'].")
            expected_keys = sorted(i for i, p in enumerate(ref) if p in optimizer.state)
            if sorted(state) != expected_keys:
                raise AssertionError(f"{what}: state has entries for parameters {sorted(state)}, expected {expected_keys} "
                                     "(one per parameter that has received a gradient, keyed by its index)")
            for i in expected_keys:
                torch_state = optimizer.state[ref[i]]
                entry = state[i]
                if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
                    raise AssertionError(f"{what}: state[{i}] must be a dict with the keys 'step', 'exp_avg', "
                                         f"'exp_avg_sq' (torch's names), got {sorted(entry) if isinstance(entry, dict) else entry!r}")
                step_value = entry["step"]
                step_value = float(step_value) if isinstance(step_value, (int, float, torch.Tensor)) else None
                if step_value != float(torch_state["step"]):
                    raise AssertionError(f"{what}: state[{i}]['step'] is {entry['step']!r}, expected "
                                         f"{int(torch_state['step'])} (the number of updates this parameter has had)")
                for key in ("exp_avg", "exp_avg_sq"):
                    # An entry near zero is a cancellation (m mixes gradients of both signs); m written as
                    # beta1 m + (1 - beta1) g instead of torch's lerp differs there by a rounding of the
                    # gradients' size, so the absolute tolerance follows the size of the moment's entries.
                    scale = float(torch_state[key].abs().max())
                    assert_close(entry[key], torch_state[key], f"{what}: state[{i}][{key!r}]", rtol=1e-5,
                                 atol=1e-6 * scale + 1e-12)


# ----- train (the capstone) -------------------------------------------------------------------

EOS = 256          # byte-level tokens: the 256 byte values, then an end-of-story id
BLOCK = 32
MODEL = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)


def _read_stories(name: str, n: int) -> list[str]:
    from llama_from_scratch.data import stories_dir

    with gzip.open(stories_dir() / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


@lru_cache(maxsize=1)
def story_blocks() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Byte-level ``[N, BLOCK + 1]`` blocks of the first 300 training and 40 validation stories
    (each story followed by ``EOS``), and the validation loss of the training unigram model."""
    from llama_from_scratch.data import pack_tokens

    def blocks(texts: list[str]) -> torch.Tensor:
        return pack_tokens([list(t.encode("utf-8")) for t in texts], BLOCK, EOS)

    train, val = blocks(_read_stories("train.jsonl.gz", 300)), blocks(_read_stories("val.jsonl.gz", 40))
    counts = torch.bincount(train[:, 1:].flatten(), minlength=EOS + 1).double() + 1
    unigram = float(-(counts / counts.sum()).log()[val[:, 1:].flatten()].mean())
    return train, val, unigram


def _loss(model, blocks: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=blocks[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))


def _reference_train(model, blocks: torch.Tensor, batches: list[list[int]], config: dict) -> dict:
    from transformers import get_wsd_schedule

    params = list(model.parameters())
    optimizer = _torch_adamw(params, config["max_lr"], tuple(config["betas"]), config["eps"], config["weight_decay"])
    scheduler = get_wsd_schedule(optimizer, num_warmup_steps=config["num_warmup_steps"],
                                 num_decay_steps=config["num_decay_steps"], num_stable_steps=config["num_stable_steps"],
                                 warmup_type=config["warmup_type"], decay_type=config["decay_type"],
                                 min_lr_ratio=config["min_lr_ratio"])
    history: dict[str, list[float]] = {"losses": [], "grad_norms": [], "lrs": []}
    accum = config["grad_accum_steps"]
    for indices in batches:
        history["lrs"].append(optimizer.param_groups[0]["lr"])
        total = 0.0
        for micro in torch.tensor(indices).chunk(accum):
            loss = _loss(model, blocks[micro]) / accum
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"], foreach=False)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        history["losses"].append(total)
        history["grad_norms"].append(float(norm))
    return history


LOSS_STEPS_COMPARED = 10   # a long run's losses are compared step by step over these first steps


def _random_config(rng, steps: int) -> dict:
    """A run of ``steps`` steps; a short one (6 steps) has every phase of the schedule and clips at
    0.5, below the gradient norms of a fresh model (about 2), so that clipping acts at every step."""
    short = steps < 12
    warmup = 2 if short else rng.randrange(2, 7)
    decay = 2 if short else rng.randrange(8, 16)
    # The long run keeps to smaller learning rates: at 1e-2 and above a 36-step run of the tiny model
    # is chaotic, and a correct run's float rounding grows until its held-out loss differs by 1-2%.
    max_lr = rng.choice([8e-3, 1e-2, 1.5e-2]) if short else rng.choice([3e-3, 5e-3, 8e-3])
    return dict(grad_accum_steps=rng.choice([2, 4]), max_lr=max_lr, num_warmup_steps=warmup,
                num_stable_steps=steps - warmup - decay, num_decay_steps=decay, warmup_type=rng.choice(WARMUP_TYPES),
                decay_type=rng.choice(DECAY_TYPES), min_lr_ratio=rng.choice([0.1, 0.2]),
                max_grad_norm=0.5 if short else rng.choice([0.5, 1.0]), weight_decay=rng.choice([0.05, 0.1]),
                betas=(0.9, 0.95), eps=1e-8)


def _series(result: dict, key: str, what: str) -> torch.Tensor:
    values = result[key]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
        raise AssertionError(f"{what}: result[{key!r}] must be a list of floats, one per step")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _run_and_compare(fn: Callable, rng, g, steps: int) -> tuple[dict, torch.nn.Module]:
    """Train the student's way and the reference way from the same weights on the same batches;
    compare what the run reports (tightly for a short run, where float rounding has not yet had time
    to grow: there the weights are compared too). Returns the student's trained state dict and the
    reference's trained model."""
    train_blocks, _, _ = story_blocks()
    start = rng.randrange(len(train_blocks) - 2400)
    blocks = train_blocks[start:start + 2400].clone()
    config = _random_config(rng, steps)
    batches = [torch.randperm(len(blocks), generator=g)[:16].tolist() for _ in range(steps)]
    reference_model = tiny_llama(MODEL, rng.randrange(2**31))
    weights = {k: v.detach().clone() for k, v in reference_model.state_dict().items()}
    reference = _reference_train(reference_model, blocks, batches, config)
    what = f"train(tiny Llama, {len(blocks)} story blocks of {BLOCK + 1} bytes, {steps} steps of 16 blocks, config={config})"
    result = call(fn, construct_llama(MODEL, weights), blocks, batches, dict(config))
    if not isinstance(result, dict):
        raise AssertionError(f"{what}: expected a dict with 'lrs', 'losses', 'grad_norms', 'state_dict', got "
                             f"{type(result).__name__}")
    for key in ("lrs", "losses", "grad_norms", "state_dict"):
        if key not in result:
            raise AssertionError(f"{what}: the result has no {key!r} (keys: {sorted(result)})")
    short = steps < 12
    assert_close(_series(result, "lrs", what), torch.tensor(reference["lrs"], dtype=torch.float64),
                 f"{what}: the learning rate of each step", rtol=1e-6, atol=1e-12,
                 hint="Step s (from 0) uses max_lr * wsd_lr_lambda(s, ...).")
    # Over a long run float rounding grows (AdamW's near-sign updates amplify it, and at the larger
    # learning rates a run is chaotic: a correct run has drifted 0.12 from the reference by step 18):
    # the long run's losses are compared step by step only over its first steps, then as a mean.
    losses, reference_losses = _series(result, "losses", what), torch.tensor(reference["losses"], dtype=torch.float64)
    loss_hint = ("A step's loss is the mean cross-entropy over its whole batch (the mean of its micro-batches' "
                 "losses), measured before the update; inputs are block[:, :-1], targets block[:, 1:].")
    if len(losses) != steps:
        raise AssertionError(f"{what}: result['losses'] has {len(losses)} entries, expected one per step ({steps})")
    first = steps if short else LOSS_STEPS_COMPARED
    assert_close(losses[:first], reference_losses[:first], f"{what}: the loss of each of the first {first} steps",
                 rtol=1e-4 if short else 2e-2, atol=1e-6, hint=loss_hint)
    if not short:
        assert_close(losses.mean(), reference_losses.mean(), f"{what}: the mean loss over all {steps} steps",
                     rtol=5e-2, atol=1e-6, hint=loss_hint)
    # The long run's gradient norms are compared only for their length (same drift as the losses).
    norms = _series(result, "grad_norms", what)
    if short:
        assert_close(norms, torch.tensor(reference["grad_norms"], dtype=torch.float64),
                     f"{what}: the gradient norm of each step (before clipping)", rtol=1e-4, atol=1e-6,
                     hint="Divide each micro-batch's loss by grad_accum_steps before backward, so that the accumulated "
                          "gradient is the gradient of the batch's mean loss; start every step from zero gradients.")
    elif len(norms) != steps:
        raise AssertionError(f"{what}: result['grad_norms'] has {len(norms)} entries, expected one per step ({steps})")
    state = result["state_dict"]
    expected = reference_model.state_dict()
    if not isinstance(state, dict) or sorted(state) != sorted(expected):
        raise AssertionError(f"{what}: result['state_dict'] must be model.state_dict() after training (the same names)")
    if short:
        # AdamW's near-sign updates turn float rounding into differences of up to ~2e-5 on a few
        # weights after 6 steps; a wrong clipping or weight-decay rule moves weights by 4e-3 or more.
        for name, value in expected.items():
            assert_close(state[name], value, f"{what}: trained weight {name!r}", rtol=0.0, atol=2e-4,
                         hint="Clip the accumulated gradients (max_grad_norm, global L2 norm) before the AdamW "
                              "step; decay only the weights with 2+ dimensions; one AdamW state for the whole run.")
    return state, reference_model


@one_thread
def check_train(fn: Callable) -> None:
    """``fn(model, blocks, batches, config)`` trains a tiny ``transformers`` Llama on byte-level story
    blocks as the grader's reference loop does: a 6-step run must give the same learning rates,
    losses, gradient norms and weights, a 36-step run the same learning rates, the same losses over
    its first 10 steps and the same mean loss, and the weights it returns must score on held-out
    stories as the reference's trained weights do.

    The held-out loss is compared with the reference run's, not with a fixed bar: 36 steps with a
    randomly drawn schedule sometimes leave even the reference just above the unigram baseline."""
    rng, g = fresh_rng(), fresh_generator()
    _run_and_compare(fn, rng, g, 6)
    state, reference_model = _run_and_compare(fn, rng, g, 36)
    _, val_blocks, unigram = story_blocks()
    with torch.no_grad():
        trained = tiny_llama(MODEL, 0)
        trained.load_state_dict({k: as_tensor(v, k) for k, v in state.items()})
        held_out = float(_loss(trained, val_blocks))
        expected = float(_loss(reference_model, val_blocks))
    if not abs(held_out - expected) <= 0.02 * expected:
        raise AssertionError(f"train: after 36 steps the returned weights give a held-out loss of {held_out:.3f}, "
                             f"not within 2% of the reference run's (unigram baseline: {unigram:.3f}); return "
                             f"model.state_dict() after the last step.")


# ----- document_mask --------------------------------------------------------------------------


def _other_token(rng, vocab: int, eos: int) -> int:
    token = rng.randrange(vocab - 1)
    return token + 1 if token >= eos else token


def _packed_rows(rng, batch: int, seq_len: int, eos: int, vocab: int) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """``[batch, seq_len]`` windows of streams of documents (random tokens, then ``eos``), and for
    each row the pieces of the documents it holds, in order (the first and last may be cut). With
    two rows or more, row 0 lies inside one long document and row 1 starts with a lone EOS."""
    rows, pieces = [], []
    for row in range(batch):
        stream: list[int] = []
        owner: list[int] = []
        doc = 0
        while len(stream) < seq_len + 12:
            n = rng.choice([0, 0, 1, 2, rng.randrange(3, 9), rng.randrange(3, 30)])   # 0: a lone EOS
            if batch > 1 and doc == 0 and row < 2:
                n = seq_len + 1 if row == 0 else 0
            stream += [_other_token(rng, vocab, eos) for _ in range(n)] + [eos]
            owner += [doc] * (n + 1)
            doc += 1
        start = 0 if batch > 1 and row < 2 else rng.choice([0, rng.randrange(0, 12)])
        window, owners = stream[start:start + seq_len], owner[start:start + seq_len]
        rows.append(window)
        parts: list[list[int]] = []
        for t, o in enumerate(owners):
            if t == 0 or o != owners[t - 1]:
                parts.append([])
            parts[-1].append(window[t])
        pieces.append(parts)
    return torch.tensor(rows, dtype=torch.long), pieces


def _transformers_reference(pieces: list[list[list[int]]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask ``[B, 1, T, T]`` and positions ``[B, T]`` transformers gives these documents: the
    positions of ``DataCollatorWithFlattening``, the mask ``create_causal_mask`` derives from them."""
    import transformers
    from transformers.masking_utils import create_causal_mask

    collate = transformers.DataCollatorWithFlattening(return_tensors="pt")
    positions = torch.cat([collate([{"input_ids": part} for part in parts])["position_ids"] for parts in pieces])
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1)
    config._attn_implementation = "sdpa"
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(len(pieces), seq_len, 1), attention_mask=None,
                              cache=None, position_ids=positions, allow_is_causal_skip=False)
    return mask, positions


DOCUMENT_HINT = ("A new document starts at the first position of the row and right after every EOS; the EOS itself "
                 "is the last token of the document it ends. Query i may attend key j when j <= i and both are in "
                 "the same document; position ids count from 0 at the start of each document.")


def check_document_mask(fn: Callable) -> None:
    """``fn(input_ids, eos_token_id)`` returns ``(mask, position_ids)`` of packed blocks: the boolean
    ``[B, 1, T, T]`` block-diagonal causal mask and the ``[B, T]`` positions that restart at every
    document, equal to what transformers builds for the documents the grader packed."""
    rng = fresh_rng()
    vocab = rng.randrange(20, 60)
    plans = [(1, 1), (2, 1), (1, 2), (3, 17), (2, 40), (4, rng.randrange(5, 33)), (1, rng.randrange(2, 9))]
    for batch, seq_len in plans:
        eos = rng.choice([0, vocab - 1, rng.randrange(1, vocab - 1)])
        input_ids, pieces = _packed_rows(rng, batch, seq_len, eos, vocab)
        expected_mask, expected_positions = _transformers_reference(pieces, seq_len)
        what = (f"document_mask(input_ids of shape {tuple(input_ids.shape)} with "
                f"{int((input_ids == eos).sum())} EOS tokens, eos_token_id={eos})")
        result = call(fn, input_ids.clone(), eos)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise AssertionError(f"{what}: expected a pair (mask, position_ids), got {type(result).__name__}")
        mask, positions = (as_tensor(r, f"{what}: {name}") for r, name in zip(result, ("mask", "position_ids")))
        if mask.dtype != torch.bool:
            raise AssertionError(f"{what}: the mask must be a boolean tensor (True = may attend), got {mask.dtype}")
        assert_equal(mask, expected_mask, f"{what}: the mask [B, 1, T, T], compared with transformers' "
                     "create_causal_mask for these documents", hint=DOCUMENT_HINT)
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise AssertionError(f"{what}: position_ids must be an integer tensor, got {positions.dtype}")
        assert_equal(positions, expected_positions, f"{what}: position_ids [B, T], compared with "
                     "transformers' DataCollatorWithFlattening for these documents", hint=DOCUMENT_HINT)


# ----- chinchilla_allocation ------------------------------------------------------------------

ALLOCATION_KEYS = ("N_opt", "D_opt", "L_opt", "equivalent_compute")


def _random_law(rng) -> dict:
    """Coefficients of ``E + A / N**alpha + B / D**beta`` around Chinchilla's, the exponents at
    least 0.08 apart (so that swapping them shows)."""
    while True:
        alpha, beta = rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6)
        if abs(alpha - beta) >= 0.08:
            break
    return dict(E=rng.uniform(0.5, 2.5), A=math.exp(rng.uniform(2.0, 8.0)), B=math.exp(rng.uniform(2.0, 8.0)),
                alpha=alpha, beta=beta)


def _equivalent_compute(law, loss: float) -> float:
    """The budget whose compute-optimal model reaches ``loss``: bisection on log C (the optimal
    loss falls as C grows), independent of any closed form for it."""
    from llama_from_scratch.scaling_laws import compute_optimal

    def optimal_loss(log_c: float) -> float:
        n, d = compute_optimal(law, math.exp(log_c))
        return law.loss(n, d)

    lo, hi = math.log(1e-6), math.log(1e60)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if optimal_loss(mid) > loss else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def check_chinchilla_allocation(fn: Callable) -> None:
    """``fn(law, budgets, runs)`` returns, for each budget ``C = 6 N D``, the compute-optimal
    ``N_opt``, ``D_opt`` and their loss ``L_opt``, and for each run ``(N, D)`` the budget at which a
    compute-optimal model reaches that run's loss.

    No library implements Chinchilla's allocation, so the reference is computed here from the
    package's :func:`~llama_from_scratch.scaling_laws.compute_optimal` (the closed form, itself
    tested against a brute-force search) and, for the equivalent compute, by bisection."""
    from llama_from_scratch.scaling_laws import ChinchillaLaw, compute_optimal

    rng = fresh_rng()
    for trial in range(4):
        coefficients = _random_law(rng)
        law = ChinchillaLaw(**coefficients)
        budgets = [10 ** rng.uniform(12.0, 26.0) for _ in range(rng.randrange(1, 5))]
        runs = [[10 ** rng.uniform(5.0, 11.0), 10 ** rng.uniform(6.0, 13.0)] for _ in range(rng.randrange(1, 4))]
        if trial == 0:
            runs.append(list(compute_optimal(law, budgets[0])))      # a run that is compute-optimal already
        what = (f"chinchilla_allocation(law with alpha={coefficients['alpha']:.3f}, beta={coefficients['beta']:.3f}, "
                f"budgets {[f'{c:.3g}' for c in budgets]}, runs {[[f'{n:.3g}', f'{d:.3g}'] for n, d in runs]})")
        result = call(fn, dict(coefficients), list(budgets), [list(r) for r in runs])
        if not isinstance(result, dict) or set(result) != set(ALLOCATION_KEYS):
            keys = sorted(result) if isinstance(result, dict) else type(result).__name__
            raise AssertionError(f"{what}: expected a dict with exactly the keys {list(ALLOCATION_KEYS)}, got {keys}")
        n_opt, d_opt = compute_optimal(law, torch.tensor(budgets, dtype=torch.float64))
        expected = {"N_opt": n_opt, "D_opt": d_opt, "L_opt": law.loss(n_opt, d_opt),
                    "equivalent_compute": torch.tensor([_equivalent_compute(law, law.loss(n, d)) for n, d in runs],
                                                       dtype=torch.float64)}
        hints = {
            "N_opt": "With D = C / (6 N), L(N, D) is smallest where its derivative in N is 0: "
                     "N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).",
            "D_opt": "The budget is spent: 6 N_opt D_opt = C.",
            "L_opt": "L_opt = E + A / N_opt^alpha + B / D_opt^beta.",
            "equivalent_compute": "Find the C whose L_opt equals the run's loss E + A / N^alpha + B / D^beta "
                                  "(L_opt falls as C grows: bisect on log C, or solve L_opt(C) in closed form).",
        }
        for key in ALLOCATION_KEYS:
            value = result[key]
            length = len(expected[key])
            if not isinstance(value, (list, tuple)) or len(value) != length or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise AssertionError(f"{what}: result[{key!r}] must be a list of {length} floats")
            assert_close(torch.tensor([float(v) for v in value], dtype=torch.float64), expected[key],
                         f"{what}: {key}", rtol=1e-6, atol=0.0, hint=hints[key])


CHECKS = {
    "wsd_lr_lambda": check_wsd_lr_lambda,
    "clip_grad_norm": check_clip_grad_norm,
    "adamw_step": check_adamw_step,
    "train": check_train,
    "chinchilla_allocation": check_chinchilla_allocation,
    "document_mask": check_document_mask,
}

FORBIDDEN = {
    "chinchilla_allocation": [],   # arithmetic only; the package (always forbidden) has compute_optimal
    "wsd_lr_lambda": ["transformers", "torch.optim"],
    "clip_grad_norm": ["torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grads_with_norm_",
                       "torch.nn.utils.get_total_norm", "torch.nn.utils.clip_grad"],
    "adamw_step": ["torch.optim"],
    "train": ["torch.optim", "torch.nn.utils.clip_grad_norm_", "torch.nn.utils.clip_grads_with_norm_",
              "torch.nn.utils.get_total_norm", "torch.nn.utils.clip_grad", "transformers.get_wsd_schedule",
              "transformers.optimization", "transformers.Trainer"],
    "document_mask": ["transformers"],
}
