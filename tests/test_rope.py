"""RoPE against Hugging Face's rotary embedding, plus the properties the chapter relies on."""

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import rotate_half as hf_rotate_half

from llama_from_scratch.rope import (
    apply_rope,
    apply_rope_complex,
    permute_qk_for_rotate_half,
    precompute_freqs_cis,
    precompute_rope,
    rope_inv_freq,
    rotate_half,
    unpermute_qk,
)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _hf_rotary(head_dim: int, theta: float, scaling: dict | None, max_pos: int) -> LlamaRotaryEmbedding:
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_parameters=rope)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [(64, 10000.0, None), (64, 100000.0, None), (16, 500000.0, LLAMA3_SCALING),
     (128, 500000.0, dict(LLAMA3_SCALING, factor=8.0))],
)
def test_cos_sin_equal_hf_rotary_embedding(head_dim, theta, scaling):
    max_seq_len = 300
    cos, sin = precompute_rope(head_dim, max_seq_len, theta, scaling)
    assert cos.shape == sin.shape == (max_seq_len, head_dim) and cos.dtype == torch.float32
    hf = _hf_rotary(head_dim, theta, scaling, max_pos=16384)
    positions = torch.arange(max_seq_len)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    # Same float32 operations: bit-exact.
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=0)


def test_llama3_inv_freq_equals_hf_and_changes_only_low_frequencies():
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                   rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    ours = rope_inv_freq(64, 500000.0, LLAMA3_SCALING)
    torch.testing.assert_close(ours, hf_inv, rtol=0, atol=0)
    plain = rope_inv_freq(64, 500000.0)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert torch.equal(ours[high], plain[high])                       # short wavelengths kept
    torch.testing.assert_close(ours[low], plain[low] / 32, rtol=0, atol=0)  # long ones slowed by `factor`
    mid = ~high & ~low
    assert mid.any() and torch.all(ours[mid] < plain[mid]) and torch.all(ours[mid] > plain[mid] / 32)


def test_scaling_validation_errors():
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        precompute_rope(64, 8, scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="missing keys"):
        precompute_rope(64, 8, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="unknown keys"):
        precompute_rope(64, 8, scaling={**LLAMA3_SCALING, "fator": 2})
    with pytest.raises(ValueError, match="rope_theta"):
        precompute_rope(64, 8, theta=10000.0, scaling={**LLAMA3_SCALING, "rope_theta": 500000.0})
    with pytest.raises(ValueError, match="even"):
        precompute_rope(7, 8)
    with pytest.raises(TypeError):
        precompute_rope(8, 8, scaling="llama3")
    # "default" and the legacy "type" key are accepted.
    assert torch.equal(precompute_rope(8, 4, scaling={"rope_type": "default"})[0], precompute_rope(8, 4)[0])
    assert torch.equal(precompute_rope(8, 4, 5e5, {**LLAMA3_SCALING, "type": "llama3"})[1],
                       precompute_rope(8, 4, 5e5, LLAMA3_SCALING)[1])


