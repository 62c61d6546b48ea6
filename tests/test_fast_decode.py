"""The fast decoding path (``generate(..., compile=True)``, :mod:`llama_from_scratch.fast_decode`).

References: Hugging Face ``transformers``' ``LlamaForCausalLM.generate`` (greedy tokens, an
independent implementation) and this package's eager decoding loop (step logits, to rounding).
The fused step adds the same products in another order, so logits are compared with a tolerance
(float32: 1e-5 relative plus 1e-5 absolute, on logits of size ~10; bfloat16: 0.1), and tokens exactly.
Most tests run the fused step eagerly (fast); one compiles it with ``torch.compile``.
"""

import warnings

import pytest
import torch
import transformers

from llama_from_scratch import fast_decode
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.generation import _FastForward, _Forward, generate
from llama_from_scratch.lora import apply_lora
from llama_from_scratch.model import Llama

VOCAB = 96


def _model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Llama:
    torch.manual_seed(seed)
    config = LlamaConfig.tiny(**{"vocab_size": VOCAB, "max_seq_len": 64, **overrides})
    model = Llama(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)  # peaked next-token distributions: greedy choices are not near-ties
    return model.to(dtype)


def _prompts(batch: int, width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row r has width - r real tokens (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for row in range(batch):
        mask[row, : min(row, width - 1)] = 0
    return ids, mask


@pytest.fixture
def eager_step(monkeypatch):
    """Run the fused step without torch.compile (seconds instead of a compilation)."""
    monkeypatch.setattr(fast_decode, "compiled_decode_step", lambda: fast_decode.decode_step)


def _step_logits(forward, ids: torch.Tensor, new_tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the prefill and of each step fed the given new tokens."""
    out = [forward.step(ids)]
    seq = ids
    for t in range(new_tokens.shape[1]):
        seq = torch.cat([seq, new_tokens[:, t : t + 1]], dim=1)
        out.append(forward.step(seq))
    return out


@pytest.mark.parametrize("batch,width", [(1, 1), (1, 7), (3, 5), (4, 9)])
def test_fused_step_equals_the_eager_cached_forward(eager_step, batch, width):
    model = _model()
    ids, mask = _prompts(batch, width)
    mask_or_none = None if batch == 1 else mask
    new = torch.randint(1, VOCAB, (batch, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        slow = _step_logits(_Forward(model, batch, width + 12, mask_or_none, use_cache=True), ids, new)
        fast = _step_logits(_FastForward(model, batch, width + 12, mask_or_none), ids, new)
    assert len(slow) == len(fast) == 13
    for s, f in zip(slow, fast):
        assert s.dtype == f.dtype == torch.float32 and s.shape == f.shape == (batch, VOCAB)
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)
    # Tokens of a wrong position would not be within rounding: the check can fail.
    assert (slow[-1] - slow[-2]).abs().max() > 1e-2


def test_greedy_tokens_equal_transformers(eager_step):
    model = _model()
    hf_config = transformers.LlamaConfig(**model.config.to_hf())
    hf_config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_config).eval()
    ref.load_state_dict(model.state_dict())
    ref.generation_config.eos_token_id = ref.generation_config.bos_token_id = None
    ref.generation_config.pad_token_id = 0
    ids, mask = _prompts(3, 6)
    ours = generate(model, ids, 20, temperature=0, attention_mask=mask, compile=True)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(ours, theirs)


def test_sampling_and_eos_follow_the_default_path(eager_step):
    model = _model(seed=3)
    ids, mask = _prompts(4, 5, seed=4)
    kwargs = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, eos_token_id=[5, 7],
                  attention_mask=mask)
    slow = generate(model, ids, 30, generator=torch.Generator().manual_seed(0), **kwargs)
    fast = generate(model, ids, 30, generator=torch.Generator().manual_seed(0), compile=True, **kwargs)
    assert torch.equal(fast, slow)


def test_bfloat16_logits_within_rounding(eager_step):
    model = _model(dtype=torch.bfloat16)
    ids, mask = _prompts(2, 6)
    new = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        slow = _step_logits(_Forward(model, 2, 14, mask, use_cache=True), ids, new)
        fast = _step_logits(_FastForward(model, 2, 14, mask), ids, new)
    for s, f in zip(slow, fast):
        torch.testing.assert_close(f, s, rtol=0, atol=0.1)


def test_cache_length_rounds_up_but_not_past_the_model():
    model = _model(max_seq_len=300)
    forward = _FastForward(model, 1, 5, None)
    assert forward.prefill.cache.max_seq_len == 128
    assert _FastForward(model, 1, 129, None).prefill.cache.max_seq_len == 256
    assert _FastForward(model, 1, 290, None).prefill.cache.max_seq_len == 300  # capped at max_seq_len


def test_fused_weights_follow_changes_to_the_model(eager_step):
    model = _model()
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    before = generate(model, ids, 10, temperature=0, compile=True)
    first = fast_decode.fuse_weights(model)
    assert fast_decode.fuse_weights(model) is first  # reused while nothing changed
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.0)  # in place: the version counter moves
    assert fast_decode.fuse_weights(model) is not first
    after_fast = generate(model, ids, 10, temperature=0, compile=True)
    after_slow = generate(model, ids, 10, temperature=0)
    assert torch.equal(after_fast, after_slow)
    assert not torch.equal(after_fast, before)


def test_one_new_token_is_the_prefill_alone(eager_step):
    model = _model()
    ids = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(generate(model, ids, 1, temperature=0, compile=True), generate(model, ids, 1, temperature=0))


def test_refuses_what_it_cannot_fuse():
    model = _model()
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, compile=True, use_cache=False)
    apply_lora(model, target_modules=("q_proj",), r=2, alpha=4)
    with pytest.raises(ValueError, match="q_proj is a LoRALinear"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, compile=True)
    with pytest.raises(ValueError, match="needs a llama_from_scratch Llama"):
        fast_decode.fuse_weights(torch.nn.Linear(2, 2))


def test_falls_back_to_the_eager_step_when_compiling_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(fast_decode, "_compile_failed", False)
    monkeypatch.setattr(fast_decode, "compiled_decode_step", lambda: broken)
    model = _model()
    ids = torch.randint(1, VOCAB, (1, 4), generator=torch.Generator().manual_seed(8))
    with pytest.warns(RuntimeWarning, match="torch.compile of the decoding step failed.*InvalidCxxCompiler"):
        fast = generate(model, ids, 6, temperature=0, compile=True)
    assert torch.equal(fast, generate(model, ids, 6, temperature=0))
    assert fast_decode._compile_failed  # later calls go straight to the eager step


@pytest.mark.cxx_compiler
def test_compiled_step_gives_the_same_tokens():
    """The real thing: torch.compile (inductor) of the fused step, on a 2-layer model."""
    model = _model(seed=9)
    ids, mask = _prompts(2, 5, seed=10)
    slow = generate(model, ids, 16, temperature=0, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager step would hide a failure
        fast = generate(model, ids, 16, temperature=0, attention_mask=mask, compile=True)
    assert torch.equal(fast, slow)
    assert fast_decode.compiled_decode_step() is not fast_decode.decode_step


# ----- int4 weights (quantize="int4") ------------------------------------------------------------


def _q4_1_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` through the gguf package's own Q4_1 quantizer and dequantizer (llama.cpp's rule)."""
    from gguf import GGMLQuantizationType, quants

    data = quants.quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q4_1).copy())


def test_int4_codes_follow_gguf_q4_1():
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(48, 96, generator=g) * 0.05 + torch.rand(48, 1, generator=g) * 0.02
    theirs = _q4_1_roundtrip(weight)
    _, ours = fast_decode.quantize_int4(weight)
    # Same rule; the scales and minima are stored in bfloat16 (the kernel's dtype) instead of fp16.
    group_range = (weight.view(48, 3, 32).amax(-1) - weight.view(48, 3, 32).amin(-1)).repeat_interleave(32, dim=1)
    assert ((ours - theirs).abs() <= group_range * 2**-7 + 1e-6).all()
    assert (ours - weight).abs().max() > 1e-3  # it is a 4-bit approximation, not a copy
    # Weights that are already Q4_1 values come back to the same codes: only the bfloat16 rounding remains.
    _, again = fast_decode.quantize_int4(theirs)
    assert ((again - theirs).abs() <= group_range * 2**-7 + 1e-6).all()


def test_int4_kernel_multiplies_by_the_dequantized_matrix():
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(80, 64, generator=g)
    int4, dequantized = fast_decode.quantize_int4(weight)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    out = fast_decode._linear(x, int4)
    assert out.shape == (3, 80) and out.dtype == torch.bfloat16
    reference = x.float() @ dequantized.T
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=0.05)


