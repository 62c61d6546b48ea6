"""Checks of chapter 5's exercises: the 4-D attention mask (causal with cached keys, padding, sliding
window), blockwise attention with an online softmax (FlashAttention's forward), and a grouped-query
attention layer with RoPE, left padding and a KV cache, loaded with a real SmolLM2 layer.

References, all independent of the package: transformers' ``masking_utils.sdpa_mask``;
``torch.nn.functional.scaled_dot_product_attention`` and ``torch.logsumexp`` in float64; transformers'
``LlamaAttention`` (eager) with ``LlamaRotaryEmbedding``, holding the same weights (SmolLM2's read
from its GGUF file and converted by transformers' GGUF loader). Inputs are drawn fresh at every run.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch
import torch.nn.functional as F

from llama_from_scratch.course.checks.ch03_rmsnorm_swiglu import smollm2_tensor
from llama_from_scratch.course.checks.ch04_rope import _hf_from_gguf, _quiet_transformers
from llama_from_scratch.course.checks.common import (as_tensor, assert_close, assert_equal, call_answer, fresh_generator,
                                              fresh_rng, load_state)

_ATTENTION = ["torch.nn.functional.scaled_dot_product_attention", "torch.nn.MultiheadAttention",
              "torch.nn.functional.multi_head_attention_forward", "transformers"]
FORBIDDEN = {
    "attention_mask_4d": ["transformers"],
    "flash_attention": _ATTENTION + ["torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
                                     "torch.special.softmax", "torch.logsumexp", "torch.Tensor.logsumexp",
                                     "torch.special.logsumexp", "torch.nn.functional.log_softmax",
                                     "torch.log_softmax", "torch.Tensor.log_softmax"],
    "GQAttention": _ATTENTION,
}


# ----- attention_mask_4d ------------------------------------------------------------------------


def _reference_mask(padding_mask: torch.Tensor, q_len: int, sliding_window: int | None) -> torch.Tensor:
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    batch, kv_len = padding_mask.shape
    mask_function = (causal_mask_function if sliding_window is None
                     else sliding_window_causal_mask_function(sliding_window))
    return sdpa_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=kv_len - q_len,
                     mask_function=mask_function, attention_mask=padding_mask.bool(), allow_is_causal_skip=False)


MASK_HINT = ("Query i stands at position S - q_len + i (the earlier positions are cached keys), so it may see key j "
             "when j <= S - q_len + i; with a sliding window W also when j > S - q_len + i - W (itself and the W - 1 "
             "keys before it); and only keys whose padding_mask is 1. Padding hides KEYS (the last dimension); a "
             "padded query's row is whatever those rules give. Shape [B, 1, q_len, S], dtype torch.bool.")


def _padding(rng: random.Random, batch: int, kv_len: int, style: str) -> torch.Tensor:
    mask = torch.ones(batch, kv_len, dtype=torch.long)
    for row in range(batch):
        n_pad = rng.randrange(0, kv_len) if row else 0            # row 0 unpadded, others padded at random
        if style == "left":
            mask[row, :n_pad] = 0
        elif style == "right":
            mask[row, kv_len - n_pad:] = 0
        else:                                                       # holes anywhere (packed or odd masks)
            for j in rng.sample(range(kv_len), n_pad):
                mask[row, j] = 0
    return mask


def check_attention_mask_4d(fn: Callable) -> None:
    """``fn(padding_mask, q_len, sliding_window=None)`` equals transformers' ``sdpa_mask`` for queries
    that are the last ``q_len`` of the ``S`` key positions, with key padding and an optional sliding window."""
    rng = fresh_rng()
    specs = [(3, 6, 6, None, "left"), (2, 9, 3, None, "left"), (3, 7, 1, None, "left"), (2, 10, 10, 3, "left"),
             (3, 12, 4, 5, "right"), (2, 8, 8, 1, "holes"), (1, 5, 5, 9, "left")]
    for _ in range(4):
        kv_len = rng.randrange(1, 20)
        specs.append((rng.randrange(1, 5), kv_len, rng.randrange(1, kv_len + 1),
                      rng.choice([None, rng.randrange(1, kv_len + 3)]), rng.choice(["left", "right", "holes"])))
    for batch, kv_len, q_len, window, style in specs:
        padding_mask = _padding(rng, batch, kv_len, style)
        as_bool = rng.random() < 0.3
        given = padding_mask.bool() if as_bool else padding_mask
        expected = _reference_mask(padding_mask, q_len, window)
        what = (f"attention_mask_4d(padding_mask of shape {tuple(given.shape)} ({given.dtype}, {style} padding), "
                f"q_len={q_len}" + (f", sliding_window={window})" if window is not None else ")"))
        args = (given.clone(), q_len) + ((window,) if window is not None else ())
        got = call_answer(fn, what, *args)
        got = as_tensor(got, what)
        if got.dtype != torch.bool:
            raise AssertionError(f"{what}: expected dtype torch.bool, got {got.dtype}. {MASK_HINT}")
        assert_equal(got, expected, what, hint=MASK_HINT)


# ----- flash_attention --------------------------------------------------------------------------


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """(output, logsumexp of the scaled scores) in float64: SDPA with an explicit bottom-right mask."""
    t, s = q.shape[-2], k.shape[-2]
    mask = None
    if causal:
        mask = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    qd, kd, vd = q.double(), k.double(), v.double()
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
    scores = qd @ kd.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return out.to(q.dtype), torch.logsumexp(scores, dim=-1).to(q.dtype)


FLASH_HINT = ("For each block of keys: scores = q k^T / sqrt(d) (masked to -inf above the bottom-right diagonal when "
              "causal); m_new = max(m, rowmax(scores)); p = exp(scores - m_new); l = l * exp(m - m_new) + rowsum(p); "
              "acc = acc * exp(m - m_new) + p v; m = m_new. At the end out = acc / l and lse = m + log(l). The last "
              "block may be shorter than block_size.")


def check_flash_attention(fn: Callable) -> None:
    """``fn(q, k, v, block_size, causal=True)`` returns ``(out, lse)`` equal to scaled dot-product
    attention (bottom-right causal mask when T < S) and the log-sum-exp of its scaled scores, for block
    sizes that do and do not divide S, single queries, and scores large enough to overflow exp."""
    rng, g = fresh_rng(), fresh_generator()
    # (batch, heads, T, S, d, block_size, causal, scale of q and k)
    specs = [(2, 3, 8, 8, 16, 3, True, 1.0), (1, 2, 5, 13, 8, 4, True, 1.0), (2, 2, 1, 11, 32, 2, True, 1.0),
             (1, 4, 6, 6, 16, 1, True, 1.0), (2, 1, 7, 9, 8, 64, True, 1.0), (1, 2, 6, 10, 16, 4, False, 1.0),
             (2, 2, 9, 9, 16, 4, True, 30.0)]
    for _ in range(3):
        s = rng.randrange(1, 40)
        specs.append((rng.randrange(1, 3), rng.randrange(1, 4), rng.randrange(1, s + 1), s, rng.choice([4, 8, 24, 64]),
                      rng.randrange(1, s + 3), rng.random() < 0.8, rng.choice([1.0, 3.0])))
    for batch, heads, t, s, d, block, causal, scale in specs:
        q = torch.randn(batch, heads, t, d, generator=g) * scale
        k = torch.randn(batch, heads, s, d, generator=g) * scale
        v = torch.randn(batch, heads, s, d, generator=g)
        before = [x.clone() for x in (q, k, v)]
        out_ref, lse_ref = _reference_attention(q, k, v, causal)
        what = (f"flash_attention(q {tuple(q.shape)}, k/v {tuple(k.shape)}, block_size={block}, causal={causal})"
                + (f" with q and k of scale {scale:g} (scores in the thousands)" if scale > 10 else ""))
        got = call_answer(fn, what, q, k, v, block, causal=causal)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise AssertionError(f"{what}: return a tuple (out, lse)")
        for x, original, name in zip((q, k, v), before, "qkv"):
            assert_equal(x, original, f"{what} changed {name} in place", hint="Leave the inputs unchanged.")
        hint = FLASH_HINT
        if causal and t < s:
            hint = ("The queries are the LAST T of the S positions: query i may see keys 0 .. S - T + i (a mask "
                    "aligned top-left, like tril(ones(T, S)) or SDPA's is_causal, is wrong here). " + FLASH_HINT)
        # float32 scores carry an absolute rounding error of about 1e-6 * scale^2 * sqrt(d) (the products summed
        # are of size scale^2), which reaches the log-sum-exp and, through the softmax, the output
        score_error = max(1e-5, 1e-6 * scale ** 2 * math.sqrt(d))
        assert_close(got[0], out_ref, f"{what}: out", rtol=1e-4,
                     atol=max(1e-5 * float(out_ref.abs().max()), score_error * float(v.abs().max())),
                     check_dtype=True, hint=hint)
        assert_close(got[1], lse_ref, f"{what}: lse (shape [B, H, T])", rtol=1e-5, atol=score_error,
                     check_dtype=True,
                     hint="lse = m + log(l), the running maximum plus the log of the running sum. " + hint)


# ----- GQAttention ------------------------------------------------------------------------------


def _hf_attention(dim: int, n_heads: int, n_kv_heads: int, theta: float, state: dict[str, torch.Tensor]):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    with _quiet_transformers():
        config = transformers.LlamaConfig(hidden_size=dim, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                          max_position_embeddings=131072,
                                          rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "eager"
    attention = LlamaAttention(config, layer_idx=0).eval()
    attention.load_state_dict(state)
    return attention, LlamaRotaryEmbedding(config)


def _reference_layer(attention: Any, rotary: Any, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """transformers' full pass over x [B, S, dim] with left padding: positions count real tokens only."""
    batch, s, _ = x.shape
    position_ids = (padding_mask.cumsum(-1) - 1).clamp(min=0)
    allowed = _reference_mask(padding_mask, s, None)
    additive = torch.zeros(batch, 1, s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out, _ = attention(x, position_embeddings=rotary(x, position_ids), attention_mask=additive)
    return out


def _random_state(dim: int, n_heads: int, n_kv_heads: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    head_dim = dim // n_heads
    return {"q_proj.weight": torch.randn(n_heads * head_dim, dim, generator=g) / dim ** 0.5,
            "k_proj.weight": torch.randn(n_kv_heads * head_dim, dim, generator=g) / dim ** 0.5 * 3,
            "v_proj.weight": torch.randn(n_kv_heads * head_dim, dim, generator=g) / dim ** 0.5,
            "o_proj.weight": torch.randn(dim, n_heads * head_dim, generator=g) / (n_heads * head_dim) ** 0.5}


def _smollm2_state(layer: int) -> dict[str, torch.Tensor]:
    return {"q_proj.weight": _hf_from_gguf(smollm2_tensor(f"blk.{layer}.attn_q.weight"), 9),
            "k_proj.weight": _hf_from_gguf(smollm2_tensor(f"blk.{layer}.attn_k.weight"), 3),
            "v_proj.weight": smollm2_tensor(f"blk.{layer}.attn_v.weight"),
            "o_proj.weight": smollm2_tensor(f"blk.{layer}.attn_output.weight")}


def _load(obj: Any, state: dict[str, torch.Tensor], what: str) -> None:
    load_state(obj, state, what,
               names_hint="q_proj, k_proj, v_proj and o_proj, nn.Linear without bias, as in transformers; the KV "
                          "cache is not a parameter (a plain attribute, or a buffer registered with persistent=False).",
               shape_hint="k_proj and v_proj have n_kv_heads * head_dim rows")


GQA_HINT = ("Project and split into heads ([B, heads, T, head_dim]); RoPE on q and k at the positions of the new "
            "tokens (cumsum(attention_mask) - 1, the last T columns); with use_cache, prepend the cached keys/values "
            "and store the result; repeat each kv head n_heads // n_kv_heads times NEXT TO ITSELF; scores / "
            "sqrt(head_dim), masked where the 4-D mask is False (bottom-right causal AND key padding); softmax over "
            "the keys; merge heads; o_proj.")


def _compare_rows(got: Any, expected: torch.Tensor, real: torch.Tensor, what: str, hint: str) -> None:
    """Compare the rows of real tokens; every row (padding included) must be finite."""
    got = as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(f"{what}: your output contains nan or inf. A query with no visible key (a padding "
                             "position at the start of a left-padded row) must give a finite output, e.g. zeros: "
                             "a softmax over a row of -inf is nan, and nan at a padding position reaches the real "
                             "tokens in the next layer (0 * nan = nan).")
    assert_close(got[real], expected[real], what + " (rows of real tokens)", rtol=1e-4,
                 atol=1e-4 * float(expected[real].abs().max()), check_dtype=True, hint=hint)


def _run_cached(obj: Any, x: torch.Tensor, padding_mask: torch.Tensor, chunks: list[int], what: str) -> torch.Tensor:
    """reset_cache, then feed x in chunks of the given lengths with use_cache=True; concatenated outputs."""
    call_answer(obj.reset_cache, f"{what}: reset_cache()")
    pieces, start = [], 0
    for length in chunks:
        end = start + length
        piece = call_answer(obj, f"{what}: the chunk of positions {start}..{end - 1}", x[:, start:end],
                      attention_mask=padding_mask[:, :end], use_cache=True)
        pieces.append(as_tensor(piece, f"{what}: the chunk of positions {start}..{end - 1}"))
        start = end
    return torch.cat(pieces, dim=1)


def check_GQAttention(cls: Callable) -> None:  # noqa: N802 - named after the class it checks
    """``GQAttention(dim, n_heads, n_kv_heads, rope_theta)`` with transformers' weight names: its full pass
    equals ``LlamaAttention`` (eager) with the same weights, on a real SmolLM2 layer and random shapes (MQA,
    MHA), with left padding; its cached pass (a prompt, single tokens, then a chunk of several tokens after
    the cache) equals the full pass; padded rows stay finite."""
    rng, g = fresh_rng(), fresh_generator()
    layer = rng.randrange(30)
    configs = [(576, 9, 3, 100000.0, _smollm2_state(layer),
                f"SmolLM2 layer {layer}'s attention (576, 9 heads, 3 kv heads)")]
    for n_heads, n_kv in ((4, 1), (6, 6), (rng.choice([6, 8]), 2)):
        head_dim = rng.choice([4, 6, 8, 16])
        dim, theta = n_heads * head_dim, rng.choice([10000.0, 500000.0])
        configs.append((dim, n_heads, n_kv, theta, _random_state(dim, n_heads, n_kv, g),
                        f"GQAttention({dim}, n_heads={n_heads}, n_kv_heads={n_kv}, rope_theta={theta:g})"))
    for index, (dim, n_heads, n_kv, theta, state, name) in enumerate(configs):
        obj = call_answer(cls, f"GQAttention({dim}, {n_heads}, {n_kv}, rope_theta={theta:g})", dim, n_heads, n_kv,
                    rope_theta=theta)
        _load(obj, state, name)
        attention, rotary = _hf_attention(dim, n_heads, n_kv, theta, state)
        batch, s = rng.randrange(1, 4) if index else 2, rng.randrange(7, 12)
        x = torch.randn(batch, s, dim, generator=g)
        unpadded = torch.ones(batch, s, dtype=torch.long)
        expected = _reference_layer(attention, rotary, x, unpadded)
        real = unpadded.bool()
        what = f"{name} on x of shape {tuple(x.shape)}"

        # 1. the full pass, no mask given
        call_answer(obj.reset_cache, f"{name}: reset_cache()")
        _compare_rows(call_answer(obj, f"{what}, full pass", x), expected, real, f"{what}, full pass", GQA_HINT)

        # 2. prefill, single tokens, then a chunk of 3 new tokens after the cache
        prompt = rng.randrange(1, s - 4)
        chunks = [prompt, 1, 1, 3, s - prompt - 5] if s - prompt - 5 > 0 else [prompt, 1, 1, 3]
        cached = _run_cached(obj, x[:, : sum(chunks)], unpadded[:, : sum(chunks)], chunks, what)
        hint = ("Cached keys/values come first, and the new queries are the LAST T positions: with T > 1 after a "
                "cache, query i sees keys 0 .. past + i (SDPA's is_causal, or tril(ones(T, S)), aligns top-left and is "
                "wrong here). RoPE rotates the new tokens to positions past, past + 1, ... " + GQA_HINT)
        _compare_rows(cached, expected[:, : sum(chunks)], real[:, : sum(chunks)],
                      f"{what}, cached in chunks of {chunks} tokens", hint)

        # 3. left padding: full pass, then cached
        if batch > 1 or index == 0:
            padded = torch.ones(max(batch, 2), s, dtype=torch.long)
            for row in range(1, padded.shape[0]):
                padded[row, : rng.randrange(1, s - 3)] = 0
            xp = torch.randn(padded.shape[0], s, dim, generator=g)
            expected_p = _reference_layer(attention, rotary, xp, padded)
            real_p = padded.bool()
            what_p = (f"{name} on a left-padded batch of shape {tuple(xp.shape)} "
                      f"(padding per row {(1 - padded).sum(1).tolist()})")
            hint_p = ("With left padding a row's first real token is at position 0: positions = cumsum(attention_mask) "
                      "- 1, and padded keys are masked. " + GQA_HINT)
            call_answer(obj.reset_cache, f"{name}: reset_cache()")
            _compare_rows(call_answer(obj, f"{what_p}, full pass", xp, attention_mask=padded), expected_p, real_p,
                          f"{what_p}, full pass", hint_p)
            cached = _run_cached(obj, xp, padded, [s - 3, 1, 2], what_p)
            _compare_rows(cached, expected_p, real_p, f"{what_p}, cached in chunks of [{s - 3}, 1, 2]", hint_p)


CHECKS = {
    "attention_mask_4d": check_attention_mask_4d,
    "flash_attention": check_flash_attention,
    "GQAttention": check_GQAttention,
}
