"""Checks for the exercises of chapter 12 (reward modeling).

The references run in the grader's process, on the same inputs as the student's code:

- TRL's ``RewardTrainer.compute_loss`` (the method itself, on a tiny ``RewardTrainer``) for the
  pairwise loss, its margin and TRL's ``center_rewards_coefficient``, and TRL's
  ``DataCollatorForPreference`` for the training batches;
- transformers' ``LlamaForSequenceClassification`` (same weights) for the reward model;
- ``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.lr_scheduler.LambdaLR``
  for the training loop;
- for Llama 2's combination of a helpfulness and a safety reward model, which no library implements,
  a transcription of the paper's formula (Touvron et al. 2023, section 3.2.3) in float64, one
  response at a time: an internal reference.

Sizes, weights, padding and hyper-parameters are drawn fresh at every grading run. Models the
student's code needs are built on the student's side from data (``Construct``); what comes back is
compared here. Failure messages say what differed, never the expected values.
"""

from __future__ import annotations

import functools
import math
import os
import random
import tempfile
from types import SimpleNamespace
from typing import Any, Callable

import torch

from llama_from_scratch.course.checks.common import (Construct, as_scalar_loss, as_tensor, assert_close, fresh_generator,
                                              fresh_rng, seqcls, value_and_grad)

FORBIDDEN = {
    "reward_model_loss": ["trl"],
    "ranking_loss": ["trl"],
    "LlamaRewardModel": ["transformers.LlamaForSequenceClassification",
                         "transformers.AutoModelForSequenceClassification",
                         "transformers.models.llama.modeling_llama.LlamaForSequenceClassification", "trl"],
    "train_reward_model": ["trl"],
    "llama2_reward": ["trl"],
}


# --------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------


