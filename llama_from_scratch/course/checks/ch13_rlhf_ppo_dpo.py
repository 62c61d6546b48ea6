"""Checks for the exercises of chapter 13 (RLHF with PPO, and DPO).

The references run in the grader's process, on the same inputs as the student's code:

- ``token_logprobs``: TRL's ``selective_log_softmax`` on real logits of a tiny transformers Llama;
- ``dpo_loss``: TRL's ``DPOTrainer.compute_loss`` itself, run on the tiny policy and reference models
  whose logits the student's code receives (its loss types ``sigmoid``, ``hinge``, ``ipo``,
  ``robust``); the gradient with respect to the policy's logits from a transcription of that
  method's formulas on TRL's ``selective_log_softmax``, which the check first confirms equals TRL's
  loss;
- ``ppo_advantages`` and ``ppo_step``: TRL 1.x no longer ships its PPO trainer, so the reference is a
  transcription (``_masked_whiten``, ``_advantages_reference``, ``_ppo_step_reference`` below) of
  the formulas of TRL's last ``PPOTrainer`` (``trl/experimental/ppo/ppo_trainer.py``: k1/k3 KL
  estimators, the score on the last response token, ``missing_eos_penalty``, ``whiten_rewards``,
  GAE, whitened advantages, clipped policy and value losses, ``loss = pg_loss + vf_coef * vf_loss``)
  with the chapter's mask convention (the response up to and including its first EOS; TRL adds one
  position past it for the value), run on transformers models and ``torch.optim.AdamW``.

Sizes, weights, masks and hyper-parameters are drawn fresh at every grading run. Failure messages
say what differed, never the expected values.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch12_reward_modeling import _random_weights, _student, _tiny_config, _tokens
from llama_from_scratch.course.checks.common import (Construct, as_scalar_loss, as_tensor, assert_close, assert_equal,
                                              fresh_generator, fresh_rng, seqcls, value_and_grad)

_LOGSOFTMAX = ["torch.nn.functional.log_softmax", "torch.log_softmax", "torch.Tensor.log_softmax",
               "torch.special.log_softmax", "torch.nn.functional.cross_entropy", "torch.nn.functional.nll_loss",
               "torch.nn.LogSoftmax", "torch.nn.CrossEntropyLoss"]
FORBIDDEN = {
    "token_logprobs": _LOGSOFTMAX + ["trl"],
    "dpo_loss": _LOGSOFTMAX + ["trl"],
    "ppo_advantages": ["trl"],
    "ppo_step": ["trl"],
}


def _causal_lm(cfg: dict[str, Any]):
    import transformers

    cfg = {k: v for k, v in cfg.items() if k != "num_labels"}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def _from_weights(target: str, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Construct:
    """A transformers model with these weights, built on the student's side."""
    if target == "transformers.LlamaForCausalLM":
        cfg = {k: v for k, v in cfg.items() if k != "num_labels"}
    return Construct(target, None, method="from_pretrained", config=Construct("transformers.LlamaConfig", **cfg),
                     state_dict={name: t.clone() for name, t in weights.items()})


def _token_logprobs_reference(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                              temperature: float) -> torch.Tensor:
    from trl.trainer.utils import selective_log_softmax

    per_token = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:], temperature=temperature)
    return torch.where(completion_mask[:, 1:] != 0, per_token, torch.zeros((), dtype=per_token.dtype))


