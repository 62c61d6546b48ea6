"""Chapter 12's reward-model variants: InstructGPT's K-way ranking loss, ChatLLaMA's score regression
and Llama 2's combination of a helpfulness and a safety reward model.

References: the ranking loss against TRL's own ``RewardTrainer.compute_loss`` (called on a tiny
trainer with a stand-in model whose logits are the given rewards), on every pair of each ranking;
the regression loss against ``torch.nn.functional.mse_loss``; Llama 2's rule has no library, so it
is checked against a direct transcription of the paper's formula (section 3.2.3), probabilities,
``logit`` and all, in float64: an internal check.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llama_from_scratch.reward import reward_loss
from llama_from_scratch.reward_variants import (LLAMA2_SAFETY_THRESHOLD, llama2_combined_reward, ranking_loss,
                                                score_regression_loss)


# ------------------------------------------------------------------ TRL's pairwise loss


@pytest.fixture(scope="module")
def trl_trainer():
    """A tiny TRL RewardTrainer, built only for its ``compute_loss``."""
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import RewardConfig, RewardTrainer

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1")
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=0, num_labels=1))
    args = RewardConfig(output_dir=os.path.join(tempfile.gettempdir(), "lfs-test-unused"), report_to=[],
                        use_cpu=True, save_strategy="no", bf16=False)
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_dict({"chosen_ids": [[2, 3]], "rejected_ids": [[4]]}))
    trainer.model.eval()                 # eval mode: compute_loss skips its token counting
    return trainer


def trl_pair_loss(trainer, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """TRL's ``RewardTrainer.compute_loss`` for these rewards: a stand-in model returns them as logits
    (TRL's layout: the chosen rows first, then the rejected ones)."""
    rewards = torch.cat([chosen, rejected])
    inputs = {"attention_mask": torch.ones(rewards.shape[0], 1, dtype=torch.long)}
    return trainer.compute_loss(lambda **_: SimpleNamespace(logits=rewards[:, None]), inputs)


def trl_ranking_reference(trainer, rewards: torch.Tensor) -> torch.Tensor:
    """The mean, over every pair (i, j) with i < j of a ranking, of TRL's loss on that pair alone
    (each pair is one TRL batch of the B prompts' (i, j) pairs: TRL averages over the prompts)."""
    k = rewards.shape[1]
    losses = [trl_pair_loss(trainer, rewards[:, i], rewards[:, j]) for i, j in itertools.combinations(range(k), 2)]
    return torch.stack(losses).mean()


# ------------------------------------------------------------------ ranking_loss


@pytest.mark.parametrize("batch", [1, 5, 32])
def test_ranking_loss_with_two_answers_is_trl_pairwise_loss(trl_trainer, batch):
    g = torch.Generator().manual_seed(batch)
    rewards = (3 * torch.randn(batch, 2, generator=g)).requires_grad_(True)
    ours = ranking_loss(rewards)
    (grad,) = torch.autograd.grad(ours, rewards)
    ref_rewards = rewards.detach().clone().requires_grad_(True)
    theirs = trl_pair_loss(trl_trainer, ref_rewards[:, 0], ref_rewards[:, 1])
    (ref_grad,) = torch.autograd.grad(theirs, ref_rewards)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours, reward_loss(rewards[:, 0], rewards[:, 1]), rtol=0, atol=0)


@pytest.mark.parametrize(("batch", "k"), [(1, 3), (4, 3), (3, 4), (7, 9), (16, 5)])
@pytest.mark.parametrize("scale", [0.1, 2.0, 50.0])
def test_ranking_loss_is_mean_of_trl_losses_over_all_pairs(trl_trainer, batch, k, scale):
    g = torch.Generator().manual_seed(100 * batch + k)
    rewards = (scale * torch.randn(batch, k, generator=g)).requires_grad_(True)
    ours = ranking_loss(rewards)
    (grad,) = torch.autograd.grad(ours, rewards)
    ref_rewards = rewards.detach().clone().requires_grad_(True)
    theirs = trl_ranking_reference(trl_trainer, ref_rewards)
    (ref_grad,) = torch.autograd.grad(theirs, ref_rewards)
    assert ours.shape == () and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)


