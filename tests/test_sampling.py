"""Chapter 7: sampling filters, checked against the transformers logits processors."""

from __future__ import annotations

import math

import pytest
import torch

from llama_from_scratch.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    filter_logits,
    min_p_filter,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

lp = pytest.importorskip("transformers.generation.logits_process")

NEG_INF = float("-inf")
SEEDS = range(12)
SHAPES = [(4, 1), (3, 2), (5, 7), (2, 101), (1, 1000)]


def random_logits(shape, seed, kind="normal"):
    """``kind="normal"``: Gaussian logits (scale 3); ``"ties"``: drawn from a few integers, so ties abound."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g) * 3.0


def hf(warper, logits):
    """Run a transformers warper on [B, V] float32 logits (the dtype generate hands it)."""
    return warper(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.float().clone())


def assert_same_filter(ours, theirs, original):
    """Identical kept sets; kept entries equal to the reference's and to the input's (unchanged)."""
    assert ours.shape == original.shape and ours.dtype == original.dtype
    assert torch.equal(ours == NEG_INF, theirs == NEG_INF)
    kept = ours != NEG_INF
    assert torch.equal(ours.float()[kept], theirs[kept])
    assert torch.equal(ours[kept], original[kept])


# ------------------------------------------------------------------ filters vs transformers


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_top_k_matches_transformers(shape, kind):
    for seed in SEEDS:
        logits = random_logits(shape, seed, kind)
        for k in (1, 2, 3, 5, 50, shape[-1], shape[-1] + 3):
            ours = top_k_filter(logits, k)
            assert_same_filter(ours, hf(lp.TopKLogitsWarper(top_k=k), logits), logits)
            # never fewer than min(k, V) survivors (more when the k-th value is tied)
            assert ((ours != NEG_INF).sum(-1) >= min(k, shape[-1])).all()


def test_top_k_keeps_all_ties_at_kth_value():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0]])
    assert torch.equal(top_k_filter(logits, 2) != NEG_INF, torch.tensor([[True, True, True, False, True]]))
    assert torch.equal(top_k_filter(logits, 1) != NEG_INF, torch.tensor([[True, False, False, False, False]]))


def test_top_k_min_tokens_to_keep_matches_transformers():
    logits = random_logits((3, 20), 0)
    for k, m in [(1, 4), (5, 2), (2, 30)]:
        ours = top_k_filter(logits, k, min_tokens_to_keep=m)
        assert_same_filter(ours, hf(lp.TopKLogitsWarper(top_k=k, min_tokens_to_keep=m), logits), logits)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_top_p_matches_transformers(shape, kind):
    for seed in SEEDS:
        logits = random_logits(shape, seed, kind)
        for p in (0.01, 0.3, 0.5, 0.75, 0.9, 0.95, 0.999, 1.0):
            for m in (1, 3):
                ours = top_p_filter(logits, p, min_tokens_to_keep=m)
                theirs = hf(lp.TopPLogitsWarper(top_p=p, min_tokens_to_keep=m), logits)
                assert_same_filter(ours, theirs, logits)


def test_top_p_boundary_token_is_kept():
    # Probabilities that are exact powers of two, so cumulative sums hit p exactly.
    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])
    logits = torch.log(probs)[None].repeat(2, 1)
    # the construction really is exact in float32 (otherwise this test would prove nothing)
    tail_mass = torch.sort(logits[0]).values.softmax(-1).cumsum(-1)
    assert torch.equal(tail_mass, torch.tensor([0.0625, 0.125, 0.25, 0.5, 1.0]))
    expected = {
        0.5: [False, True, False, False, False],  # 0.5 alone reaches p exactly
        0.75: [False, True, False, True, False],  # 0.5 + 0.25 = 0.75 exactly: boundary token kept
        0.7: [False, True, False, True, False],
        0.875: [True, True, False, True, False],
        0.9375: [True, True, False, True, False],  # the two 1/16 are tied: they hold 1/8 together
        1.0: [True, True, True, True, True],
    }
    for p, keep in expected.items():
        ours = top_p_filter(logits, p)
        theirs = hf(lp.TopPLogitsWarper(top_p=p), logits)
        assert_same_filter(ours, theirs, logits)
        if p != 0.9375:  # at 0.9375 one of the tied 1/16 tokens stays; which one is the sort's choice
            assert (ours != NEG_INF)[0].tolist() == keep, p
        else:
            assert (ours != NEG_INF).sum(-1).tolist() == [4, 4]
    # 0.875 - a hair: still three tokens; 0.5 + a hair: two.
    assert (top_p_filter(logits, 0.5 + 1e-6) != NEG_INF).sum().item() == 4
    assert (top_p_filter(logits, 0.5 - 1e-6) != NEG_INF).sum().item() == 2


def test_top_p_boundary_random_powers_of_two():
    """Random permutations of power-of-two distributions, every cumulative sum as p."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125])
    cums = [0.5, 0.75, 0.875, 0.9375, 0.96875, 1.0]
    for _ in range(10):
        logits = torch.stack([torch.log(probs[torch.randperm(6, generator=g)]) for _ in range(3)])
        for p in cums:
            for m in (1, 2):
                ours = top_p_filter(logits, p, min_tokens_to_keep=m)
                theirs = hf(lp.TopPLogitsWarper(top_p=p, min_tokens_to_keep=m), logits)
                assert_same_filter(ours, theirs, logits)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_min_p_matches_transformers(shape, kind):
    for seed in SEEDS:
        logits = random_logits(shape, seed, kind)
        for p in (0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0):
            ours = min_p_filter(logits, p)
            assert_same_filter(ours, hf(lp.MinPLogitsWarper(min_p=p), logits), logits)
            ours = min_p_filter(logits, p, min_tokens_to_keep=3)
            assert_same_filter(ours, hf(lp.MinPLogitsWarper(min_p=p, min_tokens_to_keep=3), logits), logits)


