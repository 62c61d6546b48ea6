"""Chapter 14: rejection-sampling fine-tuning (best-of-N, then SFT on the best).

TRL 1.x ships no best-of-N sampler, so the selection is checked against a plain Python loop (an
internal check of the rule: highest reward per group, first one on ties); the SFT loss against
``torch.nn.functional.cross_entropy`` with ``ignore_index`` on the same logits. The arithmetic
checker and problem generator are checked on hand-written cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.arithmetic import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    arithmetic_reward,
    extract_final_number,
    make_arithmetic_problems,
)
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.rejection_sampling import best_of_n, completion_nll, select_best_completions, sft_batch


def loop_best(rewards: list[float], n: int) -> tuple[list[int], list[float]]:
    indices, best = [], []
    for start in range(0, len(rewards), n):
        i = start
        for j in range(start, start + n):
            if rewards[j] > rewards[i]:
                i = j
        indices.append(i)
        best.append(rewards[i])
    return indices, best


@pytest.mark.parametrize("n,p", [(1, 3), (2, 1), (4, 5), (8, 3)])
@pytest.mark.parametrize("kind", ["binary", "gaussian"])
def test_best_of_n_equals_loop(n, p, kind):
    g = torch.Generator().manual_seed(n * 10 + p)
    rewards = torch.randint(0, 2, (n * p,), generator=g).float() if kind == "binary" else torch.randn(n * p, generator=g)
    indices, best = best_of_n(rewards, n)
    ref_indices, ref_best = loop_best(rewards.tolist(), n)
    assert indices.tolist() == ref_indices
    assert best.tolist() == ref_best
    indices2, best2 = best_of_n(rewards.view(p, n), n)  # the [P, N] layout gives the same answer
    assert indices2.tolist() == ref_indices and best2.tolist() == ref_best


def test_best_of_n_ties_go_to_the_first_and_all_wrong_groups():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    indices, best = best_of_n(rewards, 4)
    assert indices.tolist() == [1, 4] and best.tolist() == [1.0, 0.0]
    completions = [[i] for i in range(8)]
    assert select_best_completions(completions, rewards, 4) == [(0, [1]), (1, [4])]
    assert select_best_completions(completions, rewards, 4, min_reward=1.0) == [(0, [1])]  # no correct answer: dropped
    assert best_of_n(torch.tensor([-float("inf"), -1.0]), 2)[0].tolist() == [1]


def test_best_of_n_errors():
    with pytest.raises(ValueError, match="multiple"):
        best_of_n(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        best_of_n(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="N = 3"):
        best_of_n(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="completions"):
        select_best_completions([[1]], torch.zeros(2), 2)


def test_sft_batch_and_completion_nll_equal_cross_entropy():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    pairs = [([5, 6, 7], [8, 9, 2]), ([10], [11, 2]), ([12, 13, 14, 15], [2])]
    batch = sft_batch(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist()[1] == [10, 11, 2, 0, 0, 0]
    assert batch["completion_mask"].tolist()[1] == [0, 1, 1, 0, 0, 0]
    assert batch["attention_mask"].tolist()[2] == [1, 1, 1, 1, 1, 0]
    with torch.no_grad():
        ours = completion_nll(model, batch)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_completion_nll_trains_toward_the_kept_answers():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    batch = sft_batch([([5, 6], [7, 7, 2]), ([8], [7, 7, 2])], pad_token_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = completion_nll(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sft_batch_errors():
    with pytest.raises(ValueError, match="at least one"):
        sft_batch([], 0)
    with pytest.raises(ValueError, match="token"):
        sft_batch([([], [1])], 0)


# --------------------------------------------------------------------------------------------
# The verifiable reward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("68", 68.0), ("The answer is 68.", 68.0), ("45 + 23 = 68", 68.0), ("-12", -12.0), ("1,234", 1234.0),
    ("3.5 apples", 3.5), ("no number here", None), ("", None), ("60 - 81 = -21", -21.0),
])
def test_extract_final_number(text, value):
    assert extract_final_number(text) == value


def test_arithmetic_reward():
    assert arithmetic_reward("45 + 23 = 68", 68) == 1.0
    assert arithmetic_reward("68 is close, but 67", 68) == 0.0  # the last number counts
    assert arithmetic_reward("I don't know", 68) == 0.0
    assert arithmetic_reward("-21", -21) == 1.0
    with pytest.raises(TypeError):
        extract_final_number(68)


def test_problems_are_exact_and_templates_disjoint():
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    train = make_arithmetic_problems(200, "train", seed=0)
    heldout = make_arithmetic_problems(200, "heldout", seed=0)
    assert {p["template"] for p in train} <= set(TRAIN_TEMPLATES)
    assert {p["template"] for p in heldout} <= set(HELDOUT_TEMPLATES)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    for p in train[:50] + heldout[:50]:
        numbers = [int(x) for x in p["prompt"].replace("=", " ").replace("?", " ").replace(".", " ").split()
                   if x.lstrip("-").isdigit()]
        a, b = numbers
        assert p["answer"] in (a + b, a - b)
        assert p["answer"] == (a + b if ("+" in p["prompt"] or "plus" in p["prompt"]) else a - b)
        assert 10 <= a <= 99 and 10 <= b <= 99
    assert make_arithmetic_problems(5, "train", seed=1) == make_arithmetic_problems(5, "train", seed=1)
    assert make_arithmetic_problems(5, "train", seed=1) != make_arithmetic_problems(5, "train", seed=2)
    with pytest.raises(ValueError, match="split"):
        make_arithmetic_problems(3, "test")
    with pytest.raises(ValueError, match="operations"):
        make_arithmetic_problems(3, operations="*")