def _build(value: Any) -> Any:
    """``Construct`` markers built here, inner ones first (what the sandbox does on its side)."""
    if isinstance(value, Construct):
        return Construct(value.target, *_build(list(value.args)), method=value.method,
                         **_build(dict(value.kwargs))).build()
    if isinstance(value, list):
        return [_build(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_build(v) for v in value)
    if isinstance(value, dict):
        return {k: _build(v) for k, v in value.items()}
    return value


class _Prebuilt:
    """The student's function or class with nested ``Construct`` arguments (a config inside a model's
    ``from_pretrained``) built before the call. The sandbox builds them on the student's side; this
    does it when the check runs in the learner's own process (``check(fn)`` in the notebook)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.__name__ = getattr(fn, "__name__", "answer")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*_build(list(args)), **_build(kwargs))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._fn, attr)

    def _lfs_value_and_grad(self, args: tuple, kwargs: dict, grad_output: Any) -> Any:
        return value_and_grad(self._fn, *_build(list(args)), grad_output=grad_output, **_build(kwargs))


def _student(fn: Any) -> Any:
    """The student's function or class as the checks call it (see ``_Prebuilt``)."""
    from llama_from_scratch.course.sandbox import RemoteObject

    return fn if isinstance(fn, RemoteObject) else _Prebuilt(fn)


def _tiny_config(rng: random.Random) -> dict[str, Any]:
    """A small random Llama: 2-3 layers, grouped-query attention, a pad id inside the vocabulary."""
    heads = rng.choice([2, 4])
    vocab = rng.randrange(40, 97)
    return dict(vocab_size=vocab, hidden_size=heads * rng.choice([8, 16]), intermediate_size=rng.choice([32, 48]),
                num_hidden_layers=rng.choice([2, 3]), num_attention_heads=heads,
                num_key_value_heads=rng.choice([h for h in (1, 2, heads) if heads % h == 0]),
                max_position_embeddings=64, rms_norm_eps=rng.choice([1e-5, 1e-6]), tie_word_embeddings=False,
                pad_token_id=rng.randrange(vocab), num_labels=1)


def _random_weights(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights of a healthy scale (so positions and tokens give clearly different rewards)."""
    out = {}
    for name, t in model.state_dict().items():
        if t.dim() == 1:                                  # RMSNorm weights
            out[name] = 1 + 0.2 * torch.randn(t.shape, generator=g)
        elif "embed_tokens" in name:
            out[name] = torch.randn(t.shape, generator=g)
        else:
            out[name] = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
    return out


def _tokens(g: torch.Generator, n: int, cfg: dict[str, Any]) -> list[int]:
    """``n`` random token ids, never the pad id."""
    ids = torch.randint(0, cfg["vocab_size"] - 1, (n,), generator=g)
    return (ids + (ids >= cfg["pad_token_id"]).long()).tolist()


@functools.lru_cache(maxsize=1)
def _reward_trainer():
    """A tiny TRL RewardTrainer, only for its ``compute_loss`` (which reads ``args`` and ``model.training``)."""
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import RewardConfig, RewardTrainer

    vocab = {f"t{i}": i for i in range(8)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")
    model = seqcls(dict(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, num_labels=1))
    args = RewardConfig(output_dir=os.path.join(tempfile.gettempdir(), "lfs-grader-unused"), report_to=[],
                        use_cpu=True, save_strategy="no", bf16=False)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"chosen_ids": [[2, 3]], "rejected_ids": [[4]]}))
    trainer.model.train()
    return trainer


def _trl_loss(model: Callable, inputs: dict[str, Any], center: float | None) -> torch.Tensor:
    """TRL's RewardTrainer.compute_loss(model, inputs) with ``center_rewards_coefficient = center``."""
    trainer = _reward_trainer()
    trainer.args.center_rewards_coefficient = center
    return trainer.compute_loss(model, dict(inputs))


def _trl_loss_of_rewards(rewards: torch.Tensor, margin: torch.Tensor | None, center: float | None) -> torch.Tensor:
    """TRL's loss for given rewards ``[2B]`` (chosen first): a model whose logits are the rewards."""
    inputs: dict[str, Any] = {"attention_mask": torch.ones(rewards.shape[0], 1, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return _trl_loss(lambda **_: SimpleNamespace(logits=rewards[:, None]), inputs, center)


# --------------------------------------------------------------------------------------------
# reward_model_loss
# --------------------------------------------------------------------------------------------


def check_reward_model_loss(fn: Callable) -> None:
    """``fn(rewards [2B], margin=None, center_rewards_coefficient=None)`` equals TRL's
    ``RewardTrainer.compute_loss`` on the same rewards, value and gradient."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("the first half of `rewards` are the chosen answers, the second half the rejected ones (pair i is "
            "rows i and B + i); loss = mean over pairs of -logsigmoid(r_chosen - r_rejected - margin), plus "
            "center_rewards_coefficient * mean over pairs of (r_chosen + r_rejected)^2 when it is given")
    cases = [(None, None), ("scalar", None), ("per-pair", None), (None, 0.01), ("per-pair", 0.1)]
    cases += [(rng.choice([None, "scalar", "per-pair"]), rng.choice([None, 0.01, 0.5])) for _ in range(5)]
    for margin_kind, center in cases:
        b = rng.choice([1, 2, 3, 8, rng.randrange(9, 65)])
        scale = rng.choice([0.1, 1.0, 10.0, 60.0])
        rewards = scale * torch.randn(2 * b, generator=g)
        if margin_kind is None:
            margin = None
        elif margin_kind == "scalar":
            margin = rng.choice([1 / 3, 1.0, 3.0])
        else:
            margin = torch.randint(0, 4, (b,), generator=g).float() / rng.choice([1, 3])
        ref_rewards = rewards.clone().requires_grad_(True)
        ref_margin = None if margin is None else torch.as_tensor(margin).expand(b)
        expected = _trl_loss_of_rewards(ref_rewards, ref_margin, center)
        (expected_grad,) = torch.autograd.grad(expected, ref_rewards)
        desc = (f"reward_model_loss on {b} pairs (rewards of scale {scale}), "
                f"{'no margin' if margin is None else 'margin ' + ('a number' if margin_kind == 'scalar' else 'per pair')}, "
                f"center_rewards_coefficient={center}")
        kwargs: dict[str, Any] = {}
        if margin is not None or rng.random() < 0.5:
            kwargs["margin"] = margin
        if center is not None or rng.random() < 0.5:
            kwargs["center_rewards_coefficient"] = center
        got, grads, _ = value_and_grad(fn, rewards.clone().requires_grad_(True), **kwargs)
        assert_close(as_scalar_loss(got, desc), expected.detach(), desc, rtol=1e-5, atol=1e-5, hint=hint)
        assert_close(grads[0] if grads[0] is not None else torch.zeros_like(rewards), expected_grad,
                     desc + ": gradient with respect to the rewards", rtol=1e-4, atol=1e-7, hint=hint)
    rewards = torch.tensor([-100.0, 0.0, 0.0, 0.0])
    got = _student(fn)(rewards.clone())
    assert_close(as_scalar_loss(got, "reward_model_loss"), _trl_loss_of_rewards(rewards, None, None).detach(),
                 "reward_model_loss for a chosen reward 100 below the rejected one", atol=1e-4,
                 hint="-log sigmoid(-100) = 100: compute it with F.logsigmoid (or softplus), never log(sigmoid(.))")


# --------------------------------------------------------------------------------------------
# ranking_loss
# --------------------------------------------------------------------------------------------


def _ranking_reference(rewards: torch.Tensor, num_answers: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss through TRL: every prompt's pairs (better, worse) as one RewardTrainer batch,
    the mean of the per-prompt losses."""
    losses = []
    for row, n in zip(rewards, num_answers.tolist()):
        better = [i for i in range(n) for j in range(i + 1, n)]
        worse = [j for i in range(n) for j in range(i + 1, n)]
        losses.append(_trl_loss_of_rewards(torch.cat([row[better], row[worse]]), None, None))
    return torch.stack(losses).mean()


def check_ranking_loss(fn: Callable) -> None:
    """``fn(rewards [N, K], num_answers [N])``: the mean over prompts of the mean over the prompt's
    ``C(n, 2)`` pairs of TRL's pairwise loss (answers sorted best first, junk after ``n``)."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("row p ranks its first num_answers[p] answers best first; every pair i < j < n is a comparison "
            "'i beats j' with loss -logsigmoid(r_i - r_j); average over the n(n-1)/2 pairs of each prompt, then "
            "over the prompts (InstructGPT: each prompt's comparisons count as one batch element); entries past "
            "num_answers[p] are junk and must not enter")
    for trial in range(8):
        n_prompts = rng.choice([1, 2, 3, 6, rng.randrange(7, 20)])
        k = rng.choice([2, 3, 4, 9])
        counts = torch.tensor([k if trial == 0 else rng.randrange(2, k + 1) for _ in range(n_prompts)])
        scale = rng.choice([0.3, 1.0, 8.0])
        rewards = scale * torch.randn(n_prompts, k, generator=g)
        padded = (torch.arange(k)[None, :] >= counts[:, None])
        rewards = torch.where(padded, 1e4 * (2 * torch.rand(n_prompts, k, generator=g) - 1), rewards)
        ref = rewards.clone().requires_grad_(True)
        expected = _ranking_reference(ref, counts)
        (expected_grad,) = torch.autograd.grad(expected, ref)
        desc = f"ranking_loss on {n_prompts} prompts with up to {k} ranked answers (answers per prompt {counts.tolist()})"
        counts_arg = counts.clone() if trial % 2 else counts.to(rng.choice([torch.int32, torch.long]))
        got, grads, _ = value_and_grad(fn, rewards.clone().requires_grad_(True), counts_arg)
        assert_close(as_scalar_loss(got, desc), expected.detach(), desc, rtol=1e-5, atol=1e-5, hint=hint)
        grad = grads[0] if grads[0] is not None else torch.zeros_like(rewards)
        assert_close(grad, expected_grad, desc + ": gradient with respect to the rewards", rtol=1e-4, atol=1e-7,
                     hint=hint + " (junk entries get no gradient)")


# --------------------------------------------------------------------------------------------
# LlamaRewardModel
# --------------------------------------------------------------------------------------------


def _padded_batch(rng: random.Random, g: torch.Generator, cfg: dict[str, Any], side: str):
    """(ids with junk at the padding, mask [B, T] in a random dtype, ids with the pad id at the padding)."""
    b, width = rng.randrange(2, 6), rng.randrange(2, 12)
    lengths = [width if side == "none" else rng.randrange(1, width + 1) for _ in range(b)]
    if side != "none":                                     # one row full, one row padded, in random places
        full, short = rng.sample(range(b), 2)
        lengths[full], lengths[short] = width, rng.randrange(1, width)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, width - n:] = True
        else:
            mask[row, :n] = True
    ids = torch.randint(0, cfg["vocab_size"], (b, width), generator=g)
    clean = torch.tensor([_tokens(g, width, cfg) for _ in range(b)], dtype=torch.long)
    ids = torch.where(mask, clean, ids)                    # junk (any id, the pad id too) at the padding
    hf_ids = ids.masked_fill(~mask, cfg["pad_token_id"])
    dtype = rng.choice([torch.long, torch.bool, torch.int32, torch.float32])
    return ids, mask.to(dtype), hf_ids, mask, lengths


def _expected_trainable(cfg: dict[str, Any], k: int | None) -> list[str]:
    names = list(seqcls(cfg).state_dict())
    if k is None:
        return names
    n = cfg["num_hidden_layers"]
    keep = [f"model.layers.{i}." for i in range(n - k, n)] + (["model.norm."] if k > 0 else [])
    return [name for name in names if name == "score.weight" or name.startswith(tuple(keep))]


def check_LlamaRewardModel(cls: Callable) -> None:
    """``cls(config, trainable_layers=None)``: rewards and gradients equal transformers'
    ``LlamaForSequenceClassification`` with the same weights, for right, left and no padding."""
    cls = _student(cls)
    rng, g = fresh_rng(), fresh_generator()
    pool_hint = ("read each row's reward at its last REAL token (the last 1 of attention_mask), whatever the "
                 "padding side; the ids at padded positions are junk; score = Linear(hidden_size, 1, bias=False) "
                 "on the final (normed) hidden state")
    for trial, k in enumerate([None, 0, "some", "all"]):
        cfg = _tiny_config(rng)
        n_layers = cfg["num_hidden_layers"]
        k = rng.randrange(1, n_layers) if k == "some" else n_layers if k == "all" else k
        config = Construct("transformers.LlamaConfig", **cfg)
        rm = cls(config) if k is None and trial == 0 else cls(config, trainable_layers=k)
        ref = seqcls(cfg)
        weights = _random_weights(ref, g)
        ref.load_state_dict(weights)
        try:
            rm.load_state_dict({name: t.clone() for name, t in weights.items()})
        except Exception as exc:  # noqa: BLE001 - whatever load_state_dict raised, say what is expected
            raise AssertionError(
                "LlamaRewardModel.load_state_dict(weights of transformers' LlamaForSequenceClassification) failed "
                f"({type(exc).__name__}: {str(exc)[:300]}). The trunk must be `self.model` (a transformers "
                "LlamaModel) and the head `self.score` (Linear(hidden_size, 1, bias=False)), nothing else with "
                "parameters") from None
        desc_k = "trainable_layers=None" if k is None else f"trainable_layers={k}"
        for side in ("right", "left", "none"):
            ids, mask, hf_ids, bool_mask, lengths = _padded_batch(rng, g, cfg, side)
            desc = (f"LlamaRewardModel ({n_layers} layers, {desc_k}) on a {tuple(ids.shape)} batch with {side} "
                    f"padding (lengths {lengths}, mask dtype {mask.dtype})")
            with torch.no_grad():
                expected = ref(input_ids=hf_ids, attention_mask=bool_mask.long()).logits[:, 0]
            got = rm(ids.clone(), mask.clone())
            assert_close(got, expected, desc + ": rewards [B]", rtol=1e-4, atol=1e-5, hint=pool_hint)
        if trial == 0:
            b, width = 2, rng.randrange(2, 8)
            ids = torch.tensor([_tokens(g, width, cfg) for _ in range(b)])
            with torch.no_grad():
                expected = ref(input_ids=ids).logits[:, 0]
            assert_close(rm(ids.clone()), expected, "LlamaRewardModel(input_ids) without an attention mask",
                         rtol=1e-4, atol=1e-5, hint="attention_mask=None means no padding: the last position")
        # gradients, by parameter name, for the trainable parameters only
        ids, mask, hf_ids, bool_mask, lengths = _padded_batch(rng, g, cfg, rng.choice(["right", "left"]))
        weight = torch.randn(ids.shape[0], generator=g)
        ref.zero_grad()
        (ref(input_ids=hf_ids, attention_mask=bool_mask.long()).logits[:, 0] * weight).sum().backward()
        trainable = _expected_trainable(cfg, k)
        _, _, grads = value_and_grad(rm, ids.clone(), mask.clone(), grad_output=weight)
        desc = f"LlamaRewardModel ({n_layers} layers, {desc_k})"
        got_names = sorted(n for n, gr in grads.items())
        missing = sorted(set(trainable) - set(got_names))
        extra = sorted(set(got_names) - set(trainable))
        if missing or extra:
            raise AssertionError(
                f"{desc}: the trainable parameters are not the expected ones ({len(missing)} missing, e.g. "
                f"{missing[:2]}; {len(extra)} that should be frozen, e.g. {extra[:2]}). With trainable_layers=k only "
                "the last k blocks, the final norm (when k > 0) and the score head have requires_grad=True; "
                "None trains everything")
        for name in trainable:
            got = grads[name] if grads[name] is not None else torch.zeros_like(ref.get_parameter(name))
            assert_close(got, ref.get_parameter(name).grad, f"{desc}: gradient of {name}", rtol=1e-3, atol=1e-5,
                         hint=pool_hint)


# --------------------------------------------------------------------------------------------
# train_reward_model
# --------------------------------------------------------------------------------------------


def _pair_batches(rng: random.Random, g: torch.Generator, cfg: dict[str, Any], steps: int, batch_size: int,
                  with_margin: bool) -> list[list[dict[str, Any]]]:
    batches = []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size):
            example: dict[str, Any] = {"chosen_ids": _tokens(g, rng.randrange(1, 10), cfg),
                                       "rejected_ids": _tokens(g, rng.randrange(1, 10), cfg)}
            if with_margin:
                example["margin"] = rng.choice([0.0, 1 / 3, 2 / 3, 1.0])
            batch.append(example)
        batches.append(batch)
    return batches


def _reference_training(cfg: dict[str, Any], weights: dict[str, torch.Tensor], batches, lr: float,
                        warmup_steps: int, max_grad_norm: float | None, weight_decay: float,
                        micro_batch_size: int | None, center: float | None, adam_epsilon: float):
    """TRL's collator and loss, torch's AdamW, clipping and LambdaLR warm-up."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    model = seqcls(cfg)
    model.load_state_dict(weights)
    model.train()
    collate = DataCollatorForPreference(pad_token_id=cfg["pad_token_id"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=adam_epsilon, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
    losses = []
    for batch in batches:
        size = micro_batch_size or len(batch)
        parts = [batch[i:i + size] for i in range(0, len(batch), size)]
        total = 0.0
        for part in parts:
            loss = _trl_loss(model, collate(part), center) / len(parts)
            loss.backward()
            total += loss.item()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {name: t.detach().clone() for name, t in model.state_dict().items()}


def check_train_reward_model(fn: Callable) -> None:
    """``fn(model, batches, lr, warmup_steps, max_grad_norm, weight_decay, adam_epsilon, micro_batch_size,
    center_rewards_coefficient) -> (losses, state_dict)`` equals TRL's collator and loss with torch's
    AdamW, clipping and warm-up: the same losses, and the same update of every weight.

    AdamW divides each gradient by its running size, so a weight whose gradient is nearly 0 amplifies
    float rounding; ``adam_epsilon`` (HF's ``adam_epsilon``) is set to 1e-5, large enough that two correct
    answers agree to 1% of the learning rate, and the updates are compared with that tolerance."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("per batch: TRL's layout (the B chosen sequences then the B rejected ones, right-padded with "
            "model.config.pad_token_id, attention mask 1 on tokens), rewards = model(...).logits[:, 0], "
            "reward_model_loss with the batch's margins; with micro_batch_size m, B/m forward/backward passes whose "
            "losses are divided by B/m before backward (the step equals the full-batch step); then "
            "clip_grad_norm_(max_grad_norm), AdamW (lr warmed up linearly: lr * min(1, (step + 1) / warmup_steps), "
            "eps=adam_epsilon and the given weight_decay), zero_grad")
    setups = [dict(micro=None, center=None, margin=False, warmup=0, clip=rng.choice([0.5, 1.0]), decay=0.0),
              dict(micro="half", center=rng.choice([0.01, 0.1]), margin=True, warmup=rng.choice([2, 3]),
                   clip=rng.choice([None, 5.0]), decay=rng.choice([0.05, 0.1]))]
    for setup in setups:
        cfg = _tiny_config(rng)
        model_ref = seqcls(cfg)
        weights = _random_weights(model_ref, g)
        batch_size = rng.choice([2, 4])
        micro = None if setup["micro"] is None else batch_size // 2
        batches = _pair_batches(rng, g, cfg, rng.choice([3, 4]), batch_size, setup["margin"])
        lr = rng.choice([1e-3, 3e-3])
        eps = 1e-5
        expected_losses, expected_state = _reference_training(cfg, weights, batches, lr, setup["warmup"],
                                                              setup["clip"], setup["decay"], micro, setup["center"],
                                                              eps)
        model = Construct("transformers.LlamaForSequenceClassification", None, method="from_pretrained",
                          config=Construct("transformers.LlamaConfig", **cfg),
                          state_dict={name: t.clone() for name, t in weights.items()})
        desc = (f"train_reward_model: {len(batches)} batches of {batch_size} pairs"
                f"{' with margins' if setup['margin'] else ''}, lr={lr:g}, warmup_steps={setup['warmup']}, "
                f"max_grad_norm={setup['clip']}, weight_decay={setup['decay']}, adam_epsilon={eps:g}, "
                f"micro_batch_size={micro}, "
                f"center_rewards_coefficient={setup['center']}, pad_token_id={cfg['pad_token_id']}")
        out = fn(model, batches, lr=lr, warmup_steps=setup["warmup"], max_grad_norm=setup["clip"],
                 weight_decay=setup["decay"], adam_epsilon=eps, micro_batch_size=micro,
                 center_rewards_coefficient=setup["center"])
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise AssertionError(f"{desc}: expected (losses, model.state_dict()), got {type(out).__name__}")
        losses, state = out
        if not isinstance(losses, (list, tuple)) or len(losses) != len(batches):
            raise AssertionError(f"{desc}: expected a list of {len(batches)} losses (one per batch), got "
                                 f"{type(losses).__name__} of length {len(losses) if hasattr(losses, '__len__') else '?'}")
        got_losses = torch.tensor([float(v) for v in losses], dtype=torch.float64)
        assert_close(got_losses, torch.tensor(expected_losses, dtype=torch.float64), desc + ": the losses per batch",
                     rtol=1e-4, atol=1e-6, hint=hint)
        missing = sorted(set(expected_state) - set(state))
        if missing:
            raise AssertionError(f"{desc}: the returned state_dict lacks {len(missing)} weights, e.g. {missing[0]}")
        for name, expected in expected_state.items():
            update = as_tensor(state[name], f"weight {name}") - weights[name]
            assert_close(update, expected - weights[name], f"{desc}: the update of weight {name} (after minus before)",
                         rtol=1e-3, atol=1e-2 * lr, hint=hint)


# --------------------------------------------------------------------------------------------
# llama2_reward
# --------------------------------------------------------------------------------------------


def _llama2_reference(helpfulness: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor,
                      threshold: float) -> torch.Tensor:
    """Llama 2, section 3.2.3, transcribed one response at a time in float64: ``R_s = sigmoid(safety)``,
    ``R_h = sigmoid(helpfulness)``; ``R_c = R_s if is_safety(p) or R_s < threshold else R_h``;
    ``logit(R_c)``; whitened over the batch, ``(x - mean) / sqrt(var + 1e-8)``, unbiased variance.
    (The scores the check draws stay within +-20, where float64's sigmoid and logit round-trip to ~1e-7.)"""
    out = []
    for h, s, unsafe in zip(helpfulness.double().tolist(), safety.double().tolist(), is_safety.tolist()):
        r_s, r_h = 1.0 / (1.0 + math.exp(-s)), 1.0 / (1.0 + math.exp(-h))
        r_c = r_s if (unsafe or r_s < threshold) else r_h
        out.append(math.log(r_c) - math.log1p(-r_c))
    mean = sum(out) / len(out)
    var = sum((x - mean) ** 2 for x in out) / (len(out) - 1)
    return torch.tensor([(x - mean) / math.sqrt(var + 1e-8) for x in out], dtype=torch.float64)


def _away_from(scores: torch.Tensor, boundary: float, gap: float = 1e-3) -> torch.Tensor:
    """Scores moved at least ``gap`` away from ``boundary`` (comparing in logit or probability space,
    or in float32 or float64, must not decide a case)."""
    near = (scores - boundary).abs() < gap
    return torch.where(near, scores + 2 * gap * torch.sign(scores - boundary + 1e-12), scores)


def check_llama2_reward(fn: Callable) -> None:
    """``fn(helpfulness [B], safety [B], is_safety [B] bool, threshold=0.15) -> [B]``: Llama 2's
    ``whiten(logit(R_c))`` against the paper's formula transcribed in float64."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("R_s = sigmoid(safety) and R_h = sigmoid(helpfulness); R_c = R_s where is_safety or R_s < threshold "
            "(strictly below), else R_h; then logit(R_c) (that is the selected linear score itself), then whiten "
            "over the batch: (x - mean) / sqrt(var + 1e-8) with the unbiased variance (torch.var's default)")
    logit = lambda p: math.log(p / (1 - p))                 # noqa: E731
    t0 = logit(0.15)
    # every branch: unsafe prompt with a high safety score, unsafe with a low one, safe with a low one
    # (safety used), safe with a high one (helpfulness used); helpfulness far from the safety scores
    cases = [("one response per branch", torch.tensor([2.0, -1.0, 3.0, -0.5, 1.2]),
              torch.tensor([3.0, t0 - 1.0, t0 - 0.5, t0 + 0.7, 2.5]),
              torch.tensor([True, True, False, False, False]), None)]
    # a tie: sigmoid(0) = 0.5 exactly, so at threshold 0.5 a safety score of 0 is not below it
    cases.append(("a safety probability exactly at the threshold 0.5 (not below it: helpfulness is used)",
                  torch.tensor([1.5, -2.0, 0.5]), torch.tensor([0.0, 0.0, -3.0]),
                  torch.tensor([False, False, False]), 0.5))
    for _ in range(6):
        b = rng.choice([2, 3, 5, 17, rng.randrange(18, 100)])
        threshold = rng.choice([None, 0.15, 0.3, round(rng.uniform(0.05, 0.6), 3)])
        scale = rng.choice([1.0, 3.0])
        helpfulness = scale * torch.randn(b, generator=g)
        safety = _away_from(scale * torch.randn(b, generator=g) - 1.0, logit(0.15 if threshold is None else threshold))
        is_safety = torch.rand(b, generator=g) < rng.choice([0.0, 0.3, 0.7])
        cases.append((f"{b} responses (scores of scale {scale}), threshold {threshold or 'default'}",
                      helpfulness, safety, is_safety, threshold))
    b = rng.randrange(4, 9)                                  # linear scores up to +-20
    big = _away_from(20 * (2 * torch.rand(b, generator=g) - 1), t0)
    big[0], big[1] = 20.0, -20.0
    tagged = torch.rand(b, generator=g) < 0.3
    tagged[0] = True                                         # the safety score 20 is selected
    cases.append((f"{b} responses with linear scores up to +-20", big.flip(0).clone(), big, tagged, None))
    for desc, helpfulness, safety, is_safety, threshold in cases:
        desc = "llama2_reward on " + desc
        expected = _llama2_reference(helpfulness, safety, is_safety, 0.15 if threshold is None else threshold)
        args = (helpfulness.clone(), safety.clone(), is_safety.clone())
        got = fn(*args) if threshold is None else fn(*args, threshold=threshold)
        got = as_tensor(got, desc)
        extra = ""
        if float(torch.cat([helpfulness, safety]).abs().max()) >= 20:
            extra = (" (sigmoid(20.0) rounds to 1.0 in float32, so logit(sigmoid(x)) is inf there: logit(R_c) is "
                     "the selected linear score)")
        assert_close(got, expected.float(), desc, rtol=1e-4, atol=1e-4, hint=hint + extra)


CHECKS = {
    "reward_model_loss": check_reward_model_loss,
    "ranking_loss": check_ranking_loss,
    "LlamaRewardModel": check_LlamaRewardModel,
    "train_reward_model": check_train_reward_model,
    "llama2_reward": check_llama2_reward,
}
