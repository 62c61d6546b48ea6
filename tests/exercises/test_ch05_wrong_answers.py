"""Chapter 5's checks reject the stubs and plausible wrong answers, and accept the solutions and
correct answers written differently."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llama_from_scratch.course.checks.ch05_attention import CHECKS

from answers import fails_on, solution, solution_and_stub_tests, stub

SOLUTION = solution("ch05_attention")
STUB = stub("ch05_attention")
fails = fails_on(CHECKS)
test_solution_passes, test_stub_fails = solution_and_stub_tests(CHECKS, SOLUTION, STUB)


# ----- attention_mask_4d --------------------------------------------------------------------------

def _mask_variant(**changes):
    def attention_mask_4d(padding_mask, q_len, sliding_window=None):
        b, s = padding_mask.shape
        if changes.get("top_left"):
            q_pos = torch.arange(q_len)[:, None]
        else:
            q_pos = torch.arange(s - q_len, s)[:, None]
        k_pos = torch.arange(s)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed = allowed & ((k_pos >= q_pos - sliding_window) if changes.get("window_off_by_one")
                                 else (k_pos > q_pos - sliding_window))
        allowed = allowed[None, None].expand(b, 1, q_len, s)
        if changes.get("pad_queries"):
            allowed = allowed & padding_mask.bool()[:, None, s - q_len:, None]
        elif not changes.get("no_padding"):
            allowed = allowed & padding_mask.bool()[:, None, None, :]
        return allowed[:, 0] if changes.get("no_head_dim") else allowed
    return attention_mask_4d


@pytest.mark.parametrize("change", ["top_left", "window_off_by_one", "pad_queries", "no_padding", "no_head_dim"])
def test_attention_mask_4d_wrong(change):
    assert fails("attention_mask_4d", _mask_variant(**{change: True}))


def test_attention_mask_4d_right_variant_passes():
    assert CHECKS["attention_mask_4d"](_mask_variant()) is None


def test_attention_mask_4d_other_form_passes():
    def attention_mask_4d(padding_mask, q_len, sliding_window=None):   # distances, then broadcasting
        s = padding_mask.shape[-1]
        distance = (torch.arange(s - q_len, s)[:, None] - torch.arange(s)[None, :])   # query pos - key pos
        window = s if sliding_window is None else sliding_window
        allowed = (distance >= 0) & (distance < window)
        return torch.logical_and(allowed.unsqueeze(0), padding_mask.unsqueeze(1).ne(0)).unsqueeze(1)
    assert CHECKS["attention_mask_4d"](attention_mask_4d) is None


# ----- flash_attention ----------------------------------------------------------------------------

def _flash_variant(**changes):
    def flash_attention(q, k, v, block_size, causal=True):
        t, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
        scale = 1.0 / d if changes.get("scale_by_d") else 1.0 / math.sqrt(d)
        q_pos = (torch.arange(t) if changes.get("top_left") else torch.arange(s - t, s))[:, None]
        m = torch.full(q.shape[:-1] + (1,), float("-inf"))
        l = torch.zeros(q.shape[:-1] + (1,))
        acc = torch.zeros_like(q)
        end = s - s % block_size if changes.get("drop_remainder") else s
        for start in range(0, end, block_size):
            kb, vb = k[..., start:start + block_size, :], v[..., start:start + block_size, :]
            scores = q @ kb.transpose(-2, -1) * scale
            if causal:
                scores = scores.masked_fill(torch.arange(start, start + kb.shape[-2])[None, :] > q_pos, float("-inf"))
            if changes.get("no_max"):
                p = torch.exp(scores)
                l, acc = l + p.sum(-1, keepdim=True), acc + p @ vb
                m = torch.zeros_like(m)
                continue
            m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - m_safe)
            c = torch.exp(m - m_safe)
            l = l * c + p.sum(-1, keepdim=True)
            acc = (acc if changes.get("no_rescale") else acc * c) + p @ vb
            m = m_new
        lse = torch.log(l) if changes.get("lse_without_max") else m + torch.log(l)
        return acc / l, lse.squeeze(-1)
    return flash_attention


@pytest.mark.parametrize("change", ["scale_by_d", "top_left", "drop_remainder", "no_max", "no_rescale",
                                    "lse_without_max"])
def test_flash_attention_wrong(change):
    assert fails("flash_attention", _flash_variant(**{change: True}))


def test_flash_attention_right_variant_passes():
    assert CHECKS["flash_attention"](_flash_variant()) is None


def test_flash_attention_other_form_passes():
    def flash_attention(q, k, v, block_size, causal=True):   # two passes over the blocks, last block first
        t, s = q.shape[-2], k.shape[-2]
        starts = list(range(0, s, block_size))[::-1]
        q_pos = torch.arange(s - t, s)[:, None]

        def block_scores(start):
            kb = k[..., start:start + block_size, :]
            sc = (q / math.sqrt(q.shape[-1])) @ kb.transpose(-2, -1)
            if causal:
                sc = sc.masked_fill(torch.arange(start, start + kb.shape[-2]) > q_pos, float("-inf"))
            return sc

        m = torch.stack([block_scores(st).amax(-1) for st in starts]).amax(0)[..., None]   # pass 1: row maxima
        l, acc = 0.0, 0.0
        for st in starts:                                                                   # pass 2: sums
            p = torch.exp(block_scores(st) - m)
            l, acc = l + p.sum(-1, keepdim=True), acc + p @ v[..., st:st + block_size, :]
        return acc / l, (m + l.log()).squeeze(-1)
    assert CHECKS["flash_attention"](flash_attention) is None


# ----- GQAttention --------------------------------------------------------------------------------

def make_gqa(**changes):
    mask_fn = SOLUTION["attention_mask_4d"]

    class GQAttention(nn.Module):
        def __init__(self, dim, n_heads, n_kv_heads, rope_theta=10000.0):
            super().__init__()
            self.n_heads, self.n_kv_heads, self.head_dim, self.theta = n_heads, n_kv_heads, dim // n_heads, rope_theta
            self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
            if changes.get("cache_in_state_dict"):
                self.register_buffer("kv_slots", torch.zeros(2, 1, n_kv_heads, 16, self.head_dim))  # persistent
            self.reset_cache()

        def reset_cache(self):
            self.k_cache = self.v_cache = None

        def rope(self, x, positions):
            d = self.head_dim
            inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2).float() / d)
            emb = (positions[..., None].float() * inv_freq).repeat(1, 1, 2)[:, None]
            return x * emb.cos() + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * emb.sin()

        def forward(self, x, attention_mask=None, use_cache=False):
            b, t, _ = x.shape
            past = self.k_cache.shape[2] if use_cache and self.k_cache is not None else 0
            if attention_mask is None:
                attention_mask = torch.ones(b, past + t, dtype=torch.long)
            if changes.get("positions_restart"):
                positions = torch.arange(t)[None].expand(b, t)
            else:
                positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
            shape = (b, t, -1, self.head_dim)
            q = self.q_proj(x).view(shape).transpose(1, 2)
            k = self.k_proj(x).view(shape).transpose(1, 2)
            v = self.v_proj(x).view(shape).transpose(1, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            if use_cache:
                if self.k_cache is not None:
                    k, v = torch.cat((self.k_cache, k), 2), torch.cat((self.v_cache, v), 2)
                self.k_cache, self.v_cache = k, v
            n_rep = self.n_heads // self.n_kv_heads
            if changes.get("tiled_heads"):
                k, v = k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1)
            else:
                k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if changes.get("top_left"):
                allowed = torch.ones(t, k.shape[2], dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
            elif changes.get("no_key_padding"):
                allowed = mask_fn(torch.ones_like(attention_mask), t)
            else:
                allowed = mask_fn(attention_mask, t)
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            if not changes.get("nan_rows"):
                weights = weights.nan_to_num(0.0)
            return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))

    return GQAttention


@pytest.mark.parametrize("change", ["cache_in_state_dict", "no_key_padding", "positions_restart",
                                    "tiled_heads", "top_left", "nan_rows"])
def test_gqattention_wrong(change):
    assert fails("GQAttention", make_gqa(**{change: True}))


def test_gqattention_right_variant_passes():
    assert CHECKS["GQAttention"](make_gqa()) is None


def test_gqattention_other_form_passes():
    class GQAttention(nn.Module):       # preallocated cache slots, an additive mask, expand for the kv heads
        def __init__(self, dim, n_heads, n_kv_heads, rope_theta=10000.0):
            super().__init__()
            self.h, self.kv, self.d, self.theta = n_heads, n_kv_heads, dim // n_heads, rope_theta
            self.q_proj = nn.Linear(dim, n_heads * self.d, bias=False)
            self.k_proj = nn.Linear(dim, n_kv_heads * self.d, bias=False)
            self.v_proj = nn.Linear(dim, n_kv_heads * self.d, bias=False)
            self.o_proj = nn.Linear(n_heads * self.d, dim, bias=False)
            self.register_buffer("slots", torch.zeros(0), persistent=False)
            self.reset_cache()

        def reset_cache(self):
            self.length = 0
            self.slots = torch.zeros(0)

        def forward(self, x, attention_mask=None, use_cache=False):
            b, t, _ = x.shape
            past = self.length if use_cache else 0
            s = past + t
            mask = torch.ones(b, s) if attention_mask is None else attention_mask.float()
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
            inv = torch.pow(self.theta, -torch.arange(0, self.d, 2).float() / self.d)
            ang = pos[..., None] * inv
            cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]

            def rot(z):
                z1, z2 = z.chunk(2, dim=-1)
                return z * cos + torch.cat((-z2, z1), -1) * sin

            q = rot(self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2))
            k = rot(self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2))
            v = self.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
            if use_cache:
                if self.slots.numel() == 0 or self.slots.shape[3] < s:
                    grown = torch.zeros(2, b, self.kv, max(2 * s, 16), self.d)
                    if self.slots.numel():
                        grown[:, :, :, :past] = self.slots[:, :, :, :past]
                    self.slots = grown
                self.slots[0, :, :, past:s], self.slots[1, :, :, past:s] = k, v
                self.length = s
                k, v = self.slots[0, :, :, :s], self.slots[1, :, :, :s]
            rep = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, rep, s, self.d).reshape(b, self.h, s, self.d)
            v = v[:, :, None].expand(b, self.kv, rep, s, self.d).reshape(b, self.h, s, self.d)
            visible = (torch.arange(s)[None, :] <= torch.arange(past, s)[:, None]) & mask.bool()[:, None, None, :]
            bias = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
            weights = torch.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5 + bias, dim=-1)
            return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, self.h * self.d))

    assert CHECKS["GQAttention"](GQAttention) is None
