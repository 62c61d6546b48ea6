"""Chapter 13's checks pass the solutions and fail the stubs and plausible wrong answers.

Each check is called as a notebook's ``check(fn)`` calls it (through ``LocalObject``), on the
solution notebook's definitions, the released stubs, or a variant written here.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks import ch13_rlhf_ppo_dpo as ch13
from llama_from_scratch.course.checks.ch13_rlhf_ppo_dpo import CHECKS, FORBIDDEN
from llama_from_scratch.course.grade import LocalObject

from answers import fails_on, forbidden_rules_test, passes_on, solution, solution_and_stub_tests, stub

NS = solution("ch13_rlhf_ppo_dpo")
STUBS = stub("ch13_rlhf_ppo_dpo")
token_logprobs = NS["token_logprobs"]
ppo_advantages = NS["ppo_advantages"]
passes = passes_on(CHECKS, LocalObject)
fails = fails_on(CHECKS, LocalObject)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, NS, STUBS, wrap=LocalObject)
test_every_exercise_has_forbidden_rules_and_a_solution = forbidden_rules_test(CHECKS, FORBIDDEN, NS)


def test_reference_transcription_matches_the_package():
    """The PPO transcription agrees with the package's kl_penalized_rewards, compute_gae and whiten (k1, no
    options), a second, independent writing of the same formulas."""
    from llama_from_scratch.ppo import compute_gae, kl_penalized_rewards, whiten

    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(5):
        responses, scores, logprobs, ref, values, _ = ch13._rollout_tensors(rng, g, 4, 7, 30, 3)
        mask, rewards, advantages, returns = ch13._advantages_reference(
            scores, logprobs, ref, values, responses, 3, 0.1, 1.0, 0.95, "k1", None, False)
        torch.testing.assert_close(rewards, kl_penalized_rewards(scores, logprobs, ref, mask, 0.1))
        adv, ret = compute_gae(rewards, values, mask, 1.0, 0.95)
        torch.testing.assert_close(advantages[mask], whiten(adv, mask)[mask])
        torch.testing.assert_close(returns[mask], ret[mask])


# ---------------------------------------------------------------------------------------------- token_logprobs

def logprobs_variant(shift_labels=True, mask_shift=True, temperature=True, upcast=True, zero=True, naive=False):
    def token_logprobs(logits, input_ids, completion_mask, temperature_=1.0, **kwargs):
        t = kwargs.get("temperature", temperature_)
        x = logits[:, :-1]
        x = x.float() if upcast else x
        x = x / t if temperature else x
        labels = input_ids[:, 1:] if shift_labels else input_ids[:, :-1]
        if naive:
            out = torch.log(torch.softmax(x, -1)).gather(-1, labels[..., None])[..., 0]
        else:
            out = x.gather(-1, labels[..., None])[..., 0] - torch.logsumexp(x, -1)
        m = completion_mask[:, 1:] if mask_shift else completion_mask[:, :-1]
        return torch.where(m != 0, out, 0.0).float() if zero else out.float()
    return token_logprobs


@pytest.mark.parametrize("wrong", [
    logprobs_variant(shift_labels=False),       # the logits at t scored against token t
    logprobs_variant(mask_shift=False),         # the mask not shifted with the labels
    logprobs_variant(temperature=False),        # temperature ignored
    logprobs_variant(upcast=False),             # bfloat16 arithmetic
    logprobs_variant(zero=False),               # unscored positions not zeroed
    logprobs_variant(naive=True),               # log(softmax): -inf then nan gradients under junk logits
])
def test_token_logprobs_wrong(wrong):
    assert fails("token_logprobs", wrong)


def test_token_logprobs_one_hot_passes():
    def token_logprobs(logits, input_ids, completion_mask, temperature=1.0):
        x = logits.float()[:, :-1] / temperature
        top = x.max(-1, keepdim=True).values.detach()
        log_z = (x - top).exp().sum(-1).log() + top[..., 0]
        one_hot = F.one_hot(input_ids[:, 1:], x.shape[-1]).to(x.dtype)
        picked = (torch.where(one_hot.bool(), x, 0.0)).sum(-1)
        return (picked - log_z) * completion_mask[:, 1:].to(x.dtype)
    assert passes("token_logprobs", token_logprobs) is None


# ---------------------------------------------------------------------------------------------- dpo_loss

def dpo_variant(pairing="halves", reduce="sum", detach=True, ipo_norm=True, robust_sign=1.0, hinge_sign=1.0):
    def dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta=0.1, loss_type="sigmoid",
                 label_smoothing=0.0):
        def seq(logits):
            per_token = token_logprobs(logits, input_ids, completion_mask)
            if reduce == "mean":
                return per_token.sum(1) / completion_mask[:, 1:].sum(1)
            return per_token.sum(1)
        ref = seq(ref_logits)
        ratios = seq(policy_logits) - (ref.detach() if detach else ref)
        if loss_type == "ipo" and ipo_norm:
            ratios = ratios / completion_mask.sum(1)
        chosen, rejected = (ratios[0::2], ratios[1::2]) if pairing == "interleaved" else ratios.chunk(2)
        h = chosen - rejected
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * h)
        elif loss_type == "hinge":
            losses = torch.relu(1 - hinge_sign * beta * h)
        elif loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            e = label_smoothing
            losses = ((1 - e) * -F.logsigmoid(beta * h) - robust_sign * e * -F.logsigmoid(-beta * h)) / (1 - 2 * e)
        return losses.mean()
    return dpo_loss


@pytest.mark.parametrize("wrong", [
    dpo_variant(pairing="interleaved"),         # pairs taken as neighbouring rows
    dpo_variant(reduce="mean"),                 # mean token log-prob instead of the sum
    dpo_variant(detach=False),                  # gradient flows into the reference
    dpo_variant(ipo_norm=False),                # IPO without TRL's length normalisation
    dpo_variant(robust_sign=-1.0),              # robust DPO: the flipped term added
    dpo_variant(hinge_sign=-1.0),               # hinge on the wrong side
])
def test_dpo_loss_wrong(wrong):
    assert fails("dpo_loss", wrong)


def test_dpo_loss_softplus_passes():
    def dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, beta=0.1, loss_type="sigmoid",
                 label_smoothing=0.0):
        n = input_ids.shape[0] // 2
        lp = token_logprobs(policy_logits, input_ids, completion_mask).sum(1)
        rp = token_logprobs(ref_logits.detach(), input_ids, completion_mask).sum(1)
        if loss_type == "ipo":
            counts = completion_mask.sum(1).to(lp.dtype)
            lp, rp = lp / counts, rp / counts
        z = beta * ((lp[:n] - lp[n:]) - (rp[:n] - rp[n:]))
        if loss_type == "sigmoid":
            return F.softplus(-z).mean()
        if loss_type == "hinge":
            return (1 - z).clamp(min=0).mean()
        if loss_type == "ipo":
            return ((z / beta - 0.5 / beta) ** 2).mean()
        e = label_smoothing
        return (((1 - e) * F.softplus(-z) - e * F.softplus(z)) / (1 - 2 * e)).mean()
    assert passes("dpo_loss", dpo_loss) is None


# ---------------------------------------------------------------------------------------------- ppo_advantages

def advantages_variant(eos_inclusive=True, score_at_end=False, k3_flip=False, whiten_per_row=False,
                       reward_shift=False, penalty_on_eos=False, biased_var=False, zero_values=True):
    def whiten(x, mask, shift_mean=True, rows=False):
        if rows:
            out = torch.zeros_like(x)
            for b in range(x.shape[0]):
                v = x[b][mask[b]]
                sd = v.std() if v.numel() > 1 else torch.tensor(1.0)
                out[b] = (x[b] - v.mean()) / (sd + 1e-8)
            return out
        v = x[mask]
        var = v.var(unbiased=not biased_var)
        out = (x - v.mean()) * torch.rsqrt(var + 1e-8)
        return out if shift_mean else out + v.mean()

    def ppo_advantages(scores, logprobs, ref_logprobs, values, responses, eos_token_id, kl_coef, gamma=1.0,
                       lam=0.95, kl_estimator="k1", missing_eos_penalty=None, whiten_rewards=False):
        is_eos = (responses == eos_token_id).long()
        mask = (is_eos.cumsum(1) - is_eos) == 0 if eos_inclusive else is_eos.cumsum(1) == 0
        has_eos = is_eos.any(1)
        if missing_eos_penalty is not None:
            scores = torch.where(has_eos if penalty_on_eos else ~has_eos, scores - missing_eos_penalty, scores)
        logr = torch.where(mask, ref_logprobs - logprobs, 0.0)
        if k3_flip:
            logr = -logr
        kl = -logr if kl_estimator == "k1" else torch.expm1(logr) - logr
        rewards = torch.where(mask, -kl_coef * kl, 0.0)
        last = torch.full((rewards.shape[0],), rewards.shape[1] - 1) if score_at_end else mask.sum(1) - 1
        rewards[torch.arange(rewards.shape[0]), last.clamp(min=0)] += scores
        if whiten_rewards:
            rewards = torch.where(mask, whiten(rewards, mask, shift_mean=reward_shift), 0.0)
        if zero_values:
            values = torch.where(mask, values, 0.0)
        advantages = torch.zeros_like(rewards)
        running = torch.zeros(rewards.shape[0])
        for t in reversed(range(rewards.shape[1])):
            nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            running = rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * running
            advantages[:, t] = running
        returns = torch.where(mask, advantages + values, 0.0)
        advantages = torch.where(mask, whiten(advantages, mask, rows=whiten_per_row), 0.0)
        return mask, rewards, advantages, returns
    return ppo_advantages


@pytest.mark.parametrize("wrong", [
    advantages_variant(eos_inclusive=False),    # the EOS token left out of the mask
    advantages_variant(score_at_end=True),      # the score at position R - 1, not at the response's end
    advantages_variant(k3_flip=True),           # k3 with the log-ratio's sign flipped
    advantages_variant(whiten_per_row=True),    # advantages whitened per response
    advantages_variant(reward_shift=True),      # rewards re-centred by whitening
    advantages_variant(penalty_on_eos=True),    # the missing-EOS penalty on the wrong rows
    advantages_variant(biased_var=True),        # variance divided by n
    advantages_variant(zero_values=False),      # junk values after the end enter GAE
])
def test_ppo_advantages_wrong(wrong):
    assert fails("ppo_advantages", wrong)


def test_ppo_advantages_discount_matrix_passes():
    def ppo_advantages(scores, logprobs, ref_logprobs, values, responses, eos_token_id, kl_coef, gamma=1.0,
                       lam=0.95, kl_estimator="k1", missing_eos_penalty=None, whiten_rewards=False):
        b, r = responses.shape
        first_eos = torch.where(responses == eos_token_id, torch.arange(r), r).min(1).values
        end = first_eos.clamp(max=r - 1)                                  # index of the last valid token
        mask = torch.arange(r)[None] <= end[:, None]
        if missing_eos_penalty is not None:
            scores = scores - missing_eos_penalty * (first_eos == r).to(scores.dtype)
        logr = (ref_logprobs - logprobs) * mask
        kl = -logr if kl_estimator == "k1" else logr.exp() - 1 - logr
        rewards = -kl_coef * kl * mask + F.one_hot(end, r) * scores[:, None]
        n = mask.sum()

        def stats(x):
            mean = (x * mask).sum() / n
            return mean, (((x - mean) * mask) ** 2).sum() / (n - 1)
        if whiten_rewards:
            mean, var = stats(rewards)
            rewards = ((rewards - mean) / torch.sqrt(var + 1e-8) + mean) * mask
        v = values * mask
        next_v = torch.cat([v[:, 1:], torch.zeros(b, 1)], 1)
        deltas = rewards + gamma * next_v - v
        k = torch.arange(r)
        discount = torch.where(k[None] >= k[:, None], (gamma * lam) ** (k[None] - k[:, None]).clamp(min=0).float(), 0.0)
        advantages = deltas @ discount.T                                   # A_t = sum_{j>=t} (g l)^(j-t) delta_j
        returns = (advantages + v) * mask
        mean, var = stats(advantages)
        return mask, rewards, ((advantages - mean) / torch.sqrt(var + 1e-8)) * mask, returns
    assert passes("ppo_advantages", ppo_advantages) is None


# ---------------------------------------------------------------------------------------------- ppo_step

def ppo_variant(value_offset=-1, temperature=True, ref_temperature=True, score_at=-1, value_clip=True,
                joint_clip=True, whiten_mb=False, mean_all=False, stale_old=False):
    """A ppo_step variant (score_at=-1: the last real token; 'end': position -1 of the sequence)."""

    def ppo_step(policy, ref_policy, value_model, reward_model, queries, responses, config, minibatches):
        q = queries.shape[1]
        is_eos = (responses == config["eos_token_id"]).long()
        rmask = (is_eos.cumsum(1) - is_eos) == 0
        attention = torch.cat([queries != config["pad_token_id"], rmask], 1).long()
        ids = torch.cat([queries, responses], 1)
        scored = torch.cat([torch.zeros_like(queries), rmask.long()], 1)
        temp = config["temperature"]

        def logprobs_of(model, rows, use_temp):
            logits = model(input_ids=ids[rows], attention_mask=attention[rows]).logits
            return token_logprobs(logits, ids[rows], scored[rows], temp if use_temp else 1.0)[:, q - 1:]

        def values_of(rows):
            h = value_model.model(input_ids=ids[rows], attention_mask=attention[rows]).last_hidden_state
            v = value_model.score(h)[..., 0]
            return v[:, q - 1:-1] if value_offset == -1 else v[:, q:]

        everyone = torch.arange(ids.shape[0])
        with torch.no_grad():
            old, ref, old_v = logprobs_of(policy, everyone, temperature), logprobs_of(ref_policy, everyone,
                                                                                       ref_temperature), values_of(everyone)
            h = reward_model.model(input_ids=ids, attention_mask=attention).last_hidden_state
            last = torch.where(attention == 1, torch.arange(ids.shape[1]), -1).amax(1) if score_at == -1 else \
                torch.full((ids.shape[0],), ids.shape[1] - 1)
            scores = reward_model.score(h[everyone, last])[:, 0]
            mask, _, adv, ret = ppo_advantages(scores, old, ref, old_v, responses, config["eos_token_id"],
                                               config["kl_coef"], config["gamma"], config["lam"], config["kl_estimator"],
                                               config["missing_eos_penalty"], config["whiten_rewards"])
        groups = [list(policy.parameters()), list(value_model.parameters())]
        params = groups[0] + groups[1]
        opt = torch.optim.AdamW(params, lr=config["lr"], eps=config["adam_eps"], weight_decay=0.0)
        losses = []
        for epoch in minibatches:
            if stale_old:                       # "old" log-probs refreshed every epoch: not the rollout's
                with torch.no_grad():
                    old = logprobs_of(policy, everyone, temperature)
            for rows in epoch:
                rows = torch.tensor(rows)
                m = mask[rows]
                a = adv[rows]
                if whiten_mb:
                    a = torch.where(m, (a - a[m].mean()) / (a[m].std() + 1e-8), 0.0)
                ratio = torch.exp(torch.where(m, logprobs_of(policy, rows, temperature) - old[rows], 0.0))
                c = config["cliprange"]
                per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - c, 1 + c))
                pg = torch.where(m, per_token, 0.0).mean() if mean_all else per_token[m].mean()
                v, cv = values_of(rows), config["cliprange_value"]
                clipped = torch.clamp(v, old_v[rows] - cv, old_v[rows] + cv) if value_clip else v
                vf = 0.5 * torch.maximum((v - ret[rows]) ** 2, (clipped - ret[rows]) ** 2)[m].mean()
                (pg + config["vf_coef"] * vf).backward()
                if config["max_grad_norm"] is not None:
                    if joint_clip:
                        torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
                    else:
                        for group in groups:
                            torch.nn.utils.clip_grad_norm_(group, config["max_grad_norm"])
                opt.step()
                opt.zero_grad()
                losses.append([pg.item(), vf.item()])
        return losses, policy.state_dict(), value_model.state_dict()

    return ppo_step


@pytest.mark.parametrize("wrong", [
    ppo_variant(value_offset=0),                # values read at the response tokens themselves
    ppo_variant(temperature=False),             # policy log-probs without the temperature
    ppo_variant(ref_temperature=False),         # reference log-probs without the temperature
    ppo_variant(score_at="end"),                # score read at the last column (junk after EOS)
    ppo_variant(mean_all=True),                 # policy loss averaged over padding too
    ppo_variant(stale_old=True),                # old log-probs recomputed each epoch
    ppo_variant(value_clip=False),              # value clipping dropped
    ppo_variant(joint_clip=False),              # each model's gradient clipped on its own
    ppo_variant(whiten_mb=True),                # advantages re-whitened per minibatch
])
def test_ppo_step_wrong(wrong):
    assert fails("ppo_step", wrong)


def test_ppo_step_variant_without_position_ids_passes():
    assert passes("ppo_step", ppo_variant()) is None


def test_log_softmax_is_refused_by_the_rules():
    from llama_from_scratch.course.answer_rules import first_violation
    from llama_from_scratch.course.sandbox_worker import definitions_of

    source = ("import torch\nimport torch.nn.functional as F\n"
              "def token_logprobs(logits, input_ids, completion_mask, temperature=1.0):\n"
              "    lp = F.log_softmax(logits[:, :-1].float() / temperature, -1)\n"
              "    return lp.gather(-1, input_ids[:, 1:, None])[..., 0] * completion_mask[:, 1:]\n"
              "def dpo_loss(policy_logits, *args, **kwargs):\n"
              "    return policy_logits.log_softmax(-1).sum()\n")
    trees = [definitions_of(source, 0)]
    assert "log_softmax" in first_violation("token_logprobs", trees, FORBIDDEN["token_logprobs"])
    assert "log_softmax" in first_violation("dpo_loss", trees, FORBIDDEN["dpo_loss"])
