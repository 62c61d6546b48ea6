"""The assembled Llama against Hugging Face LlamaForCausalLM: keys, logits, loading, KV cache, padding."""

import json

import pytest
import torch
import transformers

from llama_from_scratch.attention import KVCache
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.lora import apply_lora
from llama_from_scratch.loss import cross_entropy
from llama_from_scratch.model import Llama, TransformerBlock

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

CONFIGS = {
    "tiny-gqa-tied": LlamaConfig.tiny(),
    "mha-untied-llama3": LlamaConfig.tiny(n_kv_heads=4, tie_embeddings=False, rope_theta=500000.0,
                                          rope_scaling=LLAMA3_SCALING, max_seq_len=256),
    "odd-mqa": LlamaConfig(vocab_size=37, dim=36, n_layers=3, n_heads=3, n_kv_heads=1, hidden_dim=50,
                           norm_eps=1e-6, max_seq_len=40),
}


def hf_model(config: LlamaConfig, attn: str = "eager") -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(**config.to_hf())
    hf_config._attn_implementation = attn
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_equal_hf(name):
    config = CONFIGS[name]
    ours, ref = Llama(config), hf_model(config)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    assert "lm_head.weight" in ours_sd
    if config.tie_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert not any("rope" in key for key in ours_sd)  # RoPE tables are non-persistent buffers


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_weights_into_ours_same_logits(name):
    torch.manual_seed(0)
    config = CONFIGS[name]
    ref = hf_model(config)
    ours = Llama(config).eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, min(17, config.max_seq_len)))
    with torch.no_grad():
        expected = ref(ids).logits
        # SDPA (fused kernel) vs HF's eager attention: float32 rounding (measured ~2e-7).
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-5)
        ours.set_use_sdpa(False)  # the from-scratch attention: HF eager's operations, same order
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_our_weights_into_hf_same_logits(name):
    torch.manual_seed(1)
    config = CONFIGS[name]
    ours = Llama(config).eval()
    ref = hf_model(config, attn="sdpa")
    result = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, config.vocab_size, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-5)


def test_bfloat16_close_to_hf():
    torch.manual_seed(2)
    config = LlamaConfig.tiny()
    ours = Llama(config).eval()
    ref = hf_model(config)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = ours(ids)
        assert logits.dtype == torch.bfloat16
        # Logits have magnitude ~0.1 here; bfloat16 keeps ~3 significant digits.
        torch.testing.assert_close(logits.float(), ref(ids).logits.float(), rtol=0, atol=2e-2)


def test_parameter_count_smollm2_135m_on_meta():
    config = LlamaConfig.smollm2_135m()
    with torch.device("meta"):
        ours = Llama(config)
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters()) == 134_515_008
    assert ours.num_parameters(trainable_only=True) == 134_515_008
    # Tied embedding counted once: the naive count over the state_dict counts it twice.
    assert sum(v.numel() for v in ours.state_dict().values()) == 134_515_008 + 49152 * 576


def test_init_like_hf():
    torch.manual_seed(3)
    model = Llama(LlamaConfig.tiny(dim=128, hidden_dim=512, vocab_size=1024))
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 2e-3
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 2e-3
    assert torch.equal(model.model.norm.weight, torch.ones(128))
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(128))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_kv_cache_incremental_logits_equal_full_forward(use_sdpa):
    torch.manual_seed(4)
    config = CONFIGS["mha-untied-llama3"]
    model = Llama(config).eval()
    model.set_use_sdpa(use_sdpa)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.make_kv_cache(batch_size=2, max_seq_len=16)
        steps = [model(ids[:, :5], 0, cache)]
        for t in range(5, 12):
            steps.append(model(ids[:, t : t + 1], t, cache))
    assert cache.seq_len == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_left_padded_batch_equals_unpadded_sequences():
    torch.manual_seed(5)
    config = LlamaConfig.tiny()
    model = Llama(config).eval()
    seqs = [torch.randint(3, config.vocab_size, (n,)) for n in (7, 3, 5)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(3, T, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    with torch.no_grad():
        for use_sdpa in (True, False):
            model.set_use_sdpa(use_sdpa)
            batched = model(ids, attention_mask=mask)
            assert torch.isfinite(batched).all()  # padding positions too (they attend to themselves)
            for b, s in enumerate(seqs):
                alone = model(s[None])
                torch.testing.assert_close(batched[b, T - len(s) :], alone[0], rtol=0, atol=1e-5)

        # The same with a KV cache: padded prefill, then two decoding steps with a growing mask.
        model.set_use_sdpa(True)
        cache = model.make_kv_cache(3, max_seq_len=T + 2)
        model(ids, 0, cache, attention_mask=mask)
        nxt = torch.tensor([[5], [6], [7]])
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step1 = model(nxt, T, cache, attention_mask=mask)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        step2 = model(nxt + 1, T + 1, cache, attention_mask=mask)
        for b, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[b], nxt[b] + 1])[None])
            torch.testing.assert_close(step1[b, 0], alone[0, -2], rtol=0, atol=1e-5)
            torch.testing.assert_close(step2[b, 0], alone[0, -1], rtol=0, atol=1e-5)


