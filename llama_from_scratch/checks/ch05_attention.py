"""Checks of chapter 5's exercises: the causal mask, scaled dot-product attention, the GQA head
mapping, repeating key/value heads, the KV-cache size, and a whole grouped-query attention layer.

Each check draws fresh random inputs (odd sizes, one-token sequences, queries that are only the
last positions of a longer key sequence as with a KV cache), compares the student's function with
the package (``llama_from_scratch.attention``), and raises ``AssertionError`` saying which input was
used, what was expected and what came back.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from llama_from_scratch.attention import GroupedQueryAttention, attention_scratch, causal_mask, repeat_kv
from llama_from_scratch.rope import precompute_rope


def _rng() -> random.Random:
    """A generator seeded fresh at every grading run, so memorised answers cannot pass."""
    return random.Random(random.SystemRandom().randrange(2**31))


def _generator(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


def _as_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _compare(got, expected: torch.Tensor, what: str, hint: str = "", rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """assert_close with a message a student can act on."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}".rstrip())
    if got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    got = got.detach()
    if torch.isnan(got).any():
        raise AssertionError(f"{what}: your result contains NaN (a softmax over a row whose scores are all -inf?). {hint}".rstrip())
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item()
        raise AssertionError(
            f"{what}: max abs difference {diff:.3g} (allowed {atol:g} + {rtol:g} * |expected|); expected "
            f"{[round(v, 5) for v in expected.flatten()[:4].tolist()]}..., got "
            f"{[round(v, 5) for v in got.flatten()[:4].tolist()]}... {hint}".rstrip())


# ----- causal_attention_mask ---------------------------------------------------------------------


def check_causal_attention_mask(fn: Callable) -> None:
    """``fn(q_len, kv_len)`` = boolean ``[q_len, kv_len]``, True where query i (at position
    ``kv_len - q_len + i``) may attend key j."""
    rng = _rng()
    cases = [(1, 1), (4, 4), (1, 6), (3, 7), (2, 3)]
    for _ in range(20):
        kv_len = rng.randrange(1, 40)
        cases.append((rng.choice([kv_len, rng.randrange(1, kv_len + 1)]), kv_len))
    for q_len, kv_len in cases:
        got = _as_tensor(fn(q_len, kv_len), f"causal_attention_mask({q_len}, {kv_len})")
        expected = causal_mask(q_len, kv_len)
        if got.dtype != torch.bool:
            raise AssertionError(f"causal_attention_mask({q_len}, {kv_len}) must return a torch.bool tensor (True = may "
                                 f"attend), got dtype {got.dtype}")
        if tuple(got.shape) != (q_len, kv_len):
            raise AssertionError(f"causal_attention_mask({q_len}, {kv_len}) must have shape [q_len, kv_len] = "
                                 f"[{q_len}, {kv_len}], got {tuple(got.shape)}")
        if not torch.equal(got, expected):
            hint = ""
            if q_len < kv_len and torch.equal(got, torch.ones(q_len, kv_len, dtype=torch.bool).tril()):
                hint = (" Your mask is tril(ones(q_len, kv_len)), which is right only when q_len == kv_len: the queries "
                        "are the LAST q_len positions, so query i sits at position kv_len - q_len + i.")
            raise AssertionError(f"causal_attention_mask({q_len}, {kv_len}) returned\n{got.int()}\nexpected\n"
                                 f"{expected.int()}{hint}")


# ----- scaled_dot_product ------------------------------------------------------------------------