def test_min_p_threshold_is_strict():
    # probabilities 0.5, 0.25, 0.125, 0.125: with p = 0.25 the threshold is 0.125, kept (not < it).
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert (min_p_filter(logits, 0.25) != NEG_INF).all()
    assert (min_p_filter(logits, 0.26) != NEG_INF).tolist() == [[True, True, False, False]]
    assert (min_p_filter(logits, 1.0) != NEG_INF).tolist() == [[True, False, False, False]]


def test_one_dimensional_logits():
    logits = random_logits((1, 31), 3)
    for ours, theirs in [
        (top_k_filter(logits[0], 4), hf(lp.TopKLogitsWarper(top_k=4), logits)),
        (top_p_filter(logits[0], 0.8), hf(lp.TopPLogitsWarper(top_p=0.8), logits)),
        (min_p_filter(logits[0], 0.1), hf(lp.MinPLogitsWarper(min_p=0.1), logits)),
    ]:
        assert ours.shape == (31,)
        assert_same_filter(ours[None], theirs, logits)


def test_filters_pass_through_minus_inf():
    """Logits already at -inf (an earlier filter) stay removed and do not disturb the others."""
    logits = random_logits((3, 12), 5)
    logits[:, ::3] = NEG_INF
    for k in (2, 5, 10, 12):
        assert_same_filter(top_k_filter(logits, k), hf(lp.TopKLogitsWarper(top_k=k), logits), logits)
    for p in (0.3, 0.9, 1.0):
        assert_same_filter(top_p_filter(logits, p), hf(lp.TopPLogitsWarper(top_p=p), logits), logits)
        assert_same_filter(min_p_filter(logits, p), hf(lp.MinPLogitsWarper(min_p=p), logits), logits)


