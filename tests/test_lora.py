"""LoRA against Hugging Face PEFT: outputs, merged weights, parameter counts, gradients, errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.lora import LoRALinear, apply_lora, count_parameters, lora_parameters, merge_lora
from llama_from_scratch.model import Llama

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = {
    "default-qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp-suffix": ["mlp.up_proj", "down_proj"],
    "one-layer": ["layers.1.self_attn.o_proj"],
    "all-linear": ALL_SEVEN,
}


def tiny_llama(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny(**overrides)).to(dtype).eval()


def peft_module(peft_model, name):
    return peft_model.get_submodule("base_model.model." + name)


def randomize_and_copy_adapters(ours, ref, seed=1):
    """Gives every LoRA B a non-zero value (B = 0 would hide bugs) and copies A and B into PEFT."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert names
    with torch.no_grad():
        for name in names:
            layer = ours.get_submodule(name)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
            peft_layer = peft_module(ref, name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return names


def make_pair(targets, r=8, alpha=16, dropout=0.0, dtype=torch.float32, **overrides):
    base = tiny_llama(dtype=dtype, **overrides)
    ours = apply_lora(copy.deepcopy(base), target_modules=targets, r=r, alpha=alpha, dropout=dropout)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=ALL_SEVEN if targets == "all-linear" else list(targets))
    ref = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    return base, ours, ref


def test_lora_linear_init_and_formula():
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    layer = LoRALinear(base, r=4, alpha=12)
    assert layer.scaling == 3.0 and layer.lora_A.weight.shape == (4, 48) and layer.lora_B.weight.shape == (24, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5))
    bound = math.sqrt(2 / 6) * math.sqrt(3 / 48)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: starts as the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = F.linear(x, base.weight, base.bias) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 3.0
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
def test_outputs_equal_peft(targets):
    _, ours, ref = make_pair("all-linear" if targets is ALL_SEVEN else targets)
    randomize_and_copy_adapters(ours, ref)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids), rtol=0, atol=0)


def test_outputs_equal_peft_bfloat16():
    _, ours, ref = make_pair(["q_proj", "v_proj", "down_proj"], dtype=torch.bfloat16)
    randomize_and_copy_adapters(ours, ref)
    assert ours.get_submodule("model.layers.0.mlp.down_proj").lora_A.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out = ours(ids)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_equal_peft_merge_and_unload(dtype):
    base, ours, ref = make_pair(["q_proj", "k_proj", "v_proj", "up_proj"], r=4, alpha=32, dtype=dtype)
    randomize_and_copy_adapters(ours, ref)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        before = ours(ids)
    merged = merge_lora(ours)
    ref_merged = ref.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    ours_sd, ref_sd = merged.state_dict(), ref_merged.state_dict()
    assert list(ours_sd) == list(base.state_dict()) == list(ref_sd)
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], ref_sd[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(ours_sd["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    if dtype == torch.float32:  # the merged model computes what the adapted one did
        with torch.no_grad():
            torch.testing.assert_close(merged(ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_equal_peft(targets, tie):
    _, ours, ref = make_pair("all-linear" if targets is ALL_SEVEN else targets, r=8, tie_embeddings=tie)
    trainable, total = ref.get_nb_trainable_parameters()
    assert count_parameters(ours, trainable_only=True) == trainable
    assert count_parameters(ours) == total
    assert sum(p.numel() for p in lora_parameters(ours)) == trainable


def test_count_parameters_counts_tied_weights_once():
    tied, untied = tiny_llama(), tiny_llama(tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == 256 * 64
    assert count_parameters(tied) == sum(p.numel() for p in set(tied.parameters()))
    assert count_parameters(tied, trainable_only=True) == count_parameters(tied)
    # r * (in + out) per adapted layer: q and v of 2 layers (dim 64; v: 64 -> 2 kv heads * 16 = 32)
    apply_lora(tied, r=8)
    assert count_parameters(tied, trainable_only=True) == 2 * (8 * (64 + 64) + 8 * (64 + 32))


def test_peft_wraps_our_llama_forward_backward():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = torch.randint(0, 256, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 256)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_gradients_reach_only_adapters_and_training_changes_output():
    model = apply_lora(tiny_llama(), target_modules="all-linear", r=4).train()
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 12))
    for _ in range(3):
        loss = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    assert all(torch.count_nonzero(m.lora_B.weight) > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: dropout never touches base(x)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, base(x) + layer.lora_B(layer.lora_A(dropped)))
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + layer.lora_B(layer.lora_A(x)))


def test_dropout_matches_peft_with_same_seed():
    _, ours, ref = make_pair(["q_proj", "v_proj"], dropout=0.3)
    randomize_and_copy_adapters(ours, ref)
    ours.train()
    ref.train()
    ids = torch.randint(0, 256, (2, 8))
    torch.manual_seed(7)
    out = ours(ids)
    torch.manual_seed(7)
    torch.testing.assert_close(out, ref(ids), rtol=0, atol=0)


def test_merge_lora_replaces_only_adapted_layers_and_freezes():
    model = apply_lora(tiny_llama(), ["o_proj"])
    merge_lora(model)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert not model.model.layers[0].self_attn.o_proj.weight.requires_grad
    with pytest.raises(TypeError, match="containing"):
        merge_lora(LoRALinear(nn.Linear(4, 4)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_llama(), r=-1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match="GroupedQueryAttention"):
        apply_lora(tiny_llama(), target_modules=["self_attn"])
    with pytest.raises(ValueError, match="qkv_proj.*model.embed_tokens"):
        apply_lora(tiny_llama(), target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="empty"):
        apply_lora(tiny_llama(), target_modules=[])
    model = apply_lora(tiny_llama())
    with pytest.raises(TypeError, match="already"):
        apply_lora(model)


def test_single_string_target_and_suffix_matching_are_exact():
    model = apply_lora(tiny_llama(), target_modules="up_proj")
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    # "proj" is not a suffix after a dot of "q_proj": PEFT's rule matches whole name components
    with pytest.raises(ValueError):
        apply_lora(tiny_llama(), target_modules=["proj"])


def test_float64_merge_is_exact_like_peft():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(7, 5).double(), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    expected = layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
    assert layer.delta_weight().dtype == torch.float64
    assert torch.equal(layer.delta_weight(), expected)