def test_ranking_loss_counts_every_pair_once_and_normalises_by_their_number():
    """The hand count for one ranking of three: pairs (0, 1), (0, 2), (1, 2), divided by C(3, 2) = 3."""
    r = torch.tensor([[2.0, 0.5, -1.0]])
    softplus = lambda z: math.log1p(math.exp(-z))          # noqa: E731, -log sigmoid(z)
    expected = (softplus(1.5) + softplus(3.0) + softplus(1.5)) / 3
    torch.testing.assert_close(ranking_loss(r), torch.tensor(expected))
    # not the sum, not only neighbours, not reversed
    assert not math.isclose(ranking_loss(r).item(), 3 * expected)
    assert not math.isclose(ranking_loss(r).item(), (softplus(1.5) + softplus(1.5)) / 2)
    assert ranking_loss(r.flip(1)).item() > 1.0 > ranking_loss(r).item()


def test_ranking_loss_stable_and_at_ties_log2():
    torch.testing.assert_close(ranking_loss(torch.zeros(3, 4)), torch.tensor(math.log(2.0)))
    far = ranking_loss(torch.tensor([[-300.0, 0.0, 300.0]]))      # every pair wrong by 300 or 600
    torch.testing.assert_close(far, torch.tensor((300.0 + 600.0 + 300.0) / 3))


def test_ranking_loss_bfloat16(trl_trainer):
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(6, 4, generator=g).bfloat16()
    got = ranking_loss(rewards)
    assert got.dtype == torch.bfloat16
    expected = trl_ranking_reference(trl_trainer, rewards.float())
    # computed in float32 from the bf16 values: only the final rounding to bf16 (2^-8 relative) remains
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=0.0)


def test_ranking_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"\[batch, K\].*\(6,\)"):
        ranking_loss(torch.zeros(6))
    with pytest.raises(ValueError, match=r"\[batch, K\].*\(2, 3, 4\)"):
        ranking_loss(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="K >= 2"):
        ranking_loss(torch.zeros(5, 1))
    with pytest.raises(ValueError, match="empty"):
        ranking_loss(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="floating"):
        ranking_loss(torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------ score_regression_loss


@pytest.mark.parametrize("shape", [(1,), (7,), (4, 3)])
def test_score_regression_loss_is_mse_loss(shape):
    g = torch.Generator().manual_seed(len(shape))
    predicted = (3 * torch.randn(shape, generator=g)).requires_grad_(True)
    target = torch.randint(0, 11, shape, generator=g).float()
    ours = score_regression_loss(predicted, target)
    (grad,) = torch.autograd.grad(ours, predicted)
    ref_pred = predicted.detach().clone().requires_grad_(True)
    theirs = F.mse_loss(ref_pred, target)
    (ref_grad,) = torch.autograd.grad(theirs, ref_pred)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ours, torch.nn.MSELoss()(predicted, target), rtol=1e-6, atol=0.0)  # ChatLLaMA's


def test_score_regression_loss_bfloat16():
    g = torch.Generator().manual_seed(3)
    predicted, target = torch.randn(32, generator=g).bfloat16(), torch.randn(32, generator=g).bfloat16()
    got = score_regression_loss(predicted, target)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.mse_loss(predicted.float(), target.float()), rtol=2**-8, atol=0.0)


def test_score_regression_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        score_regression_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        score_regression_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="target"):
        score_regression_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ llama2_combined_reward


def paper_combined_reward(helpfulness, safety, is_safety, threshold=0.15, whiten=False) -> list[float]:
    """Touvron et al. 2023, section 3.2.3, one response at a time in float64:
    R_s = sigmoid(safety), R_h = sigmoid(helpfulness); R_c = R_s if is_safety(p) or R_s < threshold,
    else R_h; then logit(R_c), then (optionally) whiten over the batch, (x - mean) / sqrt(var + 1e-8)
    with the unbiased variance."""
    out = []
    for h, s, unsafe in zip(helpfulness.double().tolist(), safety.double().tolist(), is_safety.tolist()):
        r_s, r_h = 1 / (1 + math.exp(-s)), 1 / (1 + math.exp(-h))
        if unsafe or r_s < threshold:
            r_c = r_s
        else:
            r_c = r_h
        out.append(math.log(r_c / (1 - r_c)))
    if whiten:
        mean = sum(out) / len(out)
        var = sum((x - mean) ** 2 for x in out) / (len(out) - 1)
        out = [(x - mean) / math.sqrt(var + 1e-8) for x in out]
    return out