def _junk_where_unused(logits: torch.Tensor, completion_mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Large finite junk at the positions whose prediction is not scored (the next token is masked,
    and the last position, which predicts nothing)."""
    scored = torch.zeros(logits.shape[:2], dtype=torch.bool)
    scored[:, :-1] = completion_mask[:, 1:] != 0
    junk = 1e4 * (2 * torch.rand(logits.shape, generator=g) - 1)
    return torch.where(scored[..., None], logits, junk.to(logits.dtype))


def _lm_batch(rng: random.Random, g: torch.Generator, cfg: dict[str, Any], rows: int, shared_prompts: bool = False):
    """Right-padded rows of prompt + completion: (input_ids, attention_mask, completion_mask) as long.
    With ``shared_prompts``, rows i and rows/2 + i share their prompt (TRL's chosen/rejected layout)."""
    half = rows // 2
    prompts = [_tokens(g, rng.randrange(1, 5), cfg) for _ in range(half if shared_prompts else rows)]
    if shared_prompts:
        prompts = prompts + prompts
    completions = [_tokens(g, rng.randrange(1, 7), cfg) for _ in range(rows)]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids, attention, completion = [], [], []
    for p, c in zip(prompts, completions):
        pad = width - len(p) - len(c)
        ids.append(p + c + [cfg["pad_token_id"]] * pad)
        attention.append([1] * (len(p) + len(c)) + [0] * pad)
        completion.append([0] * len(p) + [1] * len(c) + [0] * pad)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(completion)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


def check_token_logprobs(fn: Callable) -> None:
    """``fn(logits [B, T, V], input_ids [B, T], completion_mask [B, T], temperature=1.0)`` equals TRL's
    ``selective_log_softmax(logits[:, :-1] / temperature, input_ids[:, 1:])`` zeroed where
    ``completion_mask[:, 1:]`` is 0, in float32, with its gradient, on a tiny Llama's logits."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("position t of the result is log softmax(logits[:, t] / temperature)[input_ids[:, t + 1]] (the logits at t "
            "predict token t + 1), 0 where completion_mask[:, t + 1] is 0; shape [B, T - 1], float32 whatever the "
            "logits' dtype; log-softmax = x - logsumexp(x) (no log_softmax, no cross_entropy)")
    cfg = _tiny_config(rng)
    model = _causal_lm(cfg)
    model.load_state_dict(_random_weights(model, g), strict=False)
    for trial in range(6):
        ids, attention, completion = _lm_batch(rng, g, cfg, rng.randrange(1, 6))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits
        temperature = [1.0, 0.7, 1.3][trial] if trial < 3 else rng.choice([1.0, 0.7, 1.3])
        dtype = torch.bfloat16 if trial == 5 else torch.float32
        logits = _junk_where_unused(logits, completion, g).to(dtype)
        expected = _token_logprobs_reference(logits, ids, completion, temperature)
        mask_arg = completion.to(rng.choice([torch.long, torch.bool, torch.int32]))
        desc = (f"token_logprobs on a tiny Llama's {dtype} logits {tuple(logits.shape)}, temperature={temperature} "
                f"(completion tokens per row {completion.sum(1).tolist()})")
        if dtype == torch.bfloat16:
            got = fn(logits.clone(), ids.clone(), mask_arg, temperature)
            assert_close(got, expected, desc, rtol=1e-5, atol=1e-5, check_dtype=True,
                         hint=hint + " (upcast bfloat16 logits to float32 BEFORE the arithmetic)")
            continue
        weight = torch.randn(expected.shape, generator=g)
        ref_logits = logits.clone().requires_grad_(True)
        ref = _token_logprobs_reference(ref_logits, ids, completion, temperature)
        (expected_grad,) = torch.autograd.grad(ref, ref_logits, grad_outputs=weight)
        args = (logits.clone().requires_grad_(True), ids.clone(), mask_arg)
        if temperature == 1.0 and trial % 2 == 0:
            got, grads, _ = value_and_grad(fn, *args, grad_output=weight)
        else:
            got, grads, _ = value_and_grad(fn, *args, temperature, grad_output=weight)
        assert_close(got, expected, desc, rtol=1e-5, atol=1e-5, check_dtype=True, hint=hint)
        grad = grads[0] if grads and grads[0] is not None else torch.zeros_like(logits)
        assert_close(grad, expected_grad, desc + ": gradient with respect to the logits", rtol=1e-4, atol=1e-6,
                     hint=hint + "; positions that are not scored get no gradient")


# --------------------------------------------------------------------------------------------
# dpo_loss
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _dpo_trainer():
    """A tiny TRL DPOTrainer (fresh architecture per grading process); its models get fresh weights per
    trial. Returns (trainer, config)."""
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    cfg = _tiny_config(fresh_rng())
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{cfg['pad_token_id']}",
                                                     eos_token="t1" if cfg["pad_token_id"] != 1 else "t2")
    args = DPOConfig(output_dir=os.path.join(tempfile.gettempdir(), "lfs-grader-unused"), report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, beta=0.1, loss_type=["sigmoid"])
    dataset = Dataset.from_dict({"prompt": ["t3 t4"], "chosen": [" t5"], "rejected": [" t6"]})
    trainer = DPOTrainer(model=_causal_lm(cfg), ref_model=_causal_lm(cfg), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.model.train()
    return trainer, cfg


def _trl_dpo_loss(trainer, inputs: dict[str, torch.Tensor], beta: float, loss_type: str,
                  label_smoothing: float) -> torch.Tensor:
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [loss_type], [1.0]
    trainer.label_smoothing = label_smoothing
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(inputs))


def _dpo_transcription(policy_logits, ref_logits, ids, completion_mask, beta, loss_type, label_smoothing):
    """The formulas of TRL's DPOTrainer._compute_loss (reverse KL, one loss type), on given logits."""
    logps = _token_logprobs_reference(policy_logits, ids, completion_mask, 1.0).sum(1)
    ref_logps = _token_logprobs_reference(ref_logits, ids, completion_mask, 1.0).sum(1).detach()
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_scores, rejected_scores = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        chosen_mask, rejected_mask = completion_mask.chunk(2)
        ipo = chosen_scores / chosen_mask.sum(1).clamp(min=1) - rejected_scores / rejected_mask.sum(1).clamp(min=1)
        per_pair = (ipo - 1 / (2 * beta)) ** 2
    else:  # robust
        per_pair = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                    + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    return per_pair.mean()


def check_dpo_loss(fn: Callable) -> None:
    """``fn(policy_logits, ref_logits, input_ids, completion_mask, beta=0.1, loss_type="sigmoid",
    label_smoothing=0.0)`` equals TRL's ``DPOTrainer.compute_loss`` on the models those logits come
    from; its gradient reaches the policy's logits only."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    trainer, cfg = _dpo_trainer()
    hint = ("rows 0..B-1 are the chosen answers and rows B..2B-1 the rejected ones (same prompts); each row's "
            "log-prob is the SUM over its completion tokens of the token log-probs (logits at t predict token t + 1); "
            "h = (pi_c - ref_c) - (pi_r - ref_r); sigmoid: -logsigmoid(beta h); hinge: relu(1 - beta h); ipo: "
            "(h' - 1/(2 beta))^2 with each log-ratio divided by its row's number of completion tokens; robust: "
            "((1 - ls) * -logsigmoid(beta h) - ls * -logsigmoid(-beta h)) / (1 - 2 ls); mean over pairs; the "
            "reference model is frozen")
    cases = [("sigmoid", 0.1, 0.0, "same")] + [(t, rng.choice([0.1, 0.5, 2.0]), 0.0, "moved")
                                               for t in ("sigmoid", "hinge", "ipo")]
    cases.append(("robust", rng.choice([0.1, 0.5]), rng.choice([0.1, 0.2, 0.3]), "moved"))
    cases.append((rng.choice(["sigmoid", "ipo"]), rng.choice([0.05, 1.0]), 0.0, "moved"))
    for loss_type, beta, smoothing, start in cases:
        weights = _random_weights(trainer.model, g)
        trainer.model.load_state_dict(weights, strict=False)
        ref_weights = dict(weights) if start == "same" else {
            name: t + 0.3 * t.std() * torch.randn(t.shape, generator=g) for name, t in weights.items()}
        trainer.ref_model.load_state_dict(ref_weights, strict=False)
        pairs = rng.randrange(1, 5)
        ids, attention, completion = _lm_batch(rng, g, cfg, 2 * pairs, shared_prompts=True)
        inputs = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
        expected = _trl_dpo_loss(trainer, inputs, beta, loss_type, smoothing)
        with torch.no_grad():
            policy_logits = trainer.model(input_ids=ids, attention_mask=attention).logits
            ref_logits = trainer.ref_model(input_ids=ids, attention_mask=attention).logits
        policy_logits = _junk_where_unused(policy_logits, completion, g)
        ref_logits = _junk_where_unused(ref_logits, completion, g)
        p_leaf = policy_logits.clone().requires_grad_(True)
        transcribed = _dpo_transcription(p_leaf, ref_logits, ids, completion, beta, loss_type, smoothing)
        if not torch.allclose(transcribed.detach(), expected, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"grader inconsistency: the transcription of TRL's DPO loss ({loss_type}) differs "
                               f"from TRL's DPOTrainer by {float((transcribed - expected).abs()):.3g}")
        (expected_grad,) = torch.autograd.grad(transcribed, p_leaf)
        desc = (f"dpo_loss ({loss_type}, beta={beta}{f', label_smoothing={smoothing}' if smoothing else ''}) on "
                f"{pairs} pairs of a tiny Llama's logits {tuple(policy_logits.shape)}"
                f"{' with policy = reference' if start == 'same' else ''} (completion tokens per row "
                f"{completion.sum(1).tolist()})")
        mask_arg = completion.to(rng.choice([torch.long, torch.bool]))
        args = [policy_logits.clone().requires_grad_(True), ref_logits.clone().requires_grad_(True), ids.clone(),
                mask_arg]
        kwargs: dict[str, Any] = {}
        if beta != 0.1 or rng.random() < 0.5:
            kwargs["beta"] = beta
        if loss_type != "sigmoid" or rng.random() < 0.5:
            kwargs["loss_type"] = loss_type
        if smoothing:
            kwargs["label_smoothing"] = smoothing
        got, grads, _ = value_and_grad(fn, *args, grad_output=None, **kwargs)
        assert_close(as_scalar_loss(got, desc), expected, desc, rtol=1e-4, atol=1e-5, hint=hint)
        grad = grads[0] if grads[0] is not None else torch.zeros_like(policy_logits)
        assert_close(grad, expected_grad, desc + ": gradient with respect to policy_logits", rtol=1e-3, atol=1e-7,
                     hint=hint)
        if grads[1] is not None and bool(grads[1].abs().max() > 0):
            raise AssertionError(f"{desc}: a gradient reached ref_logits; the reference model is frozen (detach its "
                                 "log-probs)")


# --------------------------------------------------------------------------------------------
# ppo_advantages (transcription of TRL's PPO formulas)
# --------------------------------------------------------------------------------------------


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def _masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """TRL's masked_whiten: mean and unbiased variance over the valid entries of the whole tensor."""
    mean = _masked_mean(x, mask)
    n = mask.sum()
    var = _masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def _response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R]: up to and including the first EOS, or everything; contains_eos [B])."""
    is_eos = responses == eos_token_id
    before = is_eos.long().cumsum(1) - is_eos.long()
    return before == 0, is_eos.any(1)


def _advantages_reference(scores, logprobs, ref_logprobs, values, responses, eos_token_id, kl_coef, gamma, lam,
                          kl_estimator, missing_eos_penalty, whiten_rewards):
    mask, contains_eos = _response_mask(responses, eos_token_id)
    scores = scores.clone()
    if missing_eos_penalty is not None:
        scores[~contains_eos] -= missing_eos_penalty
    logr = torch.where(mask, ref_logprobs - logprobs, 0.0)
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    last = mask.long().sum(1) - 1
    rewards[torch.arange(rewards.shape[0]), last] += scores
    if whiten_rewards:
        rewards = torch.where(mask, _masked_whiten(rewards, mask, shift_mean=False), 0.0)
    values = torch.where(mask, values, 0.0)
    last_gae = torch.zeros(rewards.shape[0])
    reversed_advantages = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = torch.where(mask, advantages + values, 0.0)
    advantages = torch.where(mask, _masked_whiten(advantages, mask), 0.0)
    return mask, rewards, advantages, returns


def _rollout_tensors(rng: random.Random, g: torch.Generator, b: int, r: int, vocab: int, eos: int,
                     junk: bool = True):
    """Responses with the EOS at a random place in some rows (none in others), and per-token tensors
    with junk after each response's end."""
    responses = torch.randint(0, vocab, (b, r), generator=g)
    responses[responses == eos] = (eos + 1) % vocab
    ends = [rng.choice([None, rng.randrange(r)]) for _ in range(b)]
    ends[0], ends[-1] = rng.randrange(r), None            # at least one row with an EOS, one without
    for row, end in enumerate(ends):
        if end is not None:
            responses[row, end] = eos
    mask, _ = _response_mask(responses, eos)
    logprobs = -3 * torch.rand(b, r, generator=g)
    ref_logprobs = logprobs + rng.choice([0.05, 0.5]) * torch.randn(b, r, generator=g)
    values = torch.randn(b, r, generator=g)
    scores = rng.choice([0.5, 2.0]) * torch.randn(b, generator=g)
    if junk:
        logprobs = torch.where(mask, logprobs, -20 * torch.rand(b, r, generator=g))
        ref_logprobs = torch.where(mask, ref_logprobs, -20 * torch.rand(b, r, generator=g))
        values = torch.where(mask, values, 1e3 * (2 * torch.rand(b, r, generator=g) - 1))
    return responses, scores, logprobs, ref_logprobs, values, ends