def test_int4_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="divisible by 32"):
        fast_decode.quantize_int4(torch.randn(8, 40))
    model = _model()
    with pytest.raises(ValueError, match="quantize must be None or 'int4'"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, compile=True, quantize="int8")
    with pytest.raises(ValueError, match="pass compile=True too"):
        generate(model, torch.ones(1, 2, dtype=torch.long), 3, quantize="int4")


def test_int4_step_follows_the_model_with_dequantized_weights(eager_step):
    model = _model(seed=13)
    # The reference: the same model with every matrix (the output projection too, untied from the
    # embedding lookup) replaced by its int4 dequantization, in float32. The int4 path differs
    # from it only by bfloat16 activations; from the model itself, also by the quantization.
    reference = Llama(LlamaConfig.tiny(**{**model.config.to_dict(), "tie_embeddings": False})).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in reference.model.layers:
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                module.weight.copy_(fast_decode.quantize_int4(module.weight)[1])
        reference.lm_head.weight.copy_(fast_decode.quantize_int4(reference.lm_head.weight)[1])
    ids, mask = _prompts(2, 5, seed=14)
    new = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(15))
    with torch.inference_mode():
        int4_steps = _step_logits(_FastForward(model, 2, 11, mask, quantize="int4"), ids, new)[1:]
        plain_steps = _step_logits(_Forward(model, 2, 11, mask, use_cache=True), ids, new)[1:]
        # As in the int4 path, the prompt runs through the model itself; the steps after it through
        # the dequantized weights.
        forward = _Forward(model, 2, 11, mask, use_cache=True)
        forward.step(ids)
        forward.model = reference
        reference_steps = _step_logits(forward, torch.cat([ids, new[:, :1]], dim=1), new[:, 1:])
    for int4, ref, plain in zip(int4_steps, reference_steps, plain_steps):
        assert (int4 - ref).abs().max() < 0.05 * ref.abs().max()  # bfloat16 activations
        assert (int4 - plain).abs().max() > 3 * (int4 - ref).abs().max()  # the quantization is what differs