def test_llama2_rule_branches():
    """Each branch once: unsafe prompt (safety score used even when high), safe prompt with a low
    safety score (safety used), safe prompt with a high safety score (helpfulness used)."""
    helpfulness = torch.tensor([3.0, 2.0, 1.5, -0.5])
    safety = torch.tensor([4.0, -2.5, 0.0, -1.0])   # sigmoid: 0.982, 0.076 (< 0.15), 0.5, 0.269
    unsafe = torch.tensor([True, False, False, False])
    got = llama2_combined_reward(helpfulness, safety, unsafe)
    torch.testing.assert_close(got, torch.tensor([4.0, -2.5, 1.5, -0.5]), rtol=0, atol=0)
    ref = torch.tensor(paper_combined_reward(helpfulness, safety, unsafe), dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_llama2_rule_tie_at_threshold_uses_helpfulness():
    """``R_s < threshold`` is strict: sigmoid(0) = 0.5 exactly, so at threshold 0.5 the safety score
    0 is a tie and the helpfulness score is used; a hair below switches to safety."""
    h = torch.tensor([1.0, 1.0])
    s = torch.tensor([0.0, -1e-6])
    got = llama2_combined_reward(h, s, torch.tensor([False, False]), threshold=0.5)
    torch.testing.assert_close(got, torch.tensor([1.0, -1e-6]), rtol=0, atol=0)
    ref = paper_combined_reward(h, s, torch.tensor([False, False]), threshold=0.5)
    assert ref == pytest.approx([1.0, -1e-6], abs=1e-12)
    # and the tie on an unsafe prompt still uses safety
    assert llama2_combined_reward(h[:1], s[:1], torch.tensor([True]), threshold=0.5).item() == 0.0


def test_llama2_default_threshold_is_the_papers():
    assert LLAMA2_SAFETY_THRESHOLD == 0.15
    logit_015 = math.log(0.15 / 0.85)                 # -1.7346: the safety score where sigmoid = 0.15
    s = torch.tensor([logit_015 - 0.01, logit_015 + 0.01])
    got = llama2_combined_reward(torch.tensor([5.0, 5.0]), s, torch.tensor([False, False]))
    torch.testing.assert_close(got, torch.tensor([s[0].item(), 5.0]), rtol=0, atol=0)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("n", [2, 3, 50])
def test_llama2_rule_matches_paper_transcription(whiten, n):
    g = torch.Generator().manual_seed(n + 10 * whiten)
    h, s = 3 * torch.randn(n, generator=g), 3 * torch.randn(n, generator=g)
    unsafe = torch.rand(n, generator=g) < 0.3
    got = llama2_combined_reward(h, s, unsafe, whiten=whiten)
    ref = torch.tensor(paper_combined_reward(h, s, unsafe, whiten=whiten), dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if whiten:
        torch.testing.assert_close(got.mean(), torch.tensor(0.0), rtol=0, atol=1e-6)
        torch.testing.assert_close(got.std(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_llama2_rule_large_scores_stay_finite():
    """logit(sigmoid(x)) through float32 would give inf at x = 20; the selected linear score does not."""
    h = torch.tensor([20.0, -30.0])
    s = torch.tensor([25.0, 30.0])
    got = llama2_combined_reward(h, s, torch.tensor([False, True]))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([20.0, 30.0]), rtol=0, atol=0)
    naive = torch.logit(torch.sigmoid(torch.tensor(20.0)))
    assert torch.isinf(naive)


def test_llama2_rule_gradient_flows_to_the_selected_model_only():
    h = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    s = torch.tensor([2.0, -3.0, 1.0], requires_grad=True)
    llama2_combined_reward(h, s, torch.tensor([True, False, False])).sum().backward()
    assert h.grad.tolist() == [0.0, 0.0, 1.0] and s.grad.tolist() == [1.0, 1.0, 0.0]


def test_llama2_rule_bfloat16():
    g = torch.Generator().manual_seed(5)
    h, s = (2 * torch.randn(16, generator=g)).bfloat16(), (2 * torch.randn(16, generator=g)).bfloat16()
    unsafe = torch.rand(16, generator=g) < 0.4
    got = llama2_combined_reward(h, s, unsafe)
    assert got.dtype == torch.bfloat16
    ref = torch.tensor(paper_combined_reward(h, s, unsafe), dtype=torch.float32)   # from the same bf16 values
    torch.testing.assert_close(got.float(), ref, rtol=2**-8, atol=1e-6)


def test_llama2_rule_bad_inputs():
    h, s, unsafe = torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        llama2_combined_reward(h, torch.zeros(4), unsafe)
    with pytest.raises(ValueError, match=r"\[B\]"):
        llama2_combined_reward(torch.zeros(3, 1), torch.zeros(3, 1), unsafe)
    with pytest.raises(ValueError, match="is_unsafe_prompt"):
        llama2_combined_reward(h, s, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        llama2_combined_reward(h, s, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        llama2_combined_reward(h, s, unsafe, threshold=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        llama2_combined_reward(h[:1], s[:1], unsafe[:1], whiten=True)
    with pytest.raises(ValueError, match="empty"):
        llama2_combined_reward(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