def check_scaled_dot_product(fn: Callable) -> None:
    """``fn(q, k, v, causal=False)`` = ``softmax(q k^T / sqrt(d) [+ causal mask]) v``."""
    rng = _rng()
    g = _generator(rng)
    cases = []
    for trial in range(14):
        lead = rng.choice([(), (rng.randrange(1, 4),), (rng.randrange(1, 3), rng.randrange(1, 5))])
        d = rng.choice([1, 2, 7, 16, 33, 64])
        kv_len = rng.choice([1, rng.randrange(2, 20)])
        causal = trial % 2 == 1
        q_len = rng.choice([kv_len, rng.randrange(1, kv_len + 1)])
        if not causal and rng.random() < 0.3:
            q_len = rng.randrange(1, 25)          # without a mask, any number of queries
        cases.append((lead, q_len, kv_len, d, causal))
    cases.append(((2, 3), 5, 9, 8, True))         # queries = last 5 of 9 positions (KV cache)
    for lead, q_len, kv_len, d, causal in cases:
        q = torch.randn(*lead, q_len, d, generator=g) * 2
        k = torch.randn(*lead, kv_len, d, generator=g) * 2
        v = torch.randn(*lead, kv_len, d, generator=g)
        originals = [t.clone() for t in (q, k, v)]
        what = (f"scaled_dot_product(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, causal={causal})")
        got = fn(q, k, v, causal=causal)
        if not all(torch.equal(a, b) for a, b in zip((q, k, v), originals)):
            raise AssertionError(f"{what} modified its inputs in place; leave q, k and v unchanged")
        mask = causal_mask(q_len, kv_len) if causal else None
        expected = attention_scratch(q, k, v, mask)
        got_t = _as_tensor(got, what)
        hint = ""
        if got_t.shape == expected.shape and not torch.allclose(got_t, expected, rtol=1e-5, atol=1e-6):
            if torch.allclose(got_t, attention_scratch(q, k, v, mask, scale=1.0), rtol=1e-5, atol=1e-6):
                hint = "It equals attention WITHOUT the 1/sqrt(d) scale: divide the scores by sqrt(d)."
            elif torch.allclose(got_t, attention_scratch(q, k, v, mask, scale=1.0 / d), rtol=1e-5, atol=1e-6) and d > 1:
                hint = "It equals attention with the scores divided by d: divide by sqrt(d) instead."
            elif causal and q_len < kv_len and torch.allclose(
                    got_t, attention_scratch(q, k, v, torch.ones(q_len, kv_len, dtype=torch.bool).tril()),
                    rtol=1e-5, atol=1e-6):
                hint = ("Your causal mask is tril(ones(T, S)): with fewer queries than keys the queries are the LAST "
                        "T positions, so query i may attend keys 0 .. S - T + i.")
            elif causal and torch.allclose(got_t, attention_scratch(q, k, v, None), rtol=1e-5, atol=1e-6):
                hint = "It equals attention without any mask: with causal=True, hide the keys after each query."
            else:
                hint = ("Check: scores = q @ k.transpose(-2, -1) / sqrt(d); masked scores = -inf; softmax over the LAST "
                        "dimension (the keys); then @ v.")
        _compare(got, expected, what, hint)


# ----- gqa_group_of_head -------------------------------------------------------------------------


def check_gqa_group_of_head(fn: Callable) -> None:
    """``fn(head, n_heads, n_kv_heads)`` = the key/value head that query head ``head`` uses."""
    rng = _rng()
    configs = [(9, 3), (32, 8), (8, 1), (4, 4), (6, 2)]
    configs += [(n_kv * n_rep, n_kv) for n_kv, n_rep in
                ((rng.randrange(1, 9), rng.randrange(1, 9)) for _ in range(10))]
    for n_heads, n_kv_heads in configs:
        n_rep = n_heads // n_kv_heads
        for head in range(n_heads):
            got = fn(head, n_heads, n_kv_heads)
            if isinstance(got, torch.Tensor) and got.numel() == 1:
                got = got.item()
            if isinstance(got, bool) or not isinstance(got, int):
                raise AssertionError(f"gqa_group_of_head({head}, {n_heads}, {n_kv_heads}) must return an int, got "
                                     f"{type(got).__name__} {got!r}")
            expected = head // n_rep
            if got != expected:
                hint = ""
                if got == head % n_kv_heads:
                    hint = (f" You returned head % n_kv_heads: that deals the heads out in turn (0, 1, 2, 0, 1, 2, ...), "
                            f"but groups are CONSECUTIVE: heads 0..{n_rep - 1} share kv head 0, and so on.")
                raise AssertionError(f"gqa_group_of_head({head}, n_heads={n_heads}, n_kv_heads={n_kv_heads}) returned "
                                     f"{got}; expected {expected} (groups of n_heads // n_kv_heads = {n_rep} consecutive "
                                     f"query heads).{hint}")
    bad = [(6, 4), (9, 2), (10, 4), (7, 3)]
    n_heads, n_kv_heads = rng.choice(bad)
    try:
        fn(0, n_heads, n_kv_heads)
    except ValueError:
        pass
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - a student's function may raise anything
        raise AssertionError(f"gqa_group_of_head(0, {n_heads}, {n_kv_heads}) should raise ValueError (n_kv_heads does not "
                             f"divide n_heads), got {type(exc).__name__}: {exc}") from None
    else:
        raise AssertionError(f"gqa_group_of_head(0, {n_heads}, {n_kv_heads}) should raise ValueError: {n_kv_heads} kv "
                             f"heads cannot be shared equally by {n_heads} query heads")
    n_heads, n_kv_heads = 8, 2
    head = rng.choice([8, 9, -1])
    try:
        fn(head, n_heads, n_kv_heads)
    except ValueError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"gqa_group_of_head({head}, 8, 2) should raise ValueError (no such query head), got "
                             f"{type(exc).__name__}: {exc}") from None
    else:
        raise AssertionError(f"gqa_group_of_head({head}, 8, 2) should raise ValueError: query heads are 0 .. 7")