def check_ppo_advantages(fn: Callable) -> None:
    """``fn(scores, logprobs, ref_logprobs, values, responses, eos_token_id, kl_coef, gamma, lam, kl_estimator,
    missing_eos_penalty, whiten_rewards) -> (mask, rewards, advantages, returns)`` against a transcription of
    TRL's PPO formulas (see the module docstring)."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("mask: the response up to and including its first EOS (all of it without one); score minus "
            "missing_eos_penalty for rows without EOS; per-token reward -kl_coef * kl with k1: logprobs - ref_logprobs, "
            "k3: (exp(ref - logp) - 1) - (ref - logp), plus the score at the last masked token; whiten_rewards: masked "
            "whitening with shift_mean=False; GAE with V = 0 after the end; returns = advantages + values; then "
            "advantages whitened over the valid tokens of the whole batch; 0 outside the mask for rewards, advantages, "
            "returns")
    settings = [("k1", None, False, 1.0, 0.95), ("k3", None, False, 1.0, 0.95), ("k1", 1.0, False, 1.0, 0.95),
                ("k1", None, True, 1.0, 0.95), ("k3", rng.choice([0.5, 2.0]), True, rng.choice([0.9, 0.99]),
                                                rng.choice([0.0, 0.5, 1.0]))]
    for kl_estimator, penalty, whiten_rewards, gamma, lam in settings:
        b, r = rng.randrange(2, 6), rng.randrange(2, 9)
        vocab, eos = rng.randrange(20, 50), rng.randrange(0, 20)
        responses, scores, logprobs, ref_logprobs, values, ends = _rollout_tensors(rng, g, b, r, vocab, eos)
        kl_coef = rng.choice([0.05, 0.2])
        expected = _advantages_reference(scores, logprobs, ref_logprobs, values, responses, eos, kl_coef, gamma,
                                         lam, kl_estimator, penalty, whiten_rewards)
        desc = (f"ppo_advantages on {b} responses of {r} tokens (EOS at {ends}), kl_coef={kl_coef}, "
                f"kl_estimator={kl_estimator!r}, missing_eos_penalty={penalty}, whiten_rewards={whiten_rewards}, "
                f"gamma={gamma}, lam={lam}")
        out = fn(scores.clone(), logprobs.clone(), ref_logprobs.clone(), values.clone(), responses.clone(), eos,
                 kl_coef, gamma=gamma, lam=lam, kl_estimator=kl_estimator, missing_eos_penalty=penalty,
                 whiten_rewards=whiten_rewards)
        if not (isinstance(out, tuple) and len(out) == 4):
            raise AssertionError(f"{desc}: expected a tuple (mask, rewards, advantages, returns), got "
                                 f"{type(out).__name__}")
        mask, rewards, advantages, returns = out
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise AssertionError(f"{desc}: the mask must be a bool tensor, got "
                                 f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        assert_equal(mask, expected[0], desc + ": mask", hint=hint)
        for what, got, want in (("rewards", rewards, expected[1]), ("advantages", advantages, expected[2]),
                                ("returns", returns, expected[3])):
            assert_close(got, want, f"{desc}: {what}", rtol=1e-4, atol=1e-5, hint=hint)


# --------------------------------------------------------------------------------------------
# ppo_step (the capstone of part 4)
# --------------------------------------------------------------------------------------------


def _ppo_step_reference(models: dict[str, Any], queries: torch.Tensor, responses: torch.Tensor,
                        config: dict[str, Any], minibatches: list[list[list[int]]]):
    """One PPO update on fixed rollouts, TRL's PPOTrainer formulas (transcribed), the chapter's mask."""
    from trl.trainer.utils import selective_log_softmax

    policy, ref_policy, value_model, reward_model = (models[k] for k in ("policy", "ref", "value", "reward"))
    pad, eos, temp = config["pad_token_id"], config["eos_token_id"], config["temperature"]
    q = queries.shape[1]
    mask, _ = _response_mask(responses, eos)
    attention = torch.cat([queries != pad, mask], dim=1).long()
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    ids = torch.cat([queries, responses], dim=1)

    def logprobs_of(model, rows):
        logits = model(input_ids=ids[rows], attention_mask=attention[rows], position_ids=positions[rows]).logits
        return selective_log_softmax(logits[:, q - 1:-1] / temp, responses[rows])

    def values_of(model, rows):
        hidden = model.model(input_ids=ids[rows], attention_mask=attention[rows],
                             position_ids=positions[rows]).last_hidden_state
        return model.score(hidden)[:, q - 1:-1, 0]

    everyone = torch.arange(queries.shape[0])
    with torch.no_grad():
        old_logprobs = logprobs_of(policy, everyone)
        ref_logprobs = logprobs_of(ref_policy, everyone)
        old_values = values_of(value_model, everyone)
        hidden = reward_model.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
        last = torch.where(attention == 1, torch.arange(attention.shape[1]), -1).amax(1)   # the last real token
        scores = reward_model.score(hidden[everyone, last])[:, 0]
        _, _, advantages, returns = _advantages_reference(
            scores, old_logprobs, ref_logprobs, old_values, responses, eos, config["kl_coef"], config["gamma"],
            config["lam"], config["kl_estimator"], config["missing_eos_penalty"], config["whiten_rewards"])
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config["lr"], eps=config["adam_eps"], weight_decay=0.0)
    policy.train()
    value_model.train()
    losses = []
    for epoch in minibatches:
        for rows in epoch:
            rows = torch.tensor(rows)
            m = mask[rows]
            new_logprobs = logprobs_of(policy, rows)
            vpred = values_of(value_model, rows)
            vclipped = torch.clamp(vpred, old_values[rows] - config["cliprange_value"],
                                   old_values[rows] + config["cliprange_value"])
            vf_loss = 0.5 * _masked_mean(torch.max((vpred - returns[rows]) ** 2, (vclipped - returns[rows]) ** 2), m)
            ratio = torch.exp(torch.where(m, new_logprobs - old_logprobs[rows], 0.0))
            pg_losses = -advantages[rows] * ratio
            pg_losses2 = -advantages[rows] * torch.clamp(ratio, 1 - config["cliprange"], 1 + config["cliprange"])
            pg_loss = _masked_mean(torch.max(pg_losses, pg_losses2), m)
            (pg_loss + config["vf_coef"] * vf_loss).backward()
            if config["max_grad_norm"] is not None:
                torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
            losses.append([pg_loss.item(), vf_loss.item()])
    state = lambda model: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    return losses, state(policy), state(value_model)


def _ppo_problem(rng: random.Random, g: torch.Generator, trial: int):
    cfg = _tiny_config(rng)
    pad = cfg["pad_token_id"]
    eos = (pad + 1 + rng.randrange(cfg["vocab_size"] - 1)) % cfg["vocab_size"]
    policy, value = _causal_lm(cfg), seqcls(cfg)
    weights = {"policy": _random_weights(policy, g), "value": _random_weights(value, g),
               "reward": _random_weights(value, g)}
    weights["ref"] = {n: t + 0.2 * t.std() * torch.randn(t.shape, generator=g) for n, t in weights["policy"].items()}
    b, q, r = rng.choice([4, 6]), rng.randrange(2, 6), rng.randrange(3, 8)
    queries = []
    for _ in range(b):
        n = rng.randrange(1, q + 1)
        queries.append([pad] * (q - n) + _tokens(g, n, cfg))
    queries[rng.randrange(b)] = _tokens(g, q, cfg)
    queries = torch.tensor(queries)
    responses, *_ = _rollout_tensors(rng, g, b, r, cfg["vocab_size"], eos, junk=False)
    other = next(t for t in range(cfg["vocab_size"]) if t not in (pad, eos))
    responses[responses == pad] = other                   # the pad id only ever pads the queries
    # Trial 0 and trial 1 cover the options between them (so an answer ignoring one of them fails every run).
    first = trial == 0
    config = dict(pad_token_id=pad, eos_token_id=eos, temperature=rng.choice([0.7, 0.8]) if first else 1.0,
                  kl_coef=rng.choice([0.05, 0.2]), kl_estimator="k1" if first else "k3", gamma=1.0,
                  lam=rng.choice([0.95, 0.9]), whiten_rewards=not first, missing_eos_penalty=None if first else 1.0,
                  cliprange=rng.choice([0.2, 0.02]), cliprange_value=rng.choice([0.2, 0.02]),
                  vf_coef=rng.choice([0.1, 0.5]), lr=rng.choice([1e-3, 3e-3]), adam_eps=1e-5,
                  max_grad_norm=rng.choice([0.5, 1.0]) if first else None)
    epochs = 2
    half = b // 2
    minibatches = []
    for _ in range(epochs):
        order = torch.randperm(b, generator=g).tolist()
        minibatches.append([order[:half], order[half:]])
    return cfg, weights, queries, responses, config, minibatches


def check_ppo_step(fn: Callable) -> None:
    """``fn(policy, ref_policy, value_model, reward_model, queries, responses, config, minibatches) ->
    (losses, policy_state_dict, value_state_dict)``: the losses of every optimizer step and the weights
    after the update equal a transcription of TRL's PPOTrainer on the same models and rollouts."""
    fn = _student(fn)
    rng, g = fresh_rng(), fresh_generator()
    hint = ("rollout (no grad): ids = queries ++ responses, attention 1 on real query tokens and on the response up "
            "to its first EOS; log-probs of response token t from the logits at position Q - 1 + t divided by the "
            "temperature (policy and reference); values from value_model.score on value_model.model's hidden states "
            "at the same positions; the score from reward_model.score at each row's last real token; then "
            "ppo_advantages; then for every minibatch: clipped policy loss + vf_coef * clipped value loss (masked "
            "means over the minibatch's valid tokens), backward, clip_grad_norm_ over both models' parameters, one "
            "step of ONE AdamW over both models (lr, eps=adam_eps, weight_decay=0), zero_grad")
    for trial in range(2):
        cfg, weights, queries, responses, config, minibatches = _ppo_problem(rng, g, trial)
        models = {"policy": _causal_lm(cfg), "ref": _causal_lm(cfg), "value": seqcls(cfg), "reward": seqcls(cfg)}
        for key, model in models.items():
            model.load_state_dict(weights[key], strict=False)
        expected_losses, expected_policy, expected_value = _ppo_step_reference(models, queries, responses, config,
                                                                               minibatches)
        lm, sc = "transformers.LlamaForCausalLM", "transformers.LlamaForSequenceClassification"
        desc = (f"ppo_step on {queries.shape[0]} rollouts (queries {tuple(queries.shape)}, responses "
                f"{tuple(responses.shape)}), {len(minibatches)} epoch(s) of 2 minibatches, config "
                f"{ {k: v for k, v in config.items() if k not in ('pad_token_id', 'eos_token_id')} }")
        out = fn(_from_weights(lm, cfg, weights["policy"]), _from_weights(lm, cfg, weights["ref"]),
                 _from_weights(sc, cfg, weights["value"]), _from_weights(sc, cfg, weights["reward"]),
                 queries.clone(), responses.clone(), dict(config), [list(map(list, e)) for e in minibatches])
        if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[1], dict) and isinstance(out[2], dict)):
            raise AssertionError(f"{desc}: expected (losses, policy.state_dict(), value_model.state_dict()), got "
                                 f"{type(out).__name__}")
        losses, policy_state, value_state = out
        steps = sum(len(e) for e in minibatches)
        try:
            got = torch.tensor([[float(a), float(b)] for a, b in losses], dtype=torch.float64)
        except (TypeError, ValueError):
            raise AssertionError(f"{desc}: losses must be a list of [pg_loss, vf_loss] pairs of numbers, one per "
                                 "optimizer step") from None
        if got.shape != (steps, 2):
            raise AssertionError(f"{desc}: expected {steps} [pg_loss, vf_loss] pairs (one per minibatch), got "
                                 f"{got.shape[0]}")
        expected = torch.tensor(expected_losses, dtype=torch.float64)
        assert_close(got[:1, 0], expected[:1, 0], desc + ": the policy loss of the first minibatch", rtol=1e-4,
                     atol=1e-5, hint="the first step only depends on the rollout: check the log-probs (position "
                     "Q - 1 + t, temperature), the rewards and the advantages. " + hint)
        assert_close(got[:1, 1], expected[:1, 1], desc + ": the value loss of the first minibatch", rtol=1e-4,
                     atol=1e-5, hint="the first step only depends on the rollout: check the values' positions, "
                     "the returns and the value clipping. " + hint)
        assert_close(got, expected, desc + ": [pg_loss, vf_loss] of every step", rtol=1e-3, atol=1e-5, hint=hint)
        # The updates (after minus before) are compared, with a tolerance relative to the learning rate: AdamW
        # moves every weight by about lr, whatever its size.
        for label, state, reference, before in (("policy", policy_state, expected_policy, weights["policy"]),
                                                ("value model", value_state, expected_value, weights["value"])):
            missing = sorted(set(reference) - set(state))
            if missing:
                raise AssertionError(f"{desc}: the {label}'s state_dict lacks {len(missing)} weights, e.g. {missing[0]}")
            for name, want in reference.items():
                if name not in before:
                    continue
                got_update = as_tensor(state[name], f"{label} weight {name}") - before[name]
                assert_close(got_update, want - before[name], f"{desc}: the update of the {label}'s {name}",
                             rtol=1e-3, atol=1e-2 * config["lr"], hint=hint)


CHECKS = {
    "token_logprobs": check_token_logprobs,
    "dpo_loss": check_dpo_loss,
    "ppo_advantages": check_ppo_advantages,
    "ppo_step": check_ppo_step,
}
