"""AdamW, cosine schedule, gradient clipping and GaLore (chapter 8) against torch's own."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama
from llama_from_scratch.optim import (AdamW, GaLoreAdamW, clip_grad_norm, cosine_schedule, galore_param_groups,
                                      optimizer_state_bytes, weight_decay_groups)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second OpenMP thread only adds contention on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                  max_seq_len=32))


def groups(model):
    g = weight_decay_groups(model, 0.1)
    g[1].update(lr=3e-3, betas=(0.8, 0.99), eps=1e-6)  # a second group with its own settings
    return g


def test_adamw_equals_torch_for_20_steps_with_groups_and_decay():
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    ours, ref = AdamW(groups(m1), lr=1e-2), torch.optim.AdamW(groups(m2), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 64, (4, 16), generator=g)
        for model, opt in ((m1, ours), (m2, ref)):
            cross_entropy(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)
    for a, b in zip(ours.state.values(), ref.state.values()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)


def test_adamw_state_dict_round_trips_with_torch():
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    ours = AdamW(m1.parameters(), lr=1e-2, weight_decay=0.05)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        cross_entropy(m1(x), x).backward()
        ours.step()
        ours.zero_grad()
    m2.load_state_dict(m1.state_dict())
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.05)
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))  # our checkpoint continues in torch's optimizer
    again = AdamW(m1.parameters(), lr=0.0)
    again.load_state_dict(copy.deepcopy(ours.state_dict()))  # and in a fresh one of ours (lr comes from the state)
    assert again.param_groups[0]["lr"] == 1e-2
    for model, opt in ((m1, again), (m2, ref)):
        cross_entropy(model(x), x).backward()
        opt.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1e-8}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            AdamW(p, **kwargs)


@pytest.mark.parametrize("tile_size", [1, 7, 1000, 2 ** 18])
def test_adamw_tiles_are_bit_identical_to_torch(tile_size):
    # Sizes around the tile boundary (one short, exact, one over, several tiles with a tail),
    # a 0-element and a 1-element parameter, and a strided (transposed) parameter that cannot be
    # cut into flat tiles.
    g = torch.Generator().manual_seed(3)
    shapes = [(999,), (1000,), (1001,), (10_007,), (0,), (1,), (37, 53)]
    ours_params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ours_params.append(torch.nn.Parameter(torch.randn(40, 30, generator=g).t()))
    assert not ours_params[-1].is_contiguous()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = AdamW(ours_params, lr=3e-2, weight_decay=0.1, tile_size=tile_size)
    ref = torch.optim.AdamW(ref_params, lr=3e-2, weight_decay=0.1)
    for _ in range(5):
        for a, b in zip(ours_params, ref_params):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], ref.state[b][key], rtol=0, atol=0)


def test_adamw_rejects_a_bad_tile_size():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="tile_size"):
            AdamW(p, tile_size=bad)


def test_cosine_schedule_values():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert cosine_schedule(0, **kw) == pytest.approx(0.1)       # (0 + 1) / 10: never a zero-lr step
    assert cosine_schedule(4, **kw) == pytest.approx(0.5)
    assert cosine_schedule(9, **kw) == pytest.approx(1.0)       # last warmup step reaches max_lr
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)      # decay starts at max_lr
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)     # half way: the mean of max and min
    assert cosine_schedule(109, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.99)))
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)     # the end and beyond: the floor
    assert cosine_schedule(10_000, **kw) == pytest.approx(0.1)
    values = [cosine_schedule(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))      # monotone decay
    assert cosine_schedule(0, 1.0, 0.0, 0, 10) == pytest.approx(1.0)  # no warmup


@pytest.mark.parametrize("bad", [dict(step=-1), dict(min_lr=2.0), dict(warmup_steps=200), dict(step=1.5),
                                 dict(max_lr=-1.0, min_lr=-2.0)])
def test_cosine_schedule_validates(bad):
    kw = dict(step=0, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=100)
    kw.update(bad)
    with pytest.raises(ValueError):
        cosine_schedule(**kw)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_equals_torch(norm_type, max_norm):
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    torch.manual_seed(3)
    for i, (p1, p2) in enumerate(zip(m1.parameters(), m2.parameters())):
        if i == 1:
            continue  # a parameter without a gradient is skipped by both
        p1.grad = torch.randn_like(p1) * (i + 1)
        p2.grad = p1.grad.clone()
    ours = clip_grad_norm(m1.parameters(), max_norm, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(m2.parameters(), max_norm, norm_type)
    torch.testing.assert_close(ours, ref)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert (p1.grad is None) == (p2.grad is None)
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad)


def test_clip_grad_norm_edge_cases():
    p = torch.nn.Parameter(torch.ones(3))
    assert clip_grad_norm([p], 1.0).item() == 0.0  # no gradients at all
    p.grad = torch.full((3,), float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm(p, 1.0, error_if_nonfinite=True)


def _toy_regression(opt_factory, steps=60):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Tanh(), torch.nn.Linear(48, 16))
    x = torch.randn(128, 32)
    target = torch.randn(32, 16) @ torch.randn(16, 16) * 0.3
    y = torch.tanh(x @ target)
    opt = opt_factory(model)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses, optimizer_state_bytes(opt), opt, model


def test_galore_saves_state_memory_and_still_learns():
    def galore(model):
        return GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=20, scale=1.0, exclude=()), lr=1e-2,
                           weight_decay=0.0)

    adam_losses, adam_bytes, _, _ = _toy_regression(lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.0))
    losses, galore_bytes, opt, model = _toy_regression(galore)
    assert losses[-1] < 0.7 * losses[0]
    assert galore_bytes < 0.5 * adam_bytes
    # The 48 x 32 matrix (m >= n): moments are 48 x 4 and P = Vh[:4] is 4 x 32.
    state = opt.state[model[0].weight]
    assert state["exp_avg"].shape == (48, 4) and state["projector"].shape == (4, 32)
    # The 16 x 48 matrix (m < n): P = U[:, :4] is 16 x 4, moments 4 x 48.
    state = opt.state[model[2].weight]
    assert state["exp_avg"].shape == (4, 48) and state["projector"].shape == (16, 4)
    # The bias is not projected.
    assert opt.state[model[2].bias]["exp_avg"].shape == (16,)


def test_galore_update_lies_in_the_projected_subspace():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 5, "scale": 0.5}], lr=0.1, weight_decay=0.0)
    w.grad = torch.randn(20, 12)
    before = w.detach().clone()
    opt.step()
    P = opt.state[w]["projector"]  # [3, 12], orthonormal rows
    torch.testing.assert_close(P @ P.T, torch.eye(3), atol=1e-5, rtol=0)
    delta = w.detach() - before
    torch.testing.assert_close(delta - delta @ P.T @ P, torch.zeros_like(delta), atol=1e-6, rtol=0)
    U, S, Vh = torch.linalg.svd(w.grad)
    torch.testing.assert_close(P.abs(), Vh[:3].abs(), atol=1e-5, rtol=0)
    # The subspace is refreshed every update_proj_gap steps, and only then.
    for i in range(1, 6):
        w.grad = torch.randn(20, 12)
        old = opt.state[w]["projector"].clone()
        opt.step()
        assert torch.equal(old, opt.state[w]["projector"]) == (i % 5 != 0)


def test_galore_without_projected_params_is_adamw():
    m1 = tiny_model()
    m2 = copy.deepcopy(m1)
    ours = GaLoreAdamW(galore_param_groups(m1, rank=1000, weight_decay=0.1), lr=1e-2)
    assert all("rank" not in g for g in ours.param_groups)  # nothing is larger than rank 1000
    ref = torch.optim.AdamW(galore_param_groups(m2, rank=1000, weight_decay=0.1), lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(5):
        for model, opt in ((m1, ours), (m2, ref)):
            cross_entropy(model(x), x).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_galore_groups_pick_large_matrices_and_skip_embeddings():
    model = tiny_model()
    groups = galore_param_groups(model, rank=8)
    low = next(g for g in groups if "rank" in g)["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    picked = {names[id(p)] for p in low}
    assert picked and all("proj" in n for n in picked)
    assert not any("embed" in n or "norm" in n for n in picked)
    assert all(min(p.shape) > 8 for p in low)
    # Every trainable parameter is in exactly one group (the tied embedding once).
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