def test_rotate_half_equals_hf():
    x = torch.randn(2, 3, 4, 10)
    assert torch.equal(rotate_half(x), hf_rotate_half(x))


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_equals_hf_apply_rotary_pos_emb(offset, dtype):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 7, 32
    cos, sin = precompute_rope(D, 64, 10000.0)
    q, k = torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, 1, T, D, dtype=dtype)
    hf = _hf_rotary(D, 10000.0, None, 64)
    hf_cos, hf_sin = hf(q, (torch.arange(T) + offset)[None].expand(B, T))
    ref_q, ref_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    out_q, out_k = apply_rope(q, cos, sin, offset=offset), apply_rope(k, cos, sin, offset=offset)
    assert out_q.dtype == dtype
    torch.testing.assert_close(out_q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(out_k, ref_k, rtol=0, atol=0)


def test_apply_rope_position_ids_per_sequence():
    torch.manual_seed(1)
    cos, sin = precompute_rope(16, 32)
    x = torch.randn(2, 2, 4, 16)
    pos = torch.tensor([[0, 1, 2, 3], [3, 4, 5, 6]])
    out = apply_rope(x, cos, sin, position_ids=pos)
    torch.testing.assert_close(out[:1], apply_rope(x[:1], cos, sin, offset=0), rtol=0, atol=0)
    torch.testing.assert_close(out[1:], apply_rope(x[1:], cos, sin, offset=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        apply_rope(x, cos, sin, position_ids=pos + 30)
    with pytest.raises(TypeError):
        apply_rope(x, cos, sin, position_ids=pos.float())


def test_apply_rope_offset_overflow_names_max_seq_len():
    cos, sin = precompute_rope(8, 10)
    x = torch.randn(1, 1, 4, 8)
    apply_rope(x, cos, sin, offset=6)  # positions 6..9 fit
    with pytest.raises(ValueError, match="max_seq_len=10"):
        apply_rope(x, cos, sin, offset=7)
    with pytest.raises(ValueError, match=r"\[B, H, T, head_dim\]"):
        apply_rope(torch.randn(4, 8), cos, sin)
    with pytest.raises(ValueError):
        apply_rope(torch.randn(1, 1, 4, 6), cos, sin)


def test_rope_preserves_norm_and_position_zero_is_identity():
    cos, sin = precompute_rope(32, 50)
    x = torch.randn(1, 2, 50, 32)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0], rtol=0, atol=0)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(2)
    D = 64
    cos, sin = precompute_rope(D, 200)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, cos, sin, offset=m) * apply_rope(k, cos, sin, offset=n)).sum()

    for m, n, shift in [(5, 2, 100), (10, 10, 37), (3, 40, 150)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))  # but it does depend on the distance


def test_permute_unpermute_are_exact_inverses_and_match_the_formula():
    torch.manual_seed(3)
    n_heads, head_dim, dim2 = 3, 8, 5
    w = torch.randn(n_heads * head_dim, dim2)
    p = permute_qk_for_rotate_half(w, n_heads)
    assert torch.equal(unpermute_qk(p, n_heads), w)
    assert torch.equal(permute_qk_for_rotate_half(unpermute_qk(w, n_heads), n_heads), w)
    # REFERENCES.md formula (Hugging Face's convert_llama_weights_to_hf.py)
    ref = w.view(n_heads, head_dim // 2, 2, dim2).transpose(1, 2).reshape(n_heads * head_dim, dim2)
    assert torch.equal(p, ref)
    # Within head 0: rotate-half row c * d/2 + i is interleaved row 2i + c.
    assert torch.equal(p[1], w[2]) and torch.equal(p[head_dim // 2], w[1])
    bias = torch.randn(n_heads * head_dim)
    assert torch.equal(unpermute_qk(permute_qk_for_rotate_half(bias, n_heads), n_heads), bias)
    with pytest.raises(ValueError, match="multiple of 2 \\* n_heads"):
        permute_qk_for_rotate_half(torch.randn(10, 4), 3)


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_complex_interleaved_equals_rotate_half_after_permutation(scaling):
    """Meta's complex RoPE on interleaved weights == HF's rotate-half RoPE on permuted weights."""
    torch.manual_seed(4)
    dim, n_heads, D, T, theta = 48, 3, 16, 9, 500000.0
    w_meta = torch.randn(n_heads * D, dim)  # an interleaved (Meta / GGUF) q projection
    w_hf = permute_qk_for_rotate_half(w_meta, n_heads)
    x = torch.randn(2, T, dim)

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).view(2, T, n_heads, D).transpose(1, 2)

    freqs_cis = precompute_freqs_cis(D, 32, theta, scaling)
    cos, sin = precompute_rope(D, 32, theta, scaling)
    meta = apply_rope_complex(heads(w_meta), freqs_cis, offset=4)
    hf = apply_rope(heads(w_hf), cos, sin, offset=4)
    # The rotated vectors are the same numbers, in permuted order within each head ...
    perm = permute_qk_for_rotate_half(torch.arange(D), 1)
    torch.testing.assert_close(meta[..., perm], hf, rtol=1e-5, atol=1e-5)
    # ... so attention scores (q . k over the head dimension) are equal.
    torch.testing.assert_close(meta @ meta.transpose(-1, -2), hf @ hf.transpose(-1, -2), rtol=1e-4, atol=1e-4)