def test_bfloat16_input():
    for seed in range(4):
        x = random_logits((3, 257), seed).bfloat16()
        ref = x.float()  # generate casts logits to float32 before the warpers
        assert_same_filter(top_k_filter(x, 7), hf(lp.TopKLogitsWarper(top_k=7), ref), x)
        assert_same_filter(top_p_filter(x, 0.9), hf(lp.TopPLogitsWarper(top_p=0.9), ref), x)
        assert_same_filter(min_p_filter(x, 0.05), hf(lp.MinPLogitsWarper(min_p=0.05), ref), x)
        t = apply_temperature(x, 0.7)
        assert t.dtype == torch.bfloat16 and torch.equal(t, x / 0.7)
        ids = torch.randint(0, 257, (3, 9), generator=torch.Generator().manual_seed(seed))
        r = apply_repetition_penalty(x, ids, 1.3)
        assert r.dtype == torch.bfloat16
        assert torch.equal(r, lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()))
        tok = sample_next_token(x, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02,
                                generator=torch.Generator().manual_seed(seed))
        assert tok.dtype == torch.long and tok.shape == (3,)
        assert torch.equal(sample_next_token(x, temperature=0), ref.argmax(-1))
    f = filter_logits(x, temperature=0.5, top_k=3)
    assert f.dtype == torch.float32


# ------------------------------------------------------------------ temperature and repetition penalty


@pytest.mark.parametrize("temperature", [0.1, 0.5, 0.7, 1.0, 1.5, 3.0])
def test_temperature_matches_transformers(temperature):
    for seed in range(4):
        logits = random_logits((3, 50), seed)
        ours = apply_temperature(logits, temperature)
        theirs = lp.TemperatureLogitsWarper(float(temperature))(None, logits.clone())
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("penalty", [0.5, 0.9, 1.0, 1.2, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        V = [1, 7, 50, 333][seed % 4]
        logits = torch.randn(3, V, generator=g) * 3
        # repeated ids, and a few ids beyond the output vocabulary (ignored by both)
        ids = torch.randint(0, V + 3, (3, 17), generator=g)
        ours = apply_repetition_penalty(logits, ids, penalty)
        theirs = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        assert torch.equal(ours, theirs)
        # 1-D form
        assert torch.equal(apply_repetition_penalty(logits[1], ids[1], penalty), theirs[1])


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    ids = torch.tensor([[0, 1, 1, 1, 4]])  # token 1 three times: penalised once
    out = apply_repetition_penalty(logits, ids, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0, 0.0]]
    assert logits.tolist() == [[2.0, -2.0, 2.0, -2.0, 0.0]]  # input untouched


# ------------------------------------------------------------------ sampling


def test_filter_logits_matches_transformers_chain():
    def chain(t, k, p, mp):  # the warpers generate builds, in its order
        warpers = [lp.TemperatureLogitsWarper(t), lp.TopKLogitsWarper(k)]
        return lp.LogitsProcessorList(warpers + [lp.TopPLogitsWarper(p), lp.MinPLogitsWarper(mp)])

    for seed in range(6):
        for kind in ("normal", "ties"):
            logits = random_logits((4, 64), seed, kind)
            for t, k, p, mp in [(0.7, 10, 0.9, 0.05), (1.3, 40, 0.5, 0.0), (1.0, 5, 0.99, 0.2)]:
                ours = filter_logits(logits, temperature=t, top_k=k, top_p=p, min_p=mp)
                theirs = hf(chain(t, k, p, mp), logits)
                assert torch.equal(ours == NEG_INF, theirs == NEG_INF)
                assert torch.equal(ours[ours != NEG_INF], theirs[theirs != NEG_INF])


def test_temperature_zero_is_argmax():
    for seed in range(5):
        logits = random_logits((6, 40), seed)
        greedy = logits.argmax(-1)
        assert torch.equal(sample_next_token(logits, temperature=0), greedy)
        assert torch.equal(sample_next_token(logits, temperature=0, top_k=3, top_p=0.5, min_p=0.1), greedy)
        # a tiny positive temperature concentrates all the mass on the argmax
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next_token(logits, temperature=1e-4, generator=g), greedy)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert sample_next_token(ties, temperature=0).tolist() == [1]  # first index among ties
    assert sample_next_token(ties[0], temperature=0).shape == ()