# ----- repeat_kv_heads ---------------------------------------------------------------------------


def check_repeat_kv_heads(fn: Callable) -> None:
    """``fn(x, n_rep)``: ``[B, n_kv, S, d]`` -> ``[B, n_kv * n_rep, S, d]``, head h = input head h // n_rep."""
    rng = _rng()
    g = _generator(rng)
    cases = [(2, 3, 5, 4, 3), (1, 1, 3, 2, 4), (1, 4, 2, 3, 1)]
    cases += [(rng.randrange(1, 4), rng.randrange(1, 6), rng.randrange(1, 12), rng.choice([1, 3, 8, 17]),
               rng.randrange(1, 6)) for _ in range(12)]
    for b, n_kv, s, d, n_rep in cases:
        x = torch.randn(b, n_kv, s, d, generator=g)
        original = x.clone()
        what = f"repeat_kv_heads(x of shape {tuple(x.shape)}, n_rep={n_rep})"
        got = fn(x, n_rep)
        if not torch.equal(x, original):
            raise AssertionError(f"{what} modified x in place; return a new tensor")
        expected = repeat_kv(x, n_rep)
        got = _as_tensor(got, what)
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if not torch.equal(got, expected):
            hint = ""
            if torch.equal(got, x.repeat(1, n_rep, 1, 1)):
                hint = (" You tiled the heads (0, 1, ..., 0, 1, ...) like x.repeat: each kv head must be repeated NEXT TO "
                        "ITSELF (0, 0, 0, 1, 1, 1, ...), because query heads h // n_rep share kv head h // n_rep.")
            wrong = next(h for h in range(n_kv * n_rep) if not torch.equal(got[:, h], expected[:, h]))
            raise AssertionError(f"{what}: output head {wrong} should equal input head {wrong // n_rep}.{hint}")


# ----- kv_cache_size_bytes -----------------------------------------------------------------------


def check_kv_cache_size_bytes(fn: Callable) -> None:
    """``fn(n_layers, n_kv_heads, head_dim, seq_len, batch_size=1, dtype=torch.bfloat16)`` in bytes."""
    rng = _rng()
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]
    cases = [(16, 8, 64, 8192, 1, torch.float32), (30, 3, 64, 8192, 1, torch.bfloat16), (80, 8, 128, 4096, 4, torch.float16)]
    cases += [(rng.randrange(1, 100), rng.randrange(1, 17), rng.choice([32, 64, 80, 128, 7]), rng.randrange(1, 200_000),
               rng.randrange(1, 33), rng.choice(dtypes)) for _ in range(20)]
    for n_layers, n_kv_heads, head_dim, seq_len, batch_size, dtype in cases:
        size = torch.empty((), dtype=dtype).element_size()
        expected = 2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * size
        call = (f"kv_cache_size_bytes(n_layers={n_layers}, n_kv_heads={n_kv_heads}, head_dim={head_dim}, "
                f"seq_len={seq_len}, batch_size={batch_size}, dtype={dtype})")
        got = fn(n_layers, n_kv_heads, head_dim, seq_len, batch_size=batch_size, dtype=dtype)
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if isinstance(got, bool) or not isinstance(got, int):
            raise AssertionError(f"{call} must return an int (a number of bytes), got {type(got).__name__} {got!r}")
        if got != expected:
            hints = []
            if 2 * got == expected:
                hints.append(" That is half: the cache holds keys AND values (the factor 2).")
            if got * size == expected:
                hints.append(f" Did you count elements, not bytes? Multiply by the element size ({size} bytes for {dtype}).")
            hint = "".join(hints)
            raise AssertionError(f"{call} returned {got:,}; expected {expected:,} = 2 * n_layers * n_kv_heads * head_dim * "
                                 f"seq_len * batch_size * {size} bytes.{hint}")
    # the default dtype is bfloat16
    got = fn(2, 3, 4, 5)
    if got != 2 * 2 * 3 * 4 * 5 * 2:
        raise AssertionError(f"kv_cache_size_bytes(2, 3, 4, 5) with the defaults (batch_size=1, dtype=torch.bfloat16) "
                             f"returned {got!r}; expected {2 * 2 * 3 * 4 * 5 * 2}")


