"""Grouped-query attention against Hugging Face LlamaAttention and SDPA; the KV cache."""

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

from llama_from_scratch.attention import (
    GroupedQueryAttention,
    KVCache,
    attention_scratch,
    build_attention_mask,
    causal_mask,
    kv_cache_bytes_per_token,
    repeat_kv,
)
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.rope import precompute_rope


def _hf_attention(dim: int, n_heads: int, n_kv_heads: int) -> tuple[LlamaAttention, LlamaRotaryEmbedding]:
    cfg = transformers.LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return LlamaAttention(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_equals_hf_llama_attention(n_heads, n_kv_heads, use_sdpa):
    torch.manual_seed(0)
    dim, T = 48, 11
    ours = GroupedQueryAttention(dim, n_heads, n_kv_heads)
    ours.use_sdpa = use_sdpa
    ref, rotary = _hf_attention(dim, n_heads, n_kv_heads)
    ref.load_state_dict(ours.state_dict())  # q_proj, k_proj, v_proj, o_proj: same names and shapes
    x = torch.randn(2, T, dim)
    cos, sin = precompute_rope(dim // n_heads, 64)
    hf_mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    expected, _ = ref(x, position_embeddings=rotary(x, torch.arange(T)[None]), attention_mask=hf_mask)
    # The from-scratch path does HF eager attention's operations in the same order: bit-exact.
    # SDPA is a fused kernel that sums in another order: equal to float32 rounding.
    tol = dict(rtol=1e-5, atol=1e-6) if use_sdpa else dict(rtol=0, atol=0)
    torch.testing.assert_close(ours(x, cos, sin), expected, **tol)


def test_scratch_equals_sdpa_masks_and_dtypes():
    torch.manual_seed(1)
    attn = GroupedQueryAttention(64, 8, 2)
    cos, sin = precompute_rope(8, 32)
    x = torch.randn(3, 10, 64)
    pad = torch.ones(3, 10, dtype=torch.long)
    pad[1, :4] = 0
    pad[2, :9] = 0
    additive = torch.zeros(3, 1, 10, 10).masked_fill(~build_attention_mask(pad, 10), torch.finfo(torch.float32).min)
    for mask in [None, pad, build_attention_mask(pad, 10), additive]:
        attn.use_sdpa = True
        fast = attn(x, cos, sin, attention_mask=mask)
        attn.use_sdpa = False
        slow = attn(x, cos, sin, attention_mask=mask)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    attn = attn.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    attn.use_sdpa = False
    slow = attn(xb, cos, sin)
    attn.use_sdpa = True
    fast = attn(xb, cos, sin)
    assert fast.dtype == slow.dtype == torch.bfloat16
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)  # bfloat16 has ~3 significant digits


def test_attention_scratch_is_the_textbook_formula():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = causal_mask(5, 5)
    scores = q @ k.transpose(-1, -2) / 2.0  # sqrt(head_dim) = 2
    scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention_scratch(q, k, v, mask), torch.softmax(scores, -1) @ v)
    # The first query sees only the first key: its output is v[0] exactly.
    torch.testing.assert_close(attention_scratch(q, k, v, mask)[..., 0, :], v[..., 0, :])
    # A row with every key masked gives zeros, not NaN.
    none = torch.zeros(5, 5, dtype=torch.bool)
    assert torch.equal(attention_scratch(q, k, v, none), torch.zeros_like(q))


def test_repeat_kv_equals_repeat_interleave_and_hf():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert torch.equal(repeat_kv(x, 4), hf_repeat_kv(x, 4))
    assert repeat_kv(x, 1) is x


@pytest.mark.parametrize("n_kv_heads, name", [(8, "MHA"), (2, "GQA"), (1, "MQA")])
def test_shapes_mha_mqa_gqa(n_kv_heads, name):
    attn = GroupedQueryAttention(64, 8, n_kv_heads)
    assert attn.k_proj.weight.shape == (n_kv_heads * 8, 64)
    assert attn.v_proj.weight.shape == (n_kv_heads * 8, 64)
    assert attn.q_proj.weight.shape == attn.o_proj.weight.shape == (64, 64)
    cos, sin = precompute_rope(8, 16)
    for shape in [(1, 1, 64), (2, 7, 64)]:
        assert attn(torch.randn(shape), cos, sin).shape == shape


