"""Chapter 12: the Bradley-Terry reward loss and the reward model.

The loss is checked against the formula of REFERENCES.md written out in float64 with a Python loop;
the reward model against Hugging Face ``LlamaForSequenceClassification`` (same state dict) and
against itself on unpadded rows, and it must learn a toy preference.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama
from llama_from_scratch.reward import RewardModel, last_token_index, pairwise_accuracy, reward_loss


def reference_reward_loss(chosen, rejected, margin=None) -> float:
    """``mean_i -log(sigmoid(c_i - r_i - m_i))`` in float64, one pair at a time."""
    c, r = chosen.double().tolist(), rejected.double().tolist()
    if margin is None:
        m = [0.0] * len(c)
    elif isinstance(margin, float):
        m = [margin] * len(c)
    else:
        m = margin.double().expand(len(c)).tolist()
    total = 0.0
    for ci, ri, mi in zip(c, r, m):
        z = ci - ri - mi
        # -log sigmoid(z) = log(1 + exp(-z)), written so that neither branch overflows
        total += math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))
    return total / len(c)


# ------------------------------------------------------------------ reward_loss


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor", "scalar_tensor"])
def test_reward_loss_matches_formula(batch, margin_kind):
    g = torch.Generator().manual_seed(batch)
    chosen, rejected = torch.randn(batch, generator=g) * 3, torch.randn(batch, generator=g) * 3
    margin = {
        "none": None,
        "float": 0.7,
        "tensor": torch.rand(batch, generator=g) * 2,
        "scalar_tensor": torch.tensor(0.3),
    }[margin_kind]
    got = reward_loss(chosen, rejected, margin)
    ref_margin = margin if not isinstance(margin, torch.Tensor) else margin.reshape(-1)
    expected = torch.tensor(reference_reward_loss(chosen, rejected, ref_margin), dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, expected)


def test_reward_loss_gradient_is_sigmoid_of_minus_difference():
    chosen = torch.tensor([2.0, -1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    reward_loss(chosen, rejected).backward()
    # d/dc [-log sigmoid(c - r)] = -sigmoid(r - c), averaged over 3 pairs
    expected = torch.tensor([-1 / (1 + math.exp(1.0)), -1 / (1 + math.exp(-2.0)), -0.5]) / 3
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_reward_loss_is_stable_for_large_differences():
    chosen = torch.tensor([-200.0, 200.0])
    rejected = torch.tensor([200.0, -200.0])
    loss = reward_loss(chosen, rejected)
    # pair 1: -log sigmoid(-400) = 400 (naive log(sigmoid) would give inf); pair 2: ~0
    torch.testing.assert_close(loss, torch.tensor(200.0))


def test_reward_loss_bfloat16():
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(16, generator=g).bfloat16()
    rejected = torch.randn(16, generator=g).bfloat16()
    got = reward_loss(chosen, rejected, margin=0.5)
    assert got.dtype == torch.bfloat16
    expected = torch.tensor(reference_reward_loss(chosen, rejected, 0.5))
    # computed in float32 from the bf16 values; only the final rounding to bf16 (2^-8 relative) remains
    torch.testing.assert_close(got.double(), expected.double(), rtol=2**-8, atol=0.0)


def test_reward_loss_at_equal_rewards_is_log2():
    torch.testing.assert_close(reward_loss(torch.zeros(5), torch.zeros(5)), torch.tensor(math.log(2.0)))


def test_reward_loss_shape_errors():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        reward_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"margin of shape \(2,\)"):
        reward_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))
    with pytest.raises(ValueError, match=r"margin of shape \(2, 3\)"):  # would broadcast the loss to [2, 3]
        reward_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty"):
        reward_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="floating"):
        reward_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_pairwise_accuracy():
    chosen = torch.tensor([1.0, 2.0, 0.5, 3.0])
    rejected = torch.tensor([0.0, 2.5, 0.5, 1.0])  # right, wrong, tie (wrong), right
    assert pairwise_accuracy(chosen, rejected) == 0.5
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\)"):
        pairwise_accuracy(chosen, rejected[:3])


# ------------------------------------------------------------------ the reward model


def test_last_token_index_left_right_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0, 4]
    assert last_token_index(mask.bool()).tolist() == [2, 4, 4, 0, 4]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


def tiny_reward_model(seed: int = 0, **overrides) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(Llama(LlamaConfig.tiny(**overrides))).eval()


def padded_batch(rows: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


ROWS = [[17, 3, 99, 42, 8, 250, 11], [5, 6, 7], [200], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_reads_last_real_token(side):
    rm = tiny_reward_model()
    alone = torch.stack([rm(torch.tensor([r])).squeeze(0) for r in ROWS])
    ids, mask = padded_batch(ROWS, side)
    with torch.no_grad():
        batched = rm(ids, mask)
    assert batched.shape == (len(ROWS),)
    torch.testing.assert_close(batched, alone.detach(), rtol=1e-5, atol=1e-6)
    # and the model would give something else at a padding position: the index matters
    with torch.no_grad():
        naive_last = rm.score(rm.model(ids, attention_mask=mask)[:, -1]).squeeze(-1)
    differs = (naive_last - alone).abs() > 1e-4
    assert differs.any() if side == "right" else not differs.any()


def test_reward_model_equals_hf_sequence_classification():
    """Same state dict in transformers' LlamaForSequenceClassification, right-padded batch
    (HF finds the last non-pad token from pad_token_id; its positions ignore left padding)."""
    config = LlamaConfig.tiny(tie_embeddings=False)
    rm = tiny_reward_model(seed=1, tie_embeddings=False)
    pad_id = 255
    hf = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**config.to_hf(), num_labels=1, pad_token_id=pad_id)
    )
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(rm.state_dict(), strict=True)
    hf.eval()
    ids, mask = padded_batch(ROWS, "right", pad_id=pad_id)
    with torch.no_grad():
        ours = rm(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_reward_model_accepts_llama_or_backbone_and_rejects_others():
    torch.manual_seed(0)
    llama = Llama(LlamaConfig.tiny())
    rm_a = RewardModel(llama)
    assert rm_a.model is llama.model
    rm_b = RewardModel(llama.model)
    assert rm_b.model is llama.model
    assert set(rm_a.state_dict()) == {k for k in llama.state_dict() if k.startswith("model.")} | {"score.weight"}
    with pytest.raises(TypeError, match="Linear"):
        RewardModel(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"attention_mask \(1, 3\).*\(1, 4\)"):
        rm_a(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_reward_model_freezing(k):
    torch.manual_seed(0)
    rm = RewardModel(Llama(LlamaConfig.tiny()), trainable_layers=k)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    expected = {"score.weight"}
    for i in range(2 - k, 2):
        expected |= {n for n, _ in rm.named_parameters() if n.startswith(f"model.layers.{i}.")}
    if k > 0:
        expected.add("model.norm.weight")
    assert trainable == expected
    rm(torch.randint(0, 256, (2, 5))).sum().backward()
    for n, p in rm.named_parameters():
        assert (p.grad is not None) == (n in expected), n
    with pytest.raises(ValueError, match="trainable_layers"):
        RewardModel(Llama(LlamaConfig.tiny()), trainable_layers=3)


def test_reward_model_bfloat16_close_to_float32():
    rm = tiny_reward_model()
    ids, mask = padded_batch(ROWS, "left")
    with torch.no_grad():
        ref = rm(ids, mask)
        got = rm.to(torch.bfloat16)(ids, mask)
    assert got.dtype == torch.bfloat16
    # rewards are ~0.1 in size; measured max difference 1.4e-3
    torch.testing.assert_close(got.float(), ref, rtol=0.0, atol=1e-2)


def preference_pairs(n: int, seed: int, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen: a random sequence with token 5 somewhere; rejected: random, without token 5."""
    g = torch.Generator().manual_seed(seed)
    rejected = torch.randint(6, 64, (n, length), generator=g)
    chosen = torch.randint(6, 64, (n, length), generator=g)
    chosen[torch.arange(n), torch.randint(0, length, (n,), generator=g)] = 5
    return chosen, rejected


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine a second thread makes
    each step ~50x slower (measured 0.6 s vs 0.012 s); run the training test single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reward_model_learns_a_toy_preference(one_thread):
    """Prefer sequences that contain token 5: >90% held-out accuracy within a few dozen steps."""
    rm = tiny_reward_model(seed=0).train()
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    test_chosen, test_rejected = preference_pairs(256, seed=1000)
    with torch.no_grad():
        before = pairwise_accuracy(rm(test_chosen), rm(test_rejected))
    for step in range(40):
        chosen, rejected = preference_pairs(32, seed=step)
        rewards = rm(torch.cat([chosen, rejected]))
        loss = reward_loss(rewards[:32], rewards[32:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval()
    with torch.no_grad():
        after = pairwise_accuracy(rm(test_chosen), rm(test_rejected))
    assert before < 0.75, before
    assert after > 0.9, (before, after)