def test_padded_batch_equals_hf_with_same_positions():
    torch.manual_seed(6)
    config = LlamaConfig.tiny()
    ours, ref = Llama(config).eval(), hf_model(config)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what HF's generate passes
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_from_hf_round_trip_via_save_pretrained(tmp_path, tied):
    torch.manual_seed(7)
    config = LlamaConfig.tiny(tie_embeddings=tied)
    ref = hf_model(config)
    # Untied: force several shards (model.safetensors.index.json), tied: one model.safetensors.
    ref.save_pretrained(tmp_path, max_shard_size="100KB" if not tied else "50MB")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert ("model.safetensors.index.json" in files) == (not tied)
    model = Llama.from_hf(tmp_path)
    assert model.config == config
    assert model.lm_head.weight.device.type == "cpu" and model.model.rope_cos.device.type == "cpu"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-5)
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())
    bf16 = Llama.from_hf(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Llama.from_hf(tmp_path / "nope")
    config = LlamaConfig.tiny(tie_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        Llama.from_hf(tmp_path)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in Llama(config).state_dict().items()}
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\].*unexpected keys \['model.extra"):
        Llama.from_hf(tmp_path)


def test_input_validation():
    model = Llama(LlamaConfig.tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="sequence too long.*max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=13)
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="KV cache has"):
        model(torch.zeros(2, 5, dtype=torch.long), kv_cache=model.make_kv_cache(3))
    with pytest.raises(ValueError, match="exceeds"):
        model.make_kv_cache(1, max_seq_len=17)


def test_edge_cases_single_token_and_batch_one():
    torch.manual_seed(8)
    config = CONFIGS["odd-mqa"]
    ours, ref = Llama(config).eval(), hf_model(config)
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for shape in [(1, 1), (1, 40), (4, 1)]:
            ids = torch.randint(0, config.vocab_size, shape)
            logits = ours(ids)
            assert logits.shape == (*shape, config.vocab_size)
            torch.testing.assert_close(logits, ref(ids).logits, rtol=0, atol=1e-5)
        ids = torch.randint(0, config.vocab_size, (1, 3)).int()  # int32 ids are fine too
        assert ours(ids).shape == (1, 3, 37)


def test_make_kv_cache_defaults_and_block():
    model = Llama(LlamaConfig.tiny()).to(torch.bfloat16)
    cache = model.make_kv_cache(2, max_seq_len=8)
    assert isinstance(cache, KVCache) and cache.dtype == torch.bfloat16
    assert cache.k.shape == (2, 2, 2, 8, 16)
    assert model.make_kv_cache(1).max_seq_len == 128
    assert isinstance(model.model.layers[0], TransformerBlock)


def test_gradients_reach_every_parameter():
    model = Llama(LlamaConfig.tiny())
    ids = torch.randint(0, 256, (2, 8))
    model(ids).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_logits_to_keep_returns_the_last_positions_only():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model(ids)
    for keep in (1, 3, 9):
        last = model(ids, logits_to_keep=keep)
        assert last.shape == (2, keep, model.config.vocab_size)
        torch.testing.assert_close(last, full[:, -keep:], rtol=0, atol=1e-6)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)


# ----- the training loss: model(x, targets=y) ------------------------------------------------


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CONFIGS)
def test_targets_loss_and_gradients_equal_hf_labels_loss(name):
    # Independent reference: transformers' own loss (labels already shifted: shift_labels),
    # with -100 targets (padding, masked prompt) in the batch and one sequence of length 1.
    config = CONFIGS[name]
    torch.manual_seed(0)
    ours = Llama(config)
    ref = hf_model(config, attn="sdpa")
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(0, config.vocab_size, (3, 11))
    y = torch.randint(0, config.vocab_size, (3, 11))
    y[0, :4] = -100
    y[2, 5:] = -100
    loss = ours(x, targets=y)
    ref_loss = ref(input_ids=x, labels=y, shift_labels=y).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    ref_grads = _grads(ref)
    for n, g in _grads(ours).items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    one = torch.randint(0, config.vocab_size, (1, 1))
    torch.testing.assert_close(ours(one, targets=one), ref(input_ids=one, labels=one, shift_labels=one).loss,
                               rtol=1e-6, atol=1e-6)


def test_targets_loss_never_stores_the_full_logits():
    # The chunked loss computes the gradients in the forward pass: nothing of size [B, T, V] is
    # saved for backward (the unfused loss saves the logits' softmax, B*T*V numbers).
    config = LlamaConfig.tiny(vocab_size=512)
    model = Llama(config)
    x = torch.randint(0, 512, (2, 33))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(x, targets=x)
    assert max(saved) < 2 * 33 * 512
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        cross_entropy(model(x), x)
    assert max(saved) >= 2 * 33 * 512  # the check above can fail


def test_targets_loss_under_bf16_autocast_and_with_a_wrapped_lm_head():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, targets=x)
        expected = cross_entropy(model(x).float(), x)  # bf16 logits, float32 loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    apply_lora(model, target_modules=("lm_head",), r=2)
    torch.testing.assert_close(model(x, targets=x), cross_entropy(model(x), x), rtol=1e-6, atol=1e-6)


def test_targets_bad_input():
    model = Llama(LlamaConfig.tiny())
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, targets=x, logits_to_keep=1)
    with pytest.raises(ValueError, match="targets of shape"):
        model(x, targets=x[:, 1:])
    with pytest.raises(ValueError):
        model(x, targets=torch.full_like(x, model.config.vocab_size))  # a target outside the vocabulary