# ----- gqa_forward -------------------------------------------------------------------------------


def check_gqa_forward(fn: Callable) -> None:
    """``fn(x, q_weight, k_weight, v_weight, o_weight, n_heads, n_kv_heads, cos, sin)`` = causal GQA
    with RoPE, equal to the package's ``GroupedQueryAttention``."""
    rng = _rng()
    g = _generator(rng)
    configs = [(9, 3, 8, 2, 7), (4, 1, 6, 1, 1), (4, 4, 4, 3, 5)]
    for _ in range(8):
        n_kv = rng.randrange(1, 5)
        n_rep = rng.randrange(1, 5)
        configs.append((n_kv * n_rep, n_kv, rng.choice([2, 4, 6, 8, 16]), rng.randrange(1, 4), rng.choice([1, 2, rng.randrange(3, 14)])))
    for n_heads, n_kv_heads, head_dim, batch, seq_len in configs:
        dim = n_heads * head_dim
        layer = GroupedQueryAttention(dim, n_heads, n_kv_heads)
        layer.use_sdpa = False
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0.0, dim**-0.5, generator=g)   # unit-variance projections
        x = torch.randn(batch, seq_len, dim, generator=g)
        cos, sin = precompute_rope(head_dim, seq_len + rng.randrange(0, 5), theta=rng.choice([10000.0, 100000.0]))
        with torch.no_grad():
            expected = layer(x, cos, sin)
        weights = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.o_proj.weight]
        originals = [w.detach().clone() for w in weights]
        what = (f"gqa_forward(x {tuple(x.shape)}, q_weight {tuple(weights[0].shape)}, k_weight "
                f"{tuple(weights[1].shape)}, v_weight {tuple(weights[2].shape)}, o_weight {tuple(weights[3].shape)}, "
                f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, cos/sin {tuple(cos.shape)})")
        with torch.no_grad():
            got = fn(x.clone(), *[w.detach().clone() for w in weights], n_heads, n_kv_heads, cos, sin)
        if not all(torch.equal(w.detach(), o) for w, o in zip(weights, originals)):
            raise AssertionError(f"{what} modified the weights")
        hint = ""
        got_t = _as_tensor(got, what)
        if got_t.shape == expected.shape and not torch.allclose(got_t, expected, rtol=1e-4, atol=1e-5):
            if seq_len > 1 and torch.allclose(got_t[:, :1], expected[:, :1], rtol=1e-4, atol=1e-5):
                hint = ("Position 0 is right but later ones are not: check the causal mask (query t sees keys 0 .. t) and "
                        "RoPE (apply_rope to both q and k: position t is rotated by t).")
            else:
                hint = ("Steps: q = x @ q_weight.T, split into [B, n_heads, T, head_dim] (view then transpose(1, 2)); the "
                        "same for k, v with n_kv_heads; apply_rope(q, cos, sin) and apply_rope(k, cos, sin); repeat each "
                        "kv head n_heads // n_kv_heads times next to itself; causal softmax(q k^T / sqrt(head_dim)) v; "
                        "merge heads back to [B, T, n_heads * head_dim]; @ o_weight.T.")
        _compare(got, expected, what, hint, rtol=1e-4, atol=1e-5)


CHECKS = {
    "causal_attention_mask": check_causal_attention_mask,
    "scaled_dot_product": check_scaled_dot_product,
    "gqa_group_of_head": check_gqa_group_of_head,
    "repeat_kv_heads": check_repeat_kv_heads,
    "kv_cache_size_bytes": check_kv_cache_size_bytes,
    "gqa_forward": check_gqa_forward,
}
