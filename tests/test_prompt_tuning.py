"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT.

The reference is PEFT's ``PeftModelForCausalLM`` (``PromptTuningConfig``, ``PromptEncoderConfig``,
``PrefixTuningConfig``) over transformers' ``LlamaForCausalLM`` holding our tiny model's weights.
Our wrapper's learned parameters (made non-trivial first) are loaded into PEFT's prompt encoder by
name; then the logits of the real tokens, the gradients of every learned parameter and the
trainable-parameter counts must agree. Measured on CPU (torch 2.13, transformers 5, PEFT 0.21),
float32: the logits are equal bit for bit (max |diff| 0 for all five configurations, while the
virtual tokens move the logits by 0.5 to 1.0). The tolerances (2e-5) leave room for other
kernels and are far below the effect of the mistakes the chapter's exercise lists (RoPE on the
prefix keys, a masked prefix, unshifted positions).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.hf_export import hf_state_dict
from llama_from_scratch.model import Llama
from llama_from_scratch.prompt_tuning import (
    PrefixCache,
    PrefixEncoder,
    PrefixTuning,
    PromptEmbedding,
    PromptEncoder,
    PromptTuning,
    PTuning,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

P = 5  # virtual tokens


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.tiny(**overrides)).eval()
    with torch.no_grad():  # RMSNorm gains of 1 would hide a norm under the wrong name
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_copy(model: Llama):
    """transformers' LlamaForCausalLM with our weights."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf()))
    hf.load_state_dict(hf_state_dict(model), strict=False)
    hf.tie_weights()
    return hf.eval()


METHODS = {  # name -> (our wrapper, its kwargs, PEFT config class, its kwargs)
    "prompt-tuning": (PromptTuning, {}, "PromptTuningConfig", {}),
    "p-tuning-mlp": (PTuning, {"encoder_hidden_size": 24}, "PromptEncoderConfig",
                     {"encoder_hidden_size": 24, "encoder_reparameterization_type": "MLP"}),
    "p-tuning-lstm": (PTuning, {"encoder_type": "LSTM", "encoder_hidden_size": 12}, "PromptEncoderConfig",
                      {"encoder_hidden_size": 12, "encoder_reparameterization_type": "LSTM"}),
    "prefix": (PrefixTuning, {}, "PrefixTuningConfig", {}),
    "prefix-projection": (PrefixTuning, {"prefix_projection": True, "encoder_hidden_size": 20}, "PrefixTuningConfig",
                          {"prefix_projection": True, "encoder_hidden_size": 20}),
}


def make_pair(method: str, seed: int = 0, **overrides):
    """Our wrapper and PEFT's, same base weights, same (randomized) learned parameters."""
    cls, kwargs, config_name, peft_kwargs = METHODS[method]
    base = tiny_llama(seed, **overrides)
    ours = cls(copy.deepcopy(base), P, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # scaled so that the virtual tokens change the logits visibly but sanely
        for p in ours.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    config = getattr(peft, config_name)(task_type="CAUSAL_LM", num_virtual_tokens=P, **peft_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(hf_copy(base), config)
    ref.prompt_encoder["default"].load_state_dict(ours.prompt_encoder.state_dict())
    ref.eval()
    return base, ours, ref


def ids(batch: int = 3, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_logits(ref, method: str, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = ref(input_ids=x, attention_mask=mask, **kwargs).logits
    return logits if method.startswith("prefix") else logits[:, P:]  # prepended methods return P + T rows


TOL = dict(rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_logits_equal_peft_without_padding(method):
    base, ours, ref = make_pair(method)
    x = ids()
    with torch.no_grad():
        got, expected = ours(x), peft_logits(ref, method, x)
        assert got.shape == (3, 11, 256)
        torch.testing.assert_close(got, expected, **TOL)
        assert (got - base(x)).abs().max() > 1e-2  # the virtual tokens do change the output
        torch.testing.assert_close(ref.get_base_model()(x).logits, base(x), rtol=0, atol=1e-6)  # same weights
        # an all-ones mask changes nothing
        torch.testing.assert_close(ours(x, attention_mask=torch.ones_like(x)), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_logits_equal_peft_with_right_padding(method):
    """Chapter 9's batches: right padding. Real tokens have the same positions in both conventions."""
    _, ours, ref = make_pair(method, seed=3)
    x = ids(batch=4, length=9, seed=1)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        got, expected = ours(x, attention_mask=mask), peft_logits(ref, method, x, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], **TOL)


@pytest.mark.parametrize("method", list(METHODS))
def test_left_padding_equals_peft_given_positions_and_the_unpadded_row(method):
    """Left padding: ours counts positions over real tokens. PEFT's prefix tuning takes explicit
    ``position_ids`` (it adds P); for the prepended methods PEFT drops position ids, so the
    reference is transformers' model fed PEFT's own prompt (``get_prompt``) at our positions.
    Either way a padded row also equals the same row alone."""
    _, ours, ref = make_pair(method, seed=5)
    x = ids(batch=3, length=10, seed=2)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[1, :1] = 0
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(x, attention_mask=mask)
        if method.startswith("prefix"):
            expected = peft_logits(ref, method, x, mask, position_ids=positions)
        else:
            prompt = ref.get_prompt(batch_size=3)
            embeds = torch.cat([prompt, ref.word_embeddings(x)], dim=1)
            full_mask = torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], dim=1)
            full_positions = torch.cat([torch.arange(P).expand(3, P), positions + P], dim=1)
            expected = ref.base_model(inputs_embeds=embeds, attention_mask=full_mask,
                                      position_ids=full_positions).logits[:, P:]
        torch.testing.assert_close(got[real], expected[real], **TOL)
        alone = ours(x[0:1, 4:])
    torch.testing.assert_close(got[0, 4:], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_equal_peft_and_reach_only_the_virtual_token_parameters(method):
    _, ours, ref = make_pair(method, seed=7)
    x = ids(batch=2, length=8, seed=3)
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    weights = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(0))
    ours.train(), ref.train()  # no dropout anywhere here: train mode only enables autograd paths
    (ours(x, attention_mask=mask) * weights * mask[..., None]).sum().backward()
    (peft_logits(ref, method, x, mask) * weights * mask[..., None]).sum().backward()
    trained = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("prompt_encoder.") for n in trained)
    assert all(p.grad is None for p in ours.model.parameters())
    theirs = dict(ref.prompt_encoder["default"].named_parameters())
    for name, grad in trained.items():
        expected = theirs[name.removeprefix("prompt_encoder.")].grad
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("method", list(METHODS))
def test_trainable_parameter_counts_equal_peft(method):
    _, ours, ref = make_pair(method)
    trainable, total = ref.get_nb_trainable_parameters()
    assert ours.num_parameters(trainable_only=True) == trainable
    assert ours.num_parameters() == total


def test_parameter_count_formulas():
    """The counts of the chapter's table, by formula (tiny model: dim 64, 2 layers, kv_dim 32)."""
    model = tiny_llama()
    dim, layers, kv = 64, 2, 32
    assert PromptTuning(copy.deepcopy(model), P).num_parameters(True) == P * dim
    assert PrefixTuning(copy.deepcopy(model), P).num_parameters(True) == P * layers * 2 * kv
    h = 24
    mlp = PTuning(copy.deepcopy(model), P, encoder_hidden_size=h).num_parameters(True)
    assert mlp == P * dim + (dim * h + h) + (h * h + h) + (h * dim + dim)
    proj = PrefixTuning(copy.deepcopy(model), P, prefix_projection=True, encoder_hidden_size=h).num_parameters(True)
    assert proj == P * kv + (kv * h + h) + (h * layers * 2 * kv + layers * 2 * kv)


def test_targets_loss_equals_cross_entropy_of_the_logits():
    from llama_from_scratch.loss import cross_entropy

    for method in ("prompt-tuning", "prefix"):
        _, ours, _ = make_pair(method)
        x = ids(batch=2, length=9)
        targets = torch.roll(x, -1, dims=1)
        targets[:, -1] = -100
        with torch.no_grad():
            torch.testing.assert_close(ours(x, targets=targets), cross_entropy(ours(x), targets), rtol=1e-6, atol=1e-6)


def test_prefix_keys_are_not_rotated_and_positions_start_after_the_prefix():
    """Internal check of PrefixCache: what attention receives is the prefix exactly as learned,
    followed by the real tokens' keys rotated at positions P, P + 1, ... (a KV cache's keys)."""
    model = tiny_llama()
    wrapper = PrefixTuning(copy.deepcopy(model), P)
    keys, values = wrapper.prefix()
    seen = []
    cache = PrefixCache(keys, values, batch_size=2)
    original = cache.update

    def spy(layer_idx, k, v, start_pos):
        out = original(layer_idx, k, v, start_pos)
        seen.append((layer_idx, start_pos, out))
        return out

    cache.update = spy
    x = ids(batch=2, length=6)
    with torch.no_grad():
        model.model(x, start_pos=P, kv_cache=cache)
    assert [s[:2] for s in seen] == [(0, P), (1, P)]
    for layer_idx, _, (k, v) in seen:
        assert k.shape == (2, 2, P + 6, 16)
        assert torch.equal(k[:, :, :P], keys[layer_idx].expand(2, -1, -1, -1))
        assert torch.equal(v[:, :, :P], values[layer_idx].expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="start_pos=5"):
        cache.update(0, seen[0][2][0][:, :, P:], seen[0][2][1][:, :, P:], 0)


def test_initialised_from_tokens_equals_reading_those_tokens_first():
    """Internal consistency: prompt tuning initialised from tokens, and prefix tuning initialised
    from their keys and values (Li & Liang), both give the logits of the model reading those
    tokens before the input (same positions, same attention): prefix tuning *is* a KV cache."""
    model = tiny_llama()
    prefix_ids = [7, 3, 200, 41, 99]
    x = ids(batch=2, length=7)
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor([prefix_ids] * 2), x], dim=1))[:, P:]
        prompt = PromptTuning(copy.deepcopy(model), P, init="tokens", init_token_ids=prefix_ids)
        prefix = PrefixTuning(copy.deepcopy(model), P)
        prefix.init_from_tokens(prefix_ids)
        torch.testing.assert_close(prompt(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(prefix(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exactly num_virtual_tokens"):
        prefix.init_from_tokens(prefix_ids[:3])
    with pytest.raises(ValueError, match="prefix_projection=False"):
        PrefixTuning(copy.deepcopy(model), P, prefix_projection=True).init_from_tokens(prefix_ids)


def test_backbone_inputs_embeds_equals_input_ids():
    model = tiny_llama()
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        a = model.model(x, attention_mask=mask)
        b = model.model(None, attention_mask=mask, inputs_embeds=model.model.embed_tokens(x))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model.model(x, inputs_embeds=model.model.embed_tokens(x))
    with pytest.raises(ValueError, match="exactly one"):
        model.model(None)
    with pytest.raises(ValueError, match=r"\[batch, seq_len, 64\]"):
        model.model(None, inputs_embeds=torch.zeros(2, 3, 32))
    with pytest.raises(TypeError, match="float tensor"):
        model.model(None, inputs_embeds=torch.zeros(2, 3, 64, dtype=torch.long))


def test_initializations():
    model = tiny_llama()
    emb = model.model.embed_tokens
    torch.manual_seed(0)
    sampled = PromptEmbedding(7, emb, init="sample_vocab")()
    rows = (sampled[:, None, :] == emb.weight[None]).all(-1)
    assert rows.any(-1).all()  # every virtual token starts as some token's embedding
    tokens = PromptEmbedding(7, emb, init="tokens", init_token_ids=[5, 9, 11])()
    assert torch.equal(tokens, emb.weight[[5, 9, 11, 5, 9, 11, 5]])  # PEFT's TEXT rule: repeat, then cut
    assert torch.equal(PromptEmbedding(2, emb, init="tokens", init_token_ids=[5, 9, 11])(), emb.weight[[5, 9]])
    random = PromptEmbedding(400, emb)()
    assert abs(random.std().item() - 1) < 0.05  # nn.Embedding's N(0, 1), PEFT's RANDOM
    projection = PrefixEncoder(3, 2, 32, prefix_projection=True)
    assert projection().shape == (3, 128) and projection.embedding.weight.shape == (3, 32)
    assert PromptEncoder(3, 64, encoder_type="LSTM")().shape == (3, 64)


def test_bfloat16_model_runs():
    model = tiny_llama().to(torch.bfloat16)
    for wrapper in (PromptTuning(copy.deepcopy(model), P), PrefixTuning(copy.deepcopy(model), P)):
        out = wrapper(ids(batch=2, length=4))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert wrapper.prompt_encoder.embedding.weight.dtype == torch.float32


def test_bad_configs_and_inputs_raise():
    model = tiny_llama()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuning(copy.deepcopy(model), 0)
    with pytest.raises(ValueError, match="init must be"):
        PromptTuning(copy.deepcopy(model), 3, init="text")
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(copy.deepcopy(model), 3, init="tokens")
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(copy.deepcopy(model), 3, init="random", init_token_ids=[1])
    with pytest.raises(ValueError, match=r"in \[0, 256\)"):
        PromptTuning(copy.deepcopy(model), 3, init="tokens", init_token_ids=[300])
    with pytest.raises(ValueError, match="encoder_type"):
        PTuning(copy.deepcopy(model), 3, encoder_type="GRU")
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PTuning(copy.deepcopy(model), 3, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="needs prefix_projection"):
        PrefixTuning(copy.deepcopy(model), 3, encoder_hidden_size=16)
    with pytest.raises(TypeError, match="Llama"):
        PromptTuning(torch.nn.Linear(2, 2), 3)  # type: ignore[arg-type]
    wrapper = PrefixTuning(copy.deepcopy(model), 3)
    x = ids(batch=2, length=5)
    with pytest.raises(ValueError, match="attention_mask"):
        wrapper(x, attention_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        wrapper(x.float())
    with pytest.raises(ValueError, match="max_seq_len"):  # P + T must fit in the context
        wrapper(ids(batch=1, length=126))
    with pytest.raises(ValueError, match="max_seq_len"):
        PromptTuning(copy.deepcopy(model), 3)(ids(batch=1, length=126))
    with pytest.raises(ValueError, match="n_layers, n_kv_heads"):
        PrefixCache(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), 1)