def test_explicit_head_dim_and_bias():
    attn = GroupedQueryAttention(30, 4, 2, head_dim=8, bias=True)
    assert attn.q_proj.weight.shape == (32, 30) and attn.o_proj.weight.shape == (30, 32)
    assert attn.k_proj.bias is not None
    cos, sin = precompute_rope(8, 16)
    assert attn(torch.randn(2, 3, 30), cos, sin).shape == (2, 3, 30)


def test_construction_errors():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        GroupedQueryAttention(48, 6, 4)
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        GroupedQueryAttention(50, 4, 2)
    with pytest.raises(ValueError):
        GroupedQueryAttention(48, 4, 0)
    attn = GroupedQueryAttention(32, 4, 2)
    cos, sin = precompute_rope(8, 16)
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        attn(torch.randn(2, 3, 31), cos, sin)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        attn(torch.randn(2, 3, 32), cos, sin, attention_mask=torch.ones(2, 4))


def test_causal_and_padding_masks():
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    # Two new queries after three cached positions.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    pad = torch.tensor([[0, 0, 1, 1]])
    m = build_attention_mask(pad, 4)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)  # pad queries see only themselves; real ones skip the pads


def test_kv_cache_incremental_equals_full_forward():
    torch.manual_seed(3)
    attn = GroupedQueryAttention(32, 4, 2)
    cos, sin = precompute_rope(8, 32)
    x = torch.randn(2, 9, 32)
    full = attn(x, cos, sin)
    for use_sdpa in [True, False]:
        attn.use_sdpa = use_sdpa
        cache = KVCache(1, 2, 2, 16, 8)
        pieces = [attn(x[:, :4], cos, sin, 0, cache, 0)]  # prefill 4 tokens
        pieces.append(attn(x[:, 4:6], cos, sin, 4, cache, 0))  # 2 at once
        for t in range(6, 9):  # then one at a time
            pieces.append(attn(x[:, t : t + 1], cos, sin, t, cache, 0))
        assert cache.lengths == [9]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-6)


def test_kv_cache_update_storage_and_errors():
    cache = KVCache(n_layers=2, batch_size=1, n_kv_heads=2, max_seq_len=5, head_dim=4, dtype=torch.bfloat16)
    assert cache.k.shape == (2, 1, 2, 5, 4) and cache.dtype == torch.bfloat16
    assert cache.memory_bytes() == 2 * 2 * 1 * 2 * 5 * 4 * 2
    k = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    k_all, v_all = cache.update(1, k, v, 0)
    assert k_all.shape == (1, 2, 3, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    assert k_all.data_ptr() == cache.k[1].data_ptr()  # a view into the preallocated storage
    assert cache.lengths == [0, 3]
    k2, _ = cache.update(1, k[:, :, :2], v[:, :, :2], 3)
    assert k2.shape[2] == 5 and torch.equal(k2[:, :, 3:], k[:, :, :2])
    with pytest.raises(ValueError, match="overflow.*max_seq_len=5"):
        cache.update(1, k[:, :, :1], v[:, :, :1], 5)
    with pytest.raises(ValueError, match="gap"):
        cache.update(0, k, v, 1)
    with pytest.raises(ValueError, match="dtype"):
        cache.update(0, k.float(), v.float(), 0)
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        cache.update(0, k[:, :1], v[:, :1], 0)
    with pytest.raises(IndexError):
        cache.update(2, k, v, 0)
    with pytest.raises(ValueError, match="positive"):
        KVCache(1, 0, 1, 4, 4)
    cache.update(1, k[:, :, :1], v[:, :, :1], 1)  # rewinding overwrites
    assert cache.lengths[1] == 2
    cache.reset()
    assert cache.seq_len == 0


def test_kv_cache_reorder():
    cache = KVCache(1, 3, 1, 4, 2)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    cache.update(0, k, k, 0)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[0, :, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]


def test_kv_cache_bytes_per_token():
    # SmolLM2-135M: 2 * 30 layers * 3 kv heads * 64 * 2 bytes (bf16)
    assert kv_cache_bytes_per_token(LlamaConfig.smollm2_135m(), torch.bfloat16) == 23040
    # Llama 3.2 1B: 2 * 16 * 8 * 64 * 2
    assert kv_cache_bytes_per_token(LlamaConfig.llama32_1b(), torch.bfloat16) == 32768
    # MHA instead of GQA would cost n_heads / n_kv_heads times as much.
    mha = LlamaConfig.llama32_1b()
    mha.n_kv_heads = mha.n_heads
    assert kv_cache_bytes_per_token(mha, torch.float32) == 4 * 2 * 32768
