"""Chapter 12's checks pass the solutions and fail the stub and plausible wrong answers.

Each check is called as a notebook's ``check(fn)`` calls it (through ``LocalObject``), on the
solution notebook's definitions or on a wrong variant written here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from llama_from_scratch.course.checks.ch12_reward_modeling import CHECKS, FORBIDDEN
from llama_from_scratch.course.grade import LocalObject

from answers import fails_on, forbidden_rules_test, passes_on, solution, solution_and_stub_tests, stub

NS = solution("ch12_reward_modeling")
STUBS = stub("ch12_reward_modeling")
solution_loss = NS["reward_model_loss"]
passes = passes_on(CHECKS, LocalObject)
fails = fails_on(CHECKS, LocalObject)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, NS, STUBS, wrap=LocalObject)
test_every_exercise_has_forbidden_rules_and_a_solution = forbidden_rules_test(CHECKS, FORBIDDEN, NS)


# ---------------------------------------------------------------------------------------------- reward_model_loss

def loss_interleaved(rewards, margin=None, center_rewards_coefficient=None):
    chosen, rejected = rewards[0::2], rewards[1::2]          # pairs as neighbours, not halves
    diff = chosen - rejected - (0.0 if margin is None else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def loss_margin_added(rewards, margin=None, center_rewards_coefficient=None):
    c, r = rewards.chunk(2)
    loss = -F.logsigmoid(c - r + (0.0 if margin is None else margin)).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((c + r) ** 2).mean()
    return loss


def loss_center_all_rewards(rewards, margin=None, center_rewards_coefficient=None):
    c, r = rewards.chunk(2)
    loss = -F.logsigmoid(c - r - (0.0 if margin is None else margin)).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (rewards ** 2).mean()
    return loss


def loss_sum(rewards, margin=None, center_rewards_coefficient=None):
    c, r = rewards.chunk(2)
    loss = -F.logsigmoid(c - r - (0.0 if margin is None else margin)).sum()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((c + r) ** 2).mean()
    return loss


def loss_log_sigmoid(rewards, margin=None, center_rewards_coefficient=None):
    c, r = rewards.chunk(2)
    loss = -torch.log(torch.sigmoid(c - r - (0.0 if margin is None else margin))).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((c + r) ** 2).mean()
    return loss


def loss_ignores_center(rewards, margin=None, center_rewards_coefficient=None):
    c, r = rewards.chunk(2)
    return -F.logsigmoid(c - r - (0.0 if margin is None else margin)).mean()


@pytest.mark.parametrize("wrong", [loss_interleaved, loss_margin_added, loss_center_all_rewards, loss_sum,
                                   loss_log_sigmoid, loss_ignores_center])
def test_reward_model_loss_wrong(wrong):
    assert fails("reward_model_loss", wrong)


def test_reward_model_loss_softplus_passes():
    def reward_model_loss(rewards, margin=None, center_rewards_coefficient=None):
        pairs = rewards.view(2, -1)                          # row 0 chosen, row 1 rejected
        z = pairs[0] - pairs[1]
        if margin is not None:
            z = z - torch.as_tensor(margin, dtype=z.dtype)
        loss = F.softplus(-z).sum() / z.numel()
        if center_rewards_coefficient:
            loss = loss + center_rewards_coefficient * pairs.sum(0).pow(2).mean()
        return loss
    assert passes("reward_model_loss", reward_model_loss) is None


# ---------------------------------------------------------------------------------------------- ranking_loss

def _pair_terms(rewards, num_answers, valid_of):
    k = rewards.shape[1]
    pos = torch.arange(k)
    valid = valid_of(pos, num_answers)
    pairs = (pos[:, None] < pos[None, :])[None] & valid[:, :, None] & valid[:, None, :]
    diff = torch.where(pairs, rewards[:, :, None] - rewards[:, None, :], 0.0)
    return pairs, torch.where(pairs, -F.logsigmoid(diff), 0.0)


def ranking_mean_over_all_pairs(rewards, num_answers):
    pairs, losses = _pair_terms(rewards, num_answers, lambda pos, n: pos[None] < n[:, None])
    return losses.sum() / pairs.sum()                      # prompts with more answers weigh more


def ranking_ignores_counts(rewards, num_answers):
    full = torch.full_like(num_answers, rewards.shape[1])
    pairs, losses = _pair_terms(rewards, full, lambda pos, n: pos[None] < n[:, None])
    return (losses.sum((1, 2)) / pairs.sum((1, 2))).mean()


def ranking_off_by_one(rewards, num_answers):
    pairs, losses = _pair_terms(rewards, num_answers, lambda pos, n: pos[None] <= n[:, None])
    return (losses.sum((1, 2)) / pairs.sum((1, 2))).mean()


def ranking_reversed(rewards, num_answers):
    return ranking_mean_per_prompt(-rewards, num_answers)


def ranking_mean_per_prompt(rewards, num_answers):
    pairs, losses = _pair_terms(rewards, num_answers, lambda pos, n: pos[None] < n[:, None])
    return (losses.sum((1, 2)) / pairs.sum((1, 2))).mean()


def ranking_adjacent_only(rewards, num_answers):
    losses = []
    for row, n in zip(rewards, num_answers.tolist()):
        losses.append(-F.logsigmoid(row[: n - 1] - row[1:n]).mean())   # only neighbours in the ranking
    return torch.stack(losses).mean()


@pytest.mark.parametrize("wrong", [ranking_mean_over_all_pairs, ranking_ignores_counts, ranking_off_by_one,
                                   ranking_reversed, ranking_adjacent_only])
def test_ranking_loss_wrong(wrong):
    assert fails("ranking_loss", wrong)


def test_ranking_loss_loop_passes():
    def ranking_loss(rewards, num_answers):
        per_prompt = []
        for row, n in zip(rewards, num_answers.tolist()):
            terms = [F.softplus(row[j] - row[i]) for i, j in itertools.combinations(range(n), 2)]
            per_prompt.append(torch.stack(terms).mean())
        return sum(per_prompt) / len(per_prompt)
    assert passes("ranking_loss", ranking_loss) is None


# ---------------------------------------------------------------------------------------------- LlamaRewardModel

def reward_model(last_index, freeze_norm=True, freeze_embedding=True, bias=False):
    """A LlamaRewardModel variant: how it finds the last token, and what it freezes."""

    class Variant(nn.Module):
        def __init__(self, config, trainable_layers=None):
            super().__init__()
            self.model = transformers.LlamaModel(config)
            self.score = nn.Linear(config.hidden_size, 1, bias=bias)
            if trainable_layers is not None:
                n = len(self.model.layers)
                self.model.requires_grad_(False)
                if not freeze_embedding:
                    self.model.embed_tokens.requires_grad_(True)
                for layer in self.model.layers[n - trainable_layers:]:
                    layer.requires_grad_(True)
                if trainable_layers > 0 and freeze_norm:
                    self.model.norm.requires_grad_(True)

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.model(input_ids=input_ids, attention_mask=(attention_mask != 0).long()).last_hidden_state
            last = last_index(attention_mask != 0)
            return self.score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1)

    return Variant


def last_real(mask):
    return torch.where(mask, torch.arange(mask.shape[1]), -1).amax(1)


@pytest.mark.parametrize("wrong", [
    reward_model(lambda m: torch.full((m.shape[0],), m.shape[1] - 1)),           # position -1: right padding breaks
    reward_model(lambda m: m.sum(1) - 1),                                          # a count: left padding breaks
    reward_model(lambda m: m.long().argmax(1)),                                    # the FIRST real token
    reward_model(last_real, freeze_norm=False),                                    # final norm left frozen
    reward_model(last_real, freeze_embedding=False),                               # embedding left trainable
    reward_model(last_real, bias=True),                                            # a bias: not HF's layout
])
def test_reward_model_wrong(wrong):
    assert fails("LlamaRewardModel", wrong)


def test_reward_model_gather_and_position_ids_passes():
    class LlamaRewardModel(nn.Module):
        def __init__(self, config, trainable_layers=None):
            super().__init__()
            self.model = transformers.LlamaModel(config)
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
            for p in self.model.parameters():
                p.requires_grad = trainable_layers is None
            if trainable_layers:
                for layer in list(self.model.layers)[-trainable_layers:]:
                    for p in layer.parameters():
                        p.requires_grad = True
                self.model.norm.weight.requires_grad = True

        def forward(self, input_ids, attention_mask=None):
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            positions = (mask.cumsum(1) - 1).clamp(min=0)          # RoPE positions over real tokens only
            hidden = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)       # last 1 = first 1 of the flipped row
            picked = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
            return (picked @ self.score.weight.T)[:, 0]
    assert passes("LlamaRewardModel", LlamaRewardModel) is None


# ---------------------------------------------------------------------------------------------- train_reward_model

def trainer(pad=lambda model: model.config.pad_token_id, decay=None, divide=True, warmup=True, clip=True,
            interleave=False, default_eps=False):
    """A train_reward_model variant."""

    def train_reward_model(model, batches, lr=1e-4, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                           adam_epsilon=1e-8, micro_batch_size=None, center_rewards_coefficient=None):
        pad_id = pad(model)
        kwargs = {} if decay == "default" else {"weight_decay": weight_decay}
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8 if default_eps else adam_epsilon, **kwargs)
        losses = []
        for step, batch in enumerate(batches):
            factor = min(1.0, (step + 1) / warmup_steps) if warmup and warmup_steps else 1.0
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            size = micro_batch_size or len(batch)
            chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
            total = 0.0
            for chunk in chunks:
                if interleave:
                    seqs = [s for e in chunk for s in (e["chosen_ids"], e["rejected_ids"])]
                else:
                    seqs = [e["chosen_ids"] for e in chunk] + [e["rejected_ids"] for e in chunk]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
                margin = torch.tensor([e["margin"] for e in chunk]) if "margin" in chunk[0] else None
                rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
                loss = solution_loss(rewards, margin, center_rewards_coefficient)
                if divide:
                    loss = loss / len(chunks)
                loss.backward()
                total += loss.item()
            if clip and max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(total)
        return losses, model.state_dict()

    return train_reward_model


@pytest.mark.parametrize("wrong", [
    trainer(pad=lambda model: 0),                 # padded with 0: HF's pooling looks for pad_token_id
    trainer(decay="default"),                     # torch's default weight decay 0.01
    trainer(divide=False),                        # micro-batch losses summed, not averaged
    trainer(warmup=False),                        # no warm-up
    trainer(clip=False),                          # no clipping
    trainer(interleave=True),                     # chosen/rejected interleaved but split in halves
    trainer(default_eps=True),                    # adam_epsilon ignored (torch's 1e-8)
])
def test_train_reward_model_wrong(wrong):
    assert fails("train_reward_model", wrong)


def test_train_reward_model_scheduler_and_pad_sequence_passes():
    def train_reward_model(model, batches, lr=1e-4, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                           adam_epsilon=1e-8, micro_batch_size=None, center_rewards_coefficient=None):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=adam_epsilon, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
        losses = []
        for batch in batches:
            m = micro_batch_size or len(batch)
            step_loss = 0.0
            for start in range(0, len(batch), m):
                chunk = batch[start:start + m]
                seqs = [torch.tensor(e["chosen_ids"]) for e in chunk] + [torch.tensor(e["rejected_ids"]) for e in chunk]
                ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=model.config.pad_token_id)
                mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)
                rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
                c, r = rewards.chunk(2)
                z = c - r - (torch.tensor([e["margin"] for e in chunk]) if "margin" in chunk[0] else 0.0)
                loss = F.softplus(-z).mean()
                if center_rewards_coefficient is not None:
                    loss = loss + center_rewards_coefficient * ((c + r) ** 2).mean()
                loss = loss * m / len(batch)
                loss.backward()
                step_loss += loss.item()
            if max_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
        return losses, {k: v.clone() for k, v in model.state_dict().items()}
    assert passes("train_reward_model", train_reward_model) is None


# ---------------------------------------------------------------------------------------------- llama2_reward

def llama2(select=lambda h, s, tagged, t: tagged | (torch.sigmoid(s) < t), transform=lambda c, h, s, use: c,
           whiten=lambda x: (x - x.mean()) / torch.sqrt(x.var() + 1e-8)):
    """A llama2_reward variant: which answers get the safety score, what is whitened, and how."""

    def llama2_reward(helpfulness, safety, is_safety, threshold=0.15):
        use_safety = select(helpfulness, safety, is_safety, threshold)
        combined = torch.where(use_safety, safety, helpfulness)
        return whiten(transform(combined, helpfulness, safety, use_safety))

    return llama2_reward


@pytest.mark.parametrize("wrong", [
    llama2(select=lambda h, s, tagged, t: tagged | (torch.sigmoid(s) >= t)),         # threshold comparison inverted
    llama2(select=lambda h, s, tagged, t: tagged | (torch.sigmoid(s) <= t)),         # a tie at the threshold -> safety
    llama2(select=lambda h, s, tagged, t: tagged & (torch.sigmoid(s) < t)),          # "and" instead of "or"
    llama2(select=lambda h, s, tagged, t: torch.sigmoid(s) < t),                     # the prompt's tag ignored
    llama2(select=lambda h, s, tagged, t: tagged),                                   # the threshold ignored
    llama2(select=lambda h, s, tagged, t: tagged | (s < t)),                         # threshold on the linear score
    llama2(select=lambda h, s, tagged, t: tagged | (torch.sigmoid(h) < t)),          # the helpfulness score tested
    llama2(transform=lambda c, h, s, use: torch.sigmoid(c)),                         # R_c whitened, not logit(R_c)
    llama2(transform=lambda c, h, s, use: torch.logit(torch.where(use, torch.sigmoid(s), torch.sigmoid(h)))),  # float32 round trip
    llama2(whiten=lambda x: x),                                                      # not whitened
    llama2(whiten=lambda x: (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-8)),  # biased variance
    llama2(whiten=lambda x: x - x.mean()),                                           # centred only
])
def test_llama2_reward_wrong(wrong):
    assert fails("llama2_reward", wrong)


def test_llama2_reward_in_probabilities_float64_passes():
    """The paper's notation literally, in float64, with the threshold moved to logit space."""
    def llama2_reward(helpfulness, safety, is_safety, threshold=0.15):
        r_s, r_h = torch.sigmoid(safety.double()), torch.sigmoid(helpfulness.double())
        use = is_safety | (safety.double() < torch.log(torch.tensor(threshold / (1 - threshold), dtype=torch.float64)))
        r_c = torch.where(use, r_s, r_h)
        x = torch.log(r_c) - torch.log1p(-r_c)
        return ((x - x.mean()) / (x.std() + 1e-8)).float()      # std + eps: the same to 1e-8 / std
    assert passes("llama2_reward", llama2_reward) is None