def test_top_k_one_is_always_argmax():
    g = torch.Generator().manual_seed(0)
    logits = random_logits((500, 30), 1)  # no ties in Gaussian logits
    for temperature in (0.5, 1.0, 5.0):
        assert torch.equal(sample_next_token(logits, temperature, top_k=1, generator=g), logits.argmax(-1))


def test_generator_makes_draws_reproducible():
    logits = random_logits((8, 100), 2)
    a = sample_next_token(logits, 1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits, 1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05),
    ],
)
def test_empirical_distribution_matches_filtered_softmax(settings):
    V, n = 11, 40_000
    row = random_logits((1, V), 11)[0]
    expected = torch.softmax(filter_logits(row, **settings), -1).double()
    logits = row.expand(n, V)  # n independent draws from the same row in one call
    tokens = sample_next_token(logits, generator=torch.Generator().manual_seed(1234), **settings)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    support = expected > 0
    e = expected[support] * n
    chi2 = (((counts[support] - e) ** 2) / e).sum().item()
    df = int(support.sum()) - 1
    # far beyond the 99.99th percentile of chi-square(df) for df <= 10 (about 33)
    assert chi2 < df + 8 * math.sqrt(2 * df) + 10, (chi2, df)


def test_vocabulary_of_one():
    logits = torch.randn(3, 1)
    tokens = sample_next_token(logits, 1.0, top_k=5, top_p=0.1, min_p=1.0)
    assert torch.equal(tokens, torch.zeros(3, dtype=torch.long))
    assert torch.equal(top_p_filter(logits, 0.01), logits)


# ------------------------------------------------------------------ bad input


def test_bad_input_errors():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="top-p"):
        top_p_filter(x, 0.0)
    with pytest.raises(ValueError, match="top-p"):
        top_p_filter(x, 1.5)
    with pytest.raises(ValueError, match="top-p"):
        top_p_filter(x, -0.1)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        top_p_filter(x, 0.5, min_tokens_to_keep=0)
    with pytest.raises(ValueError, match="top-k"):
        top_k_filter(x, 0)
    with pytest.raises(ValueError, match="top-k"):
        top_k_filter(x, 2.0)
    with pytest.raises(ValueError, match="top-k"):
        top_k_filter(x, True)
    with pytest.raises(ValueError, match="min-p"):
        min_p_filter(x, 1.01)
    with pytest.raises(ValueError, match="min-p"):
        min_p_filter(x, -0.01)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        apply_temperature(x, -1.0)
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(x, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_next_token(x, temperature=-0.5)
    with pytest.raises(ValueError, match="repetition penalty"):
        apply_repetition_penalty(x, torch.zeros(2, 3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="repetition penalty"):
        apply_repetition_penalty(x, torch.zeros(2, 3, dtype=torch.long), -1.2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        apply_repetition_penalty(x, torch.zeros(3, 3, dtype=torch.long), 1.2)
    with pytest.raises(ValueError, match="negative token ids"):
        apply_repetition_penalty(x, torch.full((2, 3), -100), 1.2)
    with pytest.raises(ValueError, match="integer"):
        apply_repetition_penalty(x, torch.zeros(2, 3), 1.2)
    with pytest.raises(ValueError, match=r"\[V\] or \[B, V\]"):
        top_k_filter(torch.randn(2, 3, 10), 2)
    with pytest.raises(ValueError, match=r"\[V\] or \[B, V\]"):
        sample_next_token(torch.tensor(1.0))
    with pytest.raises(ValueError, match="floating-point"):
        top_p_filter(torch.ones(2, 5, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="top-k"):
        sample_next_token(x, top_k=0)
    with pytest.raises(ValueError, match="top-p"):
        sample_next_token(x, top_p=0.0)
    with pytest.raises(ValueError, match="min-p"):
        sample_next_token(x, min_p=2.0)
    with pytest.raises(ValueError, match="all -inf"):
        sample_next_token(torch.full((2, 4), NEG_INF))
